"""A hand-driven source talking to a real target side (``TargetVolumes`` behind a peer listener).

How this works: ``run(directory, volumes, scenario)`` starts a target node's replication side on a
free port, runs the async ``scenario(target)``, and closes it; ``target.source(first)`` connects a
``Source`` that sends frames by hand and collects every answer.  Used by tests/daemon.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from volkeeper.core.addresses import TcpAddress
from volkeeper.core.peer import wire as pw
from volkeeper.daemon.target.target_record import TargetRecords
from volkeeper.daemon.target.targets import TargetVolumes
from volkeeper.io.peer_link import PeerLink, connect
from volkeeper.io.peer_server import PeerServer
from volkeeper.io.volume import Volume
from volkeeper.io.volume_service import VolumeService
from volkeeper.io.workers import IoWorkers
from volkeeper_lab.launcher import free_tcp_port

MiB = 1024 * 1024


class Source:
    """A hand-driven source: sends frames, collects what the target answers."""

    def __init__(self) -> None:
        self.frames: list[pw.Frame] = []
        self.lost: list[str] = []
        self.link: PeerLink | None = None

    def on_frame(self, link: PeerLink, frame: pw.Frame) -> None:
        self.frames.append(frame)

    def on_lost(self, link: PeerLink, reason: str) -> None:
        self.lost.append(reason)

    async def answers(self, count: int, timeout: float = 5.0) -> list[pw.Frame]:
        async with asyncio.timeout(timeout):
            while len(self.frames) < count and not self.lost:
                await asyncio.sleep(0.005)
        return self.frames


def hello(volume: str = "data1", *, job: str = "web", node: str = "alpha", size: int = 4 * MiB,
          sector: int = 512) -> pw.Hello:  # fmt: skip
    return pw.Hello(
        node=node, volume=volume, job=job, source_volume="data0", volume_size=size,
        sector_size=sector,
        current_generation=0x1234, previous_generation=0,
    )  # fmt: skip


class Target:
    def __init__(self, directory: Path, volumes: Sequence[Volume]) -> None:
        self.directory = directory
        self.readers = IoWorkers(2, "test-readers")
        self.services = {v.name: VolumeService(v, self.readers) for v in volumes}
        self.targets = TargetVolumes(
            "beta", self.services.get, TargetRecords(directory / "targets")
        )
        self.targets.vouch = lambda node, link: None  # plain links, any source: the session alone
        self.server = PeerServer(self.targets.make_link)
        self.address = TcpAddress("127.0.0.1", free_tcp_port())

    async def source(self, first: pw.Frame) -> Source:
        source = Source()
        source.link = await connect(self.address, source.on_frame, source.on_lost)
        source.link.send(first)
        await source.answers(1)
        return source


def run(directory: Path, volumes: Sequence[Volume],
        scenario: Callable[[Target], Awaitable[None]]) -> Target:  # fmt: skip
    target = Target(directory, volumes)

    async def main() -> None:
        await target.server.listen(target.address)
        try:
            await scenario(target)
        finally:
            await target.server.close()

    asyncio.run(main())
    target.readers.shutdown()
    return target
