"""The package's import graph has no cycles, counting imports inside functions too.

A function-level import of an orchestrator module that only dodges a cycle would close one here,
so this also keeps those out. Run it alone: `python -m pytest tests/unit/test_import_graph.py`.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "orchestrator"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The orchestrator modules `name` imports, anywhere in the file (`from pkg import module` included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imported(name, path, known) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles_counting_function_level_imports():
    graph = import_graph()
    assert len(graph) > 50  # the walk found the package
    # A package __init__ re-exporting its submodules is not a cycle of the code: drop those edges.
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name.startswith(t + ".") and _modules()[t].name == "__init__.py")}
    assert find_cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_imports():
    failed = {}
    for name in _modules():
        if name.endswith("__main__"):  # `python -m orchestrator` runs the CLI on import
            continue
        try:
            importlib.import_module(name)
        except ImportError as exc:  # optional engines (vllm) are guarded inside functions, never at import
            failed[name] = str(exc)
    assert failed == {}
