"""The package's structure: no import cycle among its modules, none of them imports another inside a function
(every dependency shows at the top of the module that has it), no family knowledge outside ``backbones/`` and no
module that breaks ``nn.Module``'s contract."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
from torch import nn

import vptune
from vptune.backbones import FAMILIES

PACKAGE = Path(vptune.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = ("vptune", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package's own modules an import statement of module ``name`` loads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "vptune"]
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    if base.split(".")[0] != "vptune":
        return []
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]


def imports(name: str) -> tuple[set[str], list[str]]:
    """Module ``name``'s imports of the package: every one, and those inside a function (``where: what``)."""
    tree = ast.parse(MODULES[name].read_text())
    every, nested = set(), []
    for function in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]:
        for node in ast.walk(function):
            if isinstance(node, ast.Import | ast.ImportFrom):
                nested += [f"{name}.{function.name}: {target}" for target in imported(name, node)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            every.update(imported(name, node))
    return every, nested


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk (each as the path that closes it)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_walk_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve_to_modules() -> None:
    edges = imports("vptune.sweep.plan")[0]
    assert {"vptune.engine", "vptune.methods", "vptune.runs"} <= edges
    assert "vptune.backbones.tokens" in imports("vptune.backbones.vit")[0]


def test_no_import_cycle() -> None:
    graph = {name: imports(name)[0] & set(MODULES) for name in MODULES}
    assert sum(map(len, graph.values())) > 50  # the graph was read
    assert cycles(graph) == []


def test_no_module_imports_the_package_inside_a_function() -> None:
    assert [line for name in MODULES for line in imports(name)[1]] == []


def test_nothing_imports_the_command_line() -> None:
    importers = [name for name in MODULES if "vptune.cli" in imports(name)[0]]
    assert importers == []


# --- family knowledge stays in backbones/ -------------------------------------------------------------------------
# Every family class, the family bases, and what stood for families before "One way in"
FAMILY_TYPES = {family.__name__ for family in FAMILIES.values()} | {
    "ConvBackbone", "TokenBackbone", "ConvTaskModel", "DefaultLocation",
}  # fmt: skip
FAMILY_FLAGS = {"staged", "has_tokens"}


def family_knowledge(source: str, where: str = "") -> list[str]:
    """Where ``source`` names a family type or flag, or compares a ``.family`` (a branch on which family it holds)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        name = node.name.rpartition(".")[2] if isinstance(node, ast.alias) else name
        if name in FAMILY_TYPES or (isinstance(node, ast.Attribute) and name in FAMILY_FLAGS):
            found.append(f"{where}:{getattr(node, 'lineno', '?')}: {name}")
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(side, ast.Attribute) and side.attr == "family" for side in sides):
                found.append(f"{where}:{node.lineno}: compares .family")
    return found


def test_the_scan_finds_family_knowledge() -> None:
    code = (
        "from .backbones import ConvBackbone\nif backbone.staged: pass\nok = isinstance(b, SwinBackbone)\n"
        "if model.backbone.family == 'swin': pass\nx = b.has_tokens\nstaged = 1\n"
    )
    found = sorted(hit.partition(": ")[2] for hit in family_knowledge(code))
    assert found == ["ConvBackbone", "SwinBackbone", "compares .family", "has_tokens", "staged"]  # not `staged = 1`


def test_no_family_type_or_flag_outside_backbones() -> None:
    assert "SwinBackbone" in FAMILY_TYPES and "ResNetBackbone" in FAMILY_TYPES  # read from the family registry
    outside = {name: path for name, path in MODULES.items() if not name.startswith("vptune.backbones")}
    assert len(outside) > 30
    assert [hit for name, path in outside.items() for hit in family_knowledge(path.read_text(), name)] == []


# --- nn.Module's contract -------------------------------------------------------------------------------------------
def package_modules() -> list[type]:
    """Every nn.Module subclass the package defines."""
    import importlib

    found = []
    for name in MODULES:
        module = importlib.import_module(name)
        found += [value for value in vars(module).values() if isinstance(value, type) and issubclass(value, nn.Module)
                  and value.__module__ == name]  # fmt: skip
    return found


@pytest.mark.parametrize("kind", package_modules(), ids=lambda kind: f"{kind.__module__}.{kind.__name__}")
def test_no_module_shadows_an_nn_module_method(kind: type) -> None:
    """A method of nn.Module that a class redefines takes the same arguments (``apply``, ``train``, ``to`` ...);
    ``forward`` is each module's own."""
    for name, base in inspect.getmembers(nn.Module, inspect.isfunction):
        if (
            name.startswith("_")
            or name == "forward"
            or name not in vars(kind)
            and not any(name in vars(c) for c in kind.__mro__[:-2])
        ):
            continue
        ours = list(inspect.signature(getattr(kind, name)).parameters)
        assert ours == list(inspect.signature(base).parameters), f"{kind.__name__}.{name}{ours}"
