"""Pinned node identities on the replication link, over real loopback sockets.

Nodes alpha and beta each have an identity (io/identity.py) in a state directory of their own
and pin each other's fingerprint, as ``volkeeper node trust`` does; beta serves, alpha dials
it by name.  Every refusal here is a way an attacker, or a careless change, would get at a
volume: a peer nobody pinned, a key that changed, a pinned node posing as another, plain TCP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.support.peer_side import Side, until
from volkeeper.core.addresses import TcpAddress
from volkeeper.core.peer.wire import Ack, Write
from volkeeper.errors import PeerError
from volkeeper.io import identity
from volkeeper.io.identity import KnownPeers
from volkeeper.io.peer_link import PeerLink, connect
from volkeeper.io.peer_server import PeerServer
from volkeeper.io.peer_trust import PeerPolicy, PeerTrust
from volkeeper_lab.launcher import free_tcp_port


class Cluster:
    """Nodes with identities; ``trust(a, b)`` pins b's fingerprint on a."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ports = {name: free_tcp_port() for name in ("alpha", "beta", "gamma")}
        self.fingerprints = {
            name: identity.ensure(root / name, name)[0].fingerprint for name in self.ports
        }

    def trust(self, node: str, peer: str, fingerprint: str | None = None) -> None:
        KnownPeers(self.root / node).trust(peer, fingerprint or self.fingerprints[peer])

    def node(self, name: str, insecure: tuple[str, ...] = ()) -> PeerTrust:
        peers = {
            other: PeerPolicy(TcpAddress("127.0.0.1", port), insecure=other in insecure)
            for other, port in self.ports.items()
            if other != name
        }
        own = identity.load(self.root / name)
        return PeerTrust(name, peers, KnownPeers(self.root / name), identity=own)

    async def serve(self, trust: PeerTrust, side: Side) -> PeerServer:
        server = PeerServer(side.make, trust=trust)
        await server.listen(TcpAddress("127.0.0.1", self.ports[trust.node]))
        return server


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


async def dial(cluster: Cluster, trust: PeerTrust, peer: str, side: Side) -> PeerLink:
    address = TcpAddress("127.0.0.1", cluster.ports[peer])
    return await connect(address, side.on_frame, side.on_lost, trust=trust, peer_name=peer)


def test_pinned_nodes_talk_once_the_server_has_fetched_the_clients_certificate(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path)
    cluster.trust("alpha", "beta")
    cluster.trust("beta", "alpha")

    async def scenario() -> None:
        alpha, beta = cluster.node("alpha"), cluster.node("beta")
        beta_side, alpha_side = Side(), Side()
        server = await cluster.serve(beta, beta_side)
        alpha_server = await cluster.serve(alpha, Side())  # where beta fetches from
        assert beta.missing() == {"alpha": cluster.fingerprints["alpha"]}
        with structlog.testing.capture_logs() as logs:  # beta does not hold alpha's yet
            link = await dial(cluster, alpha, "beta", alpha_side)
            link.send(Write(0, b"x" * 4096))
            await until(lambda: alpha_side.lost)
        assert beta_side.frames == []
        assert any(e["event"] == "replication TLS handshake failed" for e in logs)
        assert await beta.fetch_missing() == ["alpha"] and beta.missing() == {}

        link = await dial(cluster, alpha, "beta", alpha_side)
        link.send(Write(0, b"y" * 4096))
        await until(lambda: beta_side.frames)
        accepted = beta_side.links[-1]
        assert beta.check_source("alpha", accepted) is None
        gamma = cluster.fingerprints["gamma"]
        assert beta.check_source("gamma", accepted) == (
            f"gamma is not a trusted peer of beta (it presented {cluster.fingerprints['alpha']})"
        )
        accepted.send(Ack(1, 0))
        await until(lambda: alpha_side.frames)
        assert alpha_side.frames == [Ack(1, 0)]
        assert gamma not in str(accepted.certificate_der())
        link.close("done")
        await server.close()
        await alpha_server.close()

    run(scenario)


def test_an_unpinned_peer_is_refused_with_its_fingerprint_and_what_to_run(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path)

    async def scenario() -> None:
        beta_side = Side()
        server = await cluster.serve(cluster.node("beta"), beta_side)
        with pytest.raises(PeerError) as info:
            await dial(cluster, cluster.node("alpha"), "beta", Side())
        beta_print = cluster.fingerprints["beta"]
        assert str(info.value) == (
            f"peer beta is not trusted yet: it presents {beta_print}. If that is what "
            f"`volkeeper node show` prints on beta, run `volkeeper node trust beta "
            f"{beta_print}` here (or set fingerprint in [peers])"
        )
        assert beta_side.frames == []  # nothing of ours was sent
        await server.close()

    run(scenario)


def test_a_changed_identity_is_refused_loudly(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    old = "sha256:" + "0" * 64
    cluster.trust("alpha", "beta", old)  # what alpha pinned before beta's key was re-made

    async def scenario() -> None:
        server = await cluster.serve(cluster.node("beta"), Side())
        with pytest.raises(PeerError) as info:
            await dial(cluster, cluster.node("alpha"), "beta", Side())
        message = str(info.value)
        assert message.startswith("REFUSED: the identity of peer beta has changed.")
        assert f"It presents {cluster.fingerprints['beta']}, but {old} is pinned" in message
        assert "Someone may be impersonating beta" in message
        await server.close()

    run(scenario)


def test_a_node_nobody_pinned_cannot_reach_a_link(tmp_path: Path) -> None:
    """mallory has a key of its own and says it is alpha: its handshake fails at beta."""
    cluster = Cluster(tmp_path)
    cluster.trust("beta", "alpha")
    mallory = identity.create(tmp_path / "mallory", "alpha")
    cluster.trust("mallory", "beta")

    async def scenario() -> None:
        beta, beta_side = cluster.node("beta"), Side()
        alpha_server = await cluster.serve(cluster.node("alpha"), Side())
        await beta.fetch_missing()  # the real alpha's certificate
        await alpha_server.close()
        server = await cluster.serve(beta, beta_side)
        impostor = PeerTrust(
            "alpha",
            {"beta": PeerPolicy(TcpAddress("127.0.0.1", cluster.ports["beta"]))},
            KnownPeers(tmp_path / "mallory"),
            identity=mallory,
        )
        side = Side()
        link = await dial(cluster, impostor, "beta", side)  # beta is who mallory expects...
        link.send(Write(0, b"evil" * 1024))
        await until(lambda: side.lost)  # ...but beta does not know mallory's certificate
        assert "it may have refused our TLS certificate" in side.lost[0]
        assert beta_side.frames == []
        assert all(link._transport is None for link in beta_side.links)  # never connected
        await server.close()

    run(scenario)


def test_plain_tcp_is_refused_unless_a_peer_is_insecure_and_then_only_for_it(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path)

    async def scenario() -> None:
        secure_side = Side()
        server = await cluster.serve(cluster.node("beta"), secure_side)
        side = Side()
        plain = await connect(
            TcpAddress("127.0.0.1", cluster.ports["beta"]), side.on_frame, side.on_lost
        )
        plain.send(Write(0, b"x" * 4096))
        await until(lambda: side.lost)
        assert "it takes plain TCP only from peers it has as insecure = true" in side.lost[0]
        assert secure_side.links == []
        await server.close()

        insecure, open_side = cluster.node("beta", insecure=("alpha",)), Side()
        server = await cluster.serve(insecure, open_side)
        plain = await dial(cluster, cluster.node("alpha", insecure=("beta",)), "beta", Side())
        plain.send(Write(0, b"x" * 4096))
        await until(lambda: open_side.frames)
        accepted = open_side.links[0]
        assert accepted.certificate_der() is None
        assert insecure.check_source("alpha", accepted) is None
        assert insecure.check_source("gamma", accepted) == (
            "plain TCP from 127.0.0.1 claiming to be gamma refused: only a peer configured "
            "insecure = true may connect without TLS"
        )
        assert insecure.security("alpha") == "insecure" and insecure.security("gamma") == (
            "unpinned"
        )
        plain.close("done")
        await server.close()

    run(scenario)


def test_an_unreadable_known_peers_file_trusts_nobody_and_says_so(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    cluster.trust("alpha", "beta")
    alpha = cluster.node("alpha")
    assert alpha.pin("beta") == cluster.fingerprints["beta"]
    (tmp_path / "alpha" / "known_peers.json").write_text("{not json")
    with structlog.testing.capture_logs() as logs:
        assert alpha.pin("beta") is None and alpha.security("beta") == "unpinned"
        assert alpha.missing() == {}
    (complaint,) = [e for e in logs if e["event"].startswith("known peers unreadable")]
    assert "not a volkeeper known-peers file" in complaint["error"]
    (tmp_path / "alpha" / "known_peers.json").unlink()  # the administrator's repair
    cluster.trust("alpha", "beta")
    assert alpha.pin("beta") == cluster.fingerprints["beta"]
