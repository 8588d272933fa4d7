"""Replication protocol decoding: ``FrameDecoder`` (re-exported by ``wire``, the public module).

How this works: ``FrameDecoder`` is incremental: ``feed()`` every chunk read, drain
``next_frame()`` until it returns None, call ``eof()`` when the peer closes.  The header
alone is validated (magic, type, flags, body length against the type's bounds) before the
body is waited for, so a hostile length never makes it buffer anything.  Then the checksum,
the sequence and the body (``bodies``) are checked.  A payload is copied once: sliced out
of the buffer as bytes when its frame arrived whole, or else gathered straight into a
bytearray of its own (see ``FrameDecoder``), never through a growing buffer.  Any violation
is a ``ProtocolError`` whose message names the frame ("WRITE frame 17: ..."); the decoder
stays failed afterwards (the connection is unusable) and drops whatever it is fed.
"""

from __future__ import annotations

from dataclasses import dataclass

from xxhash import xxh3_64, xxh3_64_intdigest

from volkeeper.core.peer.bodies import LAYOUTS, BodyError, BodyLayout
from volkeeper.core.peer.frames import Frame
from volkeeper.core.peer.layout import (
    _DATA_HEAD,
    CHECKSUM,
    DATA_OFFSET,
    DIRECT_MIN,
    FUA,
    HEADER,
    MAGIC,
    MAX_BODY,
    MAX_SPARE_BYTES,
    Buffer,
)
from volkeeper.errors import ProtocolError

_MAGIC_BYTES = MAGIC.to_bytes(4, "big")
_TRAILER = HEADER.size + CHECKSUM.size  # bytes of a frame besides its body


@dataclass(slots=True)
class _Pending:
    """A WRITE / RESYNC_DATA whose data goes straight into a buffer of its own."""

    layout: BodyLayout
    flags: int
    sequence: int
    head: bytes  # the frame header and the u64 offset
    data: bytearray
    filled: int


class FrameDecoder:
    """Turns the peer's byte stream into frames; see the module docstring for the contract.

    ``sequence`` is the sequence number of the last frame returned (what an ACK names).
    A WRITE or RESYNC_DATA with DIRECT_MIN or more bytes of data that are not all here when
    ``next_frame()`` first sees its header gets a bytearray of its own, which later feeds
    fill directly (one copy, where a growing buffer would copy and reallocate again and
    again), or which the adapter fills with ``recv_into(payload_window())`` and
    ``payload_received(n)`` (no copy at all).  Its ``data`` is then that bytearray; hand it
    back with ``recycle()`` once it is written, so the next one costs no allocation and no
    page faults.  Smaller frames are gathered in the buffer and their data sliced out of it
    once, as bytes.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pos = 0  # decoded up to here; compacted on the next feed
        self._pending: _Pending | None = None
        self._error: ProtocolError | None = None
        self._spare: dict[int, list[bytearray]] = {}  # recycled data buffers, by size
        self._spare_bytes = 0
        self.sequence = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        pending = self._pending
        held = _DATA_HEAD.size + pending.filled if pending is not None else 0
        return len(self._buffer) - self._pos + held

    def feed(self, data: Buffer) -> None:
        if self._error is not None:
            return  # the connection is finished; hold nothing more
        pending = self._pending
        if pending is not None and pending.filled < len(pending.data):
            view = memoryview(data).cast("B")
            take = min(len(view), len(pending.data) - pending.filled)
            # Through a memoryview: ``bytearray[a:b] = x`` copies x to a temporary first.
            with memoryview(pending.data) as target:
                target[pending.filled : pending.filled + take] = view[:take]
            pending.filled += take
            data = view[take:]
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += data

    def payload_window(self) -> memoryview | None:
        """The unfilled part of a pending WRITE / RESYNC_DATA's data, or None."""
        pending = self._pending
        if pending is None or pending.filled == len(pending.data) or self._error is not None:
            return None
        return memoryview(pending.data)[pending.filled :]

    def payload_received(self, nbytes: int) -> None:
        """``nbytes`` were written into ``payload_window()`` (by recv_into)."""
        pending = self._pending
        if pending is None or not 0 <= nbytes <= len(pending.data) - pending.filled:
            raise ValueError(f"{nbytes} bytes received outside the payload window")
        pending.filled += nbytes

    def recycle(self, data: Buffer) -> None:
        """Take back a decoded frame's data once it is written; nothing may use it afterwards."""
        if isinstance(data, bytearray) and self._spare_bytes + len(data) <= MAX_SPARE_BYTES:
            self._spare.setdefault(len(data), []).append(data)
            self._spare_bytes += len(data)

    def next_frame(self) -> Frame | None:
        if self._error is not None:
            raise ProtocolError(str(self._error))
        try:
            return self._next_frame()
        except ProtocolError as exc:
            self._error = exc
            self._buffer, self._pos, self._pending = bytearray(), 0, None
            raise

    def eof(self) -> None:
        """The peer closed the stream (call after draining): an error inside a frame."""
        if self._error is not None:
            raise ProtocolError(str(self._error))
        if not self.buffered:
            return
        due, got, pending = self.sequence + 1, self.buffered, self._pending
        if pending is not None:
            whole = _TRAILER + DATA_OFFSET.size + len(pending.data)
            why = f"{pending.layout.name} frame {due}: connection closed after {got} of its {whole}"
        elif got < HEADER.size:
            why = f"frame {due}: connection closed after {got} of the {HEADER.size} header"
        else:
            _, kind, _, length, _ = HEADER.unpack_from(self._buffer, self._pos)
            layout = LAYOUTS.get(kind)
            name = f"{layout.name} frame" if layout else "frame"
            why = f"{name} {due}: connection closed after {got} of its {_TRAILER + length}"
        self._error = ProtocolError(why + " bytes")
        raise self._error

    def _next_frame(self) -> Frame | None:
        if self._pending is not None:
            return self._finish_data()
        buffer, pos = self._buffer, self._pos
        available = len(buffer) - pos
        if available < HEADER.size:
            if available >= 4 and buffer[pos : pos + 4] != _MAGIC_BYTES:
                self._bad_magic(int.from_bytes(buffer[pos : pos + 4], "big"))
            return None
        magic, kind, flags, length, sequence = HEADER.unpack_from(buffer, pos)
        if magic != MAGIC:
            self._bad_magic(magic)
        layout = LAYOUTS.get(kind)
        if layout is None:
            raise ProtocolError(f"frame {sequence}: unknown frame type {kind}")
        try:
            if length > MAX_BODY:  # from the header alone, before waiting for the body
                raise BodyError(f"body length {length} exceeds the {MAX_BODY}-byte limit")
            layout.check(flags, length)
            if available < _TRAILER + length:
                big = length - DATA_OFFSET.size >= DIRECT_MIN
                if layout.data and big and available >= _DATA_HEAD.size:
                    self._start_data(layout, flags, length, sequence)
                    return self._finish_data()
                return None
            frame = self._check_frame(pos, length, sequence, layout, flags)
        except BodyError as exc:
            raise ProtocolError(f"{layout.name} frame {sequence}: {exc}") from None
        self._pos = pos + _TRAILER + length
        self.sequence = sequence
        return frame

    def _check_frame(
        self, pos: int, length: int, sequence: int, layout: BodyLayout, flags: int
    ) -> Frame:
        end = HEADER.size + length
        with memoryview(self._buffer)[pos : pos + end + CHECKSUM.size] as view:
            (sent,) = CHECKSUM.unpack_from(view, end)
            self._verify(sent, xxh3_64_intdigest(view[:end]), sequence)
            return layout.parse(view[HEADER.size : end], flags)

    def _verify(self, sent: int, actual: int, sequence: int) -> None:
        if sent != actual:
            raise BodyError(f"checksum 0x{sent:016x} does not match the frame's 0x{actual:016x}")
        if sequence != self.sequence + 1:
            why = "a repeat or reorder" if sequence <= self.sequence else "frames missing"
            raise BodyError(f"sequence {sequence} where {self.sequence + 1} was due ({why})")

    def _start_data(self, layout: BodyLayout, flags: int, length: int, sequence: int) -> None:
        pos, size = self._pos, length - DATA_OFFSET.size
        spare = self._spare.get(size)
        if spare:
            data = spare.pop()
            self._spare_bytes -= size
        else:
            data = bytearray(size)
        take = min(size, len(self._buffer) - pos - _DATA_HEAD.size)
        with memoryview(self._buffer)[pos : pos + _DATA_HEAD.size + take] as view:
            head = bytes(view[: _DATA_HEAD.size])
            with memoryview(data) as target:
                target[:take] = view[_DATA_HEAD.size :]
        self._pos = pos + _DATA_HEAD.size + take
        self._pending = _Pending(layout, flags, sequence, head, data, take)

    def _finish_data(self) -> Frame | None:
        pending = self._pending
        assert pending is not None
        if pending.filled < len(pending.data) or len(self._buffer) - self._pos < CHECKSUM.size:
            return None
        (sent,) = CHECKSUM.unpack_from(self._buffer, self._pos)
        hasher = xxh3_64(pending.head)
        hasher.update(pending.data)
        try:
            self._verify(sent, hasher.intdigest(), pending.sequence)
        except BodyError as exc:
            raise ProtocolError(f"{pending.layout.name} frame {pending.sequence}: {exc}") from None
        self._pos += CHECKSUM.size
        self._pending = None
        self.sequence = pending.sequence
        (offset,) = DATA_OFFSET.unpack_from(pending.head, HEADER.size)
        assert pending.layout.data is not None
        return pending.layout.data(offset, pending.data, pending.flags == FUA)

    def _bad_magic(self, magic: int) -> None:
        raise ProtocolError(
            f"frame {self.sequence + 1}: bad magic 0x{magic:08x}, not 0x{MAGIC:08x} (VKP1)"
        )
