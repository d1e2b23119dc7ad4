"""Package metadata and the API reference stay true: the LICENSE ships in the wheel, the version agrees across
pyproject.toml, gmd_ext and CITATION.cff, and every public name is in docs/api (built by CI with
``python -m sphinx -W -b html docs/api <folder>``)."""
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import gmd_ext

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_license_and_metadata():
    assert PYPROJECT["license"] == "MIT"
    for name in PYPROJECT["license-files"]:
        assert "MIT License" in (ROOT / name).read_text()
    assert PYPROJECT["authors"] and PYPROJECT["urls"]
    assert "Typing :: Typed" in PYPROJECT["classifiers"] and (ROOT / "gmd_ext" / "py.typed").exists()
    assert not any(c.startswith("License ::") for c in PYPROJECT["classifiers"])  # PEP 639: the expression only
    assert gmd_ext.__version__ == PYPROJECT["version"]
    assert f"## [{PYPROJECT['version']}]" in (ROOT / "CHANGELOG.md").read_text()


def test_citation_cff():
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["version"] == PYPROJECT["version"] and cff["license"] == "MIT"
    paper = cff["preferred-citation"]
    assert paper["title"] == "Gradient-Guided Modality Decoupling for Missing-Modality Robustness"
    assert [a["family-names"] for a in paper["authors"]] == ["Wang", "Luo", "Hu", "Zhang"]
    assert paper["year"] == 2024 and "2402.16318" in paper["url"]


def test_every_public_name_is_in_the_api_reference():
    index = (ROOT / "docs" / "api" / "index.rst").read_text()
    documented = set(re.findall(r"^\.\. auto\w+:: ([\w.]+)", index, re.M))
    modules = set(re.findall(r"^\.\. automodule:: ([\w.]+)", index, re.M))
    for name in gmd_ext.__all__:
        if name != "__version__":  # the modules gmd_ext.ops and gmd_ext.monitor are documented whole
            assert f"gmd_ext.{name}" in documented, f"gmd_ext.{name} is public but not in docs/api/index.rst"
    for module in ("gmd_ext.gmd", "gmd_ext.ds", "gmd_ext.ops", "gmd_ext.monitor", "gmd_ext.lightning",
                   "gmd_ext.metrics.brats", "gmd_ext.metrics.sentiment", "gmd_ext.data.brats", "gmd_ext.data.phantom",
                   "gmd_ext.data.mmsa", "gmd_ext.data.synthetic_mosi"):
        assert module in modules, f"{module} is not in docs/api/index.rst"


@pytest.mark.skipif(os.environ.get("GMD_EXT_INSTALL_TEST") != "1",
                    reason="builds a wheel with build isolation (fetches setuptools): GMD_EXT_INSTALL_TEST=1")
def test_wheel_ships_the_license(tmp_path):
    # Build isolation on: no torch in the build environment, so a pure-Python wheel in seconds (no compile).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, timeout=600)
    wheel, = tmp_path.glob("gmd_ext-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        license_file = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
        assert "MIT License" in z.read(license_file).decode()
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata
    assert "Classifier: Typing :: Typed" in metadata and "Project-URL: Paper" in metadata
    assert "gmd_ext/py.typed" in names and "gmd_ext/lightning.py" in names
