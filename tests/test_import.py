"""`import gmd_ext` never touches a GPU, and a missing build is reported, not crashed on."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=120)


def test_import_does_not_initialise_cuda():
    # Any CUDA initialisation during import (device queries, allocations) goes through torch.cuda._lazy_init.
    code = (
        "import torch, torch.cuda\n"
        "def boom(*a, **k): raise SystemExit('CUDA was initialised during import')\n"
        "torch.cuda._lazy_init = boom\n"
        "torch.cuda.is_available = lambda: boom()\n"
        "torch.cuda.device_count = lambda: boom()\n"
        "import gmd_ext, gmd_ext.ops, gmd_ext.gmd.projection\n"
        "print('ok')\n"
    )
    r = _run(code)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


def test_info_reports_backends():
    r = _run("import gmd_ext.info, json; print(json.dumps(gmd_ext.info.report()))")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["backends"]["torch/cpu"] == "available"
    assert set(report["backends"]) >= {"cpp/cpu", "triton/cpu", "torch/cpu"}
    assert os.path.isabs(report["kernel_cache"])


def test_missing_build_is_reported_clearly():
    # The package as it is without its compiled .so (hidden from the import system, whatever the install mode):
    # import works, cpp is unavailable with a reason, an explicit request raises, auto warns once and runs.
    code = (
        "import importlib.util, warnings\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'gmd_ext._C' else real(name, *a)\n"
        "import torch, gmd_ext\n"
        "from gmd_ext import _backend\n"
        "assert not _backend.CPP_LOADED\n"
        "print(_backend.CPP_REASON)\n"
        "try:\n"
        "    gmd_ext.project_conflicts(torch.randn(2, 3), backend='cpp')\n"
        "except RuntimeError as e:\n"
        "    print('raised', e)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    gmd_ext.project_conflicts(torch.randn(2, 3))\n"
        "    gmd_ext.project_conflicts(torch.randn(2, 3))\n"
        "    print('warned', len(w))\n"
    )
    r = _run(code, GMD_EXT_BACKEND="")
    assert r.returncode == 0, r.stderr
    assert "not built" in r.stdout and "raised backend 'cpp' is unavailable" in r.stdout
    assert "warned 1" in r.stdout


def test_missing_build_in_a_checkout_names_the_fixing_command():
    # The checkout without its library: the reason says the checkout is not built and gives the command that
    # builds it (an in-place / editable build), and `python -m gmd_ext.info` says so and exits 1.
    code = (
        "import importlib.util, runpy, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'gmd_ext._C' else real(name, *a)\n"
        "sys.argv = ['gmd_ext.info']\n"
        "runpy.run_module('gmd_ext.info', run_name='__main__')\n"
    )
    r = _run(code)
    assert r.returncode == 1, r.stdout + r.stderr
    assert json.loads(r.stdout)["kernels"]["loaded"] is False
    assert "NOT loaded" in r.stderr and "pip install --no-build-isolation -e ." in r.stderr, r.stderr


def test_backend_resolution_does_no_file_io():
    # available()/resolve() run inside every op call: the build record is read once, at import.
    import builtins
    import pathlib

    import torch
    from gmd_ext import _backend

    def no_io(*a, **k):
        raise AssertionError("file I/O during backend resolution")

    saved = builtins.open, pathlib.Path.open, pathlib.Path.read_text
    builtins.open = pathlib.Path.open = pathlib.Path.read_text = no_io
    try:
        for dev in ("cpu", "cuda", "meta"):
            for name in ("cpp", "triton", "torch"):
                _backend.available(name, torch.device(dev))
        assert _backend.resolve("torch", "cpu") == "torch"
        _backend.resolve(None, "cpu")
    finally:
        builtins.open, pathlib.Path.open, pathlib.Path.read_text = saved


def test_op_call_compiles_fullgraph():
    # Backend resolution inside an op must be traceable by Dynamo (no file reads, no untraceable calls).
    import torch
    import gmd_ext

    G = torch.randn(3, 40)
    compiled = torch.compile(lambda G: gmd_ext.gram(G) + 1, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(G), gmd_ext.ops.reference.gram(G) + 1)



def test_bench_without_kernels_says_so(tmp_path):
    # A bench run without the compiled kernels says plainly that it times the fallback and how to fix it, and
    # its smoke rows go where --out says (never into the committed bench/results/).
    code = (
        "import importlib.util, runpy, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'gmd_ext._C' else real(name, *a)\n"
        f"sys.path.insert(0, {os.path.join(ROOT, 'bench')!r})\n"
        "sys.argv = ['bench_projection.py', '--quick', '--K', '2', '--dtypes', 'float32', "
        f"'--out', {str(tmp_path / 'p.csv')!r}]\n"
        f"runpy.run_path({os.path.join(ROOT, 'bench', 'bench_projection.py')!r}, run_name='__main__')\n"
    )
    r = _run(code, GMD_EXT_BACKEND="")
    assert r.returncode == 0, r.stderr
    assert "WARNING: the C++ kernels are NOT loaded" in r.stdout and "pip install --no-build-isolation -e ." in r.stdout
    assert "ours = the torch fallback" in r.stdout
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0].startswith("bench,timestamp,git_rev,machine,device,torch,gmd_ext,kernels,threads,op,provider")
    assert all(",none," in row for row in rows[1:]) and len(rows) > 1


def test_public_names_and_typing_marker():
    import gmd_ext

    missing = [name for name in gmd_ext.__all__ if not hasattr(gmd_ext, name)]
    assert not missing, missing
    assert os.path.isfile(os.path.join(os.path.dirname(gmd_ext.__file__), "py.typed"))
