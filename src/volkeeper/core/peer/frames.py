"""Replication protocol frames of the data path, the ``Frame`` union of all, and the encoder.

How this works: each frame type (layouts in ``layout``) is a frozen dataclass whose
``encode(sequence)`` returns the buffers to hand to ``transport.writelines``; the frames of a
session (handshake, records, role changes) are in ``session_frames``, the helpers both use
in ``encoding``.  ``FrameEncoder`` owns the outgoing counter.  A WRITE or RESYNC_DATA
payload is never copied: the caller's object itself sits in the list between the header and
the checksum, so it must not change until the transport sent it.  Decoding lives in
``wire``, the protocol's public module, which re-exports all of this.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeAlias

from xxhash import xxh3_64

from volkeeper.core.peer.encoding import packed
from volkeeper.core.peer.layout import (
    _DATA_HEAD,
    ACK_BODY,
    COMPRESSED_HEAD,
    DATA_OFFSET,
    DIGEST_SIZE,
    DURABLE,
    FUA,
    HASH_RANGE,
    HASHES_HEAD,
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    MAY_TRIM,
    RANGE,
    Buffer,
    Codec,
    FrameType,
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


@dataclass(frozen=True, slots=True, repr=False)
class _DataFrame:
    """u64 offset + data: the layout WRITE and RESYNC_DATA share."""

    @property
    def TYPE(self) -> FrameType:
        """Each subclass names its own."""
        raise NotImplementedError

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

    @property
    def TYPE(self) -> FrameType:
        return FrameType.WRITE


@dataclass(frozen=True, slots=True, repr=False)
class ResyncData(_DataFrame):
    """A block sent by a resync (marked region), not an application write."""

    @property
    def TYPE(self) -> FrameType:
        return FrameType.RESYNC_DATA


@dataclass(frozen=True, slots=True, repr=False)
class _CompressedFrame:
    """COMPRESSED_HEAD + compressed data: the layout WRITE_Z and RESYNC_Z share."""

    @property
    def TYPE(self) -> FrameType:
        """Each subclass names its own."""
        raise NotImplementedError

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
    @property
    def TYPE(self) -> FrameType:
        return FrameType.WRITE_Z


@dataclass(frozen=True, slots=True, repr=False)
class ResyncCompressed(_CompressedFrame):
    @property
    def TYPE(self) -> FrameType:
        return FrameType.RESYNC_Z


@dataclass(frozen=True, slots=True)
class Zero:
    @property
    def TYPE(self) -> FrameType:
        return FrameType.ZERO

    offset: int
    length: int
    fua: bool = False
    may_trim: bool = False

    def encode(self, sequence: int) -> list[Buffer]:
        flags = (FUA if self.fua else 0) | (MAY_TRIM if self.may_trim else 0)
        return packed(self.TYPE, flags, sequence, RANGE.pack(self.offset, self.length))


@dataclass(frozen=True, slots=True)
class Trim:
    @property
    def TYPE(self) -> FrameType:
        return FrameType.TRIM

    offset: int
    length: int
    fua: bool = False

    def encode(self, sequence: int) -> list[Buffer]:
        flags = FUA if self.fua else 0
        return packed(self.TYPE, flags, sequence, RANGE.pack(self.offset, self.length))


@dataclass(frozen=True, slots=True)
class Flush:
    """A barrier: the target makes every earlier write durable before acknowledging it."""

    @property
    def TYPE(self) -> FrameType:
        return FrameType.FLUSH

    def encode(self, sequence: int) -> list[Buffer]:
        return packed(self.TYPE, 0, sequence, b"")


@dataclass(frozen=True, slots=True)
class Ack:
    """Completion of the peer's frame ``sequence``; ``errno`` 0 means success."""

    @property
    def TYPE(self) -> FrameType:
        return FrameType.ACK

    sequence: int
    errno: int = 0
    durable: bool = False

    def encode(self, sequence: int) -> list[Buffer]:
        flags = DURABLE if self.durable else 0
        return packed(self.TYPE, flags, sequence, ACK_BODY.pack(self.sequence, self.errno))


@dataclass(frozen=True, slots=True)
class HashRequest:
    """Ask the target for the xxh3-128 of each ``region_size`` region of a range."""

    @property
    def TYPE(self) -> FrameType:
        return FrameType.HASH_REQUEST

    offset: int
    length: int
    region_size: int

    def encode(self, sequence: int) -> list[Buffer]:
        body = HASH_RANGE.pack(self.offset, self.length, self.region_size)
        return packed(self.TYPE, 0, sequence, body)


@dataclass(frozen=True, slots=True)
class Hashes:
    """The answer to HASH_REQUEST ``request``: the digests, concatenated, in order."""

    @property
    def TYPE(self) -> FrameType:
        return FrameType.HASHES

    request: int
    digests: bytes

    def encode(self, sequence: int) -> list[Buffer]:
        return packed(self.TYPE, 0, sequence, HASHES_HEAD.pack(self.request) + self.digests)

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
    | Handover
    | Marked
    | SwitchoverRequest
)


class FrameEncoder:
    """Numbers outgoing frames 1, 2, 3, ...; ``sequence`` is the number of the last one."""

    def __init__(self) -> None:
        self.sequence = 0

    def encode(self, frame: Frame) -> list[Buffer]:
        self.sequence += 1
        return frame.encode(self.sequence)


__all__ = [
    "Ack",
    "Flush",
    "Frame",
    "FrameEncoder",
    "Goodbye",
    "Handover",
    "HashRequest",
    "Hashes",
    "Hello",
    "HelloOk",
    "Job",
    "Marked",
    "Ping",
    "Pong",
    "Refuse",
    "ResyncCompressed",
    "ResyncData",
    "State",
    "SwitchoverRequest",
    "Trim",
    "Write",
    "WriteCompressed",
    "Zero",
]
