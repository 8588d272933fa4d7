"""What every frame's encoder shares: the packed header + body + checksum, and strings.

How this works: ``packed`` lays out a frame whose body is built in full (every frame but
WRITE and RESYNC_DATA, whose payload is never copied: core/peer/frames.py); ``encoded_str``
is the u16-length-prefixed UTF-8 of HELLO and HELLO_OK; ``message_bytes`` a REFUSE or
GOODBYE message cut to MAX_MESSAGE bytes at a character boundary.
"""

from __future__ import annotations

from xxhash import xxh3_64_digest

from volkeeper.core.peer.layout import HEADER, MAGIC, MAX_MESSAGE, STR_LEN, Buffer, FrameType


def packed(kind: FrameType, flags: int, sequence: int, body: bytes) -> list[Buffer]:
    head = HEADER.pack(MAGIC, kind, flags, len(body), sequence) + body
    return [head + xxh3_64_digest(head)]


def encoded_str(text: str, limit: int, what: str) -> bytes:
    raw = text.encode()
    if len(raw) > limit:
        raise ValueError(f"{what} is {len(raw)} UTF-8 bytes, more than {limit}")
    return STR_LEN.pack(len(raw)) + raw


def message_bytes(text: str) -> bytes:
    """A REFUSE / GOODBYE message, cut at a character boundary to MAX_MESSAGE bytes."""
    return text.encode()[:MAX_MESSAGE].decode(errors="ignore").encode()


def document(kind: FrameType, sequence: int, text: str, limit: int, what: str) -> list[Buffer]:
    """A frame whose whole body is a UTF-8 document of at most ``limit`` bytes."""
    raw = text.encode()
    if len(raw) > limit:
        raise ValueError(f"{what} of {len(raw)} bytes exceeds {limit}")
    return packed(kind, 0, sequence, raw)
