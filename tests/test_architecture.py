"""The package's import graph, read from the source with `ast` (nothing is imported): the solver layer
stays at the bottom, the command layer (sdekit/commands: argparse, printing, plots) on top, and sdekit's
top-level modules and subpackages import each other without cycles.

`IMPORTS` holds every import statement of every module under sdekit/, resolved to absolute module
names (sdekit's own and third-party alike), with the line it is on and whether it runs when the module
is imported (module or class level) or only when a function is called. Rules about what may be imported
at import time, and where, are written against it like the ones below.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "sdekit"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

SOLVERS = f"{PACKAGE}.solvers"
SOLVERS_MAY_IMPORT = {f"{PACKAGE}.sde"}          # the SDE definitions: the only sdekit module below the solvers
COMMANDS = f"{PACKAGE}.commands"                 # the command layer: argparse, printing, plots
COMMAND_ONLY = ("argparse", "matplotlib")        # what only the command layer imports when it is imported


@dataclass(frozen=True)
class Import:
    """One imported module: `module` imports `target` at path:line."""

    module: str              # the importing module, e.g. "sdekit.sensitivity.forward"
    target: str              # the imported module, absolute, e.g. "sdekit.solvers" or "torch.nn"
    path: str                # the importing file, relative to the repository
    line: int
    at_import_time: bool     # False inside a function body (runs only when the function is called)

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.target}"


def _module_name(path: Path) -> tuple[str, bool]:
    """(dotted module name, is a package __init__) of a file under sdekit/."""
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _read_modules() -> dict[str, tuple[Path, bool]]:
    return {name: (path, is_pkg) for path in sorted(ROOT.rglob("*.py")) for name, is_pkg in [_module_name(path)]}


MODULES = _read_modules()


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, path: Path):
        self.module, self.path = module, str(path.relative_to(ROOT.parent))
        self.package = module if is_package else module.rpartition(".")[0]
        self.depth = 0                                      # function bodies entered
        self.found: list[Import] = []

    def _add(self, target: str, node: ast.stmt) -> None:
        self.found.append(Import(self.module, target, self.path, node.lineno, self.depth == 0))

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.level:
            base = self.package.split(".")
            base = base[:len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module
        if source == "__future__":
            return
        for alias in node.names:
            # `from pkg import name` imports the submodule pkg.name when there is one, else takes an attribute of pkg
            sub = f"{source}.{alias.name}"
            self._add(sub if sub in MODULES else source, node)


def _read_imports() -> list[Import]:
    found = []
    for name, (path, is_pkg) in MODULES.items():
        collector = _Collector(name, is_pkg, path)
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        found += collector.found
    return found


IMPORTS = _read_imports()


def unit(module: str) -> str:
    """The top-level module or subpackage a module belongs to: sdekit.samplers.ddim -> sdekit.samplers."""
    return ".".join(module.split(".")[:2])


def is_internal(target: str) -> bool:
    return target == PACKAGE or target.startswith(PACKAGE + ".")


def unit_graph(deferred: bool = True) -> dict[str, dict[str, Import]]:
    """{unit: {unit it imports: the first import statement that makes the edge}} over sdekit's own modules.

    Edges from a package to its own children are left out (`sdekit/__init__.py` re-exporting its modules is
    what a package does); an import of a package from inside one of its children is kept.
    deferred=False leaves out the imports inside function bodies (the graph Python walks on `import sdekit`).
    """
    graph: dict[str, dict[str, Import]] = {unit(m): {} for m in MODULES}
    for imp in IMPORTS:
        if not is_internal(imp.target) or not (deferred or imp.at_import_time):
            continue
        a, b = unit(imp.module), unit(imp.target)
        own_child = imp.module != imp.target and imp.target.startswith(imp.module + ".") and MODULES[imp.module][1]
        if a != b and not own_child:
            graph[a].setdefault(b, imp)
    return graph


def find_cycle(graph: dict[str, dict[str, Import]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of the graph, or None (depth-first search; nodes and edges in sorted order)."""
    state: dict[str, int] = {}                      # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


# --- the collector itself ------------------------------------------------------------------------------------


def test_every_module_is_read_and_relative_imports_resolve():
    assert f"{SOLVERS}.schemes" in MODULES and MODULES[SOLVERS][1] and MODULES[PACKAGE][1]
    forward = {i.target for i in IMPORTS if i.module == f"{PACKAGE}.sensitivity.forward"}
    assert {f"{SOLVERS}", f"{SOLVERS}._tracing", "torch"} <= forward, forward
    assert all(i.target and not i.target.startswith(".") for i in IMPORTS)


def test_find_cycle_reports_the_cycle():
    imp = Import("a", "b", "a.py", 1, True)
    assert find_cycle({"a": {"b": imp}, "b": {"c": imp}, "c": {}}) is None
    assert find_cycle({"a": {"b": imp}, "b": {"c": imp}, "c": {"a": imp}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y": imp}, "y": {"y2": imp}, "y2": {"y": imp}}) == ["y", "y2", "y"]


# --- the rules -----------------------------------------------------------------------------------------------


def test_solvers_import_nothing_from_sdekit_above_them():
    """sdekit/solvers/ is the bottom layer: besides itself it may import the SDE definitions only."""
    assert any(unit(m) == SOLVERS for m in MODULES)
    bad = [str(i) for i in IMPORTS
           if unit(i.module) == SOLVERS and is_internal(i.target)
           and unit(i.target) != SOLVERS and i.target not in SOLVERS_MAY_IMPORT]
    assert not bad, "the solver layer imports from above it:\n" + "\n".join(bad)


def _assert_acyclic(graph: dict[str, dict[str, Import]]) -> None:
    cycle = find_cycle(graph)
    if cycle is not None:
        edges = "\n".join(f"  {a} -> {b}: {graph[a][b]}{'' if graph[a][b].at_import_time else ' (in a function)'}"
                          for a, b in zip(cycle, cycle[1:]))
        raise AssertionError(f"import cycle {' -> '.join(cycle)}:\n{edges}")


def test_no_import_cycles_between_top_level_modules_and_subpackages_at_import_time():
    _assert_acyclic(unit_graph(deferred=False))


def test_no_import_cycles_between_top_level_modules_and_subpackages():
    """Imports inside functions count too: a deferred import is still a dependency."""
    _assert_acyclic(unit_graph())


def test_only_the_command_layer_imports_argparse_or_matplotlib_at_import_time():
    """Outside sdekit/commands no module imports argparse or matplotlib when it is imported (a plot in the library
    imports matplotlib when it is drawn, through sdekit._imports.pyplot)."""
    assert any(unit(i.module) == COMMANDS and i.target == "argparse" and i.at_import_time for i in IMPORTS)
    bad = [str(i) for i in IMPORTS
           if unit(i.module) != COMMANDS and i.at_import_time and i.target.partition(".")[0] in COMMAND_ONLY]
    assert not bad, "argparse or matplotlib imported outside the command layer:\n" + "\n".join(bad)


def test_the_library_never_imports_the_command_layer():
    """The commands sit on top: no module outside sdekit/commands imports them, not even inside a function."""
    bad = [str(i) for i in IMPORTS if unit(i.module) != COMMANDS and unit(i.target) == COMMANDS]
    assert not bad, "the library imports the command layer:\n" + "\n".join(bad)
