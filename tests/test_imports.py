"""No import cycles inside the ``wsdan`` package, read from the source with ``ast``.

Every ``import`` / ``from ... import`` of a ``wsdan`` module counts, wherever it stands: at
module level, under ``if TYPE_CHECKING:``, or inside a function (a lazy import hides a cycle
from the interpreter, not from the reader). An edge goes to the module named, not to the
packages above it: ``from wsdan.services._process import x`` runs ``wsdan/services/__init__``
first, which imports its submodules, and that is how packages work, not a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "wsdan"

# module -> {imported module: line of the first import}
Graph = dict[str, dict[str, int]]


def _modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every .py file of the package at ``root``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph(root: Path = PACKAGE_ROOT) -> Graph:
    """The package's imports of its own modules (see the module docstring)."""
    modules = _modules(root)
    package = root.name

    def owner(name: str) -> str | None:  # the module a dotted name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: Graph = {name: {} for name in modules}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..a import b
                    anchor = here[: len(here) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from pkg import sub`` imports the submodule when there is one.
                targets = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                module = owner(target)
                if module is not None and module != name and module.split(".")[0] == package:
                    graph[name].setdefault(module, node.lineno)
    return graph


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected
    group of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan; the package is shallow enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for group in groups:  # a shortest path back to the start, inside the group
        start = min(group)
        paths = {start: [start]}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        cycle = [*paths[v], start]
                        break
                    if w in group and w not in paths:
                        paths[w] = [*paths[v], w]
                        nxt.append(w)
                if cycle:
                    break
            frontier = nxt
        assert cycle is not None
        cycles.append(cycle)
    return cycles


def _describe(graph: Graph, cycle: list[str]) -> str:
    return " -> ".join(cycle) + "  (" + ", ".join(
        f"{a} line {graph[a][b]}" for a, b in zip(cycle, cycle[1:])
    ) + ")"


def test_wsdan_has_no_import_cycles():
    graph = import_graph()
    # The graph is read, not empty: edges known to exist are in it.
    assert "wsdan.weights" in graph["wsdan.backbones"]
    assert "wsdan.data.glyphs" in graph["wsdan.data.synthetic"]
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in wsdan:\n" + "\n".join(
        _describe(graph, c) for c in cycles
    )


def test_cycles_are_found_wherever_the_import_stands(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg import a\n")  # a package importing its own
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\nfrom pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..c import C\n"
    )
    (pkg / "c.py").write_text("def f():\n    import pkg.a.thing\n")  # lazy, inside a function
    (pkg / "d.py").write_text("from pkg import c\nfrom . import sub\n")  # no cycle through d
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b": 2}
    assert graph["pkg.sub.b"] == {"pkg.c": 3}
    assert graph["pkg.c"] == {"pkg.a": 2}
    assert graph["pkg.d"] == {"pkg.c": 1, "pkg.sub": 2}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    assert _describe(graph, find_cycles(graph)[0]).endswith(
        "(pkg.a line 2, pkg.sub.b line 3, pkg.c line 2)"
    )
