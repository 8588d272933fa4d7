"""Writes a mirror's intent log on a thread of its own, coalescing bitmap persists.

How this works: the intent store's calls block (pwrite + fdatasync), so they run on one
worker thread, in order.  ``after_durable(then)`` runs ``then`` on the event loop once every
bitmap bit set so far is on stable storage.  Callers that arrive while a persist is under way
wait for the next one, which picks up their pages too, so a burst of writes while the target
is away costs one fsync, not one each.  ``write_snapshot`` persists the activity log's next
transaction (a write to a cold extent waits for it).  A failed write calls ``on_failure``:
the mirror can no longer keep its promises and breaks, but whoever waited is released.
``set_generations`` writes a new generation into the header; ``merge`` takes in the regions
a deposed copy owes (docs/failover.md).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable

import structlog

from volkeeper.core.bitmap import DirtyBitmap
from volkeeper.core.intent_log_format import Generations
from volkeeper.errors import VolumeError
from volkeeper.io.intent_store import IntentStore
from volkeeper.io.workers import IoWorkers

log = structlog.get_logger("volkeeper.intent")


class IntentWriter:
    def __init__(self, store: IntentStore, name: str, on_failure: Callable[[], None]) -> None:
        self.store = store
        self.name = name
        self._on_failure = on_failure
        self._worker = IoWorkers(1, f"volkeeper-intent-{name}")
        self._waiters: list[Callable[[], None]] = []
        self._persisting = False

    def after_durable(self, then: Callable[[], None]) -> None:
        self._waiters.append(then)
        if not self._persisting:
            self._start_persist()

    async def durable(self) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done() -> None:
            if not future.done():
                future.set_result(None)

        self.after_durable(done)
        await future

    def _start_persist(self) -> None:
        self._persisting = True
        waiters, self._waiters = self._waiters, []

        def done(result: object, error: BaseException | None) -> None:
            self._persisting = False
            if error is not None:
                log.error("intent log write failed", mirror=self.name, error=str(error))
                self._on_failure()
            for waiter in waiters:
                waiter()
            if self._waiters:
                self._start_persist()

        self._worker.submit(self.store.persist_bitmap, (), done)

    def write_snapshot(self, then: Callable[[], None]) -> bool:
        """Persist the activity log's next transaction, if one is due; ``then`` after it."""
        snapshot = self.store.activity_log.transaction()
        if snapshot is None:
            return False

        def done(result: object, error: BaseException | None) -> None:
            if error is None:
                self.store.activity_log.committed(snapshot)
            else:
                self.store.activity_log.abandoned(snapshot)
                log.error("activity log write failed", mirror=self.name, error=str(error))
                self._on_failure()
            then()

        self._worker.submit(self.store.write_snapshot, (snapshot,), done)
        return True

    def set_generations(self, generations: Generations) -> None:
        """The log's new generations, on stable storage when this returns -- on the loop:
        one header write, once per lost link, before the write that started them is
        answered (core/ready.py)."""
        log.info("intent log generations", mirror=self.name,
                 current=f"{generations.current:016x}",
                 previous=f"{generations.previous:016x}")  # fmt: skip
        try:
            self.store.set_generations(generations)
        except VolumeError as exc:
            log.error("intent log header write failed", mirror=self.name, error=str(exc))
            self._on_failure()

    async def merge(self, image: bytes, region_size: int) -> list[tuple[int, int]]:
        """OR in the regions another copy owes (``image``: a zlib-compressed bitmap image
        of ``region_size`` regions), durably; returns them as (offset, length) byte ranges.
        One that cannot be read marks every region."""
        bitmap = self.store.bitmap
        try:
            if region_size != bitmap.region_size:
                raise ValueError(f"regions of {region_size} bytes, ours {bitmap.region_size}")
            raw = zlib.decompress(image)
            theirs = DirtyBitmap.from_bytes(bitmap.volume_size, region_size, raw)
            bitmap.merge(raw)
        except (zlib.error, ValueError) as exc:
            log.error("owed regions unreadable: all marked", mirror=self.name, error=str(exc))
            bitmap.mark_all()
            theirs = bitmap
        await self.durable()
        return [(first * region_size, count * region_size) for first, count in theirs.runs()]

    def close(self) -> None:
        """Finish queued writes, then persist the bitmap and close the log cleanly."""
        self._worker.shutdown()
        self.store.close()
