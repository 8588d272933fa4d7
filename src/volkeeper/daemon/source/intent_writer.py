"""Writes a mirror's intent log on a thread of its own, coalescing bitmap persists.

How this works: the intent store's calls block (pwrite + fdatasync), so they run on one
worker thread, in order.  ``after_durable(then)`` runs ``then`` on the event loop once every
bitmap bit set so far is on stable storage.  Callers that arrive while a persist is under way
wait for the next one, which picks up their pages too, so a burst of writes while the target
is away costs one fsync, not one each.  ``write_snapshot`` persists the activity log's next
transaction (a write to a cold extent waits for it).  A failed write calls ``on_failure``:
the mirror can no longer keep its promises and breaks, but whoever waited is released.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

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
                log.error("activity log write failed", mirror=self.name, error=str(error))
                self._on_failure()
            then()

        self._worker.submit(self.store.write_snapshot, (snapshot,), done)
        return True

    def close(self) -> None:
        """Finish queued writes, then persist the bitmap and close the log cleanly."""
        self._worker.shutdown()
        self.store.close()
