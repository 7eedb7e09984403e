"""The package's structure: no import cycle among its modules, and none of them imports another inside a function
(every dependency shows at the top of the module that has it)."""

from __future__ import annotations

import ast
from pathlib import Path

import vptune

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
    assert "vptune.backbones.base" in imports("vptune.backbones.vit")[0]


def test_no_import_cycle() -> None:
    graph = {name: imports(name)[0] & set(MODULES) for name in MODULES}
    assert sum(map(len, graph.values())) > 50  # the graph was read
    assert cycles(graph) == []


def test_no_module_imports_the_package_inside_a_function() -> None:
    assert [line for name in MODULES for line in imports(name)[1]] == []


def test_nothing_imports_the_command_line() -> None:
    importers = [name for name in MODULES if "vptune.cli" in imports(name)[0]]
    assert importers == []
