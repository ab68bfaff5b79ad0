"""The import graph of `stunning/`: no cycles, and the families package holds only families.

Parsed with `ast`, nothing imported: every `import stunning...` / `from stunning... import`
anywhere in a module (top level, inside functions, under ``if TYPE_CHECKING``) is an edge, so
a lazy import inside a function counts as much as a top-level one. ``from pkg import name``
is an edge to ``pkg.name`` when that is a module, else to ``pkg``. Importing a submodule also
runs its package's ``__init__``, but that implicit edge is not counted (the usual convention):
a package may import its own submodules lazily.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "stunning"

# Deliberate exceptions to "nothing under stunning/families imports these": {importer: {imported}}.
FAMILY_IMPORT_EXCEPTIONS: dict[str, set[str]] = {}
NOT_FOR_FAMILIES = ("stunning.embedded", "stunning.tiny")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """{imported stunning module: first line} for one module."""
    is_package = path.name == "__init__.py"
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if target == "stunning" or target.startswith("stunning."):
            found.setdefault(target, line)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                add(sub if sub in modules else source, node.lineno)
    found.pop(name, None)
    return found


def _graph() -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}, modules


def _find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative DFS over the modules in sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif nxt not in graph:
                continue  # a name that is not a module of the package (reported by the next test)
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_stunning_import_graph_has_no_cycle():
    graph, modules = _graph()
    assert len(graph) > 10, f"found only {sorted(graph)} under {PACKAGE}"
    cycle = _find_cycle(graph)
    if cycle:
        hops = [f"{a} -> {b}  ({modules[a].relative_to(ROOT)}:{graph[a][b]})"
                for a, b in zip(cycle, cycle[1:], strict=False)]
        pytest.fail("import cycle among stunning modules:\n  " + "\n  ".join(hops))


def test_every_stunning_import_names_an_existing_module():
    graph, modules = _graph()
    stale = [f"{modules[a].relative_to(ROOT)}:{line} imports {b}"
             for a, targets in graph.items() for b, line in targets.items() if b not in modules]
    assert not stale, "imports of stunning modules that do not exist:\n  " + "\n  ".join(stale)


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 1}}) is None


def test_families_import_neither_the_embedded_model_nor_the_tiny_builders():
    graph, modules = _graph()
    bad = [f"{modules[a].relative_to(ROOT)}:{line} imports {b}"
           for a, targets in graph.items() if a == "stunning.families" or a.startswith("stunning.families.")
           for b, line in targets.items()
           if b.startswith(NOT_FOR_FAMILIES) and b not in FAMILY_IMPORT_EXCEPTIONS.get(a, set())]
    assert not bad, "\n".join(bad)


def test_the_families_package_holds_only_the_contract_and_listed_families():
    """Every module of stunning/families besides __init__ and base is a family named in FAMILY_MODULES."""
    from stunning.families import FAMILY_MODULES

    present = {p.stem for p in (PACKAGE / "families").glob("*.py")} - {"__init__", "base"}
    assert present == set(FAMILY_MODULES), (
        f"stunning/families holds {sorted(present)} but FAMILY_MODULES lists {sorted(FAMILY_MODULES)}: "
        "list a new family there, and move anything that is not a family out of the package"
    )
    assert not [p.name for p in (PACKAGE / "families").iterdir() if p.is_dir() and p.name != "__pycache__"]
