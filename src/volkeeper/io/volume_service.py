"""A volume as the NBD server sees it: inline fast paths, an ordered writer thread, a lock.

How this works: the event loop should not wait on a disk, and a hop to a thread and back
costs tens of microseconds, so each request takes the cheapest safe route:

    request                          route
    read, data in the page cache     inline: ``preadv2(RWF_NOWAIT)`` answers on the loop
    read, cache miss                 io_uring (io/uring.py) where the node has a ring; else
                                     the node's shared reader pool (many threads, parallel)
    small write, writer idle         inline: RWF_NOWAIT where the kernel has it, else a plain
                                     buffered ``pwrite`` (a page-cache copy of a few us)
    other writes, trim, zero, flush  this volume's writer thread, one at a time, in order

Write order: mutations go to the writer thread in arrival order, and a write is only done
inline while the writer has nothing queued, so the volume sees writes in the order they were
accepted.  ``submit`` runs a blocking call on a thread and calls ``on_done(result, error)``
back on the event loop (see io/workers.py), with no asyncio Task or Future in between.

Cold reads: while reads keep missing the page cache, the RWF_NOWAIT probe is skipped for most
of them (a wasted syscall and buffer each) and retried now and then.

A locked volume (the target of a mirror, or configured read-only) is exported read-only and
its description says why; the NBD layer turns writes to it into EPERM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from volkeeper.core.nbd_handshake import ExportInfo
from volkeeper.core.stats import VolumeStats
from volkeeper.io.uring import UringReads
from volkeeper.io.volume import Volume
from volkeeper.io.workers import Done, IoWorkers

Buffer = bytes | bytearray | memoryview


class WriteHook(Protocol):
    """Takes over a source volume's mutations and flushes (daemon/source/replication.py)."""

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
    ) -> None:
        """``on_done(error)`` answers the request; ``recycle(payload)``, if given, is called
        once nothing (disk, peer socket) holds the payload any more."""


INLINE_WRITE_MAX = 64 * 1024  # larger writes overlap with parsing on the writer thread
MISSES_BEFORE_SKIPPING = 8  # consecutive cache misses before the probe is rationed
PROBE_EVERY = 16  # while rationed, probe one read in this many


class VolumeService:
    def __init__(
        self,
        volume: Volume,
        readers: IoWorkers,
        *,
        read_only: bool = False,
        ring: UringReads | None = None,
    ) -> None:
        self.volume = volume
        self._ring = ring
        self.stats = VolumeStats()
        self.read_only = read_only
        self.lock_reason: str | None = "configured read-only" if read_only else None
        self._readers = readers
        self._writer = IoWorkers(1, f"volkeeper-{volume.name}")
        self._mutations_queued = 0
        self._read_misses = 0
        self.replication: WriteHook | None = None  # set while the volume is a mirror source

    @property
    def name(self) -> str:
        return self.volume.name

    @property
    def writer_idle(self) -> bool:
        return self._mutations_queued == 0

    def export_info(self) -> ExportInfo:
        locked = self.lock_reason is not None
        return ExportInfo(
            name=self.volume.name,
            size=self.volume.size,
            min_block_size=self.volume.sector_size,
            read_only=locked,
            description=f"locked: {self.lock_reason}" if locked else "",
        )

    def lock(self, reason: str) -> None:
        """Export read-only from now on (new connections), saying why."""
        self.lock_reason = reason

    def unlock(self) -> None:
        self.lock_reason = "configured read-only" if self.read_only else None

    # -- inline fast paths, on the event loop ---------------------------------------------

    def try_read(self, offset: int, length: int) -> bytes | bytearray | None:
        misses = self._read_misses
        if misses >= MISSES_BEFORE_SKIPPING and misses % PROBE_EVERY:
            self._read_misses += 1
            return None
        data = self.volume.read_nowait(offset, length)
        self._read_misses = 0 if data is not None else misses + 1
        return data

    def try_write(self, offset: int, data: Buffer) -> int:
        """Bytes written on the loop: 0 if the writer is busy or the write is large."""
        if self._mutations_queued or len(data) > INLINE_WRITE_MAX:
            return 0
        if not self.volume.nowait_writes:
            self.volume.write(offset, data)
            return len(data)
        return self.volume.write_nowait(offset, data)

    # -- threads ----------------------------------------------------------------------------

    def submit(
        self, function: Callable[..., Any], *args: Any, mutating: bool, on_done: Done
    ) -> None:
        """Run ``function(*args)`` on a thread; ``on_done(result, error)`` runs on the loop.
        A read of the volume goes through io_uring instead where the node has a ring."""
        if not mutating:
            if not (function == self.volume.read and self._ring_read(*args, on_done=on_done)):
                self._readers.submit(function, args, on_done)
            return
        self._mutations_queued += 1

        def finished(result: Any, error: BaseException | None) -> None:
            self._mutations_queued -= 1
            on_done(result, error)

        self._writer.submit(function, args, finished)

    def _ring_read(self, offset: int, length: int, *, on_done: Done) -> bool:
        """Queue the read on the ring; False if it cannot go there (no ring, not a plain
        file descriptor, a range the volume refuses: the thread path says why)."""
        fd = self.volume.read_fd()
        if self._ring is None or fd is None or not self.volume.readable(offset, length):
            return False

        def done(data: bytearray | None) -> None:
            if data is None:  # an error or a short read: the ordinary read says what
                self._readers.submit(self.volume.read, (offset, length), on_done)
            else:
                on_done(data, None)

        return self._ring.read(fd, offset, length, done)

    def close(self) -> None:
        """Let queued mutations finish, flush, close the volume."""
        if self._ring is not None:
            self._ring.settle()  # no completion may land after the descriptor is closed
        self._writer.shutdown()
        try:
            self.volume.flush()
        finally:
            self.volume.close()

    # -- blocking bodies, run on threads ----------------------------------------------------

    def write(self, offset: int, data: Buffer, fua: bool) -> None:
        self.volume.write(offset, data)
        if fua:
            self.volume.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self.volume.trim(offset, length)
        if fua:
            self.volume.flush()

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        self.volume.write_zeroes(offset, length, may_trim=may_trim)
        if fua:
            self.volume.flush()
