"""bam's imports run one way: a module imports only from its own floor or lower floors, packages on
one floor never import each other, and no files import each other in a circle.

The floors are written once, here (docs/layout.md draws the same order). The walk reads
every `import` in `bam/` with `ast`, including imports inside functions and under `TYPE_CHECKING`:
an import placed inside a function to dodge a cycle still couples the two modules.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
from repo_paths import REPO

PACKAGE_ROOT = REPO / "bam"

# lowest first; each entry is one floor: the bam packages or top-level modules that live on it
FLOORS: tuple[tuple[str, ...], ...] = (
    ("ops", "recipe", "warning_filters", "shipped_configs", "_version"),
    ("losses", "models", "transforms", "moved_keys"),
    ("data",),
    ("io",),
    ("training", "features"),
    ("methods",),
    ("callbacks", "evaluation"),
    ("pretrain", "study", "cli", "__main__", "__init__"),
)
# pairs (importer, imported) kept apart although the floors would allow it: evaluating a backbone
# must not depend on how it was pretrained
KEPT_APART = {("evaluation", "methods")}
FLOOR_NAMES = ("primitives", "objectives/models/transforms", "data", "checkpoint I/O", "engine",
               "methods", "callbacks/evaluation", "entry points")


@dataclass(frozen=True)
class Import:
    source: str  # dotted module name of the importing file, e.g. bam.evaluation.linear
    target: str  # dotted name of the imported bam module
    path: Path
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def known_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE_ROOT.rglob("*.py")}


def imported_module(node: ast.ImportFrom, alias: ast.alias, source: str, is_package: bool, modules: dict) -> str:
    """The bam module an import statement loads: the submodule when `from bam.x import y` names
    one, else the package or module the names come from."""
    if node.level:  # relative import: resolve against the importing module's package
        base = source.split(".") if is_package else source.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module or ""
    candidate = f"{origin}.{alias.name}"
    return candidate if candidate in modules else origin


def imports_in(tree: ast.AST, source: str, is_package: bool, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported bam module, line) for every import statement anywhere in `tree`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            targets = [imported_module(node, alias, source, is_package, modules) for alias in node.names]
        else:
            continue
        found += [(target, node.lineno) for target in targets if target == "bam" or target.startswith("bam.")]
    return found


def bam_imports() -> list[Import]:
    modules = known_modules()
    found: list[Import] = []
    for name, path in sorted(modules.items()):
        tree = ast.parse(path.read_text(), filename=str(path))
        found += [Import(name, target, path, line)
                  for target, line in imports_in(tree, name, path.name == "__init__.py", modules)]
    return found


def unit(module: str) -> str:
    """The package (or top-level module) of `bam.<unit>...` that the floors list; `bam` itself is
    the package root, `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def floor_of(module: str) -> int:
    name = unit(module)
    for level, members in enumerate(FLOORS):
        if name in members:
            return level
    raise AssertionError(f"{module} is on no floor: add `{name}` to FLOORS in {__file__} (and to docs/layout.md)")


def where(imp: Import) -> str:
    return f"{imp.path.relative_to(PACKAGE_ROOT.parent)}:{imp.line}"


def describe(module: str) -> str:
    level = floor_of(module)
    return f"floor {level} ({FLOOR_NAMES[level]})"


IMPORTS = bam_imports()


def test_the_walk_sees_imports_inside_functions_and_relative_ones():
    """An import placed inside a function (to load something late) couples modules all the same."""
    source = "def late():\n    from bam.io import export\n\nfrom . import state\nimport bam.models\n"
    modules = {"bam.io.export": PACKAGE_ROOT, "bam.io.state": PACKAGE_ROOT, "bam.models": PACKAGE_ROOT}
    found = imports_in(ast.parse(source), "bam.io.convert", False, modules)
    assert sorted(found) == [("bam.io.export", 2), ("bam.io.state", 4), ("bam.models", 5)]


def test_every_module_is_on_a_floor():
    for module in known_modules():
        floor_of(module)


def test_no_import_runs_upward_or_sideways():
    wrong = []
    for imp in IMPORTS:
        source, target = floor_of(imp.source), floor_of(imp.target)
        if target > source:
            wrong.append(f"{where(imp)}: {imp.source} ({describe(imp.source)}) imports {imp.target} "
                         f"from the higher {describe(imp.target)}")
        elif target == source and unit(imp.source) != unit(imp.target) and source != len(FLOORS) - 1:
            wrong.append(f"{where(imp)}: {imp.source} imports its sibling package {imp.target} on "
                         f"{describe(imp.target)}: move what both need to a lower floor")
        elif (unit(imp.source), unit(imp.target)) in KEPT_APART:
            wrong.append(f"{where(imp)}: {imp.source} imports {imp.target}: bam.{unit(imp.source)} is kept apart "
                         f"from bam.{unit(imp.target)}; move what both need to a lower floor")
    assert not wrong, "imports against the layer order:\n" + "\n".join(dict.fromkeys(wrong))


def file_cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if imp.source != imp.target:
            graph.setdefault(imp.source, set()).add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return groups


def test_no_file_imports_itself_in_a_circle():
    cycles = file_cycles(IMPORTS)
    lines = []
    for group in cycles:
        members = set(group)
        lines += [f"{where(imp)}: {imp.source} imports {imp.target}" for imp in IMPORTS
                  if imp.source in members and imp.target in members and imp.source != imp.target]
    assert not cycles, "modules that import each other in a circle:\n" + "\n".join(dict.fromkeys(lines))


@pytest.mark.parametrize("edges, expected", [
    ([("bam.a.x", "bam.a.y"), ("bam.a.y", "bam.a.x")], [["bam.a.x", "bam.a.y"]]),
    ([("bam.a.x", "bam.a.y"), ("bam.a.y", "bam.a.z")], []),
    ([("bam.a.x", "bam.a.y"), ("bam.a.y", "bam.a.z"), ("bam.a.z", "bam.a.x")], [["bam.a.x", "bam.a.y", "bam.a.z"]]),
])
def test_cycle_finder_finds_circles_and_only_circles(edges, expected):
    imports = [Import(source, target, PACKAGE_ROOT, 1) for source, target in edges]
    assert file_cycles(imports) == expected


def test_an_upward_import_is_reported_with_file_line_and_floors(monkeypatch):
    """The failure message names the offending file and line and both floors."""
    upward = Import("bam.io.export", "bam.methods.base", PACKAGE_ROOT / "io" / "export.py", 7)
    monkeypatch.setitem(globals(), "IMPORTS", [upward])
    with pytest.raises(AssertionError) as failure:
        test_no_import_runs_upward_or_sideways()
    message = str(failure.value)
    assert "bam/io/export.py:7" in message
    assert "floor 3 (checkpoint I/O)" in message and "floor 5 (methods)" in message
