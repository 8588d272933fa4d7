"""Replication protocol layout: the frame header, every body's Structs, flags and enums.

How this works: every frame is a 20-byte header, a body, and an 8-byte checksum:

    HEADER   u32 magic 0x564B5031 ("VKP1"), u16 frame type, u16 flags, u32 body length,
             u64 sequence number
    body     ``length`` bytes, laid out per frame type (the Structs below)
    checksum u64 xxh3_64 of header + body, big-endian (TCP's 16-bit checksum misses too much)

Sequence numbers start at 1 on each connection and rise by exactly 1 per frame in each
direction, so an ACK names a frame by its sequence and a lost, repeated or reordered frame
is caught.  The frames themselves are in ``frames``; decoding in ``wire``, the
protocol's public module, which re-exports both.

Frame types and bodies (flags not listed must be 0; "str" is a u16 length + UTF-8 bytes):

    HELLO        s->t  HELLO_FIXED, then str node, str volume (the target's), str job,
                       str source volume              (first frame)   flags: KEEP (the
                       administrator resolved a split brain keeping the sender's data)
    HELLO_OK     t->s  HELLO_OK_FIXED, then str node, str volume        flags: OWED (a
                       MARKED frame follows)
    SWITCHOVER   t->s  empty: "hand the job over to me" (a switchover asked of a target
                       node: the source runs it, and its HANDOVER is the answer)
    MARKED       t->s  u32 region size, then a zlib-compressed bitmap image: regions this
                       copy changed that its new source lacks (it was deposed: its writes
                       there are overwritten by a resync of them), right after HELLO_OK
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
    HANDOVER     s->t  UTF-8 JSON (<= MAX_HANDOVER bytes): a switchover -- the job's record
                       with the target's node as its source, and each new mirror's
                       generations and marked regions (daemon/roles/handover.py).  ACKed
                       once the target is the job's source on disk; refused with
                       GOODBYE(OTHER, why).
"""

from __future__ import annotations

import enum
import struct
from typing import TypeAlias

PROTOCOL_VERSION = 1
MAGIC = 0x564B5031  # "VKP1"
MAX_PAYLOAD = 32 * 1024 * 1024  # largest WRITE / RESYNC_DATA data
MAX_BODY = MAX_PAYLOAD + 64  # any larger length is refused from the header alone
MAX_MESSAGE = 4096  # REFUSE / GOODBYE message, UTF-8 bytes
MAX_NAME = 4096  # node, volume and job names in HELLO / HELLO_OK, UTF-8 bytes
MAX_JOB_DOCUMENT = 64 * 1024  # JOB: the job record as JSON, UTF-8 bytes
MAX_HANDOVER = 16 * 1024 * 1024  # HANDOVER: the record and the mirrors' bitmaps, UTF-8 bytes
MAX_SPARE_BYTES = 64 * 1024 * 1024  # recycled payload buffers a decoder keeps
DIRECT_MIN = 64 * 1024  # data this large that arrives in pieces gets a buffer of its own

# Frame header: u32 magic, u16 frame type, u16 flags, u32 body length, u64 sequence.
HEADER = struct.Struct(">IHHIQ")
# Trailer: u64 xxh3_64 of header + body.
CHECKSUM = struct.Struct(">Q")
# HELLO body, fixed part: u16 min_version, u16 max_version, u64 volume_size, u32 sector_size,
# u64 current_generation, u64 previous_generation, u8 Role of the sender, u32 the job's epoch
# (how many times its source moved: a target takes a new source only from a later epoch),
# u64 bytes the sender's intent log marks for this target; four strs follow.
HELLO_FIXED = struct.Struct(">HHQIQQBIQ")
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
# MARKED: u32 region size; the zlib-compressed bitmap image is the rest of the body.
MARKED_HEAD = struct.Struct(">I")
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
OWED = 1 << 0  # HELLO_OK: a MARKED frame follows
KEEP = 1 << 0  # HELLO: a split brain resolved in the sender's favour: the target yields

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
    HANDOVER = 19
    MARKED = 20
    SWITCHOVER = 21


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
    SOURCE_MOVED = 10  # the target's node is the job's source now (a switchover or failover)


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
    "KEEP",
    "MAGIC",
    "MARKED_HEAD",
    "MAX_BODY",
    "MAX_DIGESTS",
    "MAX_HANDOVER",
    "MAX_HASH_SPAN",
    "MAX_JOB_DOCUMENT",
    "MAX_MESSAGE",
    "MAX_NAME",
    "MAX_PAYLOAD",
    "MAX_SPARE_BYTES",
    "MAY_TRIM",
    "OWED",
    "PROTOCOL_VERSION",
    "RANGE",
    "REASON",
    "STATE_BODY",
    "STR_LEN",
    "TOKEN",
    "Buffer",
    "Codec",
    "DataState",
    "FrameType",
    "GoodbyeReason",
    "RefuseReason",
    "Role",
    "choose_version",
]
