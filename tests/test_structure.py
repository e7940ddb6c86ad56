"""The package's shape, read from its source: layers import only downward, no import cycles, imports at module top
(except optional dependencies), small functions and files."""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dms_megatron"
# bottom (0) to top; a module may import its own layer and the layers below
LAYERS = {"core": 0, "config": 1, "megatron": 2, "data": 2, "checkpoint": 3, "convert": 3, "training": 4,
          "inference": 4, "eval": 5, "launch": 6}
# imports a function may make lazily, each because the package must work without it
OPTIONAL = {"triton", "transformer_engine", "flash_attn", "wandb"}
MAX_FUNCTION_LINES, MAX_FILE_LINES = 80, 500


def _modules():
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _targets(node, module: str):
    """The package modules an import statement names (``from pkg import submodule`` -> the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("dms_megatron")]
    base = node.module or ""
    if node.level:  # relative import
        pkg = module.split(".")[: -node.level] if MODULES[module].name != "__init__.py" else module.split(".")
        base = ".".join(pkg + ([base] if base else []))
    if not base.startswith("dms_megatron"):
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _graph():
    edges, lazy = defaultdict(set), []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for n in ast.walk(fn):
                if isinstance(n, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or "."]
                    lazy += [(mod, fn.name, name) for name in names]
        for n in ast.walk(tree):
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                edges[mod].update(t for t in _targets(n, mod) if t != mod)
    return edges, lazy


def _is_package(name: str) -> bool:
    return (PKG / name).is_dir()


def _layer(mod: str):
    """A subpackage's layer; the package root and its single-file modules (e.g. progress.py) sit at the bottom."""
    parts = mod.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 and _is_package(parts[1]) else 0


def test_every_subpackage_has_a_layer():
    subpackages = {m.split(".")[1] for m in MODULES if m.count(".") >= 1 and _is_package(m.split(".")[1])}
    assert subpackages <= set(LAYERS), sorted(subpackages - set(LAYERS))


def test_layers_import_only_downward():
    edges, _ = _graph()
    upward = [(a, b) for a, bs in edges.items() for b in bs if _layer(b) > _layer(a)]
    assert not upward, upward


def test_no_import_cycles_between_modules():
    edges, _ = _graph()
    state, cycle = {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                cycle.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])
    assert not cycle, cycle[0]


def test_imports_sit_at_module_top_except_optional_dependencies():
    _, lazy = _graph()
    bad = [(m, f, name) for m, f, name in lazy if name.split(".")[0] not in OPTIONAL]
    assert not bad, bad


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_functions_and_files_are_small(path):
    source = path.read_text()
    assert source.count("\n") <= MAX_FILE_LINES
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_the_checks_see_a_violation():
    """The graph reader finds an upward import and a lazy one when they are there (a check that cannot fail is
    none)."""
    tree = ast.parse("from dms_megatron.launch import refit\n\ndef f():\n    import json\n")
    targets = [t for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for t in _targets(n, "dms_megatron.core")]
    assert targets == ["dms_megatron.launch.refit"] and _layer(targets[0]) > _layer("dms_megatron.core.masks")
