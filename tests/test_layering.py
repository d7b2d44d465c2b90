"""The package's modules import each other in layers: no module imports, even only for type
checking, a module that imports it back (directly or through others). The test kit
(``asgi_delegation.testing``) is left out: its token endpoint and its server still name each
other's types."""

from __future__ import annotations

import ast
from pathlib import Path

import asgi_delegation

PACKAGE = Path(asgi_delegation.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if node.module:  # "from . import _clock" imports the submodule, not the package
                found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    paths = {
        _module_name(path): path
        for path in PACKAGE.rglob("*.py")
        if not _module_name(path).startswith("asgi_delegation.testing")
    }
    return {
        name: {target for target in _imports(path, name) if target in paths and target != name}
        for name, path in paths.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = _graph()
    assert "asgi_delegation._grants" in graph["asgi_delegation._exchange"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_exchange_path_looks_down_only() -> None:
    graph = _graph()
    context, exchange, upstream = (
        f"asgi_delegation.{name}" for name in ("_context", "_exchange", "_upstream_auth")
    )
    assert {exchange, upstream} <= graph[context]
    assert context not in graph[exchange] | graph[upstream]
    assert exchange not in graph[upstream]


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
