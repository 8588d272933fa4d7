"""The intent log on stable storage: one file per mirror in the node's bitmap directory.

How this works: the file holds a header block, the activity log's ring of snapshot blocks and
the bitmap image, at fixed offsets, so every update is a ``pwrite`` of whole 4 KiB blocks
followed by ``fdatasync`` -- never a rewrite of the whole file.  The hot path asks nothing of
this module while its extents are hot; it persists an activity-log snapshot when a write
touches a cold extent, and bitmap pages when the mirror loses its target or a resync clears
regions (see docs/mirroring.md).

Opening a log whose header says it was not closed cleanly is crash recovery: every extent of
the last valid activity-log snapshot is marked in the bitmap (those may hold writes a target
never got), the bitmap is persisted, and ``recovered_bytes`` says how much was added.

File layout (offsets in bytes, integers big-endian)::

    0            header block (4096): u32 magic "VKIL", u16 version, u16 flags (bit 0: open,
                 i.e. not closed cleanly), u64 volume size, u32 region size, u32 extent size,
                 u32 activity-log capacity, u64 current generation, u64 previous generation,
                 zero padding, u32 crc32 of the first 4092 bytes
    4096         activity-log ring: RING_BLOCKS blocks of 4096 (core/activity_log.py)
    4096 * 3     bitmap image, ``image_size`` bytes (core/bitmap.py), padded to 4 KiB pages
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from volkeeper.core.activity_log import (
    BLOCK_BYTES,
    DEFAULT_CAPACITY,
    DEFAULT_EXTENT_BYTES,
    RING_BLOCKS,
    ActivityLog,
    Snapshot,
    recover,
)
from volkeeper.core.bitmap import PAGE_BYTES, DirtyBitmap, image_size
from volkeeper.errors import VolumeError
from volkeeper.io import durable_files

MAGIC = 0x564B494C  # "VKIL"
VERSION = 1
FLAG_OPEN = 1
HEADER = struct.Struct(">IHHQIIIQQ")
CRC = struct.Struct(">I")
RING_OFFSET = BLOCK_BYTES
BITMAP_OFFSET = BLOCK_BYTES * (1 + RING_BLOCKS)


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


class IntentStore:
    """An open intent-log file; every method blocks (call it from a worker thread)."""

    def __init__(self, path: Path, fd: int, geometry: Geometry, generations: Generations) -> None:
        self.path = path
        self.geometry = geometry
        self.generations = generations
        self._fd = fd
        self.bitmap = DirtyBitmap(geometry.volume_size, geometry.region_size)
        self.activity_log = ActivityLog(geometry.al_capacity, geometry.extent_bytes)
        self.recovered_bytes = 0

    # -- creation and opening -------------------------------------------------------------

    @classmethod
    def create(
        cls, path: Path, geometry: Geometry, generations: Generations, *, all_dirty: bool
    ) -> IntentStore:
        """A new log (mirror creation): every region marked when a full resync is due."""
        fd = _open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        store = cls(path, fd, geometry, generations)
        if all_dirty:
            store.bitmap.mark_all()
        store._write(BITMAP_OFFSET, store.bitmap.to_bytes())
        store.bitmap.take_dirty_pages()
        store._write(RING_OFFSET, bytes(BLOCK_BYTES * RING_BLOCKS))
        store._write_header(open_=True)
        durable_files.sync_directory(path.parent)
        return store

    @classmethod
    def open(cls, path: Path) -> IntentStore:
        """Open an existing log; recovers from a crash if it was not closed cleanly."""
        fd = _open(path, os.O_RDWR)
        try:
            header = os.pread(fd, BLOCK_BYTES, 0)
            geometry, generations, flags = _parse_header(path, header)
            store = cls(path, fd, geometry, generations)
            image = os.pread(
                fd, image_size(geometry.volume_size, geometry.region_size), BITMAP_OFFSET
            )
            store.bitmap = DirtyBitmap.from_bytes(geometry.volume_size, geometry.region_size, image)
            ring = [
                os.pread(fd, BLOCK_BYTES, RING_OFFSET + i * BLOCK_BYTES) for i in range(RING_BLOCKS)
            ]
        except BaseException:
            os.close(fd)
            raise
        snapshot = recover(ring)
        store.activity_log = ActivityLog(geometry.al_capacity, geometry.extent_bytes, snapshot)
        if flags & FLAG_OPEN and snapshot is not None:
            store._recover_from_crash(snapshot)
        store._write_header(open_=True)
        return store

    def _recover_from_crash(self, snapshot: Snapshot) -> None:
        before = self.bitmap.marked_bytes
        extent = self.geometry.extent_bytes
        for number in snapshot.extents:
            start = number * extent
            if start < self.geometry.volume_size:
                self.bitmap.mark(start, min(extent, self.geometry.volume_size - start))
        self.recovered_bytes = self.bitmap.marked_bytes - before
        self.persist_bitmap()

    # -- durable updates ---------------------------------------------------------------------

    def write_snapshot(self, snapshot: Snapshot) -> None:
        self._write(RING_OFFSET + snapshot.ring_block * BLOCK_BYTES, snapshot.encode())
        self._sync()

    def persist_bitmap(self) -> None:
        """Write every bitmap page changed since the last call, then make them durable."""
        pages = self.bitmap.take_dirty_pages()
        try:
            for page, data in pages:
                self._write(BITMAP_OFFSET + page * PAGE_BYTES, data)
            self._sync()
        except VolumeError:
            self.bitmap.mark_pages_dirty(page for page, _ in pages)
            raise

    def set_generations(self, generations: Generations) -> None:
        self.generations = generations
        self._write_header(open_=True)

    def close(self) -> None:
        """Persist the bitmap and mark the log cleanly closed."""
        try:
            self.persist_bitmap()
            self._write_header(open_=False)
        finally:
            os.close(self._fd)

    # -- plumbing ----------------------------------------------------------------------------

    def _write_header(self, *, open_: bool) -> None:
        g = self.geometry
        body = HEADER.pack(
            MAGIC,
            VERSION,
            FLAG_OPEN if open_ else 0,
            g.volume_size,
            g.region_size,
            g.extent_bytes,
            g.al_capacity,
            self.generations.current,
            self.generations.previous,
        ).ljust(BLOCK_BYTES - CRC.size, b"\0")
        self._write(0, body + CRC.pack(zlib.crc32(body)))
        self._sync()

    def _write(self, offset: int, data: bytes) -> None:
        try:
            written = os.pwrite(self._fd, data, offset)
        except OSError as exc:
            raise self._error("write", exc) from exc
        if written != len(data):
            raise VolumeError(f"intent log {self.path}: short write at {offset}")

    def _sync(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise self._error("fdatasync", exc) from exc

    def _error(self, what: str, exc: OSError) -> VolumeError:
        return VolumeError(f"intent log {self.path}: {what} failed: {exc.strerror}", exc.errno or 5)


def _parse_header(path: Path, block: bytes) -> tuple[Geometry, Generations, int]:
    if len(block) != BLOCK_BYTES:
        raise VolumeError(f"intent log {path}: file is truncated (no header block)")
    body, (crc,) = block[: -CRC.size], CRC.unpack_from(block, BLOCK_BYTES - CRC.size)
    fields = HEADER.unpack_from(body)
    if fields[0] != MAGIC:
        raise VolumeError(f"intent log {path}: not a volkeeper intent log (bad magic)")
    if zlib.crc32(body) != crc:
        raise VolumeError(f"intent log {path}: header checksum mismatch (corrupt header)")
    if fields[1] != VERSION:
        raise VolumeError(f"intent log {path}: unsupported version {fields[1]}")
    _, _, flags, size, region, extent, capacity, current, previous = fields
    return Geometry(size, region, extent, capacity), Generations(current, previous), flags


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise VolumeError(
            f"intent log {path}: cannot open: {exc.strerror}", exc.errno or 5
        ) from exc
