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
