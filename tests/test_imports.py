"""No import cycle in src/aftune, counting the imports inside functions too (a cycle hidden in a function still
ties two modules together: neither can change its names alone). The graph is read from the source with `ast`."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Nodes under `if TYPE_CHECKING:`: never run, they cannot take part in a cycle (that is what they are for)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(path: Path, name: str, modules: set[str]) -> dict[str, int]:
    """The aftune modules `path` imports (at any depth: module, class or function body) -> the first line.

    `from X import n` names the submodule X.n when there is one, else X; relative imports resolve against the
    module's package (an `__init__.py` is its own package)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = _type_checking_only(tree)
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            if t in modules and t != name:
                found.setdefault(t, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    files = {module_name(p): p for p in sorted((SRC / "aftune").rglob("*.py"))}
    return {m: imports_of(p, m, set(files)) for m, p in files.items()}


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan), as a module path
    that starts and ends at the same module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
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
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, comp) for comp in components]


def _cycle_in(graph: dict[str, dict[str, int]], comp: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start = min(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w in comp and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # a component of two or more modules always has one


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_src_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and "aftune.commands.experiment.arms" in graph  # the walk found the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(describe(graph, c) for c in cycles)


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path, monkeypatch):
    # what this test guards against, built by hand: a imports b at the top, b imports a inside a function,
    # through a relative import; and a TYPE_CHECKING import, which is not a cycle
    pkg = tmp_path / "aftune" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "aftune" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from aftune.sub.b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from . import a\n    return a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from aftune.sub import d\n")
    (pkg / "d.py").write_text("from aftune.sub import c\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    graph = import_graph()
    assert graph["aftune.sub.b"] == {"aftune.sub.a": 2} and graph["aftune.sub.c"] == {}
    cycles = find_cycles(graph)
    assert cycles == [["aftune.sub.a", "aftune.sub.b", "aftune.sub.a"]]
    assert describe(graph, cycles[0]) == "aftune.sub.a (line 1) -> aftune.sub.b (line 2) -> aftune.sub.a"


def test_the_library_does_not_import_the_commands():
    """README's layering rule: `commands/` (and `cli`) sit on top; nothing below them imports them."""
    graph = import_graph()
    top = ("aftune.commands", "aftune.cli")
    breaches = [
        f"{m} (line {line}) imports {t}"
        for m, targets in graph.items()
        if not m.startswith(top)
        for t, line in targets.items()
        if t.startswith(top)
    ]
    assert not breaches, "\n".join(breaches)
