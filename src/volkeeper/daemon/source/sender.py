"""What a mirror sends its target: in order, compressed beside the loop, throttled, resync last.

How this works: every frame a mirror sends through its link -- application writes and
flushes, resync data and its flushes, state and job records, digest requests -- goes through
``Sender.send``, into one of two FIFO *lanes*: the application lane and the resync lane
(``resync=True``).  Each lane keeps its order, and the application lane keeps the order the
target must apply writes in (invariant 1).  Between lanes, application frames go first:
a resync uses the bandwidth the application leaves, which is safe because a resync chunk that
an application write raced is resent (daemon/source/resync.py), and its own FLUSH and STATE follow
its data in its lane.  Two rates bound the resync lane: ``resync_max`` (a token bucket it may
not exceed) and ``resync_min`` (a credit bucket: while the resync has sent less than that
rate, its lane goes first, so application writes cannot starve it).  This is DRBD's dynamic
resync controller (c-min-rate, c-max-rate) with the sender's queue as the measure of what
the application uses.  With no compression, throttle or resync bounds and nothing queued, a
frame goes straight to the link: the fast path costs a few tests.

Compression: a WRITE or RESYNC_DATA payload of at least ``MIN_COMPRESS`` bytes is compressed
(io/codecs.py) -- inline when small, else on the node's compression threads, since the codecs
release the GIL -- and sent as WRITE_Z / RESYNC_Z if that saves enough, as it was otherwise.
A frame waits at the head of its lane until its compression is done.

Throttle: payload bytes on the wire, of both lanes, are paid for from a token bucket
(core/throttle.py); the next frame waits (a timer, not a loop) while it is in debt.  Control
frames cost nothing but keep their place in their lane.

``on_sent(context, sequence)`` tells the caller the frame's sequence number once it is on the
link (ACKs name it).  When the link is lost, ``abandon`` returns the contexts of the frames
that never left, so the mirror can mark them.  ``drained`` is the resync's backpressure.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from volkeeper.core.peer import wire as pw
from volkeeper.core.throttle import TokenBucket
from volkeeper.errors import PeerError
from volkeeper.io.codecs import Compressor
from volkeeper.io.peer_link import PeerLink
from volkeeper.io.workers import IoWorkers

MIN_COMPRESS = 512  # smaller payloads are not worth a codec call
INLINE_COMPRESS = 16 * 1024  # at most this much is compressed on the loop itself
HIGH_WATER = 4 * 1024 * 1024  # queued payload bytes above which drained() waits

OnSent = Callable[[Any, int], None]
Lane = collections.deque["_Entry"]
_PENDING = object()  # compression not finished yet


@dataclass(frozen=True)
class SendSettings:
    compressor: Compressor | None = None
    throttle: int | None = None  # bytes per second on the wire, both lanes
    resync_min: int | None = None  # bytes per second the resync gets even under load
    resync_max: int | None = None  # bytes per second the resync never exceeds

    @property
    def shapes(self) -> bool:
        return bool(self.throttle or self.resync_min or self.resync_max)


@dataclass(slots=True)
class _Entry:
    frame: pw.Frame
    size: int  # payload bytes as given
    on_sent: OnSent | None
    context: Any
    packed: object = None  # bytes (compressed), None (send as is) or _PENDING
    codec: pw.Codec = pw.Codec.ZLIB  # of ``packed``


def _nothing(context: Any, sequence: int) -> None:
    return None


class Sender:
    def __init__(self, link: PeerLink, pool: IoWorkers, settings: SendSettings) -> None:
        self.link = link
        self.pool = pool
        self._loop = asyncio.get_running_loop()
        self.queued_bytes = 0  # payload bytes given and not yet on the link
        self.wire_bytes = 0  # payload bytes put on the link (after compression)
        self._app: Lane = collections.deque()
        self._resync: Lane = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0  # loop time it fires at (uvloop's handles do not say)
        self._room = asyncio.Event()
        self._room.set()
        self.settings = settings
        self.throttle: TokenBucket | None = None
        self.resync_min: TokenBucket | None = None
        self.resync_max: TokenBucket | None = None
        self.configure(settings)

    def configure(self, settings: SendSettings) -> None:
        """New settings from the next frame on."""
        self.settings = settings
        now = self._loop.time()
        self.throttle = _bucket(self.throttle, settings.throttle, now)
        self.resync_min = _bucket(self.resync_min, settings.resync_min, now)
        self.resync_max = _bucket(self.resync_max, settings.resync_max, now)
        self._pump()

    def send(
        self,
        frame: pw.Frame,
        size: int = 0,
        on_sent: OnSent | None = None,
        context: Any = None,
        resync: bool = False,
    ) -> None:
        settings = self.settings
        compress = settings.compressor is not None and size >= MIN_COMPRESS and _is_data(frame)
        if not (self._app or self._resync or compress or settings.shapes):  # the fast path
            self.wire_bytes += size
            sequence = self.link.send(frame)
            if on_sent is not None:
                on_sent(context, sequence)
            return
        entry = _Entry(frame, size, on_sent, context)
        if compress:
            self._compress(entry)
        (self._resync if resync else self._app).append(entry)
        self.queued_bytes += size
        if self.queued_bytes >= HIGH_WATER:
            self._room.clear()
        self._pump()

    def _compress(self, entry: _Entry) -> None:
        compressor = self.settings.compressor
        assert compressor is not None and isinstance(entry.frame, pw.Write | pw.ResyncData)
        data, entry.codec = entry.frame.data, compressor.codec
        if entry.size <= INLINE_COMPRESS:
            entry.packed = compressor.compress(data)
            return
        entry.packed = _PENDING

        def done(packed: bytes | None, error: BaseException | None) -> None:
            entry.packed = None if error is not None else packed  # a codec failure: send raw
            self._pump()

        self.pool.submit(compressor.compress, (data,), done)

    def _pump(self) -> None:
        while self.link.is_open:  # once lost, abandon() hands what is left to the mirror
            now = self._loop.time()
            lane, owed = self._next_lane(now)
            if lane is None:
                break
            head = lane[0]
            frame, wire = _on_the_wire(head)
            if self.throttle is not None and wire:
                wait = self.throttle.wait(now)
                if wait > 0:
                    self._wake_in(wait)
                    return
                self.throttle.spend(wire, now)
            if lane is self._resync and wire:
                if self.resync_max is not None:
                    self.resync_max.spend(wire, now)
                if self.resync_min is not None and owed:
                    self.resync_min.spend(wire, now)
                elif self.resync_min is not None:
                    self.resync_min.spend_spare(wire, now)
            lane.popleft()
            self.queued_bytes -= head.size
            self.wire_bytes += wire
            sequence = self.link.send(frame)
            (head.on_sent or _nothing)(head.context, sequence)
        if self.queued_bytes < HIGH_WATER:
            self._room.set()

    def _next_lane(self, now: float) -> tuple[Lane | None, bool]:
        """The lane whose head goes next (None: a timer or a compression wakes us), and
        whether it is the resync taking the share its minimum rate is owed."""
        app = self._app if self._app and self._app[0].packed is not _PENDING else None
        resync = self._resync if self._resync and self._resync[0].packed is not _PENDING else None
        if resync is not None and self.resync_max is not None:
            wait = self.resync_max.wait(now)
            if wait > 0:
                if app is None:
                    self._wake_in(wait)
                return app, False
        behind = self.resync_min is not None and self.resync_min.balance(now) > 0
        if resync is not None and behind and app is not None:
            return resync, True
        return (app, False) if app is not None else (resync, False)

    def _wake_in(self, seconds: float) -> None:
        """Pump again in ``seconds``, or sooner if already due sooner."""
        due = self._loop.time() + seconds
        if self._timer is not None:
            if self._timer_due <= due:
                return
            self._timer.cancel()
        self._timer, self._timer_due = self._loop.call_at(due, self._tick), due

    def _tick(self) -> None:
        self._timer = None
        self._pump()

    def abandon(self) -> list[Any]:
        """The link is gone: the contexts of every frame that never left."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        contexts = [entry.context for entry in (*self._app, *self._resync)]
        self._app.clear()
        self._resync.clear()
        self.queued_bytes = 0
        self._room.set()
        return contexts

    async def drained(self) -> None:
        """Wait until the queue is under its high-water mark and the link can take more."""
        await self._room.wait()
        await self.link.drained()


def _bucket(bucket: TokenBucket | None, rate: int | None, now: float) -> TokenBucket | None:
    if not rate:
        return None
    if bucket is None:
        return TokenBucket(rate, now)
    bucket.set_rate(rate, now)
    return bucket


def _is_data(frame: pw.Frame) -> bool:
    return isinstance(frame, pw.Write | pw.ResyncData)


def _on_the_wire(entry: _Entry) -> tuple[pw.Frame, int]:
    """The frame to send for ``entry`` and the payload bytes it puts on the wire."""
    frame, packed = entry.frame, entry.packed
    if not isinstance(packed, bytes):
        return frame, entry.size
    assert isinstance(frame, pw.Write | pw.ResyncData)
    kind = pw.WriteCompressed if isinstance(frame, pw.Write) else pw.ResyncCompressed
    return kind(frame.offset, entry.codec, entry.size, packed, frame.fua), len(packed)


def fail_waiting(questions: list[object], reason: str) -> None:
    """The link is gone: every question still waiting for its answer -- a future, or a
    (future, what) context, asked or among what ``Sender.abandon`` returned -- fails with
    ``reason``."""
    for question in questions:
        waiter = question[0] if isinstance(question, tuple) else question
        if isinstance(waiter, asyncio.Future) and not waiter.done():
            waiter.set_exception(PeerError(reason))
