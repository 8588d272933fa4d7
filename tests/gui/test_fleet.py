"""The GUI's link to a real node (over TCP here): answers, backoff while away, back by itself."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.conftest import NodeFactory
from volkeeper.client.credentials import parse_target
from volkeeper.core.addresses import parse_address
from volkeeper.gui.fleet import MAX_BACKOFF_S, Fleet, NodeLink
from volkeeper_lab.launcher import LocalNode

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def node(start_node: NodeFactory) -> Iterator[LocalNode]:
    yield start_node(name="alpha", control_tcp=True)


async def until(condition: object, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.02)


def test_backoff_doubles_up_to_its_ceiling() -> None:
    link = NodeLink(parse_address("127.0.0.1:1"))
    waits = [link.failed("refused", now=100.0) for _ in range(7)]
    assert waits == [0.25, 0.5, 1.0, 2.0, MAX_BACKOFF_S, MAX_BACKOFF_S, MAX_BACKOFF_S]
    assert (link.reachable, link.attempts, link.next_try) == (False, 7, 100.0 + MAX_BACKOFF_S)


def test_a_node_that_goes_away_and_comes_back(node: LocalNode) -> None:
    async def scenario() -> None:
        fleet = Fleet([parse_target(node.control)], node.token)
        (link,) = fleet.links
        assert link.name == node.control.split("#")[0]  # its address until it answered
        fleet.start()
        try:
            await fleet.fresh()
            assert link.reachable and link.name == "alpha" and link.attempts == 0
            assert [v["name"] for v in link.status["volumes"]] == ["data1"]  # type: ignore[index]
            node.kill()
            await until(lambda: not link.reachable)
            assert "connection refused" in (link.error or "")
            await until(lambda: link.attempts >= 3)
            assert link.status is not None  # the last answer is kept, for "last known"
            node.start()
            await until(lambda: link.reachable)
            assert link.attempts == 0 and link.error is None
            notes = [e["message"] for e in link.events if e["type"] == "gui"]
            assert notes[0].startswith("node answers") and notes[-1].startswith("node answers")
            assert any(n.startswith("node stopped answering") for n in notes)
        finally:
            await fleet.stop()

    asyncio.run(scenario())


def test_actions_answer_the_nodes_words(node: LocalNode) -> None:
    async def scenario() -> None:
        fleet = Fleet([parse_target(node.control)], node.token)
        fleet.start()
        try:
            await fleet.fresh()
            refused = await fleet.call("alpha", "POST", "/jobs/web/mirror/pause", {})
            assert not refused.ok and refused.message == "no job named 'web'"
            unknown = await fleet.call("gamma", "GET", "/status")
            assert unknown.message == "no node named 'gamma' is watched by this GUI"
            answered = await fleet.call("alpha", "GET", "/volumes")
            assert answered.ok and answered.body[0]["name"] == "data1"
        finally:
            await fleet.stop()

    asyncio.run(scenario())
