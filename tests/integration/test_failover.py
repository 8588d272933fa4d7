"""Failover with real daemons: the source killed (kill -9) under a client that keeps writing,
the target promoted, the old source's return as a target with a partial resync, refusals,
a forced promotion's split brain and its resolution.

The writer (tests/support/acked_writer.py) follows whichever node takes writes and
remembers every write acknowledged to it; the checks read the volume files.  Sync mode:
every acknowledged write is on the promoted copy.  Async mode: the promoted copy is the
source as it was after some prefix of the writes, in order, and what it lacks is within
what the promotion said it may lack.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator

import httpx

from tests.conftest import NodeFactory
from tests.integration.tcp_proxy import TcpProxy
from tests.support.acked_writer import BLOCK, AckedWriter
from tests.support.metrics import metric
from tests.support.mirroring import wait_state
from tests.support.topologies import (
    assert_identical,
    full_mesh,
    mirror,
    path,
    stop_in_order,
    two_way_pair,
    vk,
    volume,
    wait_mirror,
)
from volkeeper_lab.launcher import LocalNode, VolumeSpec, free_tcp_port

SIZE = "32MiB"
VOLUME_BYTES = 32 << 20


def pair(start_node: NodeFactory, **job: object) -> tuple[LocalNode, LocalNode]:
    """alpha and beta in each other's [peers], job web (alpha:data1 -> beta:data1) created."""
    return two_way_pair(start_node, SIZE, **job)


def promote(node: LocalNode, force: bool = False, until_gone: bool = True) -> httpx.Response:
    """POST promote; while the source is still seen connected (a kill -9 takes a moment
    to be noticed), asked again."""
    deadline = time.monotonic() + 15
    while True:
        with node.api() as api:
            answer = api.post("/volumes/data1/promote", json={"force": force}, timeout=30)
        connected = "connected and serving" in answer.text
        if not (until_gone and connected) or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)


def discarded_bytes(node: LocalNode) -> int:
    """What the node's log says its demotion gave up (0 if nothing)."""
    found = re.findall(r"discarded_bytes=(\d+)", node.log_text())
    return int(found[-1]) if found else 0


def wait_role(node: LocalNode, role: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while volume(node)["role"] != role:
        assert time.monotonic() < deadline, f"{node.name} not {role}:\n{node.log_text()[-3000:]}"
        time.sleep(0.05)


def test_failover_after_kill_9_and_the_old_sources_return(start_node: NodeFactory) -> None:
    alpha, beta = pair(start_node)
    wait_state(alpha, "Mirroring")
    writer = AckedWriter([alpha.nbd_socket, beta.nbd_socket])
    writer.start()
    writer.wait_writes(500)
    alpha.kill()
    started = time.monotonic()
    answer = promote(beta)
    assert answer.status_code == 200, answer.text
    promoted = answer.json()
    assert (promoted["data_state"], promoted["may_lack"], promoted["forced"]) == (
        "UpToDate", None, False)  # fmt: skip
    acked_at_kill = writer.writes
    writer.wait_writes(acked_at_kill + 300)
    print(f"failover: beta took writes {time.monotonic() - started:.3f} s after promote was "
          f"asked ({promoted['seconds']:.3f} s in the node)")  # fmt: skip
    writer.finish()
    writer.check(path(beta))  # every write acknowledged before and after the kill is there
    assert volume(beta)["role"] == "source"
    with beta.api() as api:
        text = api.get("/metrics").text
    role = {"volume": "data1", "role": "source", "data_state": "UpToDate",
            "generation": promoted["generation"]}  # fmt: skip
    assert metric(text, "volkeeper_volume_role_info", **role) == 1
    owed_by_beta = mirror(beta, "web", "alpha:data1")["out_of_sync_bytes"]

    alpha.start()  # it comes back as the job's source, finds beta is, and gives way
    wait_role(alpha, "target")
    back = wait_mirror(beta, "web", "alpha:data1", "Mirroring")
    assert "another node is this job's source now" in alpha.log_text()
    resent = back["resync_sent_bytes"]
    owed_by_alpha = discarded_bytes(alpha)
    print(f"old source's return: beta marked {owed_by_beta} bytes, alpha {owed_by_alpha} "
          f"(unacknowledged there: its hot extents after the crash); the resync sent "
          f"{resent} bytes of a {VOLUME_BYTES}-byte volume")  # fmt: skip
    assert max(owed_by_beta, owed_by_alpha) <= resent <= owed_by_beta + owed_by_alpha
    assert resent < VOLUME_BYTES // 2
    stop_in_order(beta, alpha)
    assert_identical(path(alpha), path(beta))
    writer.check(path(alpha))


def test_async_failover_keeps_write_order_and_says_what_it_may_lack(
    start_node: NodeFactory,
) -> None:
    alpha, beta = pair(start_node, mode="async")
    wait_state(alpha, "Mirroring")
    with alpha.api() as api:  # slow the link: acknowledged writes queue up for beta
        assert api.patch("/jobs/web/mirror", json={"throttle": "4MiB"}).status_code == 200
    writer = AckedWriter([alpha.nbd_socket, beta.nbd_socket], flush_every=1_000_000)
    writer.start()
    writer.wait_writes(3000)  # 12 MiB, most of it queued
    writer.finish()  # nothing writes to beta before its copy is checked
    deadline = time.monotonic() + 30
    while mirror(alpha, "web", "beta:data1")["queue_bytes"] > 6 << 20:  # half delivered
        assert time.monotonic() < deadline
        time.sleep(0.05)
    alpha.kill()
    deadline = time.monotonic() + 10
    while (shown := mirror(beta, "web", "beta:data1"))["source_lost_at"] is None:
        assert time.monotonic() < deadline, shown
        time.sleep(0.02)
    assert (shown["data_state"], shown["may_lack_bytes"]) == ("Consistent", 64 << 20), shown
    answer = promote(beta)
    assert answer.status_code == 200, answer.text
    promoted = answer.json()
    assert promoted["data_state"] == "Consistent"
    assert promoted["may_lack"]["seconds_before"] == shown["source_lost_at"]
    assert promoted["may_lack"]["bytes"] > 0 and promoted["may_lack"]["seconds_before"] > 0
    said = vk(beta, "volume", "promote", "data1")  # once is enough: it is the source now
    assert said.returncode == 1 and "is not a mirror target" in said.stderr
    cut, missing = writer.check_prefix(path(beta))
    print(f"async failover: beta holds every write up to version {cut}; lacks {len(missing)} "
          f"acknowledged writes ({len(missing) * BLOCK} bytes, bound "
          f"{promoted['may_lack']['bytes']})")  # fmt: skip
    assert 0 < len(missing) * BLOCK <= promoted["may_lack"]["bytes"]
    alpha.start()
    wait_role(alpha, "target")
    wait_mirror(beta, "web", "alpha:data1", "Mirroring")
    stop_in_order(beta, alpha)
    assert_identical(path(alpha), path(beta))


def test_promotion_is_refused_with_the_reason(start_node: NodeFactory) -> None:
    alpha, beta = pair(start_node, throttle="2MiB")  # a full resync that takes ~16 s
    wait_mirror(alpha, "web", "beta:data1", "Resyncing")
    refused = promote(beta, until_gone=False)
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert "its source alpha is connected and serving" in error["message"]
    assert error["hint"] == "switch over instead, on alpha: volkeeper job switchover web --to beta"
    alpha.kill()
    refused = promote(beta)
    assert refused.status_code == 409
    assert "its data is Inconsistent" in refused.json()["error"]["message"]
    said = vk(beta, "volume", "promote", "data1")
    assert said.returncode == 1 and "its data is Inconsistent" in said.stderr
    refused = promote(start_node("gamma", [VolumeSpec("data1", SIZE)]))
    assert refused.status_code == 409 and "is not a mirror target" in refused.text
    forced = promote(beta, force=True)
    assert forced.status_code == 200 and forced.json()["forced"]
    assert volume(beta)["role"] == "source"


def test_a_paused_target_is_not_promoted(start_node: NodeFactory) -> None:
    alpha, beta = pair(start_node)
    wait_state(alpha, "Mirroring")
    with alpha.api() as api:
        assert api.post("/jobs/web/mirror/pause").status_code == 200
    refused = promote(beta)
    assert refused.status_code == 409
    assert "its mirror from alpha is Paused" in refused.json()["error"]["message"]


@contextlib.contextmanager
def partitionable_pair(
    start_node: NodeFactory,
) -> Iterator[tuple[LocalNode, LocalNode, list[TcpProxy]]]:
    """alpha and beta Mirroring (sync), each reaching the other through a proxy to cut."""
    alpha_port, beta_port = free_tcp_port(), free_tcp_port()
    with TcpProxy(beta_port) as to_beta, TcpProxy(alpha_port) as to_alpha:
        beta = start_node("beta", [VolumeSpec("data1", SIZE)], peer_port=beta_port,
                          peers={"alpha": to_alpha.port})  # fmt: skip
        alpha = start_node("alpha", [VolumeSpec("data1", SIZE)], peer_port=alpha_port,
                           peers={"beta": to_beta.port})  # fmt: skip
        body = {"name": "web", "source": "alpha:data1", "target": "beta:data1", "confirm": True}
        with alpha.api() as api:
            assert api.post("/jobs", json=body).status_code == 201
        wait_state(alpha, "Mirroring")
        yield alpha, beta, [to_beta, to_alpha]


def write_some(node: LocalNode, count: int, seed: int) -> AckedWriter:
    writer = AckedWriter([node.nbd_socket], seed=seed)
    writer.start()
    writer.wait_writes(count)
    writer.finish()
    return writer


def test_split_brain_is_found_shown_and_resolved(start_node: NodeFactory) -> None:
    with partitionable_pair(start_node) as (alpha, beta, proxies):
        for proxy in proxies:
            proxy.cut()
        wait_state(alpha, "Resync pending")
        write_some(alpha, 200, seed=1)  # alpha goes on alone: a new generation
        assert promote(beta).status_code == 200  # beta was UpToDate when alpha went away
        kept = write_some(beta, 200, seed=2)
        for proxy in proxies:
            proxy.restore()
        on_alpha = wait_mirror(alpha, "web", "beta:data1", "Split brain")
        on_beta = wait_mirror(beta, "web", "alpha:data1", "Split brain")
        for view, ours in ((on_alpha, "alpha"), (on_beta, "beta")):
            assert "split brain in job 'web'" in view["last_error"]
            assert f"{ours} changed" in view["last_error"], view["last_error"]
        status = vk(alpha, "status")
        assert "Split brain" in status.stdout
        time.sleep(2.5)  # no resync happens by itself: both still say so
        assert mirror(alpha, "web", "beta:data1")["state"] == "Split brain"

        said = vk(alpha, "mirror", "resolve", "web", "--keep", "beta", "--json")
        assert said.returncode == 0, said.stderr
        resolved = json.loads(said.stdout)
        assert resolved["kept"] == "beta" and resolved["discarded_bytes"] > 0
        wait_role(alpha, "target")
        back = wait_mirror(beta, "web", "alpha:data1", "Mirroring")
        assert 0 < back["resync_sent_bytes"] < VOLUME_BYTES // 2
        stop_in_order(beta, alpha)
        assert_identical(path(alpha), path(beta))
        kept.check(path(alpha))


def test_a_split_brain_where_one_side_wrote_nothing_resolves_itself(
    start_node: NodeFactory,
) -> None:
    with partitionable_pair(start_node) as (alpha, beta, proxies):
        for proxy in proxies:
            proxy.cut()
        wait_state(alpha, "Resync pending")
        assert promote(beta).status_code == 200  # beta is promoted, and takes no write
        written = write_some(alpha, 200, seed=3)
        before = mirror(alpha, "web", "beta:data1")["resync_sent_bytes"]  # the first resync's
        for proxy in proxies:
            proxy.restore()
        wait_role(beta, "target")
        back = wait_mirror(alpha, "web", "beta:data1", "Mirroring")
        assert 0 < back["resync_sent_bytes"] - before < VOLUME_BYTES // 2
        stop_in_order(alpha, beta)
        assert_identical(path(alpha), path(beta))
        written.check(path(beta))


def test_a_split_brain_resolved_on_the_side_that_is_kept(start_node: NodeFactory) -> None:
    with partitionable_pair(start_node) as (alpha, beta, proxies):
        for proxy in proxies:
            proxy.cut()
        wait_state(alpha, "Resync pending")
        kept = write_some(alpha, 100, seed=4)
        assert promote(beta).status_code == 200
        write_some(beta, 100, seed=5)
        for proxy in proxies:
            proxy.restore()
        wait_mirror(alpha, "web", "beta:data1", "Split brain")
        with alpha.api() as api:
            answer = api.post("/jobs/web/resolve", json={"keep": "alpha"}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["kept"] == "alpha" and answer.json()["discarded_bytes"] > 0
        wait_role(beta, "target")
        wait_mirror(alpha, "web", "beta:data1", "Mirroring")
        stop_in_order(alpha, beta)
        assert_identical(path(alpha), path(beta))
        kept.check(path(beta))


def test_failover_with_two_targets_compares_the_other_one(start_node: NodeFactory) -> None:
    """alpha -> beta and gamma; alpha killed, beta promoted: gamma takes beta as its source
    (the job's record names beta, one epoch on) and compares every region with it (writes in
    flight when alpha died may have reached one copy and not the other), sending only
    what differs; alpha, back, gets its partial resync."""
    gamma, beta, alpha = full_mesh(start_node, "gamma", "beta", "alpha", size=SIZE)
    body = {"name": "web", "source": "alpha:data1", "target": ["beta:data1", "gamma:data1"],
            "confirm": True}  # fmt: skip
    with alpha.api() as api:
        assert api.post("/jobs", json=body).status_code == 201
    wait_mirror(alpha, "web", "beta:data1", "Mirroring")
    wait_mirror(alpha, "web", "gamma:data1", "Mirroring")
    writer = AckedWriter([alpha.nbd_socket, beta.nbd_socket])
    writer.start()
    writer.wait_writes(400)
    alpha.kill()
    assert promote(beta).status_code == 200
    writer.wait_writes(writer.writes + 200)
    writer.finish()
    compared = wait_mirror(beta, "web", "gamma:data1", "Mirroring")
    print(f"third copy: a checksum resync sent {compared['resync_sent_bytes']} bytes")
    assert compared["resync_sent_bytes"] < VOLUME_BYTES // 4, compared
    alpha.start()
    wait_role(alpha, "target")
    wait_mirror(beta, "web", "alpha:data1", "Mirroring")
    stop_in_order(beta, alpha, gamma)
    assert_identical(path(beta), path(alpha), path(gamma))
    writer.check(path(gamma))


def test_an_outdated_target_is_not_promoted(start_node: NodeFactory) -> None:
    """A broken mirror's target is Outdated: its source stopped tracking what it lacks."""
    alpha, beta = pair(start_node)
    wait_state(alpha, "Mirroring")
    with alpha.api() as api:
        assert api.post("/jobs/web/mirror/break").status_code == 200
    deadline = time.monotonic() + 10
    while mirror(beta, "web", "beta:data1")["data_state"] != "Outdated":
        assert time.monotonic() < deadline, mirror(beta, "web", "beta:data1")
        time.sleep(0.02)
    alpha.kill()
    refused = promote(beta)
    assert refused.status_code == 409
    assert "its data is Outdated" in refused.json()["error"]["message"]
    assert volume(beta)["role"] == "target"
