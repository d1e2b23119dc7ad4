"""Installing as a user does: `pip install .` with build isolation into a fresh virtual environment that already
holds torch, then using the package from outside the checkout (docs/design.md §4), and a failed build.

The fresh-venv test installs torch into the new environment (the running torch's version) and compiles the
kernels once (about 1-3 minutes on a 2-core box): it runs when GMD_EXT_INSTALL_TEST=1 (set by .ci/run).
"""
import json
import os
import shutil
import subprocess
import sys
import venv

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy_source(dst):
    """The checkout's sources without any build output, as a fresh clone has them."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), dst)
    for name in ("csrc", "gmd_ext", "bench"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(dst, name), ignore=shutil.ignore_patterns(
            "_C*", "_build_info.json", "_csrc", "__pycache__", "scratch", "*.md"))


def test_failed_build_leaves_the_source_tree_clean(tmp_path):
    # A build that fails (here: no working C++ compiler) writes no build record into the tree it builds.
    _copy_source(tmp_path)
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, "CXX": "false", "MAX_JOBS": "1"}, timeout=300)
    assert r.returncode != 0, r.stdout[-2000:]
    assert not (tmp_path / "gmd_ext" / "_build_info.json").exists()
    assert not list((tmp_path / "gmd_ext").glob("_C*"))


USE = """
import importlib.util, json, sys
import torch
missing = [m for m in ("nibabel", "nilearn", "tqdm", "matplotlib", "sklearn", "triton")
           if importlib.util.find_spec(m) is not None]
import gmd_ext
from gmd_ext import _backend
G = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
ours = gmd_ext.project_conflicts(G, order="sequential", backend="cpp")
ref = gmd_ext.project_conflicts(G, order="sequential", backend="torch")
torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
print(json.dumps({"package": gmd_ext.__file__, "library": _backend.LIBRARY, "optional_present": missing}))
"""


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GMD_EXT_INSTALL_TEST") != "1",
                    reason="creates a venv, installs torch and compiles the kernels (minutes): GMD_EXT_INSTALL_TEST=1")
def test_pip_install_in_a_fresh_venv(tmp_path):
    src, env_dir, elsewhere = tmp_path / "src", tmp_path / "venv", tmp_path / "elsewhere"
    src.mkdir()
    elsewhere.mkdir()
    _copy_source(src)
    venv.create(env_dir, with_pip=True)  # a plain venv: nothing but pip (and setuptools on Python < 3.12)
    py = str(env_dir / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "GMD_EXT_BACKEND")}
    env["GMD_EXT_CACHE_DIR"] = str(tmp_path / "cache")

    def run(*args, cwd=elsewhere, timeout=900):
        r = subprocess.run([py, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"{args}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    run("-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}")
    run("-m", "pip", "install", "-q", str(src))  # build isolation on: the isolated build environment has no torch

    # First use, from outside the checkout, with only torch + numpy (+ pip's own) installed: compiles once.
    first = run("-c", USE)
    assert "compiling the C++ kernels" in first.stderr, first.stderr
    info = json.loads(first.stdout)
    assert info["optional_present"] == [] and info["library"].startswith(str(tmp_path / "cache")), info
    # The cache and the build folder are private, and the library is the one its build recorded (gmd_ext/_build.py).
    build_folder = os.path.dirname(os.path.dirname(info["library"]))
    assert all(os.stat(p).st_mode & 0o777 == 0o700 for p in (tmp_path / "cache", build_folder))
    record = json.load(open(os.path.join(os.path.dirname(info["library"]), "_build_info.json")))
    assert record["library"] == os.path.basename(info["library"]) and record["size"] == os.path.getsize(info["library"])
    assert str(env_dir) in info["package"]
    # Later uses load the cached build without compiling.
    again = run("-c", USE)
    assert "compiling" not in again.stderr and json.loads(again.stdout)["library"] == info["library"]
    assert json.loads(run("-m", "gmd_ext.info").stdout)["kernels"]["loaded"] is True

    # The benches import the installed package (the checkout root is not put on sys.path).
    bench = run(str(src / "bench" / "bench_projection.py"), "--quick", "--dtypes", "float32",
                "--out", str(tmp_path / "p.csv"))
    assert f"C++ kernels: loaded ({info['library']})" in bench.stdout, bench.stdout

    # Run from the checkout, its unbuilt package would shadow the installed one: that is said, with the fix.
    r = subprocess.run([py, "-c", "import gmd_ext"], cwd=src, env=env, capture_output=True, text=True, timeout=120)
    assert "instead of the installed gmd-ext" in r.stderr and "python -P" in r.stderr, r.stderr
    fixed = run("-P", "-c", USE, cwd=src)
    assert json.loads(fixed.stdout)["library"] == info["library"]


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch can build the CUDA kernels")
def test_force_cuda_with_a_cpu_torch_fails_with_the_reason(tmp_path):
    # GMD_EXT_FORCE_CUDA=1 means "the CUDA kernels are required": with a CPU torch the build stops before compiling
    # anything, says why and names the compile-only check, and leaves no build record.
    _copy_source(tmp_path)
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, "GMD_EXT_FORCE_CUDA": "1"}, timeout=300)
    assert r.returncode != 0
    assert "GMD_EXT_FORCE_CUDA=1 requires building the CUDA kernels" in r.stderr and "CPU build" in r.stderr, r.stderr
    assert ".ci/compile_cuda.sh" in r.stderr
    assert not (tmp_path / "gmd_ext" / "_build_info.json").exists()
