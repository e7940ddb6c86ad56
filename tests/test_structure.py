"""The package's shape, read from its source: layers import only downward, no import cycles, imports at module top
(except optional dependencies), small functions and files."""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dms_megatron"
# bottom (0) to top; a module may import its own layer and the layers below
LAYERS = {"core": 0, "families": 0, "config": 1, "megatron": 2, "data": 2, "checkpoint": 3, "convert": 3, "training": 4,
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


def _targets(node, module: str, modules=MODULES):
    """The package modules an import statement names (``from pkg import submodule`` -> the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("dms_megatron")]
    base = node.module or ""
    if node.level:  # relative import
        is_init = module in modules and modules[module].name == "__init__.py"
        pkg = module.split(".") if is_init else module.split(".")[: -node.level]
        base = ".".join(pkg + ([base] if base else []))
    if not base.startswith("dms_megatron"):
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def _dynamic_target(node):
    """``import_module("dms_megatron.x")`` / ``importlib.import_module(...)`` with a literal name -> that module.
    (An f-string such as f"{__package__}.{name}" stays inside its own package, so its layer.)"""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
    arg = node.args[0]
    if name == "import_module" and isinstance(arg, ast.Constant) and str(arg.value).startswith("dms_megatron"):
        return arg.value
    return None


def _graph(sources=None, modules=MODULES):
    """(module -> imported package modules, [(module, function, lazily imported name, commented)]) of ``sources``
    (module name -> source text; default: the package)."""
    sources = sources or {mod: path.read_text() for mod, path in modules.items()}
    edges, lazy = defaultdict(set), []
    for mod, source in sources.items():
        lines = source.splitlines()
        tree = ast.parse(source)
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for n in ast.walk(fn):
                if isinstance(n, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or "."]
                    said = "#" in lines[n.lineno - 1] or lines[n.lineno - 2].strip().startswith("#")
                    lazy += [(mod, fn.name, name, said) for name in names]
        for n in ast.walk(tree):
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                edges[mod].update(t for t in _targets(n, mod, modules) if t != mod)
            elif _dynamic_target(n):
                edges[mod].add(_dynamic_target(n))
    return edges, lazy


def _cycles(edges) -> list:
    state, cycle = {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                cycle.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    return cycle


def _upward(edges) -> list:
    return [(a, b) for a, bs in edges.items() for b in bs if _layer(b) > _layer(a)]


def _misplaced(lazy) -> list:
    """Lazy imports of anything but an optional dependency, and lazy optional imports without a comment why."""
    return [(m, f, name) for m, f, name, said in lazy if name.split(".")[0] not in OPTIONAL or not said]


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
    assert not _upward(edges), _upward(edges)


def test_no_import_cycles_between_modules():
    edges, _ = _graph()
    assert not _cycles(edges), _cycles(edges)[0]


def test_imports_sit_at_module_top_except_optional_dependencies_with_a_reason():
    _, lazy = _graph()
    assert not _misplaced(lazy), _misplaced(lazy)


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_functions_and_files_are_small(path):
    source = path.read_text()
    assert source.count("\n") <= MAX_FILE_LINES
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_the_checks_see_a_violation():
    """Each check finds its violation when one is there (a check that cannot fail is none): an upward import (also
    through import_module), a cycle, a lazy import of a required package, a lazy optional one without a reason."""
    fake = {"dms_megatron.core.a": "from dms_megatron.launch import refit\n",
            "dms_megatron.core.b": "import importlib\nm = importlib.import_module('dms_megatron.eval.run')\n",
            "dms_megatron.data.c": "from dms_megatron.data import d\n",
            "dms_megatron.data.d": "def f():\n    import json\n    import wandb\n    import triton  # optional\n"
                                   "from dms_megatron.data import c\n"}
    modules = {m: Path(m.replace(".", "/") + ".py") for m in fake}
    edges, lazy = _graph(fake, modules)
    assert sorted(_upward(edges)) == [("dms_megatron.core.a", "dms_megatron.launch"),
                                      ("dms_megatron.core.b", "dms_megatron.eval.run")]
    assert _cycles(edges) == [["dms_megatron.data.c", "dms_megatron.data.d", "dms_megatron.data.c"]]
    assert _misplaced(lazy) == [("dms_megatron.data.d", "f", "json"), ("dms_megatron.data.d", "f", "wandb")]
