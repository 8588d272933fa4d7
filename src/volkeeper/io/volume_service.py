"""A volume as the NBD server sees it: non-blocking fast paths, a thread pool, a lock.

How this works: the event loop should not wait on a disk.  Reads first try a syscall that
cannot block (``preadv2`` with RWF_NOWAIT, the backend's ``read_nowait``): a page-cache hit
completes on the loop with no thread hop; a miss goes to the node's thread pool.  Writes try
``pwritev2`` with RWF_NOWAIT; where the kernel does not offer that for buffered writes they are
written inline (a page-cache copy), and where it answers "would block" they go to the pool.
Flushes, FUA writes, trims and zeroing always go to the pool (they block by nature).

Write order: a write takes the fast path only while no earlier write of this volume is still
in the pool, so writes reach the volume in the order they were accepted.

A locked volume (the target of a mirror, or configured read-only) is exported read-only and
its description says why; the NBD layer turns writes to it into EPERM.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

from volkeeper.core.nbd_handshake import ExportInfo
from volkeeper.core.stats import VolumeStats
from volkeeper.io.volume import Volume

Buffer = bytes | bytearray | memoryview
T = TypeVar("T")


class VolumeService:
    def __init__(self, volume: Volume, executor: Executor, *, read_only: bool = False) -> None:
        self.volume = volume
        self.stats = VolumeStats()
        self.read_only = read_only
        self.lock_reason: str | None = "configured read-only" if read_only else None
        self._executor = executor
        self._writes_in_pool = 0

    @property
    def name(self) -> str:
        return self.volume.name

    def export_info(self) -> ExportInfo:
        locked = self.lock_reason is not None
        description = f"locked: {self.lock_reason}" if locked else ""
        return ExportInfo(
            name=self.volume.name,
            size=self.volume.size,
            min_block_size=self.volume.sector_size,
            read_only=locked,
            description=description,
        )

    def lock(self, reason: str) -> None:
        """Export read-only from now on (new connections), saying why."""
        self.lock_reason = reason

    def unlock(self) -> None:
        self.lock_reason = "configured read-only" if self.read_only else None

    # -- fast paths, called on the event loop --------------------------------------------

    def try_read(self, offset: int, length: int) -> bytes | bytearray | None:
        return self.volume.read_nowait(offset, length)

    def try_write(self, offset: int, data: bytes) -> int:
        """Bytes written on the loop; 0 while earlier writes are still in the pool.

        Where the kernel cannot do non-blocking buffered writes (ext4 and tmpfs, as of
        Linux 6.18), the write is done inline anyway: a page-cache copy costs a few
        microseconds, a hop to the thread pool and back tens of them.
        """
        if self._writes_in_pool:
            return 0
        done = self.volume.write_nowait(offset, data)
        if done < len(data) and not self.volume.nowait_writes:
            self.volume.write(offset + done, memoryview(data)[done:])
            return len(data)
        return done

    # -- slow paths, through the pool ------------------------------------------------------

    async def _in_pool(self, function: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function, *args)

    async def _mutate_in_pool(self, function: Callable[..., None], *args: object) -> None:
        self._writes_in_pool += 1
        try:
            await self._in_pool(function, *args)
        finally:
            self._writes_in_pool -= 1

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        return await self._in_pool(self.volume.read, offset, length)

    async def write(self, offset: int, data: Buffer, *, fua: bool) -> None:
        await self._mutate_in_pool(self._write_blocking, offset, data, fua)

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        await self._mutate_in_pool(self._trim_blocking, offset, length, fua)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fua: bool) -> None:
        await self._mutate_in_pool(self._zero_blocking, offset, length, may_trim, fua)

    async def flush(self) -> None:
        await self._in_pool(self.volume.flush)

    async def cache(self, offset: int, length: int) -> None:
        await self._in_pool(self.volume.cache, offset, length)

    def _write_blocking(self, offset: int, data: Buffer, fua: bool) -> None:
        self.volume.write(offset, data)
        if fua:
            self.volume.flush()

    def _trim_blocking(self, offset: int, length: int, fua: bool) -> None:
        self.volume.trim(offset, length)
        if fua:
            self.volume.flush()

    def _zero_blocking(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        self.volume.write_zeroes(offset, length, may_trim=may_trim)
        if fua:
            self.volume.flush()
