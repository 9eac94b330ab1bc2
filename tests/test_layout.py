"""The package's import structure: no cycles, and imports only run downhill.

Reads every module with ``ast`` (nothing is imported), collects every ``import`` and
``from ... import`` of an ilstudio module (relative ones resolved), lazy ones inside functions
included, and every ``importlib.import_module(...)`` / ``import_module(...)`` /
``__import__(...)`` call whose module name is a string literal, and checks them against the
layer order README's "Layout" section documents (LAYERS below, numbered from 1 as README
numbers them). A module may import its own layer or any layer below it, never one above.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "ilstudio"

# Bottom to top, as README's "Layout" section lists them.
LAYERS = (
    ("ilstudio.errors", "ilstudio.rundir"),
    ("ilstudio.config",),
    ("ilstudio.data", "ilstudio.models"),
    ("ilstudio.policies",),
    ("ilstudio.resolve", "ilstudio.plan", "ilstudio.resume", "ilstudio.cli", "ilstudio.tools"),
    ("ilstudio.training", "ilstudio.sim"),
    ("ilstudio.eval", "ilstudio.main"),
)


def module_files() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


IMPORT_CALLS = {"import_module", "__import__"}


def _package_of(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts if parts[-1] == "__init__" else parts[:-1])


def _absolute(node: ast.ImportFrom, path: Path) -> str | None:
    """The module a ``from ... import`` reads, relative levels resolved against ``path``."""
    if node.level == 0:
        return node.module
    base = _package_of(path).split(".")
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _called_import(node: ast.Call) -> str | None:
    """The literal module name of ``importlib.import_module("x")`` / ``__import__("x")``."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name in IMPORT_CALLS and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        return node.args[0].value
    return None


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The ilstudio modules ``path`` imports (``from pkg import mod`` counts as pkg.mod)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "ilstudio"}
        elif isinstance(node, ast.Call) and (target := _called_import(node)) \
                and target.split(".")[0] == "ilstudio":
            found.add(target)
        elif isinstance(node, ast.ImportFrom) and (module := _absolute(node, path)) \
                and module.split(".")[0] == "ilstudio":
            subs = {f"{module}.{a.name}" for a in node.names} & modules.keys()
            found |= subs or {module}
            if len(subs) < len(node.names):  # names that are not modules come from the module
                found.add(module)
    return found


def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(f, modules) - {name} for name, f in modules.items()}


def layer_of(module: str) -> int:
    """The module's layer, numbered from 1 as README's "Layout" numbers them."""
    for i, group in enumerate(LAYERS, start=1):
        if any(module == top or module.startswith(top + ".") for top in group):
            return i
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS and README's Layout")


def _layer_name(module: str) -> str:
    return " / ".join(top.removeprefix("ilstudio.") for top in LAYERS[layer_of(module) - 1])


def test_every_module_has_a_layer():
    for name in module_files():
        if name != "ilstudio":
            layer_of(name)


def test_imports_run_downhill():
    upward = []
    for name, deps in graph().items():
        if name == "ilstudio":
            continue
        for dep in deps:
            if dep != "ilstudio" and layer_of(dep) > layer_of(name):
                upward.append(f"{name} (layer {layer_of(name)}, {_layer_name(name)}) imports "
                              f"{dep} (layer {layer_of(dep)}, {_layer_name(dep)})")
    assert not upward, "imports that run uphill:\n  " + "\n  ".join(sorted(upward))


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(edges.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(edges):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_claim():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("ilstudio.rundir") < layer_of("ilstudio.config.settings") \
        < layer_of("ilstudio.models.lora") < layer_of("ilstudio.policies.vla.modeling") \
        < layer_of("ilstudio.resolve") < layer_of("ilstudio.training.run") < layer_of("ilstudio.main")
    modules = module_files()
    assert "ilstudio.config.settings" in imports_of(modules["ilstudio.resolve"], modules)
    assert layer_of("ilstudio.errors") == 1 and layer_of("ilstudio.main") == len(LAYERS)


def test_dynamic_and_relative_imports_are_seen(tmp_path, monkeypatch):
    """importlib.import_module / __import__ with a literal name, and relative imports, count."""
    pkg = tmp_path / "ilstudio" / "data"
    pkg.mkdir(parents=True)
    src = pkg / "sneaky.py"
    src.write_text("import importlib\nfrom importlib import import_module\n"
                   "def f():\n    importlib.import_module('ilstudio.training.run')\n"
                   "    import_module('ilstudio.eval')\n    __import__('ilstudio.main')\n"
                   "    importlib.import_module(name)  # not a literal: cannot be known\n"
                   "from ..policies import base\nfrom . import episodes\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    modules = {"ilstudio.policies.base": src, "ilstudio.data.episodes": src}
    assert imports_of(src, modules) == {"ilstudio.training.run", "ilstudio.eval", "ilstudio.main",
                                        "ilstudio.policies.base", "ilstudio.data.episodes"}


def test_readme_layout_lists_the_layers():
    """README's Layout section names every layer's packages, bottom to top, in this order."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\d+\. .*?(?=^\d+\. |^\s*$)", section, re.M | re.S)
    assert len(rows) == len(LAYERS), rows
    for row, group in zip(rows, LAYERS, strict=True):
        for top in group:
            short = top.removeprefix("ilstudio.")
            assert f"`{short}" in row, (short, row)


def test_no_function_is_longer_than_60_lines():
    """Long functions hide several jobs; README's style asks for small ones (60 lines at most)."""
    long = []
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, "functions over 60 lines:\n  " + "\n  ".join(long)
