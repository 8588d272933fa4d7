"""Comparing a range of a mirror's source and target by region digests.

How this works: ``Comparer.compare`` first sends HASH_REQUEST through the link's sender, so
the target hashes the range after every frame sent before it (its writer thread runs them in
order), then reads the same range here on the reader threads, hashes it
(core/region_hash.py), waits for the target's HASHES and returns the local data with the
runs of regions whose digests differ.  Checksum resync (daemon/source/resync.py) ships those runs;
verify (daemon/source/verify.py) reports them.  An application write to the range while this runs
makes the answer unreliable for it: both callers use the resync's rule (a chunk that a write
raced is neither cleared nor trusted) to deal with that.  Answers are matched to requests by
the request's sequence number; a link that drops fails every open question.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

from volkeeper.core import region_hash
from volkeeper.core.peer import wire as pw
from volkeeper.core.units import format_size
from volkeeper.daemon.source.sender import fail_waiting
from volkeeper.errors import VolumeError

if TYPE_CHECKING:
    from volkeeper.core.mirror_ledger import Ledger
    from volkeeper.daemon.source.sender import Sender
    from volkeeper.io.volume_service import VolumeService
    from volkeeper.io.workers import IoWorkers


class Comparer:
    def __init__(
        self, ledger: Ledger[Any, Any], service: VolumeService, readers: IoWorkers
    ) -> None:
        self.ledger, self.service, self.readers = ledger, service, readers  # the mirror's
        self._answers: dict[int, asyncio.Future[pw.Hashes]] = {}  # request sequence ->

    async def compare(
        self, sender: Sender, offset: int, length: int, region_size: int
    ) -> tuple[bytes, list[tuple[int, int]]]:
        """(the local data, runs (first region, count) that differ) for the range."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[pw.Hashes] = loop.create_future()
        request = pw.HashRequest(offset, length, region_size)  # background work: resync lane
        what = f"hash of {offset}, {format_size(length)}"
        sender.send(request, 0, self._asked, (answer, what), resync=True)
        data = await self._read(offset, length)
        ours = await loop.run_in_executor(None, region_hash.digests, data, region_size)
        theirs = await answer
        return data, region_hash.differing_runs(ours, theirs.digests)

    def _asked(self, question: tuple[asyncio.Future[pw.Hashes], str], sequence: int) -> None:
        answer, what = question
        self._answers[sequence] = answer
        self.ledger.ask(sequence, what)  # an error ACK of it fails the target

    async def _read(self, offset: int, length: int) -> bytes:
        service = self.service
        cached = service.try_read(offset, length)
        if cached is not None:
            return bytes(cached)
        done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def read(result: object, error: BaseException | None) -> None:
            if done.done():
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(bytes(result))  # type: ignore[call-overload]

        self.readers.submit(service.volume.read, (offset, length), read)
        return await done

    def take(self, frame: pw.Hashes) -> bool:
        """The answer to one of our requests?"""
        answer = self._answers.pop(frame.request, None)
        if answer is None:
            return False
        self.ledger.answered(frame.request)
        if not answer.done():
            answer.set_result(frame)
        return True

    def failed(self, sequence: int, errno: int) -> bool:
        """The target answered request ``sequence`` with an error ACK?"""
        answer = self._answers.pop(sequence, None)
        if answer is None:
            return False
        if not answer.done():
            why = os.strerror(errno)
            answer.set_exception(VolumeError(f"the target could not hash: {why}", errno))
        return True

    def lost(self, reason: str, unsent: list[object]) -> None:
        fail_waiting([*self._answers.values(), *unsent], reason)
        self._answers.clear()
