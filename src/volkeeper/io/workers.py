"""Worker threads for blocking volume I/O, with completions handed back to the event loop.

How this works: ``submit(function, args, done)`` puts one job on a ``queue.SimpleQueue`` (a C
queue: no Future objects, no condition variables); a worker thread runs it and appends
``(done, result, error)`` to a completion deque.  The loop is woken with one
``call_soon_threadsafe`` for a whole burst of completions, not one per job: a worker only
schedules ``_drain`` when none is pending.  ``_drain`` clears the flag *before* emptying the
deque, so a completion appended meanwhile either is drained now or schedules the next drain.

``IoWorkers(1, ...)`` is a FIFO: jobs run one at a time in submission order.  That is how a
volume's writes reach the disk in the order they were accepted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

Done = Callable[[Any, BaseException | None], None]
_Job = tuple[Callable[..., Any], tuple[Any, ...], Done]


class IoWorkers:
    def __init__(self, threads: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._completions: collections.deque[tuple[Done, Any, BaseException | None]] = (
            collections.deque()
        )
        self._drain_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, function: Callable[..., Any], args: tuple[Any, ...], done: Done) -> None:
        """Run ``function(*args)`` on a worker; later call ``done(result, error)`` on the loop."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._jobs.put((function, args, done))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            function, args, done = job
            try:
                result, error = function(*args), None
            except BaseException as exc:  # delivered to ``done``; the worker lives on
                result, error = None, exc
            self._completions.append((done, result, error))
            if not self._drain_pending:
                self._drain_pending = True
                assert self._loop is not None
                # A closed loop means nobody waits for completions any more, but the queued
                # jobs (a volume's last writes) must still run.
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._drain_pending = False
        completions = self._completions
        while completions:
            done, result, error = completions.popleft()
            done(result, error)

    def shutdown(self) -> None:
        """Finish queued jobs, then stop the threads (completions after this are dropped)."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
