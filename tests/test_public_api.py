"""The import paths users have keep working: each re-export module imports by its own name and hands out the very
objects of their home (not copies), and every public name it lists exists. Each path is checked in a fresh
interpreter too, since an attribute bound by an earlier import can hide a module that `import` cannot find."""
import importlib
import subprocess
import sys

import pytest

import gmd_ext

# public path -> home module; every name of the public module's __all__ must be the home's object
REEXPORTS = {
    "gmd_ext.monitor": "gmd_ext.gmd.monitor",
    "gmd_ext.models": None,  # two homes, below
    "gmd_ext.data.brats": "gmd_ext.apps.brats.data",
    "gmd_ext.data.phantom": "gmd_ext.apps.brats.phantom",
    "gmd_ext.data.mmsa": "gmd_ext.apps.mosi.mmsa",
    "gmd_ext.data.synthetic_mosi": "gmd_ext.apps.mosi.synthetic",
    "gmd_ext.metrics.brats": "gmd_ext.apps.brats.metrics",
    "gmd_ext.metrics.sentiment": "gmd_ext.apps.mosi.metrics",
}


def _import_or_skip(name):
    try:
        return importlib.import_module(name)
    except ImportError as e:  # an optional dependency of the application (nibabel, scikit-learn)
        if e.name and e.name.split(".")[0] != "gmd_ext":
            pytest.skip(f"{name} needs {e.name}")
        raise


@pytest.mark.parametrize("public, home", sorted(REEXPORTS.items()))
def test_reexport_is_its_home(public, home):
    mod = _import_or_skip(public)
    assert mod.__all__, public
    if home is None:
        from gmd_ext.apps.brats.model import DSUNet3d
        from gmd_ext.apps.mosi.model import DSSentimentNet
        assert mod.DSUNet3d is DSUNet3d and mod.DSSentimentNet is DSSentimentNet
        return
    origin = importlib.import_module(home)
    for name in mod.__all__:
        assert getattr(mod, name) is getattr(origin, name), f"{public}.{name}"
    # nothing public at home is missing from the public path
    assert set(getattr(origin, "__all__", mod.__all__)) <= set(mod.__all__)


STATEMENTS = [
    "import gmd_ext.monitor; gmd_ext.monitor.DominanceMonitor",
    "from gmd_ext.monitor import DominanceMonitor",
    "import gmd_ext; gmd_ext.monitor.DominanceMonitor",
    "from gmd_ext.models import DSUNet3d, DSSentimentNet",
    "import gmd_ext.data.brats; gmd_ext.data.brats.BraTSDataset",
    "from gmd_ext.data import phantom; phantom.make_cases",
    "import gmd_ext.data.phantom",
    "from gmd_ext.data.mmsa import load_mmsa",
    "from gmd_ext.data import load_mmsa, BraTSDataset, synthetic_mosi; synthetic_mosi.make",
    "import gmd_ext.metrics.brats; gmd_ext.metrics.brats.brats_hd95",
    "from gmd_ext.metrics import brats_dice, brats_hd95",
    "from gmd_ext.metrics.brats import brats_dice, labels_to_regions",
]


def test_paths_in_a_fresh_interpreter():
    """Each statement as a user writes it, in one fresh interpreter per statement group: first the statement
    alone (no earlier import binds anything), then all of them in order (no import-order cycle)."""
    for first in (STATEMENTS[0], STATEMENTS[3], STATEMENTS[4]):
        code = "\n".join([first, *STATEMENTS])
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        if r.returncode and "No module named 'nibabel'" in r.stderr:
            pytest.skip("nibabel is not installed")
        assert r.returncode == 0, f"{first}:\n{r.stderr[-2000:]}"


@pytest.mark.parametrize("statement", STATEMENTS)
def test_paths_in_this_interpreter(statement):
    exec(statement, {})


def test_lazy_names_resolve_to_the_modules():
    import gmd_ext.data
    import gmd_ext.metrics

    assert gmd_ext.monitor is importlib.import_module("gmd_ext.monitor")
    assert gmd_ext.monitor.DominanceMonitor is importlib.import_module("gmd_ext.gmd.monitor").DominanceMonitor
    for pkg in (gmd_ext.data, gmd_ext.metrics):
        for name in pkg.__all__:
            try:
                getattr(pkg, name)
            except ImportError as e:
                if e.name and e.name.split(".")[0] != "gmd_ext":
                    continue
                raise
    assert gmd_ext.data.phantom is importlib.import_module("gmd_ext.data.phantom")
    assert gmd_ext.metrics.brats_hd95 is importlib.import_module("gmd_ext.apps.brats.metrics").brats_hd95
    with pytest.raises(AttributeError, match="gmd_ext.data' has no attribute 'nope'"):
        gmd_ext.data.nope
    with pytest.raises(AttributeError, match="gmd_ext.metrics' has no attribute 'nope'"):
        gmd_ext.metrics.nope


def test_top_level_names():
    for name in gmd_ext.__all__:
        assert hasattr(gmd_ext, name), name


def test_import_pulls_no_optional_dependency():
    """`import gmd_ext` (and the lazy packages) import none of the extras: an optional dependency is imported by the
    module that needs it, when it is used."""
    code = ("import sys, gmd_ext, gmd_ext.data, gmd_ext.metrics\n"
            "extras = {'lightning', 'pytorch_lightning', 'scipy', 'monai', 'nibabel', 'nilearn', 'sklearn', "
            "'matplotlib', 'triton', 'torchjd'}\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & extras))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout
