"""One end of a replication link in a test: collects the frames and losses it sees."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from volkeeper.core.peer.wire import Frame
from volkeeper.io.peer_link import PeerLink


class Side:
    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.lost: list[str] = []
        self.links: list[PeerLink] = []

    def on_frame(self, link: PeerLink, frame: Frame) -> None:
        self.frames.append(frame)

    def on_lost(self, link: PeerLink, reason: str) -> None:
        self.lost.append(reason)

    def make(self) -> PeerLink:
        link = PeerLink(self.on_frame, self.on_lost)
        self.links.append(link)
        return link


async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
