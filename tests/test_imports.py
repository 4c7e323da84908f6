"""The package's import graph has no cycles: every import of every module (at module level and inside
functions, relative ones resolved) is an edge, and a cycle anywhere fails with the modules on it.

Function-level imports count too: one that closes a cycle works only while nothing on the cycle
needs the other module at import time, a property no test would notice being lost.
"""

from __future__ import annotations

import ast
from pathlib import Path

import llm2clip

PACKAGE = "llm2clip"
ROOT = Path(llm2clip.__file__).resolve().parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package __init__)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the package modules it imports, imports inside the package that resolve to no module)."""
    mods = _modules()
    graph, broken = {}, []
    for name, (path, is_pkg) in mods.items():
        package = name.split(".") if is_pkg else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
                where = targets
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                if mod.split(".")[0] != PACKAGE:
                    continue
                # `from pkg import sub` needs only the submodule; any other name needs pkg itself
                subs = [f"{mod}.{a.name}" for a in node.names]
                targets = [s if s in mods else mod for s in subs]
                where = [mod]
            else:
                continue
            broken += [f"{path.relative_to(ROOT.parent)}:{node.lineno}: {t}" for t in where if t not in mods]
            edges.update(t for t in targets if t in mods and t != name)
        graph[name] = edges
    return graph, broken


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) per strongly connected component of more than one module."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in comps:
        start = min(comp)
        prev, queue = {start: None}, [start]
        while queue:  # shortest way round from start back to start, inside the component
            v = queue.pop(0)
            nxt = sorted(w for w in graph[v] if w in comp)
            if start in nxt:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                cycles.append([*reversed(path), start])
                break
            for w in nxt:
                if w not in prev:
                    prev[w] = v
                    queue.append(w)
    return cycles


def test_the_package_has_no_import_cycles():
    graph, _ = import_graph()
    assert len(graph) > 50 and "llm2clip.eval.registry" in graph
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_every_import_inside_the_package_resolves():
    _, broken = import_graph()
    assert not broken, "imports of modules that do not exist:\n" + "\n".join("  " + b for b in broken)


def test_the_checker_sees_function_level_and_relative_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    g, _ = import_graph()
    # zeroshot imports encoding at module level; checkpoint imports the loaders' scenes inside a function
    assert "llm2clip.eval.encoding" in g["llm2clip.eval.zeroshot"]
    assert "llm2clip.eval.loaders.scenes" in g["llm2clip.eval.checkpoint"]
    assert "llm2clip.api" in g["llm2clip"]  # `from . import api` inside __getattr__
