"""Replication protocol frames: constants, layouts, one dataclass per frame type, encoder.

How this works: every frame is a 20-byte header, a body, and an 8-byte checksum:

    HEADER   u32 magic 0x564B5031 ("VKP1"), u16 frame type, u16 flags, u32 body length,
             u64 sequence number
    body     ``length`` bytes, laid out per frame type (the Structs below)
    checksum u64 xxh3_64 of header + body, big-endian (TCP's 16-bit checksum misses too much)

Sequence numbers start at 1 on each connection and rise by exactly 1 per frame in each
direction, so an ACK names a frame by its sequence and a lost, repeated or reordered frame
is caught.  Each frame type is a frozen dataclass whose ``encode(sequence)`` returns the
buffers to hand to ``transport.writelines``; ``FrameEncoder`` owns the outgoing counter.
A WRITE or RESYNC_DATA payload is never copied: the caller's object itself sits in the list
between the header and the checksum, so it must not change until the transport sent it.
Decoding lives in ``peer_wire``, the protocol's public module, which re-exports all of this.

Frame types and bodies (flags not listed must be 0; "str" is a u16 length + UTF-8 bytes):

    HELLO        s->t  HELLO_FIXED, then str node, str volume (the target's), str job,
                       str source volume                               (first frame)
    HELLO_OK     t->s  HELLO_OK_FIXED, then str node, str volume
    REFUSE       t->s  u16 RefuseReason, UTF-8 message (rest of body, <= 4096 bytes)
    WRITE        s->t  u64 offset, data (rest of body)          flags: FUA
    RESYNC_DATA  s->t  same as WRITE; a resync block, not an application write
    WRITE_Z      s->t  COMPRESSED_HEAD: u64 offset, u8 Codec, u32 raw length; then the
                       compressed data (rest of body): a WRITE whose data was compressed
                                                                  flags: FUA
    RESYNC_Z     s->t  same as WRITE_Z, for RESYNC_DATA
    HASH_REQUEST s->t  HASH_RANGE: u64 offset, u32 length, u32 region size: "hash these
                       regions as they are after every frame before this one"
    HASHES       t->s  u64 sequence of the HASH_REQUEST, then one 16-byte xxh3-128 digest
                       per region of it, in order (the last region may be short)
    ZERO         s->t  RANGE: u64 offset, u64 length              flags: FUA, MAY_TRIM
    TRIM         s->t  RANGE                                      flags: FUA
    FLUSH        s->t  empty: a barrier, every earlier write durable before its ACK
    ACK          both  ACK_BODY: u64 peer's sequence, u32 errno   flags: DURABLE
    PING / PONG  both  u64 opaque token
    GOODBYE      both  u16 GoodbyeReason, UTF-8 message (<= 4096 bytes)
    STATE        s->t  STATE_BODY: u8 DataState, u64 current, u64 previous generation
    JOB          s->t  UTF-8 JSON: the job's record, so the target knows the job it serves
                       (<= MAX_JOB_DOCUMENT bytes; sent after HELLO_OK and on each change)
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from xxhash import xxh3_64, xxh3_64_digest

PROTOCOL_VERSION = 1
MAGIC = 0x564B5031  # "VKP1"
MAX_PAYLOAD = 32 * 1024 * 1024  # largest WRITE / RESYNC_DATA data
MAX_BODY = MAX_PAYLOAD + 64  # any larger length is refused from the header alone
MAX_MESSAGE = 4096  # REFUSE / GOODBYE message, UTF-8 bytes
MAX_NAME = 4096  # node, volume and job names in HELLO / HELLO_OK, UTF-8 bytes
MAX_JOB_DOCUMENT = 64 * 1024  # JOB: the job record as JSON, UTF-8 bytes
MAX_SPARE_BYTES = 64 * 1024 * 1024  # recycled payload buffers a decoder keeps
DIRECT_MIN = 64 * 1024  # data this large that arrives in pieces gets a buffer of its own

# Frame header: u32 magic, u16 frame type, u16 flags, u32 body length, u64 sequence.
HEADER = struct.Struct(">IHHIQ")
# Trailer: u64 xxh3_64 of header + body.
CHECKSUM = struct.Struct(">Q")
# HELLO body, fixed part: u16 min_version, u16 max_version, u64 volume_size, u32 sector_size,
# u64 current_generation, u64 previous_generation, u8 Role of the sender; three strs follow.
HELLO_FIXED = struct.Struct(">HHQIQQB")
# HELLO_OK body, fixed part: u16 chosen_version, u64 volume_size, u32 sector_size,
# u64 current_generation, u64 previous_generation, u8 DataState; two strs follow.
HELLO_OK_FIXED = struct.Struct(">HQIQQB")
# Length prefix of a str: u16 byte count of the UTF-8 text that follows.
STR_LEN = struct.Struct(">H")
# REFUSE / GOODBYE: u16 reason; the UTF-8 message is the rest of the body.
REASON = struct.Struct(">H")
# WRITE / RESYNC_DATA: u64 offset; the data is the rest of the body.
DATA_OFFSET = struct.Struct(">Q")
# WRITE_Z / RESYNC_Z: u64 offset, u8 Codec, u32 length of the data once decompressed; the
# compressed data is the rest of the body.
COMPRESSED_HEAD = struct.Struct(">QBI")
# ZERO / TRIM: u64 offset, u64 length.
RANGE = struct.Struct(">QQ")
# ACK: u64 acknowledged sequence (of the peer's frame), u32 errno (0 = success).
ACK_BODY = struct.Struct(">QI")
# PING / PONG: u64 opaque token, echoed by PONG.
TOKEN = struct.Struct(">Q")
# STATE: u8 DataState, u64 current_generation, u64 previous_generation: what the target's
# copy is from now on (Inconsistent when a full resync starts, UpToDate when a resync ends).
STATE_BODY = struct.Struct(">BQQ")
# HASH_REQUEST: u64 offset, u32 length, u32 region size (a power of two, >= 512).
HASH_RANGE = struct.Struct(">QII")
# HASHES: u64 sequence of the request answered; the digests (16 bytes each) follow.
HASHES_HEAD = struct.Struct(">Q")
DIGEST_SIZE = 16  # xxh3-128
MAX_HASH_SPAN = 16 * 1024 * 1024  # bytes one HASH_REQUEST may cover
MAX_DIGESTS = MAX_HASH_SPAN // 512
# Header and WRITE offset packed at once (the hot path): HEADER then DATA_OFFSET.
_DATA_HEAD = struct.Struct(HEADER.format + DATA_OFFSET.format[1:])

# Flag bits (their meaning depends on the frame type).
FUA = 1 << 0  # WRITE, RESYNC_DATA, ZERO, TRIM: durable before the ACK
MAY_TRIM = 1 << 1  # ZERO: the target may deallocate instead of writing zeroes
DURABLE = 1 << 0  # ACK: the acknowledged data is on stable storage

Buffer: TypeAlias = bytes | bytearray | memoryview


class FrameType(enum.IntEnum):
    HELLO = 1
    HELLO_OK = 2
    REFUSE = 3
    WRITE = 4
    RESYNC_DATA = 5
    ZERO = 6
    TRIM = 7
    FLUSH = 8
    ACK = 9
    PING = 10
    PONG = 11
    GOODBYE = 12
    STATE = 13
    JOB = 14
    WRITE_Z = 15
    RESYNC_Z = 16
    HASH_REQUEST = 17
    HASHES = 18


class Role(enum.IntEnum):
    SOURCE = 0
    TARGET = 1
    STANDALONE = 2


class DataState(enum.IntEnum):
    UP_TO_DATE = 0  # "UpToDate"
    CONSISTENT = 1
    INCONSISTENT = 2
    OUTDATED = 3


class Codec(enum.IntEnum):
    """How a WRITE_Z / RESYNC_Z payload is compressed (the level is the sender's business)."""

    ZLIB = 1
    ZSTD = 2
    LZ4 = 3  # lz4 block format, no size prefix (the frame carries the raw length)


class RefuseReason(enum.IntEnum):
    VERSION = 1  # no protocol version in common
    SIZE = 2  # the target volume is smaller than the source's
    SECTOR_SIZE = 3
    NO_SUCH_VOLUME = 4
    ALREADY_TARGET = 5  # the volume is the target of another source
    SPLIT_BRAIN = 6  # the generation ids show diverged data
    BUSY = 7
    OTHER = 8
    IS_SOURCE = 9  # the volume is a mirror source on the target node


class GoodbyeReason(enum.IntEnum):
    SHUTDOWN = 1  # the daemon is stopping
    PAUSED = 2  # the administrator paused the mirror
    DELETED = 3  # the mirror or job was deleted
    PROTOCOL_ERROR = 4  # the sender saw a bad frame
    IO_ERROR = 5  # the sender's volume failed
    OTHER = 6


def choose_version(min_a: int, max_a: int, min_b: int, max_b: int) -> int | None:
    """The highest version both ranges hold, or None if they do not overlap."""
    best = min(max_a, max_b)
    return best if best >= max(min_a, min_b) else None


def _packed(kind: FrameType, flags: int, sequence: int, body: bytes) -> list[Buffer]:
    head = HEADER.pack(MAGIC, kind, flags, len(body), sequence) + body
    return [head + xxh3_64_digest(head)]


def _data_frame(kind: FrameType, flags: int, seq: int, offset: int, data: Buffer) -> list[Buffer]:
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > MAX_PAYLOAD:
        raise ValueError(f"{kind.name} payload of {size} bytes exceeds {MAX_PAYLOAD}")
    head = _DATA_HEAD.pack(MAGIC, kind, flags, DATA_OFFSET.size + size, seq, offset)
    hasher = xxh3_64(head)
    hasher.update(data)
    return [head, data, hasher.digest()]


def _data_repr(frame: _DataFrame) -> str:
    """Payloads are not printed: a 1 MiB repr in a log line or a test diff helps nobody."""
    size = frame.data.nbytes if isinstance(frame.data, memoryview) else len(frame.data)
    name = type(frame).__name__
    return f"{name}(offset={frame.offset}, data=<{size} bytes>, fua={frame.fua})"


def _str(text: str, limit: int, what: str) -> bytes:
    raw = text.encode()
    if len(raw) > limit:
        raise ValueError(f"{what} is {len(raw)} UTF-8 bytes, more than {limit}")
    return STR_LEN.pack(len(raw)) + raw


def _message(text: str) -> bytes:
    """A REFUSE / GOODBYE message, cut at a character boundary to MAX_MESSAGE bytes."""
    return text.encode()[:MAX_MESSAGE].decode(errors="ignore").encode()


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    TYPE: ClassVar[FrameType] = FrameType.HELLO
    node: str
    volume: str
    job: str
    source_volume: str
    volume_size: int
    sector_size: int
    current_generation: int
    previous_generation: int
    role: Role = Role.SOURCE
    min_version: int = PROTOCOL_VERSION
    max_version: int = PROTOCOL_VERSION

    def encode(self, sequence: int) -> list[Buffer]:
        body = HELLO_FIXED.pack(
            self.min_version, self.max_version, self.volume_size, self.sector_size,
            self.current_generation, self.previous_generation, self.role,
        )  # fmt: skip
        names = (_str(t, MAX_NAME, w) for t, w in self._names())
        return _packed(self.TYPE, 0, sequence, body + b"".join(names))

    def _names(self) -> tuple[tuple[str, str], ...]:
        return (
            (self.node, "node name"),
            (self.volume, "volume name"),
            (self.job, "job name"),
            (self.source_volume, "source volume name"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class HelloOk:
    TYPE: ClassVar[FrameType] = FrameType.HELLO_OK
    node: str
    volume: str
    volume_size: int
    sector_size: int
    current_generation: int
    previous_generation: int
    data_state: DataState
    chosen_version: int = PROTOCOL_VERSION

    def encode(self, sequence: int) -> list[Buffer]:
        body = HELLO_OK_FIXED.pack(
            self.chosen_version, self.volume_size, self.sector_size,
            self.current_generation, self.previous_generation, self.data_state,
        )  # fmt: skip
        names = _str(self.node, MAX_NAME, "node name") + _str(self.volume, MAX_NAME, "volume name")
        return _packed(self.TYPE, 0, sequence, body + names)


@dataclass(frozen=True, slots=True)
class Refuse:
    """The target's answer to a HELLO it will not accept; ``message`` is for the log."""

    TYPE: ClassVar[FrameType] = FrameType.REFUSE
    reason: RefuseReason
    message: str = ""

    def encode(self, sequence: int) -> list[Buffer]:
        return _packed(self.TYPE, 0, sequence, REASON.pack(self.reason) + _message(self.message))


@dataclass(frozen=True, slots=True, repr=False)
class _DataFrame:
    """u64 offset + data: the layout WRITE and RESYNC_DATA share."""

    TYPE: ClassVar[FrameType]
    offset: int
    data: Buffer
    fua: bool = False

    def encode(self, sequence: int) -> list[Buffer]:
        return _data_frame(self.TYPE, FUA if self.fua else 0, sequence, self.offset, self.data)

    def __repr__(self) -> str:
        return _data_repr(self)


@dataclass(frozen=True, slots=True, repr=False)
class Write(_DataFrame):
    """An application write, in the source's acknowledgement order."""

    TYPE: ClassVar[FrameType] = FrameType.WRITE


@dataclass(frozen=True, slots=True, repr=False)
class ResyncData(_DataFrame):
    """A block sent by a resync (marked region), not an application write."""

    TYPE: ClassVar[FrameType] = FrameType.RESYNC_DATA


@dataclass(frozen=True, slots=True, repr=False)
class _CompressedFrame:
    """COMPRESSED_HEAD + compressed data: the layout WRITE_Z and RESYNC_Z share."""

    TYPE: ClassVar[FrameType]
    offset: int
    codec: Codec
    raw_length: int  # of the data once decompressed
    data: Buffer  # compressed
    fua: bool = False

    def encode(self, sequence: int) -> list[Buffer]:
        size = self.data.nbytes if isinstance(self.data, memoryview) else len(self.data)
        if self.raw_length > MAX_PAYLOAD or size > MAX_PAYLOAD:
            raise ValueError(f"{self.TYPE.name} of {self.raw_length} bytes exceeds {MAX_PAYLOAD}")
        head = HEADER.pack(
            MAGIC, self.TYPE, FUA if self.fua else 0, COMPRESSED_HEAD.size + size, sequence
        ) + COMPRESSED_HEAD.pack(self.offset, self.codec, self.raw_length)
        hasher = xxh3_64(head)
        hasher.update(self.data)
        return [head, self.data, hasher.digest()]

    def __repr__(self) -> str:
        size = self.data.nbytes if isinstance(self.data, memoryview) else len(self.data)
        return (
            f"{type(self).__name__}(offset={self.offset}, codec={self.codec.name}, "
            f"raw_length={self.raw_length}, data=<{size} bytes>, fua={self.fua})"
        )


@dataclass(frozen=True, slots=True, repr=False)
class WriteCompressed(_CompressedFrame):
    TYPE: ClassVar[FrameType] = FrameType.WRITE_Z


@dataclass(frozen=True, slots=True, repr=False)
class ResyncCompressed(_CompressedFrame):
    TYPE: ClassVar[FrameType] = FrameType.RESYNC_Z


@dataclass(frozen=True, slots=True)
class Zero:
    TYPE: ClassVar[FrameType] = FrameType.ZERO
    offset: int
    length: int
    fua: bool = False
    may_trim: bool = False

    def encode(self, sequence: int) -> list[Buffer]:
        flags = (FUA if self.fua else 0) | (MAY_TRIM if self.may_trim else 0)
        return _packed(self.TYPE, flags, sequence, RANGE.pack(self.offset, self.length))


@dataclass(frozen=True, slots=True)
class Trim:
    TYPE: ClassVar[FrameType] = FrameType.TRIM
    offset: int
    length: int
    fua: bool = False

    def encode(self, sequence: int) -> list[Buffer]:
        flags = FUA if self.fua else 0
        return _packed(self.TYPE, flags, sequence, RANGE.pack(self.offset, self.length))


@dataclass(frozen=True, slots=True)
class Flush:
    """A barrier: the target makes every earlier write durable before acknowledging it."""

    TYPE: ClassVar[FrameType] = FrameType.FLUSH

    def encode(self, sequence: int) -> list[Buffer]:
        return _packed(self.TYPE, 0, sequence, b"")


@dataclass(frozen=True, slots=True)
class Ack:
    """Completion of the peer's frame ``sequence``; ``errno`` 0 means success."""

    TYPE: ClassVar[FrameType] = FrameType.ACK
    sequence: int
    errno: int = 0
    durable: bool = False

    def encode(self, sequence: int) -> list[Buffer]:
        flags = DURABLE if self.durable else 0
        return _packed(self.TYPE, flags, sequence, ACK_BODY.pack(self.sequence, self.errno))


@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[FrameType] = FrameType.PING
    token: int

    def encode(self, sequence: int) -> list[Buffer]:
        return _packed(self.TYPE, 0, sequence, TOKEN.pack(self.token))


@dataclass(frozen=True, slots=True)
class Pong:
    TYPE: ClassVar[FrameType] = FrameType.PONG
    token: int

    def encode(self, sequence: int) -> list[Buffer]:
        return _packed(self.TYPE, 0, sequence, TOKEN.pack(self.token))


@dataclass(frozen=True, slots=True)
class Goodbye:
    TYPE: ClassVar[FrameType] = FrameType.GOODBYE
    reason: GoodbyeReason
    message: str = ""

    def encode(self, sequence: int) -> list[Buffer]:
        return _packed(self.TYPE, 0, sequence, REASON.pack(self.reason) + _message(self.message))


@dataclass(frozen=True, slots=True)
class State:
    """The source tells the target what its copy now is; ACKed once durably recorded."""

    TYPE: ClassVar[FrameType] = FrameType.STATE
    data_state: DataState
    current_generation: int
    previous_generation: int

    def encode(self, sequence: int) -> list[Buffer]:
        body = STATE_BODY.pack(self.data_state, self.current_generation, self.previous_generation)
        return _packed(self.TYPE, 0, sequence, body)


@dataclass(frozen=True, slots=True)
class Job:
    """The job this mirror belongs to, as JSON (the target stores it; the source owns it)."""

    TYPE: ClassVar[FrameType] = FrameType.JOB
    document: str

    def encode(self, sequence: int) -> list[Buffer]:
        raw = self.document.encode()
        if len(raw) > MAX_JOB_DOCUMENT:
            raise ValueError(f"job document of {len(raw)} bytes exceeds {MAX_JOB_DOCUMENT}")
        return _packed(self.TYPE, 0, sequence, raw)


@dataclass(frozen=True, slots=True)
class HashRequest:
    """Ask the target for the xxh3-128 of each ``region_size`` region of a range."""

    TYPE: ClassVar[FrameType] = FrameType.HASH_REQUEST
    offset: int
    length: int
    region_size: int

    def encode(self, sequence: int) -> list[Buffer]:
        body = HASH_RANGE.pack(self.offset, self.length, self.region_size)
        return _packed(self.TYPE, 0, sequence, body)


@dataclass(frozen=True, slots=True)
class Hashes:
    """The answer to HASH_REQUEST ``request``: the digests, concatenated, in order."""

    TYPE: ClassVar[FrameType] = FrameType.HASHES
    request: int
    digests: bytes

    def encode(self, sequence: int) -> list[Buffer]:
        return _packed(self.TYPE, 0, sequence, HASHES_HEAD.pack(self.request) + self.digests)

    def __iter__(self) -> Iterator[bytes]:
        digests = self.digests
        return (digests[i : i + DIGEST_SIZE] for i in range(0, len(digests), DIGEST_SIZE))


Frame: TypeAlias = (
    Hello
    | HelloOk
    | Refuse
    | Write
    | ResyncData
    | Zero
    | Trim
    | Flush
    | Ack
    | Ping
    | Pong
    | Goodbye
    | State
    | Job
    | WriteCompressed
    | ResyncCompressed
    | HashRequest
    | Hashes
)


class FrameEncoder:
    """Numbers outgoing frames 1, 2, 3, ...; ``sequence`` is the number of the last one."""

    def __init__(self) -> None:
        self.sequence = 0

    def encode(self, frame: Frame) -> list[Buffer]:
        self.sequence += 1
        return frame.encode(self.sequence)


__all__ = [
    "ACK_BODY",
    "CHECKSUM",
    "COMPRESSED_HEAD",
    "DATA_OFFSET",
    "DIGEST_SIZE",
    "DIRECT_MIN",
    "DURABLE",
    "FUA",
    "HASHES_HEAD",
    "HASH_RANGE",
    "HEADER",
    "HELLO_FIXED",
    "HELLO_OK_FIXED",
    "MAGIC",
    "MAX_BODY",
    "MAX_DIGESTS",
    "MAX_HASH_SPAN",
    "MAX_JOB_DOCUMENT",
    "MAX_MESSAGE",
    "MAX_NAME",
    "MAX_PAYLOAD",
    "MAX_SPARE_BYTES",
    "MAY_TRIM",
    "PROTOCOL_VERSION",
    "RANGE",
    "REASON",
    "STATE_BODY",
    "STR_LEN",
    "TOKEN",
    "Ack",
    "Buffer",
    "Codec",
    "DataState",
    "Flush",
    "Frame",
    "FrameEncoder",
    "FrameType",
    "Goodbye",
    "GoodbyeReason",
    "HashRequest",
    "Hashes",
    "Hello",
    "HelloOk",
    "Job",
    "Ping",
    "Pong",
    "Refuse",
    "RefuseReason",
    "ResyncCompressed",
    "ResyncData",
    "Role",
    "State",
    "Trim",
    "Write",
    "WriteCompressed",
    "Zero",
    "choose_version",
]
