"""Size limits of the GMD engine's code (issue 24): engine.py keeps only the optimizer protocol's use,
accumulation, non-finite handling and the monitor (<= 300 lines); no function in gmd_ext/gmd/ over 60 lines."""
import ast
from pathlib import Path

import gmd_ext.gmd

GMD_DIR = Path(gmd_ext.gmd.__file__).parent


def test_engine_module_is_small():
    lines = len((GMD_DIR / "engine.py").read_text().splitlines())
    assert lines <= 300, f"gmd_ext/gmd/engine.py has {lines} lines (limit 300)"


def test_no_long_functions():
    long = []
    for path in sorted(GMD_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 60 lines: " + ", ".join(long)
