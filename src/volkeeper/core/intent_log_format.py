"""The intent-log file's format: a checked header, sealed bitmap pages, and what damage means.

How this works: every block of the file can be verified on its own, so a bad sector, a torn
write at power loss or a stray ``dd`` is found when the log is opened, never trusted.  The
header block names the mirror the log belongs to and a random *log id* chosen when the log
was created (the job record keeps it too); each bitmap page carries that log id, its own page
number and a CRC-32 of the whole block, so a page from another log, from another place in this
file, half written, zeroed or flipped by one bit fails its check.  What a failed check leads to
is the caller's rule (io/intent_store.py): a bad page marks every region it covers (a partial
resync of that page's range), a bad header or a log that is not this mirror's a full resync.
This module is pure: bytes in, values or ``LogDamage`` out.

File layout, format 2 (offsets in bytes, integers big-endian)::

    0            header block (4096): u32 magic "VKIL", u16 version (2), u16 flags (bit 0:
                 open, i.e. not closed cleanly), u64 volume size, u32 region size, u32 extent
                 size, u32 activity-log capacity, u64 current generation, u64 previous
                 generation, u64 log id, u16 mirror name length, the mirror name (UTF-8),
                 zero padding, u32 crc32 of the first 4092 bytes
    4096         activity-log ring: RING_BLOCKS blocks of 4096 (core/activity_log.py; each
                 carries its own crc32)
    4096 * 3     bitmap pages, page p at 4096 * (3 + p), each a block of 4096:
                 u64 log id, u32 page number p, PAGE_BYTES (4080) bytes of the bitmap image
                 (core/bitmap.py; the last page zero-padded), u32 crc32 of the first 4092 bytes

The file is exactly ``file_size(image_size)`` bytes.  Format 1 (volkeeper before page checks)
had a 52-byte header (the fields above up to the previous generation) and the raw image at
4096 * 3; it is read, trusted as it always was, and rewritten in format 2.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from volkeeper.core.activity_log import (
    BLOCK_BYTES,
    DEFAULT_CAPACITY,
    DEFAULT_EXTENT_BYTES,
    RING_BLOCKS,
)
from volkeeper.core.bitmap import PAGE_BYTES
from volkeeper.core.units import format_size

MAGIC = 0x564B494C  # "VKIL"
VERSION = 2
OLDEST_VERSION = 1
FLAG_OPEN = 1
HEADER_V1 = struct.Struct(">IHHQIIIQQ")  # magic .. previous generation
HEADER = struct.Struct(">IHHQIIIQQQH")  # format 2: + log id, mirror name length
CRC = struct.Struct(">I")
PAGE_SEAL = struct.Struct(">QI")  # log id, page number; the image bytes follow
MAX_MIRROR_NAME = 1024
RING_OFFSET = BLOCK_BYTES
BITMAP_OFFSET = BLOCK_BYTES * (1 + RING_BLOCKS)
assert PAGE_SEAL.size + PAGE_BYTES + CRC.size == BLOCK_BYTES


class LogDamage(Exception):
    """The log (or one block of it) cannot be trusted; the message says why."""


@dataclass(frozen=True)
class Geometry:
    volume_size: int
    region_size: int = 4096
    extent_bytes: int = DEFAULT_EXTENT_BYTES
    al_capacity: int = DEFAULT_CAPACITY


@dataclass
class Generations:
    current: int
    previous: int = 0


@dataclass(frozen=True)
class Header:
    geometry: Geometry
    generations: Generations
    log_id: int  # 0 in a format-1 log, which had none
    mirror: str  # "" in a format-1 log
    open: bool  # not closed cleanly
    version: int = VERSION


@dataclass(frozen=True)
class PageDamage:
    """A bitmap page that failed its check, and the regions it covers."""

    page: int
    first_region: int
    regions: int


# -- header ---------------------------------------------------------------------------------


def encode_header(header: Header) -> bytes:
    g, name = header.geometry, header.mirror.encode()
    if len(name) > MAX_MIRROR_NAME:
        raise ValueError(f"mirror name is {len(name)} bytes, at most {MAX_MIRROR_NAME}")
    body = HEADER.pack(
        MAGIC, VERSION, FLAG_OPEN if header.open else 0, g.volume_size, g.region_size,
        g.extent_bytes, g.al_capacity, header.generations.current,
        header.generations.previous, header.log_id, len(name),
    ) + name  # fmt: skip
    return _with_crc(body.ljust(BLOCK_BYTES - CRC.size, b"\0"))


def decode_header(block: bytes) -> Header:
    """The header of a format-1 or format-2 log; raises LogDamage saying what is wrong."""
    if len(block) != BLOCK_BYTES:
        raise LogDamage("the file is shorter than its header block")
    body = block[: -CRC.size]
    if HEADER_V1.unpack_from(body)[0] != MAGIC:
        raise LogDamage("not a volkeeper intent log (bad magic)")
    if zlib.crc32(body) != CRC.unpack_from(block, len(body))[0]:
        raise LogDamage("its header failed its checksum (damaged header)")
    version = HEADER_V1.unpack_from(body)[1]
    if not OLDEST_VERSION <= version <= VERSION:
        raise LogDamage(f"format {version} is not one this volkeeper reads (1 to {VERSION})")
    if version == 1:
        _, _, flags, size, region, extent, capacity, current, previous = HEADER_V1.unpack_from(body)
        log_id, mirror = 0, ""
    else:
        fields = HEADER.unpack_from(body)
        _, _, flags, size, region, extent, capacity, current, previous, log_id, length = fields
        if length > MAX_MIRROR_NAME:
            raise LogDamage(f"its header names a mirror of {length} bytes (damaged header)")
        raw = body[HEADER.size : HEADER.size + length]
        try:
            mirror = raw.decode()
        except UnicodeDecodeError:
            raise LogDamage("its header's mirror name is not UTF-8 (damaged header)") from None
    geometry = Geometry(size, region, extent, capacity)
    generations = Generations(current, previous)
    return Header(geometry, generations, log_id, mirror, bool(flags & FLAG_OPEN), version)


# -- bitmap pages ---------------------------------------------------------------------------


def page_count(image_bytes: int) -> int:
    return -(-image_bytes // PAGE_BYTES)


def file_size(image_bytes: int) -> int:
    """The exact length of a format-2 log whose bitmap image is ``image_bytes`` long."""
    return BITMAP_OFFSET + page_count(image_bytes) * BLOCK_BYTES


def page_offset(page: int) -> int:
    return BITMAP_OFFSET + page * BLOCK_BYTES


def seal_page(log_id: int, page: int, image: bytes) -> bytes:
    """The on-disk block of bitmap page ``page`` holding ``image`` (at most PAGE_BYTES)."""
    if len(image) > PAGE_BYTES:
        raise ValueError(f"a bitmap page holds {PAGE_BYTES} bytes, got {len(image)}")
    return _with_crc(PAGE_SEAL.pack(log_id, page) + image.ljust(PAGE_BYTES, b"\0"))


def unseal_page(log_id: int, page: int, block: bytes, image_bytes: int) -> bytes | None:
    """The image bytes of page ``page`` (short for the last page), or None if the block
    fails its check: torn, damaged, zeroed, from another page or from another log."""
    if (
        len(block) != BLOCK_BYTES
        or zlib.crc32(block[: -CRC.size]) != CRC.unpack_from(block, BLOCK_BYTES - CRC.size)[0]
    ):
        return None
    if PAGE_SEAL.unpack_from(block) != (log_id, page):
        return None
    length = min(PAGE_BYTES, image_bytes - page * PAGE_BYTES)
    start = PAGE_SEAL.size
    if any(block[start + length : start + PAGE_BYTES]):  # padding past the image
        return None
    return block[start : start + length]


def page_regions(page: int, total_regions: int) -> tuple[int, int]:
    """(first region, how many) that bitmap page ``page`` covers."""
    first = page * PAGE_BYTES * 8
    return first, max(0, min(PAGE_BYTES * 8, total_regions - first))


def describe_damage(damage: list[PageDamage], marked_bytes: int) -> str:
    """One line for status and logs, e.g. ``intent log: bitmap page 1 (regions 32640-65279)
    failed its check: 127.5 MiB marked for resync``."""
    pages = ", ".join(
        f"{d.page} (regions {d.first_region}-{d.first_region + d.regions - 1})" for d in damage
    )
    noun = "page" if len(damage) == 1 else "pages"
    verb = "failed its check" if len(damage) == 1 else "failed their checks"
    return (
        f"intent log: bitmap {noun} {pages} {verb}: {format_size(marked_bytes)} marked for resync"
    )


def _with_crc(body: bytes) -> bytes:
    return body + CRC.pack(zlib.crc32(body))
