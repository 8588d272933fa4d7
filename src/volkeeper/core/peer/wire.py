"""Replication protocol decoding; the protocol's public module (frames come from frames.py).

How this works: ``FrameDecoder`` is incremental: ``feed()`` every chunk read, drain
``next_frame()`` until it returns None, call ``eof()`` when the peer closes.  The header
alone is validated (magic, type, flags, body length against the type's bounds) before the
body is waited for, so a
hostile length never makes it buffer anything.  Then the checksum, the sequence and the body
layout are checked.  A payload is copied once: sliced out of the buffer as bytes when its
frame arrived whole, or else gathered straight into a bytearray of its own (see
``FrameDecoder``), never through a growing buffer.  Any violation is a ``ProtocolError``
whose message names the frame ("WRITE frame 17: ..."); the decoder stays failed afterwards
(the connection is unusable) and drops whatever it is fed.

Everything of core/peer/frames.py (frame dataclasses, enums, layouts, ``FrameEncoder``) is
re-exported here, so users import the whole protocol from one place.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from xxhash import xxh3_64, xxh3_64_intdigest

from volkeeper.core.peer.frames import *
from volkeeper.core.peer.layout import *
from volkeeper.core.peer.layout import _DATA_HEAD
from volkeeper.core.peer.session_frames import *
from volkeeper.errors import ProtocolError

_E = TypeVar("_E", bound=enum.IntEnum)


class _Bad(Exception):
    """A body or header fault; the decoder prefixes it with the frame's name and sequence."""


def _enum(cls: type[_E], value: int, what: str) -> _E:
    try:
        return cls(value)
    except ValueError:
        raise _Bad(f"unknown {what} {value}") from None


def _utf8(raw: memoryview, what: str) -> str:
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise _Bad(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _strs(body: memoryview, at: int, names: tuple[str, ...]) -> list[str]:
    out = []
    for what in names:
        if len(body) - at < STR_LEN.size:
            raise _Bad(f"body ends before the length of the {what}")
        (size,) = STR_LEN.unpack_from(body, at)
        at += STR_LEN.size
        if size > MAX_NAME:
            raise _Bad(f"{what} of {size} bytes is longer than {MAX_NAME}")
        if len(body) - at < size:
            raise _Bad(f"{what} of {size} bytes runs past the end of the body")
        out.append(_utf8(body[at : at + size], what))
        at += size
    if at != len(body):
        raise _Bad(f"{len(body) - at} stray bytes after the {names[-1]}")
    return out


def _hello(body: memoryview, flags: int) -> Hello:
    low, high, size, sector, current, previous, role, epoch, marked = HELLO_FIXED.unpack_from(body)
    if low > high:
        raise _Bad(f"min_version {low} is above max_version {high}")
    names = ("node name", "volume name", "job name", "source volume name")
    node, volume, job, source_volume = _strs(body, HELLO_FIXED.size, names)
    return Hello(
        node=node, volume=volume, job=job, source_volume=source_volume,
        volume_size=size, sector_size=sector,
        current_generation=current, previous_generation=previous,
        role=_enum(Role, role, "role"), min_version=low, max_version=high, epoch=epoch,
        marked_bytes=marked, keep=flags == KEEP,
    )  # fmt: skip


def _hello_ok(body: memoryview, flags: int) -> HelloOk:
    version, size, sector, current, previous, state = HELLO_OK_FIXED.unpack_from(body)
    node, volume = _strs(body, HELLO_OK_FIXED.size, ("node name", "volume name"))
    return HelloOk(
        node=node, volume=volume, volume_size=size, sector_size=sector,
        current_generation=current, previous_generation=previous,
        data_state=_enum(DataState, state, "data state"), chosen_version=version,
        owed=flags == OWED,
    )  # fmt: skip


def _marked(body: memoryview, flags: int) -> Marked:
    (region_size,) = MARKED_HEAD.unpack_from(body)
    return Marked(region_size, bytes(body[MARKED_HEAD.size :]))


def _refuse(body: memoryview, flags: int) -> Refuse:
    reason = _enum(RefuseReason, REASON.unpack_from(body)[0], "refusal reason")
    return Refuse(reason, _utf8(body[REASON.size :], "message"))


def _goodbye(body: memoryview, flags: int) -> Goodbye:
    reason = _enum(GoodbyeReason, REASON.unpack_from(body)[0], "goodbye reason")
    return Goodbye(reason, _utf8(body[REASON.size :], "message"))


def _write(body: memoryview, flags: int) -> Write:  # the one copy of the payload: bytes()
    return Write(DATA_OFFSET.unpack_from(body)[0], bytes(body[DATA_OFFSET.size :]), flags == FUA)


def _resync_data(body: memoryview, flags: int) -> ResyncData:
    offset = DATA_OFFSET.unpack_from(body)[0]
    return ResyncData(offset, bytes(body[DATA_OFFSET.size :]), flags == FUA)


def _compressed_fields(body: memoryview, flags: int) -> tuple[int, Codec, int, bytes, bool]:
    offset, codec, raw_length = COMPRESSED_HEAD.unpack_from(body)
    if raw_length > MAX_PAYLOAD:
        raise _Bad(f"raw length {raw_length} exceeds {MAX_PAYLOAD}")
    data = bytes(body[COMPRESSED_HEAD.size :])
    return offset, _enum(Codec, codec, "codec"), raw_length, data, flags == FUA


def _write_z(body: memoryview, flags: int) -> WriteCompressed:
    return WriteCompressed(*_compressed_fields(body, flags))


def _resync_z(body: memoryview, flags: int) -> ResyncCompressed:
    return ResyncCompressed(*_compressed_fields(body, flags))


def _hash_request(body: memoryview, flags: int) -> HashRequest:
    offset, length, region_size = HASH_RANGE.unpack_from(body)
    if region_size < 512 or region_size & (region_size - 1):
        raise _Bad(f"region size {region_size} is not a power of two >= 512")
    if not 0 < length <= MAX_HASH_SPAN or offset % region_size:
        raise _Bad(f"range {offset}+{length} is not whole regions of at most {MAX_HASH_SPAN}")
    return HashRequest(offset, length, region_size)


def _hashes(body: memoryview, flags: int) -> Hashes:
    (request,) = HASHES_HEAD.unpack_from(body)
    digests = bytes(body[HASHES_HEAD.size :])
    if len(digests) % DIGEST_SIZE:
        raise _Bad(f"{len(digests)} digest bytes are not a whole number of digests")
    return Hashes(request, digests)


def _zero(body: memoryview, flags: int) -> Zero:
    offset, length = RANGE.unpack_from(body)
    return Zero(offset, length, fua=bool(flags & FUA), may_trim=bool(flags & MAY_TRIM))


def _trim(body: memoryview, flags: int) -> Trim:
    offset, length = RANGE.unpack_from(body)
    return Trim(offset, length, fua=flags == FUA)


def _state(body: memoryview, flags: int) -> State:
    state, current, previous = STATE_BODY.unpack_from(body)
    return State(_enum(DataState, state, "data state"), current, previous)


def _ack(body: memoryview, flags: int) -> Ack:
    sequence, errno = ACK_BODY.unpack_from(body)
    return Ack(sequence, errno, durable=flags == DURABLE)


@dataclass(frozen=True, slots=True)
class _Layout:
    name: str
    min_body: int
    max_body: int
    flags: int  # the flag bits this type may carry
    parse: Callable[[memoryview, int], Frame]
    data: type[Write] | type[ResyncData] | None = None  # a payload that may arrive in pieces

    def check(self, flags: int, length: int) -> None:
        if flags & ~self.flags:
            raise _Bad(f"unknown flags 0x{flags & ~self.flags:04x}")
        if length < self.min_body:
            raise _Bad(f"body of {length} bytes is shorter than its {self.min_body}-byte header")
        if length > self.max_body:
            raise _Bad(f"body of {length} bytes is longer than the {self.max_body} it may have")


_T = FrameType
_HELLO_MIN = HELLO_FIXED.size + 4 * STR_LEN.size
_HELLO_OK_MIN = HELLO_OK_FIXED.size + 2 * STR_LEN.size
_LAYOUTS: dict[int, _Layout] = {
    _T.HELLO: _Layout("HELLO", _HELLO_MIN, _HELLO_MIN + 4 * MAX_NAME, KEEP, _hello),
    _T.HELLO_OK: _Layout("HELLO_OK", _HELLO_OK_MIN, _HELLO_OK_MIN + 2 * MAX_NAME, OWED, _hello_ok),
    _T.SWITCHOVER: _Layout("SWITCHOVER", 0, 0, 0, lambda b, f: SwitchoverRequest()),
    _T.MARKED: _Layout("MARKED", MARKED_HEAD.size, MARKED_HEAD.size + MAX_HANDOVER, 0, _marked),
    _T.REFUSE: _Layout("REFUSE", REASON.size, REASON.size + MAX_MESSAGE, 0, _refuse),
    _T.WRITE: _Layout("WRITE", 8, 8 + MAX_PAYLOAD, FUA, _write, Write),
    _T.RESYNC_DATA: _Layout("RESYNC_DATA", 8, 8 + MAX_PAYLOAD, FUA, _resync_data, ResyncData),
    _T.ZERO: _Layout("ZERO", RANGE.size, RANGE.size, FUA | MAY_TRIM, _zero),
    _T.TRIM: _Layout("TRIM", RANGE.size, RANGE.size, FUA, _trim),
    _T.FLUSH: _Layout("FLUSH", 0, 0, 0, lambda body, flags: Flush()),
    _T.ACK: _Layout("ACK", ACK_BODY.size, ACK_BODY.size, DURABLE, _ack),
    _T.PING: _Layout("PING", TOKEN.size, TOKEN.size, 0, lambda b, f: Ping(*TOKEN.unpack(b))),
    _T.PONG: _Layout("PONG", TOKEN.size, TOKEN.size, 0, lambda b, f: Pong(*TOKEN.unpack(b))),
    _T.GOODBYE: _Layout("GOODBYE", REASON.size, REASON.size + MAX_MESSAGE, 0, _goodbye),
    _T.STATE: _Layout("STATE", STATE_BODY.size, STATE_BODY.size, 0, _state),
    _T.JOB: _Layout("JOB", 0, MAX_JOB_DOCUMENT, 0, lambda b, f: Job(_utf8(b, "job document"))),
    _T.HANDOVER: _Layout(
        "HANDOVER", 0, MAX_HANDOVER, 0, lambda b, f: Handover(_utf8(b, "handover document"))
    ),
    _T.HASH_REQUEST: _Layout("HASH_REQUEST", HASH_RANGE.size, HASH_RANGE.size, 0, _hash_request),
    _T.HASHES: _Layout(
        "HASHES", HASHES_HEAD.size, HASHES_HEAD.size + MAX_DIGESTS * DIGEST_SIZE, 0, _hashes
    ),
    _T.WRITE_Z: _Layout(
        "WRITE_Z",
        COMPRESSED_HEAD.size,
        COMPRESSED_HEAD.size + MAX_PAYLOAD,
        FUA,
        _write_z,
    ),
    _T.RESYNC_Z: _Layout(
        "RESYNC_Z",
        COMPRESSED_HEAD.size,
        COMPRESSED_HEAD.size + MAX_PAYLOAD,
        FUA,
        _resync_z,
    ),
}
_MAGIC_BYTES = MAGIC.to_bytes(4, "big")
_TRAILER = HEADER.size + CHECKSUM.size  # bytes of a frame besides its body


@dataclass(slots=True)
class _Pending:
    """A WRITE / RESYNC_DATA whose data goes straight into a buffer of its own."""

    layout: _Layout
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
            layout = _LAYOUTS.get(kind)
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
        layout = _LAYOUTS.get(kind)
        if layout is None:
            raise ProtocolError(f"frame {sequence}: unknown frame type {kind}")
        try:
            if length > MAX_BODY:  # from the header alone, before waiting for the body
                raise _Bad(f"body length {length} exceeds the {MAX_BODY}-byte limit")
            layout.check(flags, length)
            if available < _TRAILER + length:
                big = length - DATA_OFFSET.size >= DIRECT_MIN
                if layout.data and big and available >= _DATA_HEAD.size:
                    self._start_data(layout, flags, length, sequence)
                    return self._finish_data()
                return None
            frame = self._check_frame(pos, length, sequence, layout, flags)
        except _Bad as exc:
            raise ProtocolError(f"{layout.name} frame {sequence}: {exc}") from None
        self._pos = pos + _TRAILER + length
        self.sequence = sequence
        return frame

    def _check_frame(
        self, pos: int, length: int, sequence: int, layout: _Layout, flags: int
    ) -> Frame:
        end = HEADER.size + length
        with memoryview(self._buffer)[pos : pos + end + CHECKSUM.size] as view:
            (sent,) = CHECKSUM.unpack_from(view, end)
            self._verify(sent, xxh3_64_intdigest(view[:end]), sequence)
            return layout.parse(view[HEADER.size : end], flags)

    def _verify(self, sent: int, actual: int, sequence: int) -> None:
        if sent != actual:
            raise _Bad(f"checksum 0x{sent:016x} does not match the frame's 0x{actual:016x}")
        if sequence != self.sequence + 1:
            why = "a repeat or reorder" if sequence <= self.sequence else "frames missing"
            raise _Bad(f"sequence {sequence} where {self.sequence + 1} was due ({why})")

    def _start_data(self, layout: _Layout, flags: int, length: int, sequence: int) -> None:
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
        except _Bad as exc:
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
