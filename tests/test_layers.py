"""The package's shape holds: no import loops (type-only imports included), each layer
imports only the layers below it, the core does no I/O, and the scaffolding stays outside."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
NO_IO = {"asyncio", "socket", "os", "time", "threading", "subprocess", "select", "selectors"}
# layer -> the volkeeper packages it may import (besides itself, volkeeper.errors and
# volkeeper._compiled, which says whether the core runs compiled)
ALLOWED = {
    "core": set(),
    "io": {"core"},
    "daemon": {"core", "io"},
    "client": {"core"},  # how any client reaches a control API safely (TLS pin, token)
    "cli": {
        "core",
        "client",
        "daemon",
        "ocf",
        "gui",
    },  # daemon only to run a node, to read a node's config and its identity and tokens
    "gui": {"core", "client"},  # talks to nodes through their control APIs only
    "ocf": {"core", "cli"},  # the agent talks to the node through the CLI's API client
}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "volkeeper").rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path) -> list[str]:
    """Every module an import statement of ``path`` names, type-only imports included."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


GRAPH = {name: {i for i in imports(path) if i in modules()} for name, path in modules().items()}


def test_no_import_loops() -> None:
    loops, state = [], dict.fromkeys(GRAPH, 0)  # 0 new, 1 on the path, 2 done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for imported in sorted(GRAPH[name]):
            if state[imported] == 1:
                loops.append([*path[path.index(imported) :], imported])
            elif state[imported] == 0:
                visit(imported, [*path, imported])
        state[name] = 2

    for name in GRAPH:
        if state[name] == 0:
            visit(name, [name])
    assert loops == []


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_what_is_below_it(layer: str) -> None:
    wrong = []
    for name, imported in GRAPH.items():
        if name.split(".")[1:2] != [layer]:
            continue
        for other in imported:
            parts = other.split(".")
            if parts[:2] in (["volkeeper", "errors"], ["volkeeper", "_compiled"]) or len(parts) < 2:
                continue
            if parts[1] != layer and parts[1] not in ALLOWED[layer]:
                wrong.append(f"{name} imports {other}")
    assert wrong == []


def test_the_core_does_no_io() -> None:
    wrong = [
        f"{name} imports {imported}"
        for name, path in modules().items()
        if name.startswith("volkeeper.core")
        for imported in imports(path)
        if imported.split(".")[0] in NO_IO
    ]
    assert wrong == []


def test_the_product_never_imports_its_scaffolding() -> None:
    wrong = [
        f"{name} imports {imported}"
        for name, path in modules().items()
        for imported in imports(path)
        if imported.startswith("volkeeper_lab")
    ]
    assert wrong == []
