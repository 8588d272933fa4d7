"""What a mirror sends its target, in order: compressed beside the loop, throttled.

How this works: every frame a mirror sends through its link -- application writes, flushes,
resync data, state and job records -- goes through ``Sender.send``, which keeps them in one
FIFO, so the target sees them in the order they were given (invariant 1).  With neither
compression nor a throttle, and nothing queued, a frame goes straight to the link: the fast
path costs one branch.

Compression: a WRITE or RESYNC_DATA payload of at least ``MIN_COMPRESS`` bytes is compressed
(io/codecs.py) -- inline when small, else on the node's compression threads, since the
codecs release the GIL -- and sent as WRITE_Z / RESYNC_Z if that saves enough, as it was
otherwise.  A frame waits at the head of the FIFO until its compression is done.

Throttle: payload bytes on the wire are paid for from a token bucket (core/throttle.py); the
head frame waits (a timer, not a loop) while the bucket is in debt.  Control frames cost
nothing but keep their place in the line.

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

from volkeeper.core import peer_wire as pw
from volkeeper.core.throttle import TokenBucket
from volkeeper.io.codecs import Compressor
from volkeeper.io.peer_link import PeerLink
from volkeeper.io.workers import IoWorkers

MIN_COMPRESS = 512  # smaller payloads are not worth a codec call
INLINE_COMPRESS = 16 * 1024  # at most this much is compressed on the loop itself
HIGH_WATER = 4 * 1024 * 1024  # queued payload bytes above which drained() waits

OnSent = Callable[[Any, int], None]
_PENDING = object()  # compression not finished yet


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
    def __init__(
        self,
        link: PeerLink,
        pool: IoWorkers,
        compressor: Compressor | None = None,
        rate: int | None = None,
    ) -> None:
        self.link = link
        self.pool = pool
        self.compressor = compressor
        self._loop = asyncio.get_running_loop()
        self.bucket = TokenBucket(rate, self._loop.time()) if rate else None
        self.queued_bytes = 0  # payload bytes given and not yet on the link
        self.wire_bytes = 0  # payload bytes put on the link (after compression)
        self._queue: collections.deque[_Entry] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._room = asyncio.Event()
        self._room.set()

    def configure(self, compressor: Compressor | None, rate: int | None) -> None:
        """New settings from the next frame on."""
        self.compressor = compressor
        now = self._loop.time()
        if not rate:
            self.bucket = None
        elif self.bucket is None:
            self.bucket = TokenBucket(rate, now)
        else:
            self.bucket.set_rate(rate, now)
        self._pump()

    def send(
        self, frame: pw.Frame, size: int = 0, on_sent: OnSent | None = None, context: Any = None
    ) -> None:
        compress = self.compressor is not None and size >= MIN_COMPRESS and _is_data(frame)
        if not self._queue and not compress and self.bucket is None:  # the fast path
            self.wire_bytes += size
            sequence = self.link.send(frame)
            if on_sent is not None:
                on_sent(context, sequence)
            return
        entry = _Entry(frame, size, on_sent, context)
        if compress:
            self._compress(entry)
        self._queue.append(entry)
        self.queued_bytes += size
        if self.queued_bytes >= HIGH_WATER:
            self._room.clear()
        self._pump()

    def _compress(self, entry: _Entry) -> None:
        assert self.compressor is not None and isinstance(entry.frame, pw.Write | pw.ResyncData)
        data, entry.codec = entry.frame.data, self.compressor.codec
        if entry.size <= INLINE_COMPRESS:
            entry.packed = self.compressor.compress(data)
            return
        entry.packed = _PENDING

        def done(packed: bytes | None, error: BaseException | None) -> None:
            entry.packed = None if error is not None else packed  # a codec failure: send raw
            self._pump()

        self.pool.submit(self.compressor.compress, (data,), done)

    def _pump(self) -> None:
        queue = self._queue
        while queue:
            head = queue[0]
            if head.packed is _PENDING:
                return  # its compression's completion pumps again
            if not self.link.is_open:
                return  # the link's loss calls abandon(): the mirror marks what is left
            frame, wire = _on_the_wire(head)
            if self.bucket is not None and wire:
                now = self._loop.time()
                wait = self.bucket.wait(now)
                if wait > 0:
                    if self._timer is None:
                        self._timer = self._loop.call_later(wait, self._tick)
                    return
                self.bucket.spend(wire, now)
            queue.popleft()
            self.queued_bytes -= head.size
            self.wire_bytes += wire
            sequence = self.link.send(frame)
            (head.on_sent or _nothing)(head.context, sequence)
        if self.queued_bytes < HIGH_WATER:
            self._room.set()

    def _tick(self) -> None:
        self._timer = None
        self._pump()

    def abandon(self) -> list[Any]:
        """The link is gone: the contexts of every frame that never left, oldest first."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        contexts = [entry.context for entry in self._queue]
        self._queue.clear()
        self.queued_bytes = 0
        self._room.set()
        return contexts

    async def drained(self) -> None:
        """Wait until the queue is under its high-water mark and the link can take more."""
        await self._room.wait()
        await self.link.drained()


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
