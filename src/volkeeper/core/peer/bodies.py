"""Frame bodies of the replication protocol: each frame type's bounds and body parser.

How this works: ``LAYOUTS`` maps a frame type to its ``BodyLayout``: the name used in error
messages, the smallest and largest body it may have, the flag bits it may carry, the parser
that turns a checked body into its frame dataclass, and, for WRITE and RESYNC_DATA, the class
``decoder`` builds when it gathers a large payload straight into a buffer of its own.  A body
that breaks its layout raises ``BodyError``; the decoder names the frame in the
``ProtocolError`` it makes of it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from volkeeper.core.peer.frames import (
    Ack,
    Flush,
    Frame,
    Hashes,
    HashRequest,
    ResyncCompressed,
    ResyncData,
    Trim,
    Write,
    WriteCompressed,
    Zero,
)
from volkeeper.core.peer.layout import (
    ACK_BODY,
    COMPRESSED_HEAD,
    DATA_OFFSET,
    DIGEST_SIZE,
    DURABLE,
    FUA,
    HASH_RANGE,
    HASHES_HEAD,
    HELLO_FIXED,
    HELLO_OK_FIXED,
    KEEP,
    MARKED_HEAD,
    MAX_DIGESTS,
    MAX_HANDOVER,
    MAX_HASH_SPAN,
    MAX_JOB_DOCUMENT,
    MAX_MESSAGE,
    MAX_NAME,
    MAX_PAYLOAD,
    MAY_TRIM,
    OWED,
    RANGE,
    REASON,
    STATE_BODY,
    STR_LEN,
    TOKEN,
    Codec,
    DataState,
    FrameType,
    GoodbyeReason,
    RefuseReason,
    Role,
)
from volkeeper.core.peer.session_frames import (
    Goodbye,
    Handover,
    Hello,
    HelloOk,
    Job,
    Marked,
    Ping,
    Pong,
    Refuse,
    State,
    SwitchoverRequest,
)

_E = TypeVar("_E", bound=enum.IntEnum)


class BodyError(Exception):
    """A body or header fault; the decoder prefixes it with the frame's name and sequence."""


def _enum(cls: type[_E], value: int, what: str) -> _E:
    try:
        return cls(value)
    except ValueError:
        raise BodyError(f"unknown {what} {value}") from None


def _utf8(raw: memoryview, what: str) -> str:
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _strs(body: memoryview, at: int, names: tuple[str, ...]) -> list[str]:
    out = []
    for what in names:
        if len(body) - at < STR_LEN.size:
            raise BodyError(f"body ends before the length of the {what}")
        (size,) = STR_LEN.unpack_from(body, at)
        at += STR_LEN.size
        if size > MAX_NAME:
            raise BodyError(f"{what} of {size} bytes is longer than {MAX_NAME}")
        if len(body) - at < size:
            raise BodyError(f"{what} of {size} bytes runs past the end of the body")
        out.append(_utf8(body[at : at + size], what))
        at += size
    if at != len(body):
        raise BodyError(f"{len(body) - at} stray bytes after the {names[-1]}")
    return out


def _hello(body: memoryview, flags: int) -> Hello:
    low, high, size, sector, current, previous, role, epoch, marked = HELLO_FIXED.unpack_from(body)
    if low > high:
        raise BodyError(f"min_version {low} is above max_version {high}")
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
        raise BodyError(f"raw length {raw_length} exceeds {MAX_PAYLOAD}")
    data = bytes(body[COMPRESSED_HEAD.size :])
    return offset, _enum(Codec, codec, "codec"), raw_length, data, flags == FUA


def _write_z(body: memoryview, flags: int) -> WriteCompressed:
    return WriteCompressed(*_compressed_fields(body, flags))


def _resync_z(body: memoryview, flags: int) -> ResyncCompressed:
    return ResyncCompressed(*_compressed_fields(body, flags))


def _hash_request(body: memoryview, flags: int) -> HashRequest:
    offset, length, region_size = HASH_RANGE.unpack_from(body)
    if region_size < 512 or region_size & (region_size - 1):
        raise BodyError(f"region size {region_size} is not a power of two >= 512")
    if not 0 < length <= MAX_HASH_SPAN or offset % region_size:
        raise BodyError(f"range {offset}+{length} is not whole regions of at most {MAX_HASH_SPAN}")
    return HashRequest(offset, length, region_size)


def _hashes(body: memoryview, flags: int) -> Hashes:
    (request,) = HASHES_HEAD.unpack_from(body)
    digests = bytes(body[HASHES_HEAD.size :])
    if len(digests) % DIGEST_SIZE:
        raise BodyError(f"{len(digests)} digest bytes are not a whole number of digests")
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
class BodyLayout:
    name: str
    min_body: int
    max_body: int
    flags: int  # the flag bits this type may carry
    parse: Callable[[memoryview, int], Frame]
    data: type[Write] | type[ResyncData] | None = None  # a payload that may arrive in pieces

    def check(self, flags: int, length: int) -> None:
        if flags & ~self.flags:
            raise BodyError(f"unknown flags 0x{flags & ~self.flags:04x}")
        if length < self.min_body:
            raise BodyError(
                f"body of {length} bytes is shorter than its {self.min_body}-byte header"
            )
        if length > self.max_body:
            raise BodyError(
                f"body of {length} bytes is longer than the {self.max_body} it may have"
            )


_T = FrameType
_HELLO_MIN = HELLO_FIXED.size + 4 * STR_LEN.size
_HELLO_OK_MIN = HELLO_OK_FIXED.size + 2 * STR_LEN.size
LAYOUTS: dict[int, BodyLayout] = {
    _T.HELLO: BodyLayout("HELLO", _HELLO_MIN, _HELLO_MIN + 4 * MAX_NAME, KEEP, _hello),
    _T.HELLO_OK: BodyLayout(
        "HELLO_OK", _HELLO_OK_MIN, _HELLO_OK_MIN + 2 * MAX_NAME, OWED, _hello_ok
    ),
    _T.SWITCHOVER: BodyLayout("SWITCHOVER", 0, 0, 0, lambda b, f: SwitchoverRequest()),
    _T.MARKED: BodyLayout("MARKED", MARKED_HEAD.size, MARKED_HEAD.size + MAX_HANDOVER, 0, _marked),
    _T.REFUSE: BodyLayout("REFUSE", REASON.size, REASON.size + MAX_MESSAGE, 0, _refuse),
    _T.WRITE: BodyLayout("WRITE", 8, 8 + MAX_PAYLOAD, FUA, _write, Write),
    _T.RESYNC_DATA: BodyLayout("RESYNC_DATA", 8, 8 + MAX_PAYLOAD, FUA, _resync_data, ResyncData),
    _T.ZERO: BodyLayout("ZERO", RANGE.size, RANGE.size, FUA | MAY_TRIM, _zero),
    _T.TRIM: BodyLayout("TRIM", RANGE.size, RANGE.size, FUA, _trim),
    _T.FLUSH: BodyLayout("FLUSH", 0, 0, 0, lambda body, flags: Flush()),
    _T.ACK: BodyLayout("ACK", ACK_BODY.size, ACK_BODY.size, DURABLE, _ack),
    _T.PING: BodyLayout("PING", TOKEN.size, TOKEN.size, 0, lambda b, f: Ping(*TOKEN.unpack(b))),
    _T.PONG: BodyLayout("PONG", TOKEN.size, TOKEN.size, 0, lambda b, f: Pong(*TOKEN.unpack(b))),
    _T.GOODBYE: BodyLayout("GOODBYE", REASON.size, REASON.size + MAX_MESSAGE, 0, _goodbye),
    _T.STATE: BodyLayout("STATE", STATE_BODY.size, STATE_BODY.size, 0, _state),
    _T.JOB: BodyLayout("JOB", 0, MAX_JOB_DOCUMENT, 0, lambda b, f: Job(_utf8(b, "job document"))),
    _T.HANDOVER: BodyLayout(
        "HANDOVER", 0, MAX_HANDOVER, 0, lambda b, f: Handover(_utf8(b, "handover document"))
    ),
    _T.HASH_REQUEST: BodyLayout("HASH_REQUEST", HASH_RANGE.size, HASH_RANGE.size, 0, _hash_request),
    _T.HASHES: BodyLayout(
        "HASHES", HASHES_HEAD.size, HASHES_HEAD.size + MAX_DIGESTS * DIGEST_SIZE, 0, _hashes
    ),
    _T.WRITE_Z: BodyLayout(
        "WRITE_Z",
        COMPRESSED_HEAD.size,
        COMPRESSED_HEAD.size + MAX_PAYLOAD,
        FUA,
        _write_z,
    ),
    _T.RESYNC_Z: BodyLayout(
        "RESYNC_Z",
        COMPRESSED_HEAD.size,
        COMPRESSED_HEAD.size + MAX_PAYLOAD,
        FUA,
        _resync_z,
    ),
}
