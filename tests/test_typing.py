"""tests/typing/readme_usage.py — the user-style script that CI type-checks (mypy --strict, basedpyright; commands in
its docstring) — also runs: its assertions hold at run time, so what the type checkers accept is what works."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "typing" / "readme_usage.py"


def test_readme_usage_runs():
    spec = importlib.util.spec_from_file_location("readme_usage", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    info = mod.quick_start()
    assert info.cosines.shape == (15, 15)
    step = mod.training_loop()
    assert step is not None and step.gram.shape == (7, 7)
    # an empty prediction against edema only: WT empty in one volume (the BraTS penalty), TC and ET in both (0)
    assert mod.metrics() == {"WT": 373.12866, "TC": 0.0, "ET": 0.0}
    assert mod.dynamic_sharing().shape == (2, 4, 8, 8, 8)
