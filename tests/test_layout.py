"""The package layout is the architecture (docs/design.md §2): imports point downwards only, with no cycles.

Every `import` / `from ... import` of a gmd_ext module anywhere in a gmd_ext source file (module level or inside a
function) is an edge of the import graph; the test reads the sources with `ast`, so it needs no build.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "gmd_ext"

# Layer of each top-level part of the package; a module may import its own package or strictly lower layers.
LAYERS = {
    "gmd_ext._backend": 0, "gmd_ext._build": -1, "gmd_ext.io": 0, "gmd_ext.triton": 0, "gmd_ext._C": -1,
    "gmd_ext.ops": 1,
    "gmd_ext.gmd": 2, "gmd_ext.ds": 2,
    "gmd_ext.apps.brats": 3, "gmd_ext.apps.mosi": 3, "gmd_ext.apps": 3,
    "gmd_ext.data": 4, "gmd_ext.metrics": 4, "gmd_ext.info": 4, "gmd_ext.testing": 4, "gmd_ext": 4,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    if name == "gmd_ext._C":  # the compiled extension, built or not
        return True
    rel = Path(*name.split("."))
    return (ROOT.parent / rel).with_suffix(".py").exists() or (ROOT.parent / rel / "__init__.py").exists()


def _imports(path: Path) -> set[str]:
    """The gmd_ext modules `path` imports (a `from pkg import name` counts as pkg.name when that is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "gmd_ext")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "gmd_ext":
                continue
            for a in node.names:
                out.add(f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base)
    return out


def _part(name: str) -> str:
    """The entry of LAYERS a module belongs to (longest matching prefix)."""
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return best


GRAPH = {_module_name(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


def test_graph_is_not_empty():
    assert len(GRAPH) > 30 and sum(map(len, GRAPH.values())) > 40


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    mine = _part(module)
    for dep in GRAPH[module]:
        theirs = _part(dep)
        if theirs == mine or dep == module:
            continue
        assert LAYERS[theirs] < LAYERS[mine], (
            f"{module} (layer {LAYERS[mine]}, {mine}) imports {dep} (layer {LAYERS[theirs]}, {theirs}): "
            "imports must point to a strictly lower layer (docs/design.md §2)")


def test_triton_imports_only_itself():
    for module, deps in GRAPH.items():
        if module.startswith("gmd_ext.triton"):
            assert all(d.startswith("gmd_ext.triton") for d in deps), (module, deps)


def test_no_cycles():
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in GRAPH.get(node, ()):
            # a package's __init__ importing its own submodules is how packages work, not a cycle
            if dep.startswith(node + "."):
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for module in GRAPH:
        if module not in state:
            visit(module, [module])


def test_detector_sees_an_upward_import(tmp_path):
    """The checker itself: an ops module importing the engine would be reported."""
    assert _part("gmd_ext.gmd.engine") == "gmd_ext.gmd"
    assert LAYERS[_part("gmd_ext.gmd.engine")] > LAYERS[_part("gmd_ext.ops.ds_ops")]
    assert "gmd_ext.ops.reference" in GRAPH["gmd_ext.ops.ds_ops"]
