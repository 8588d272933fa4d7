"""Replication links over real loopback TCP: frames both ways, corruption, back-pressure."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from volkeeper.core.addresses import TcpAddress
from volkeeper.core.peer.wire import Ack, Flush, Frame, Ping, Write
from volkeeper.errors import PeerError, VolkeeperError
from volkeeper.io.peer_link import PeerLink, connect
from volkeeper.io.peer_server import PeerServer
from volkeeper_lab.launcher import free_tcp_port


class Side:
    """Collects what one end of a link receives."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.lost: list[str] = []
        self.got_frame = asyncio.Event()
        self.got_lost = asyncio.Event()

    def on_frame(self, link: PeerLink, frame: Frame) -> None:
        self.frames.append(frame)
        self.got_frame.set()

    def on_lost(self, link: PeerLink, reason: str) -> None:
        self.lost.append(reason)
        self.got_lost.set()

    def link(self) -> PeerLink:
        return PeerLink(self.on_frame, self.on_lost)


async def pair() -> tuple[PeerServer, Side, Side, PeerLink, list[PeerLink]]:
    server_side, client_side = Side(), Side()
    accepted: list[PeerLink] = []

    def make() -> PeerLink:
        link = server_side.link()
        accepted.append(link)
        return link

    server = PeerServer(make)
    address = TcpAddress("127.0.0.1", free_tcp_port())
    await server.listen(address)
    client = await connect(address, client_side.on_frame, client_side.on_lost)
    return server, server_side, client_side, client, accepted


async def until(predicate: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


def test_frames_cross_in_order_both_ways() -> None:
    async def scenario() -> None:
        server, server_side, client_side, client, accepted = await pair()
        payloads = [os.urandom(n) for n in (1, 4096, 1 << 20, 3)]
        sequences = [client.send(Write(i * 4096, data)) for i, data in enumerate(payloads)]
        sequences.append(client.send(Flush()))
        assert sequences == [1, 2, 3, 4, 5]
        await until(lambda: len(server_side.frames) == 5)
        writes = server_side.frames[:4]
        assert [bytes(f.data) for f in writes if isinstance(f, Write)] == payloads
        assert isinstance(server_side.frames[4], Flush)
        link = accepted[0]
        assert link.last_received == 5
        link.send(Ack(5, 0, durable=True))
        await until(lambda: client_side.frames)
        assert client_side.frames == [Ack(5, 0, durable=True)]
        client.close("done")
        await until(lambda: server_side.lost)
        assert client_side.lost == ["done"]
        await server.close()

    asyncio.run(scenario())


def test_a_corrupt_frame_closes_that_link_only_once_and_the_server_accepts_again() -> None:
    async def scenario() -> None:
        server, server_side, _, client, _ = await pair()
        raw = socket.create_connection(("127.0.0.1", server.address.port))  # type: ignore[union-attr]
        raw.sendall(b"VKP1" + bytes(40))  # bad type and checksum
        await until(lambda: server_side.lost)
        assert len(server_side.lost) == 1 and "protocol error" in server_side.lost[0]
        raw.close()
        client.send(Ping(7))  # the healthy link is untouched
        await until(lambda: any(isinstance(f, Ping) for f in server_side.frames))
        again = await connect(server.address, Side().on_frame, Side().on_lost)  # type: ignore[arg-type]
        again.close("bye")
        client.close("bye")
        await server.close()

    asyncio.run(scenario())


def test_send_after_close_raises_peer_error_and_connect_failures_name_the_peer() -> None:
    async def scenario() -> None:
        server, _, _, client, _ = await pair()
        client.close("test")
        with pytest.raises(PeerError, match="closed"):
            client.send(Ping(1))
        await server.close()
        port = free_tcp_port()
        with pytest.raises(PeerError, match=f"127.0.0.1:{port}"):
            await connect(TcpAddress("127.0.0.1", port), Side().on_frame, Side().on_lost)

    asyncio.run(scenario())


def test_a_live_replication_port_is_not_taken_over() -> None:
    async def scenario() -> None:
        server, _, _, client, _ = await pair()
        other = PeerServer(Side().link)
        with pytest.raises(VolkeeperError, match="cannot listen for replication"):
            await other.listen(server.address)  # type: ignore[arg-type]
        client.close("bye")
        await server.close()

    asyncio.run(scenario())
