"""Shared fixtures: real node daemons in temporary directories, stopped by PID afterwards."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from volkeeper_lab.launcher import LocalNode, VolumeSpec

NodeFactory = Callable[..., LocalNode]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test ``integration`` (tests/integration, tests/fault, tests/gui/browser) or
    ``unit`` (the rest)."""
    for item in items:
        parts = set(item.path.parts)
        kind = "integration" if parts & {"integration", "fault", "browser"} else "unit"
        item.add_marker(getattr(pytest.mark, kind))


@contextlib.contextmanager
def node_factory(root: Path) -> Iterator[NodeFactory]:
    """Start daemons under ``root``; every one is stopped on the way out, and must exit 0 on
    SIGTERM."""
    nodes: list[LocalNode] = []

    def factory(
        name: str = "alpha", volumes: list[VolumeSpec] | None = None, **kw: object
    ) -> LocalNode:
        node = LocalNode(root / name, name, volumes or [VolumeSpec("data1")], **kw)  # type: ignore[arg-type]
        # A target must know its source (it authenticates it): each node named in another's
        # [peers] gets that one in its own [peers] too, as an administrator would add it.
        for other in nodes:
            if name in other.peers and other.name != name:
                node.peers.setdefault(other.name, other.peer_port)
        nodes.append(node)
        node.start()
        for other in nodes:
            if other.name in node.peers and other is not node:
                other.admit(name, node.peer_port)
        return node

    try:
        yield factory
    finally:
        codes = {node.name: node.stop() for node in nodes}
    assert all(code == 0 for code in codes.values()), f"daemon exit status on SIGTERM: {codes}"


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[NodeFactory]:
    """Start daemons with ``start_node(name=..., volumes=[VolumeSpec(...)], nbd_tcp=...)``,
    stopped at the test's teardown."""
    with node_factory(tmp_path) as factory:
        yield factory


@pytest.fixture(scope="module")
def start_module_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeFactory]:
    """The same, for daemons a module's tests share (stopped after the module's last test)."""
    with node_factory(tmp_path_factory.mktemp("nodes")) as factory:
        yield factory


def need(*programs: str) -> None:
    """Skip when an external client is missing (make test installs them all)."""
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (make test installs them)")
