"""A mirror's resync: stream the regions its intent log marks to the target, then clear them.

How this works: the walk is I/O around decisions made elsewhere.  Each pass is planned by
``resync_pass`` (core/resync_plan.py): runs of marked regions cut into chunks of at most
``CHUNK_BYTES``, a commit after every ``BATCH_BYTES``.  For each chunk the walk tells the
engine (``MirrorEngine.resync_chunk``, with the application writes in flight, which race
it), reads the source volume and sends a RESYNC_DATA frame.  Reads overlap: up to
``READ_DEPTH`` are outstanding on the node's reader pool (a read the page cache can answer is
done on the loop), and each frame leaves as soon as its read returns -- regions are
independent, so their order on the wire does not matter.  At a commit the target is sent a
FLUSH; once it ACKs, the engine says what the batch proved (``resync_committed``: only chunks
whose every frame was ACKed without an error and that no application write raced) and the
mirror clears it.  A raced chunk is sent again by the next pass; an error ACK fails the
target (the mirror drops the link, and this resync ends with nothing of the batch cleared).
Application writes keep flowing meanwhile, so a pass may leave new marks; passes repeat
until the engine says the resync is complete (``resync_complete``: nothing marked), which
converges because each pass only resends what writes touched during it.  Then the target
records UpToDate and the mirror is told (``on_finished``; daemon/source/walks.py).

A *checksum* resync (``mirror resync --checksum``: every region is marked, but the target
probably holds most of it already) compares each chunk first (daemon/source/compare.py: the
target's region digests against ours) and sends only the regions that differ; a chunk found
equal is cleared at the next batch like a sent one (unless a write raced it).

Progress (done bytes, a rate over the last few seconds, ETA) is kept here for ``status``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import structlog

from volkeeper.core.mirror_ledger import Chunk
from volkeeper.core.mirror_state import MirrorState
from volkeeper.core.peer import wire as pw
from volkeeper.core.resync_plan import COMMIT, Span, resync_pass
from volkeeper.core.stats import RateMeter
from volkeeper.daemon.source.sender import fail_waiting
from volkeeper.daemon.source.walk_host import WalkHost
from volkeeper.errors import PeerError
from volkeeper.io.peer_link import PeerLink

if TYPE_CHECKING:
    from volkeeper.core.mirror_engine import MirrorEngine
    from volkeeper.core.ready import Ready
    from volkeeper.daemon.source.op import Op
    from volkeeper.daemon.source.sender import Sender
    from volkeeper.io.workers import IoWorkers

log = structlog.get_logger("volkeeper.resync")

CHUNK_BYTES = 1024 * 1024  # bytes read and sent per RESYNC_DATA frame, at most
BATCH_BYTES = 16 * 1024 * 1024  # bytes sent between FLUSHes that let bits be cleared
READ_DEPTH = 16  # reads outstanding at once
RATE_WINDOW = 5.0  # seconds of history behind the reported rate


class ResyncHost(WalkHost, Protocol):
    """What a resync needs of its mirror beyond a walk's (daemon/source/walk_host.py)."""

    sent_bytes: int  # counts the payload the resync ships, with the writes
    resync_sent_bytes: int  # counts it alone

    @property
    def state(self) -> MirrorState: ...

    @property
    def readers(self) -> IoWorkers: ...

    @property
    def engine(self) -> MirrorEngine[Op, range]: ...

    def apply(self, ready: Ready[Op, range]) -> None: ...


class Resync:
    def __init__(
        self,
        mirror: ResyncHost,
        link: PeerLink,
        sender: Sender,
        checksum: bool,
        on_finished: Callable[[Resync], None],
    ) -> None:
        self.mirror = mirror
        self.on_finished = on_finished  # the resync completed: the mirror is told
        self.link = link
        self.sender = sender  # frames go out through it, in order with application writes
        self.checksum = checksum
        self.shipped_bytes = 0  # checksum mode: what differed and was sent
        self.bitmap = mirror.store.bitmap
        self.done_bytes = 0
        self.engine = mirror.engine  # decides what a chunk's fate clears, and when it is done
        self.ledger = self.engine.ledger  # the chunks' fate: read, sent, ACKed, raced, cleared
        self._meter = RateMeter(RATE_WINDOW)
        self._reads = 0  # outstanding
        self._read_slot = asyncio.Event()
        self._error: BaseException | None = None
        self._answers: dict[int, asyncio.Future[int]] = {}  # sequence of a question -> errno

    # -- progress ---------------------------------------------------------------------------

    @property
    def remaining_bytes(self) -> int:
        unsent = sum(chunk.length for chunk in self.ledger.open_chunks)
        return max(0, self.bitmap.marked_bytes - unsent)

    def rate(self, now: float) -> float:
        """Bytes per second over the last RATE_WINDOW seconds."""
        return self._meter.rate(now, self.done_bytes)

    def _sample(self) -> None:
        self._meter.sample(asyncio.get_running_loop().time(), self.done_bytes)

    # -- the walk ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Resync until the engine says it is complete; PeerError if the link goes."""
        self._sample()
        while self.link.is_open and self.mirror.state is MirrorState.RESYNCING:
            for span in resync_pass(self.bitmap, CHUNK_BYTES, BATCH_BYTES):
                if span is COMMIT:
                    await self._commit()
                    continue
                await self._slot()
                if self.mirror.state is not MirrorState.RESYNCING:
                    return
                self._send_chunk(span)
            if self.engine.resync_complete and await self._finish():
                return

    async def _slot(self) -> None:
        """Wait for a free read slot and for room in the socket's send buffer."""
        while self._reads >= READ_DEPTH:
            self._read_slot.clear()
            await self._read_slot.wait()
        self._check()
        await self.sender.drained()
        self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if not self.link.is_open:
            raise PeerError("link lost during resync")

    def _send_chunk(self, span: Span) -> None:
        racing = [(op.offset, op.length) for op in self.mirror.in_flight_ops() if not op.is_flush]
        chunk = self.engine.resync_chunk(span, racing)
        if self.checksum:
            self._reads += 1
            task = asyncio.ensure_future(self._compare(chunk))
            task.add_done_callback(self._compared)
            return
        data = self.mirror.service.try_read(chunk.offset, chunk.length)
        if data is not None:
            self._ship(chunk, data)
            return
        self._reads += 1

        def read(result: object, error: BaseException | None) -> None:
            self._reads -= 1
            self._read_slot.set()
            if error is not None:
                self._error = error
            elif isinstance(result, bytes | bytearray):
                self._ship(chunk, result)

        volume = self.mirror.service.volume
        self.mirror.readers.submit(volume.read, (chunk.offset, chunk.length), read)

    async def _compare(self, chunk: Chunk) -> None:
        region = self.bitmap.region_size
        data, runs = await self.mirror.comparer.compare(
            self.sender, chunk.offset, chunk.length, region
        )
        view = memoryview(data)
        for first, count in runs:
            start, stop = first * region, min((first + count) * region, chunk.length)
            if self.link.is_open:
                self._send_data(chunk, chunk.offset + start, view[start:stop])
            self.mirror.sent_bytes += stop - start
            self.mirror.resync_sent_bytes += stop - start
            self.shipped_bytes += stop - start
        self.done_bytes += chunk.length
        self._sample()

    def _compared(self, task: asyncio.Future[None]) -> None:
        self._reads -= 1
        self._read_slot.set()
        if not task.cancelled() and task.exception() is not None:
            self._error = task.exception()

    def _ship(self, chunk: Chunk, data: bytes | bytearray) -> None:
        if not self.link.is_open:
            return
        self._send_data(chunk, chunk.offset, data)
        self.mirror.sent_bytes += chunk.length
        self.mirror.resync_sent_bytes += chunk.length
        self.done_bytes += chunk.length
        self._sample()

    def _send_data(self, chunk: Chunk, offset: int, data: pw.Buffer) -> None:
        self.ledger.chunk_frame(chunk)
        size = memoryview(data).nbytes
        self.sender.send(
            pw.ResyncData(offset, data), size, self.ledger.chunk_frame_sent, chunk, resync=True
        )

    async def _commit(self) -> None:
        """FLUSH the target; once durable, clear what the ledger says is proven there."""
        while self._reads:
            self._read_slot.clear()
            await self._read_slot.wait()
        self._check()
        if not self.ledger.commit():
            return
        if await self._ask(pw.Flush(), "resync flush"):
            raise PeerError("target failed to flush resync data")
        self.mirror.apply(self.engine.resync_committed())
        self._check()

    async def _finish(self) -> bool:
        """The target records UpToDate, then the mirror is Mirroring -- unless a region was
        marked meanwhile (a write the source's disk failed: the engine told the target it is
        Inconsistent again): then False, and the walk goes on."""
        mirror = self.mirror
        state = pw.State(pw.DataState.UP_TO_DATE, mirror.store.generations.current, 0)
        self.engine.finishing = True
        if await self._ask(state, "UP_TO_DATE record"):
            raise PeerError("target failed to record its new state")
        await mirror.intent.durable()
        if not self.engine.resync_complete:
            return False
        self.on_finished(self)
        return True

    async def _ask(self, frame: pw.Frame, what: str) -> int:
        """Send ``frame`` and wait for the target's ACK; returns its errno."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.sender.send(frame, 0, self._asked, (future, what), resync=True)
        return await future

    def _asked(self, question: tuple[asyncio.Future[int], str], sequence: int) -> None:
        future, what = question
        self._answers[sequence] = future
        self.ledger.ask(sequence, what)

    # -- from the mirror ----------------------------------------------------------------------

    def answer(self, sequence: int, errno: int) -> bool:
        """The ACK of one of our questions (FLUSH, STATE)?  Its waiter gets the errno."""
        future = self._answers.pop(sequence, None)
        if future is None:
            return False
        if not future.done():
            future.set_result(errno)
        return True

    def lost(self, reason: str, unsent: list[object]) -> None:
        """The link is gone; ``unsent``: what the sender still held (our questions too)."""
        fail_waiting([*self._answers.values(), *unsent], reason)
        self._answers.clear()
        self._read_slot.set()
