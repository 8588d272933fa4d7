"""Online verify: compare a mirror's source and target by region digests while writes go on.

How this works: ``Verify.run`` walks the volume in ``CHUNK_BYTES`` chunks (``verify_chunks``,
core/verify_plan.py), ``DEPTH`` at a time, each through ``Comparer.compare``
(daemon/source/compare.py).  A chunk that an application write raced (in flight when its
comparison started, or issued before it ended -- the same rule as the resync's) proves
nothing: it is compared again in a later pass, at most ``PASSES`` passes, and what is still
raced after them is reported as unverified.  A region the intent log marks is not expected
to match (the resync will send it) and is not counted as a difference (``differences``,
core/verify_plan.py).  Differences are reported -- bytes, and the offsets of the first
``MAX_LISTED`` regions -- and, with ``mark``, marked in the intent log so the resync sends
them.  The mirror's walks (daemon/source/walks.py) keep the last result for ``status``.
"""

from __future__ import annotations

import asyncio
import datetime
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from volkeeper.core.verify_plan import differences, verify_chunks
from volkeeper.daemon.source.walk_host import WalkHost
from volkeeper.errors import PeerError, VolumeError

if TYPE_CHECKING:
    from volkeeper.daemon.source.mirror_spec import MirrorSpec
    from volkeeper.daemon.source.op import Op
    from volkeeper.daemon.source.sender import Sender

log = structlog.get_logger("volkeeper.verify")

CHUNK_BYTES = 4 * 1024 * 1024
DEPTH = 4  # chunks compared at once
PASSES = 3
MAX_LISTED = 100


@dataclass
class _Chunk:
    offset: int
    length: int
    raced: bool = False


@dataclass
class VerifyResult:
    mark: bool
    total_bytes: int
    done_bytes: int = 0
    differing_bytes: int = 0
    differing_offsets: list[int] = field(default_factory=list)
    unverified_bytes: int = 0
    running: bool = True
    error: str | None = None
    started: str = field(default_factory=lambda: _now())
    finished: str | None = None

    def view(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "mark": self.mark,
            "done_bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
            "differing_bytes": self.differing_bytes,
            "differing_offsets": self.differing_offsets[:MAX_LISTED],
            "unverified_bytes": self.unverified_bytes,
            "started": self.started,
            "finished": self.finished,
            "error": self.error,
        }


class VerifyHost(WalkHost, Protocol):
    """What a verify needs of its mirror beyond a walk's (daemon/source/walk_host.py)."""

    @property
    def spec(self) -> MirrorSpec: ...


class Verify:
    def __init__(self, mirror: VerifyHost, sender: Sender, mark: bool) -> None:
        self.mirror = mirror
        self.sender = sender
        self.result = VerifyResult(mark, mirror.service.volume.size)
        self._open: list[_Chunk] = []  # being compared

    async def run(self) -> VerifyResult:
        result, size = self.result, self.result.total_bytes
        todo = [_Chunk(offset, length) for offset, length in verify_chunks(size, CHUNK_BYTES)]
        try:
            for _ in range(PASSES):
                todo = await self._pass(todo)
                if not todo:
                    break
            result.unverified_bytes = sum(chunk.length for chunk in todo)
        except (PeerError, VolumeError) as exc:
            result.error = str(exc)
        finally:
            result.differing_offsets.sort()  # chunks finish in any order
            result.running, result.finished = False, _now()
        if result.mark and result.differing_bytes:
            await self.mirror.intent.durable()
        summary = {k: v for k, v in result.view().items() if k != "differing_offsets"}
        spec = self.mirror.spec
        log.info("verify finished", job=spec.job, target=spec.target, **summary)
        return result

    async def _pass(self, chunks: list[_Chunk]) -> list[_Chunk]:
        """Compare ``chunks``; returns the ones a write raced."""
        raced: list[_Chunk] = []
        slots = asyncio.Semaphore(DEPTH)

        async def one(chunk: _Chunk) -> None:
            async with slots:
                if not self.sender.link.is_open:
                    raise PeerError("link lost during verify")
                await self._compare(chunk)
                if chunk.raced:
                    raced.append(chunk)

        await asyncio.gather(*(one(chunk) for chunk in chunks))
        return sorted(raced, key=lambda chunk: chunk.offset)

    async def _compare(self, chunk: _Chunk) -> None:
        chunk.raced = False
        self._open.append(chunk)
        for op in self.mirror.in_flight_ops():
            if not op.is_flush:
                self.note_race(op)
        try:
            bitmap = self.mirror.store.bitmap
            region = bitmap.region_size
            _, runs = await self.mirror.comparer.compare(
                self.sender, chunk.offset, chunk.length, region
            )
        finally:
            self._open.remove(chunk)
        if chunk.raced:
            return
        result = self.result
        found = differences(runs, chunk.offset, chunk.length, region, bitmap.is_marked)
        for offset, length in found:
            result.differing_bytes += length
            if len(result.differing_offsets) < MAX_LISTED:
                result.differing_offsets.append(offset)
            if result.mark:
                bitmap.mark(offset, length)
        result.done_bytes += chunk.length

    def note_race(self, op: Op) -> None:
        """``op`` is being written: a comparison of a range it overlaps proves nothing."""
        end = op.offset + max(op.length, 1)
        for chunk in self._open:
            if op.offset < chunk.offset + chunk.length and chunk.offset < end:
                chunk.raced = True


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
