"""Reads through io_uring: queued on the loop, submitted once per loop pass, answered on the loop.

How this works: a read that misses the page cache used to go to a worker thread and back, two
thread hand-offs and the GIL taken twice (tens of microseconds of CPU per 4 KiB read).  Here
``read`` puts a READ on the ring's submission queue instead, with a fresh buffer kept alive in
``_pending`` until its completion; the first read of a loop pass schedules one ``_submit``
(``call_soon``), so a burst of reads costs one ``io_uring_enter``.  The ring signals
completions on an eventfd the loop watches (``add_reader``); ``_drain`` reaps every completion
there is and calls each read's ``done`` with its buffer -- or with None when the kernel
answered anything but the whole length (an error, a short read): the caller then does that
read the ordinary way, which also turns an error into the volume's own message.

``UringReads.create()`` answers None where io_uring cannot be had (the ``liburing`` binding
missing, a kernel or seccomp policy that refuses ``io_uring_setup``): callers keep their
worker threads.  ``read`` answers False when ``ENTRIES`` reads are in flight already (the
caller uses a thread for that one): so the completion queue, twice as long, never overflows
(an overflowed completion would not signal the eventfd).  ``settle`` waits for every read
in flight (before a volume's file is closed: a completion must never land in a reused
descriptor's file).  Not thread-safe: the loop's thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import Any

try:
    import liburing
except ImportError:  # the pure-threads path stays
    liburing = None

ENTRIES = 256
Done = Callable[[bytearray | None], None]


class UringReads:
    def __init__(self, ring: Any, eventfd: int) -> None:
        self._ring = ring
        self._cqe = liburing.Cqe()
        self._eventfd = eventfd
        self._pending: dict[int, tuple[bytearray, int, Done]] = {}
        self._next_token = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._submit_scheduled = False
        self._unsubmitted = 0

    @classmethod
    def create(cls) -> UringReads | None:
        if liburing is None:
            return None
        ring = liburing.Ring()
        try:
            liburing.io_uring_queue_init(ENTRIES, ring, 0)
        except OSError:
            return None
        eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            liburing.io_uring_register_eventfd(ring, eventfd)
        except OSError:
            os.close(eventfd)
            liburing.io_uring_queue_exit(ring)
            return None
        return cls(ring, eventfd)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def read(self, fd: int, offset: int, length: int, done: Done) -> bool:
        """Queue a read of ``length`` bytes at ``offset``; ``done(buffer or None)`` comes on
        the loop.  False: the queue is full, nothing was queued."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._eventfd, self._drain)
        if len(self._pending) >= ENTRIES:
            return False  # the completion queue (2 x ENTRIES) can never overflow
        sqe = liburing.io_uring_get_sqe(self._ring)
        if sqe is None:
            self._submit()
            sqe = liburing.io_uring_get_sqe(self._ring)
            if sqe is None:
                return False
        buffer = bytearray(length)
        token = self._next_token
        self._next_token += 1
        liburing.io_uring_prep_read(sqe, fd, buffer, offset)  # the length is the buffer's
        liburing.io_uring_sqe_set_data64(sqe, token)
        self._pending[token] = (buffer, length, done)
        self._unsubmitted += 1
        if not self._submit_scheduled:
            self._submit_scheduled = True
            self._loop.call_soon(self._submit)
        return True

    def _submit(self) -> None:
        self._submit_scheduled = False
        if self._unsubmitted:
            self._unsubmitted = 0
            liburing.io_uring_submit(self._ring)

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._eventfd)
        self._reap()

    def _reap(self) -> None:
        """Take every completion off the ring first, then answer them: a ``done`` that
        raises is reported to the loop and does not hold back the others."""
        ring, cqe = self._ring, self._cqe
        answered: list[tuple[Done, bytearray | None]] = []
        while liburing.io_uring_cq_ready(ring):
            liburing.io_uring_peek_cqe(ring, cqe)
            entry = cqe[0]
            token = liburing.io_uring_cqe_get_data64(entry)
            try:
                result = entry.res
            except OSError:  # the binding raises the errno of a failed read
                result = -1
            liburing.io_uring_cqe_seen(ring, entry)
            buffer, length, done = self._pending.pop(token)
            answered.append((done, buffer if result == length else None))
        for done, data in answered:
            try:
                done(data)
            except Exception as exc:
                assert self._loop is not None
                self._loop.call_exception_handler(
                    {"message": "an io_uring read's completion failed", "exception": exc}
                )

    def settle(self) -> None:
        """Wait, on the loop's thread, until no read is in flight (their ``done`` run)."""
        self._submit()
        while self._pending:
            liburing.io_uring_submit_and_wait(self._ring, 1)
            self._reap()

    def close(self) -> None:
        self.settle()
        if self._loop is not None:
            self._loop.remove_reader(self._eventfd)
        liburing.io_uring_unregister_eventfd(self._ring)
        liburing.io_uring_queue_exit(self._ring)
        os.close(self._eventfd)
