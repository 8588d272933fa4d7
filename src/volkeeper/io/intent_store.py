"""The intent log on stable storage: one file per mirror in the node's bitmap directory.

How this works: the file holds a header block, the activity log's ring of snapshot blocks and
the bitmap pages, at fixed offsets (core/intent_log_format.py), so every update is a
``pwrite`` of whole 4 KiB blocks followed by ``fdatasync`` -- never a rewrite of the whole
file.  The hot path asks nothing of this module while its extents are hot; it persists an
activity-log snapshot when a write touches a cold extent, and bitmap pages when the mirror
loses its target or a resync clears regions (see docs/mirroring.md).

Opening checks before it trusts.  A header that fails its checksum, a log that names another
mirror, another log id than the job record's or another volume size, or a file of the wrong
length raises ``VolumeError`` saying which: the caller starts over with a new log and a full
resync (daemon/jobs/jobs.py).  A bitmap page that fails its check is not trusted: every region it
covers is marked, and ``damaged_pages`` / ``damage_marked_bytes`` say so.  A header that says
the log was not closed cleanly is crash recovery: every extent of the last valid activity-log
snapshot is marked (those may hold writes a target never got), and ``recovered_bytes`` says
how much was added.  Either way the repaired bitmap is persisted before the log is used.  A
format-1 log (no page checks) is read as it always was and rewritten in format 2 under a new
log id (``converted_from``).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from volkeeper.core import intent_log_format as fmt
from volkeeper.core.activity_log import BLOCK_BYTES, RING_BLOCKS, ActivityLog, Snapshot, recover
from volkeeper.core.bitmap import PAGE_BYTES, DirtyBitmap, image_size
from volkeeper.core.intent_log_format import Generations, Geometry, Header, PageDamage
from volkeeper.core.units import format_size
from volkeeper.errors import VolumeError
from volkeeper.io import durable_files

READ_CHUNK_PAGES = 256  # bitmap pages per pread (opening) or pwrite (a whole new file)


def new_log_id() -> int:
    return secrets.randbits(64) or 1


class IntentStore:
    """An open intent-log file; every method blocks (call it from a worker thread)."""

    def __init__(self, path: Path, fd: int, header: Header, bitmap: DirtyBitmap) -> None:
        self.path = path
        self.geometry = header.geometry
        self.generations = header.generations
        self.log_id = header.log_id
        self.mirror = header.mirror
        self._fd = fd
        self.bitmap = bitmap
        self.activity_log = ActivityLog(self.geometry.al_capacity, self.geometry.extent_bytes)
        self.recovered_bytes = 0  # marked by crash recovery when opened
        self.damaged_pages: list[PageDamage] = []  # bitmap pages that failed their check
        self.damage_marked_bytes = 0  # marked because of them
        self.converted_from: int | None = None  # the format it was read in, if not current

    # -- creation and opening -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: Path,
        geometry: Geometry,
        generations: Generations,
        *,
        mirror: str,
        log_id: int,
        all_dirty: bool,
        marked: bytes = b"",
    ) -> IntentStore:
        """A new log (mirror creation): every region marked when a full resync is due, else
        the regions ``marked`` marks (a bitmap image of this geometry, or b"": none)."""
        fd = _open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        header = Header(geometry, generations, log_id, mirror, open=True)
        store = cls(path, fd, header, DirtyBitmap(geometry.volume_size, geometry.region_size))
        try:
            if all_dirty:
                store.bitmap.mark_all()
            elif marked:
                store.bitmap.merge(marked)
            store._write_whole_file(fd, bytes(BLOCK_BYTES * RING_BLOCKS))
        except BaseException:
            os.close(fd)
            raise
        durable_files.sync_directory(path.parent)
        return store

    @classmethod
    def open(cls, path: Path, *, mirror: str, log_id: int | None, volume_size: int) -> IntentStore:
        """Open the log of ``mirror`` (whose job record names ``log_id``, or None for a
        record older than log ids) for a source volume of ``volume_size`` bytes.  Raises
        VolumeError when the log cannot be trusted at all; see the module docstring."""
        fd = _open(path, os.O_RDWR)
        try:
            header = _header(path, fd)
            _check_identity(path, header, mirror, log_id, volume_size)
            _check_length(path, fd, header)
            bitmap, damaged_pages = _read_bitmap(path, fd, header)
            store = cls(path, fd, header, bitmap)
            store.damaged_pages = damaged_pages
            ring = [_pread(path, fd, BLOCK_BYTES, fmt.RING_OFFSET + i * BLOCK_BYTES)
                    for i in range(RING_BLOCKS)]  # fmt: skip
        except BaseException:
            os.close(fd)
            raise
        snapshot = recover(ring)
        store.activity_log = ActivityLog(
            header.geometry.al_capacity, header.geometry.extent_bytes, snapshot
        )
        store._mark_damaged_pages()
        if header.open and snapshot is not None:
            store._recover_from_crash(snapshot)
        if header.version != fmt.VERSION:
            store._convert(ring, mirror, header.version)
        else:
            store.persist_bitmap()
            store._write_header(open_=True)
        return store

    def _mark_damaged_pages(self) -> None:
        before = self.bitmap.marked_bytes
        region, size = self.geometry.region_size, self.geometry.volume_size
        for damage in self.damaged_pages:
            start = damage.first_region * region
            self.bitmap.mark(start, min(damage.regions * region, size - start))
        self.bitmap.mark_pages_dirty(damage.page for damage in self.damaged_pages)  # rewritten
        self.damage_marked_bytes = self.bitmap.marked_bytes - before

    def _recover_from_crash(self, snapshot: Snapshot) -> None:
        before = self.bitmap.marked_bytes
        extent = self.geometry.extent_bytes
        for number in snapshot.extents:
            start = number * extent
            if start < self.geometry.volume_size:
                self.bitmap.mark(start, min(extent, self.geometry.volume_size - start))
        self.recovered_bytes = self.bitmap.marked_bytes - before

    def _convert(self, ring: list[bytes], mirror: str, version: int) -> None:
        """Rewrite an older format's log in the current one, under a new log id: a new file
        beside it, made durable, renamed over it."""
        fresh = self.path.with_name(self.path.name + ".converting")
        fd = _open(fresh, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        self.log_id, self.mirror = new_log_id(), mirror
        try:
            self._write_whole_file(fd, b"".join(ring))
            os.replace(fresh, self.path)
        except BaseException:
            os.close(fd)
            raise
        durable_files.sync_directory(self.path.parent)
        os.close(self._fd)
        self._fd = fd
        self.converted_from = version

    def damage_report(self) -> str | None:
        """What opening found and did, in one line for status and logs, or None."""
        if not self.damaged_pages:
            return None
        return fmt.describe_damage(self.damaged_pages, self.damage_marked_bytes)

    # -- durable updates ---------------------------------------------------------------------

    def write_snapshot(self, snapshot: Snapshot) -> None:
        self._write(self._fd, fmt.RING_OFFSET + snapshot.ring_block * BLOCK_BYTES,
                    snapshot.encode())  # fmt: skip
        self._sync(self._fd)

    def persist_bitmap(self) -> None:
        """Write every bitmap page changed since the last call, then make them durable."""
        pages = self.bitmap.take_dirty_pages()
        try:
            for first, blocks in self._sealed_runs(pages):
                self._write(self._fd, fmt.page_offset(first), blocks)
            self._sync(self._fd)
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

    def _sealed_runs(self, pages: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        """(first page, its sealed blocks joined) for each run of consecutive pages."""
        runs: list[tuple[int, list[bytes]]] = []
        for page, image in pages:
            block = fmt.seal_page(self.log_id, page, image)
            if runs and runs[-1][0] + len(runs[-1][1]) == page:
                runs[-1][1].append(block)
            else:
                runs.append((page, [block]))
        return [(first, b"".join(blocks)) for first, blocks in runs]

    def _write_whole_file(self, fd: int, ring: bytes) -> None:
        """Every block of the log: ring as given, every bitmap page, the header; durable."""
        self.bitmap.take_dirty_pages()
        image = self.bitmap.to_bytes()
        count = fmt.page_count(len(image))
        for first in range(0, count, READ_CHUNK_PAGES):  # one pwrite per chunk of pages
            blocks = [fmt.seal_page(self.log_id, p, image[p * PAGE_BYTES : (p + 1) * PAGE_BYTES])
                      for p in range(first, min(count, first + READ_CHUNK_PAGES))]  # fmt: skip
            self._write(fd, fmt.page_offset(first), b"".join(blocks))
        self._write(fd, fmt.RING_OFFSET, ring)
        self._write(fd, 0, self._header_block(open_=True))
        self._sync(fd)

    def _header_block(self, *, open_: bool) -> bytes:
        header = Header(self.geometry, self.generations, self.log_id, self.mirror, open_)
        return fmt.encode_header(header)

    def _write_header(self, *, open_: bool) -> None:
        self._write(self._fd, 0, self._header_block(open_=open_))
        self._sync(self._fd)

    def _write(self, fd: int, offset: int, data: bytes) -> None:
        try:
            written = os.pwrite(fd, data, offset)
        except OSError as exc:
            raise _error(self.path, "write", exc) from exc
        if written != len(data):
            raise VolumeError(f"intent log {self.path}: short write at {offset}")

    def _sync(self, fd: int) -> None:
        try:
            os.fdatasync(fd)
        except OSError as exc:
            raise _error(self.path, "fdatasync", exc) from exc


def read_header(path: Path) -> Header:
    """The log's header, checked (VolumeError if it fails)."""
    fd = _open(path, os.O_RDONLY)
    try:
        return _header(path, fd)
    finally:
        os.close(fd)


def read_durable_bitmap(path: Path) -> tuple[Header, DirtyBitmap, list[PageDamage]]:
    """The log's bitmap as it is on disk, without repair or recovery (for inspection: the
    node that owns the log may be running).  Damaged pages read as clean."""
    fd = _open(path, os.O_RDONLY)
    try:
        header = _header(path, fd)
        _check_length(path, fd, header)
        bitmap, damage = _read_bitmap(path, fd, header)
        return header, bitmap, damage
    finally:
        os.close(fd)


# -- reading and checking ----------------------------------------------------------------------


def _header(path: Path, fd: int) -> Header:
    try:
        header = fmt.decode_header(_pread(path, fd, BLOCK_BYTES, 0, exact=False))
        image_size(header.geometry.volume_size, header.geometry.region_size)  # geometry checks
        ActivityLog(header.geometry.al_capacity, header.geometry.extent_bytes)
    except (fmt.LogDamage, ValueError) as exc:
        raise VolumeError(f"intent log {path}: {exc}") from None
    return header


def _check_identity(
    path: Path, header: Header, mirror: str, log_id: int | None, volume_size: int
) -> None:
    if header.version > 1 and header.mirror != mirror:
        raise VolumeError(
            f"intent log {path} belongs to mirror {header.mirror!r}, not {mirror!r} "
            "(moved, copied or swapped with another mirror's log?)"
        )
    if log_id is not None and header.log_id != log_id:
        found = f"log {header.log_id:016x}" if header.log_id else "a format-1 log with no id"
        raise VolumeError(
            f"intent log {path} is {found}, but the job record names log {log_id:016x} "
            "(an older or newer copy of this mirror's log?)"
        )
    if header.geometry.volume_size != volume_size:
        raise VolumeError(
            f"intent log {path} is for a volume of {header.geometry.volume_size} bytes; "
            f"the source volume has {volume_size}"
        )


def _check_length(path: Path, fd: int, header: Header) -> None:
    image_bytes = image_size(header.geometry.volume_size, header.geometry.region_size)
    try:
        length = os.fstat(fd).st_size
    except OSError as exc:
        raise _error(path, "fstat", exc) from exc
    if header.version == 1:
        expected, exact = fmt.BITMAP_OFFSET + image_bytes, False
    else:
        expected, exact = fmt.file_size(image_bytes), True
    if length < expected or (exact and length != expected):
        how = "truncated" if length < expected else "extended"
        raise VolumeError(
            f"intent log {path} is {length} bytes, expected {expected} "
            f"({how}: {format_size(abs(expected - length))})"
        )


def _read_bitmap(path: Path, fd: int, header: Header) -> tuple[DirtyBitmap, list[PageDamage]]:
    """The bitmap as the pages that pass their check say; failed pages read as clean and are
    listed (the caller marks them)."""
    g = header.geometry
    image_bytes = image_size(g.volume_size, g.region_size)
    if header.version == 1:
        raw = _pread(path, fd, image_bytes, fmt.BITMAP_OFFSET)
        try:
            return DirtyBitmap.from_bytes(g.volume_size, g.region_size, raw), []
        except ValueError as exc:
            raise VolumeError(f"intent log {path}: {exc}") from None
    image = bytearray(image_bytes)
    damage = []
    total_regions = -(-g.volume_size // g.region_size)
    pages = fmt.page_count(image_bytes)
    for first in range(0, pages, READ_CHUNK_PAGES):
        count = min(READ_CHUNK_PAGES, pages - first)
        chunk = _pread(path, fd, count * BLOCK_BYTES, fmt.page_offset(first))
        for page in range(first, first + count):
            at = (page - first) * BLOCK_BYTES
            data = fmt.unseal_page(header.log_id, page, chunk[at : at + BLOCK_BYTES], image_bytes)
            if data is None:
                damage.append(PageDamage(page, *fmt.page_regions(page, total_regions)))
            else:
                image[page * PAGE_BYTES : page * PAGE_BYTES + len(data)] = data
    try:
        return DirtyBitmap.from_bytes(g.volume_size, g.region_size, image), damage
    except ValueError:  # bits past the volume's end in a page that passed: mark it
        last = pages - 1
        image[last * PAGE_BYTES :] = bytes(image_bytes - last * PAGE_BYTES)
        damage.append(PageDamage(last, *fmt.page_regions(last, total_regions)))
        return DirtyBitmap.from_bytes(g.volume_size, g.region_size, image), damage


def _pread(path: Path, fd: int, length: int, offset: int, exact: bool = True) -> bytes:
    try:
        data = os.pread(fd, length, offset)
    except OSError as exc:
        raise _error(path, "read", exc) from exc
    if exact and len(data) != length:
        raise VolumeError(f"intent log {path}: short read at {offset} (truncated?)")
    return data


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        raise VolumeError(f"intent log {path} is missing", 2) from None
    except OSError as exc:
        raise VolumeError(
            f"intent log {path}: cannot open: {exc.strerror}", exc.errno or 5
        ) from exc


def _error(path: Path, what: str, exc: OSError) -> VolumeError:
    return VolumeError(f"intent log {path}: {what} failed: {exc.strerror}", exc.errno or 5)
