"""The package's import structure: no cycles, and imports only run downhill.

Reads every module with ``ast`` (nothing is imported), collects every ``import`` and
``from ... import`` of an ilstudio module, lazy ones inside functions included, and checks
them against the layer order README's "Layout" section documents (LAYERS below). A module
may import its own layer or any layer below it, never one above.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "ilstudio"

# Bottom to top, as README's "Layout" section lists them.
LAYERS = (
    ("ilstudio.errors", "ilstudio.rundir"),
    ("ilstudio.config",),
    ("ilstudio.data", "ilstudio.models"),
    ("ilstudio.policies",),
    ("ilstudio.resolve", "ilstudio.cli", "ilstudio.tools"),
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


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The ilstudio modules ``path`` imports (``from pkg import mod`` counts as pkg.mod)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "ilstudio"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "ilstudio":
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            found |= subs or {node.module}
            if len(subs) < len(node.names):  # names that are not modules come from node.module
                found.add(node.module)
    return found


def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(f, modules) - {name} for name, f in modules.items()}


def layer_of(module: str) -> int:
    for i, group in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in group):
            return i
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS and README's Layout")


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
                upward.append(f"{name} (layer {layer_of(name)}) imports {dep} "
                              f"(layer {layer_of(dep)})")
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
