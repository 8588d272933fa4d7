"""The write path of a mirrored source volume: intent first, then disk and targets together.

How this works: the NBD server hands every WRITE, WRITE_ZEROES, TRIM and FLUSH of a source
volume to ``Replication.submit``.  Each becomes an ``Op`` that waits in one FIFO until its
activity-log extents are durably active in every mirror's intent log (usually at once: hot
extents need no I/O; a cold one costs one snapshot write, shared by every op waiting for it).
The head op is then *issued*: the local write goes to the volume's writer thread and each
mirror ships it to its target (daemon/source/mirror.py) -- in the same order on every side, which
is how targets apply writes in the source's order.  The op completes, and the NBD reply
leaves, when the local disk and every mirror are done with it (sync mode: the target ACKed).

A completed FLUSH is durable locally and on every connected target, so it releases the
activity-log pins of the writes before it.  Pins only matter when an extent must leave the
log, so the engine issues a sync of its own only under pressure -- a write waits for an
extent while the log is full of pinned ones, more than half the log is pinned, or a mirror
remembers more than ``UNDURABLE_WRITES`` ACKed writes that no flush has covered yet -- and as a
backstop every ``SYNC_INTERVAL`` (a periodic fdatasync of everything would stall writes).

A write the local disk fails was shipped all the same: each of its mirrors keeps the op's
regions marked and resyncs them, so the target gets the source's data back (Mirror.
``source_write_failed``); the application is told the write failed.

A small write is written inline (a page-cache copy on the loop) while the volume's writer
thread has nothing queued, and so is a flush with nothing else in flight whose mirrors are
all asynchronous, as on an unmirrored volume; anything else goes to that thread.

Mirrors come and go while writes flow (a target added to a job, a mirror deleted): each op
remembers the mirrors it was submitted to (``op.mirrors``) and only those pin, ship and
release it.  A new mirror starts with every region marked, so it needs none of the ops before
it; a detached mirror gets no new ops, and ``drained`` waits until the ones it had are done.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
from collections.abc import Callable

from volkeeper.daemon.source.mirror import Mirror
from volkeeper.daemon.source.op import Op
from volkeeper.errors import VolkeeperError
from volkeeper.io.volume_service import Buffer, VolumeService

SYNC_INTERVAL = 30.0
PRESSURE_CHECK = 0.2  # how often the need for a sync is looked at
UNDURABLE_WRITES = 65536  # ACKed writes a mirror remembers until a flush covers them, at most
LOOKAHEAD_EXTENTS = 8  # a sequential writer's next extents, activated with the one it needs


class Replication:
    def __init__(self, service: VolumeService) -> None:
        self.service = service
        self.mirrors: tuple[Mirror, ...] = ()  # replaced, never changed: ops keep theirs
        self._queue: collections.deque[Op] = collections.deque()
        self.in_flight: set[Op] = set()
        self._syncing = False
        self._sync_task: asyncio.Task[None] | None = None

    def add(self, mirror: Mirror) -> None:
        """Ship every op submitted from now on to ``mirror`` too."""
        if self.mirrors:
            extent_bytes = self.mirrors[0].store.activity_log.extent_bytes
            if mirror.store.activity_log.extent_bytes != extent_bytes:
                raise ValueError("the mirrors of a volume must share their extent size")
        mirror.in_flight_ops = lambda: tuple(self.in_flight)
        self.mirrors = (*self.mirrors, mirror)

    def detach(self, mirror: Mirror) -> None:
        """Ship nothing more to ``mirror``; ops it already has still complete."""
        self.mirrors = tuple(m for m in self.mirrors if m is not mirror)

    async def drained(self, mirror: Mirror) -> None:
        """Wait until no op submitted to ``mirror`` is queued or in flight."""
        while any(mirror in op.mirrors for op in (*self._queue, *self.in_flight)):
            await asyncio.sleep(0.01)

    def start(self) -> None:
        self._sync_task = asyncio.create_task(self._sync_periodically())

    async def stop(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task

    def submit(
        self,
        command: str,
        offset: int,
        length: int,
        *,
        payload: bytes | bytearray = b"",
        fua: bool = False,
        may_trim: bool = False,
        on_done: Callable[[BaseException | None], None],
        recycle: Callable[[Buffer], None] | None = None,
        on_durable: Callable[[], None] | None = None,
    ) -> None:
        """``on_durable`` (a flush only): called once the flush holds locally and on every
        target, async ones included -- later than ``on_done`` when a target is async."""
        mirrors = self.mirrors
        op = Op(command, offset, length, payload, fua, may_trim, on_done=on_done, mirrors=mirrors)
        if on_durable is not None:
            op.on_durable = on_durable
        if recycle is not None:
            op.recycle, op.holds = recycle, 1 + len(mirrors)
        hot = True
        if command != "flush" and mirrors:
            first = mirrors[0].store.activity_log
            op.extents = first.extents_of(offset, length)
            for mirror in mirrors:
                log = mirror.store.activity_log
                if not log.pin(op.extents):
                    hot = False
                    extent_count = -(-self.service.volume.size // log.extent_bytes)
                    log.anticipate(offset, length, LOOKAHEAD_EXTENTS, extent_count)
        if hot and not self._queue:  # the common case: nothing to wait for
            self._issue(op)
            return
        self._queue.append(op)
        self._pump()

    def _pump(self) -> None:
        while self._queue:
            head = self._queue[0]
            waiting = [
                m
                for m in head.mirrors
                if m.tracking and not m.store.activity_log.ready(head.extents)
            ]
            if waiting:
                for mirror in waiting:
                    mirror.intent.write_snapshot(then=self._pump)
                return
            self._issue(self._queue.popleft())

    def _issue(self, op: Op) -> None:
        reply = op.on_done

        def finished(error: BaseException | None) -> None:
            self.in_flight.discard(op)
            reply(error)

        op.on_done = finished
        op.parts = 1 + len(op.mirrors)
        if op.is_flush:
            op.durable_parts = 1 + len(op.mirrors)
            op.on_durable = functools.partial(self._released, op, op.on_durable)
        flush_here = op.is_flush and self._may_flush_here(op)  # before op is in flight
        self.in_flight.add(op)
        for mirror in op.mirrors:  # ship first: an inline local write completes at once
            mirror.ship(op)
        if op.command == "write" and not op.fua and self._write_inline(op):
            return
        if flush_here:
            self._flush_inline(op)
            return
        function, args = _local(self.service, op)
        done_locally = functools.partial(_locally_done, op)
        self.service.submit(function, *args, mutating=True, on_done=done_locally)

    def _released(self, flush: Op, then: Callable[[], None]) -> None:
        """``flush`` holds locally and on every target: the writes before it are durable."""
        for mirror in flush.mirrors:
            mirror.release_durable(flush)
        then()

    def _may_flush_here(self, flush: Op) -> bool:
        """Nothing else is in flight, the writer is idle and no mirror is synchronous:
        fdatasync on the loop beats two thread hand-offs, as on an unmirrored volume (QD1
        write+flush loads).  With a synchronous mirror the thread is kept: measured with
        source and target on one disk, the local fdatasync made at once landed in an
        earlier journal commit than the target's, and the two were paid one after the other
        (docs/performance.md)."""
        idle = not self.in_flight and self.service.writer_idle
        return idle and all(mirror.asynchronous for mirror in flush.mirrors)

    def _flush_inline(self, op: Op) -> None:
        try:
            self.service.volume.flush()
        except VolkeeperError as error:
            _local_done(op, error)
            return
        _local_done(op, None)

    def _write_inline(self, op: Op) -> bool:
        try:
            done = self.service.try_write(op.offset, op.payload)
        except VolkeeperError as error:
            _local_done(op, error)
            return True
        if done != len(op.payload):
            if done:  # rare: a partial non-blocking write; the writer thread does the rest
                rest = (op.offset + done, memoryview(op.payload)[done:], False)
                done_locally = functools.partial(_locally_done, op)
                self.service.submit(self.service.write, *rest, mutating=True, on_done=done_locally)
                return True
            return False
        _local_done(op, None)
        return True

    async def _sync_periodically(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(PRESSURE_CHECK)
            due = loop.time() - last >= SYNC_INTERVAL or self._under_pressure()
            if due and not self._syncing and any(m.undurable_writes for m in self.mirrors):
                self._syncing = True
                last = loop.time()
                self.submit("flush", 0, 0, on_done=self._synced)
            self._pump()

    def _under_pressure(self) -> bool:
        for mirror in self.mirrors:
            log = mirror.store.activity_log
            if log.pinned_extents * 2 > log.capacity or (self._queue and log.waiting):
                return True
            if mirror.undurable_writes > UNDURABLE_WRITES:
                return True
        return False

    def _synced(self, error: BaseException | None) -> None:
        self._syncing = False

    async def sync(self) -> None:
        """Flush the volume and every connected target, and wait until the flush is durable
        on each of them, async targets included (before a clean stop: then nothing written
        so far has to be resent -- a mirror stopped before an async target's FLUSH ACK would
        mark every write since the last flush, on its sync siblings too)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def durable() -> None:
            if not done.done():
                done.set_result(None)

        def finished(error: BaseException | None) -> None:
            if error is not None:  # the local flush failed: it will never be durable
                durable()

        self.submit("flush", 0, 0, on_done=finished, on_durable=durable)
        await done


def _locally_done(op: Op, result: object, error: BaseException | None) -> None:
    _local_done(op, error)


def _local_done(op: Op, error: BaseException | None) -> None:
    op.release_payload()
    if error is not None and not op.is_flush:
        for mirror in op.mirrors:  # the targets may get what this disk did not take
            mirror.source_write_failed(op, error)
    op.part_done(error)
    if op.is_flush and error is None:
        op.durable_done()


def _local(service: VolumeService, op: Op) -> tuple[Callable[..., object], tuple[object, ...]]:
    if op.command == "write":
        return service.write, (op.offset, op.payload, op.fua)
    if op.command == "zero":
        return service.write_zeroes, (op.offset, op.length, op.may_trim, op.fua)
    if op.command == "trim":
        return service.trim, (op.offset, op.length, op.fua)
    return service.volume.flush, ()
