"""The user examples under examples/python/ run: each script with --quick, as a user would run it, in a subprocess.

Every script checks its own result (loss decreasing, accumulated == whole-batch merged gradient, DDP ranks identical
and equal to one process, Lightning resume exact and GMD state round-tripping, GradScaler skipping overflowing
steps) and ends with one "OK <name>: ..." line; a failed check exits non-zero. The subprocess imports the same
gmd_ext as this test process.
"""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

import gmd_ext

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "python"
SCRIPTS = ["own_model", "amp", "accumulation", "ddp", "lightning_manual", "lightning_auto", "monai_segresnet"]
needs_lightning = pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                                     reason="lightning is not installed (it is in the [test] extra)")


def run(script, *args, timeout=300):
    env = dict(os.environ)
    # The gmd_ext this test imported, first on the path; one intra-op thread (tiny tensors on a shared box).
    package_root = str(pathlib.Path(gmd_ext.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(EXAMPLES / f"{script}.py"), "--quick", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=str(ROOT))
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"{script}.py --quick {' '.join(args)} exited {proc.returncode}:\n{out[-6000:]}", pytrace=False)
    ok = [line for line in proc.stdout.splitlines() if line.startswith(f"OK {script}")]
    if not ok:
        pytest.fail(f"{script}.py printed no 'OK {script}' line:\n{out[-6000:]}", pytrace=False)
    return ok[0]


@pytest.mark.parametrize("script", ["own_model", "amp", "accumulation", "ddp"])
def test_example(script):
    run(script)


@pytest.mark.skipif(importlib.util.find_spec("monai") is None, reason="monai is not installed (it is in the [test] extra)")
def test_monai_segresnet():
    line = run("monai_segresnet")
    assert "GMD source Branches()" in line  # the DS model's marked branches picked the per-branch source


@needs_lightning
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_lightning_manual(precision):
    line = run("lightning_manual", "--precision", precision)
    assert precision in line  # the script reports which precision actually ran


@needs_lightning
@pytest.mark.parametrize("precision", ["16-mixed", "32-true"])
def test_lightning_auto(precision):
    line = run("lightning_auto", "--precision", precision)
    assert precision in line
    if precision == "32-true":
        assert "== the plain loop" in line  # fp32: the Lightning run equals the plain GMD loop bit for bit


def test_every_example_is_tested_and_listed():
    scripts = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    assert scripts == sorted(SCRIPTS), f"untested or missing examples: {scripts} vs {sorted(SCRIPTS)}"
    readme = (EXAMPLES / "README.md").read_text()
    missing = [s for s in scripts if f"{s}.py" not in readme]
    assert not missing, f"examples/python/README.md does not list {missing}"
