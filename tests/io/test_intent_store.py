"""The intent-log file: durable bitmap pages, activity-log snapshots, crash recovery, and the
checks that keep a damaged, foreign or outdated log from being trusted."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from volkeeper.core import intent_log_format as fmt
from volkeeper.core.activity_log import BLOCK_BYTES, RING_BLOCKS
from volkeeper.core.bitmap import PAGE_BYTES, image_size
from volkeeper.errors import VolumeError
from volkeeper.io.intent_store import IntentStore, read_durable_bitmap

MiB = 1024 * 1024
EXTENT = 1 * MiB
REGIONS_PER_PAGE = PAGE_BYTES * 8
SIZE = 3 * REGIONS_PER_PAGE * 4096 + 4096 * 5  # three full bitmap pages and a short fourth
GEOMETRY = fmt.Geometry(volume_size=SIZE, region_size=4096, extent_bytes=EXTENT, al_capacity=4)
MIRROR = "web: data1 -> beta:data1"
LOG_ID = 0x1234_5678_9ABC_DEF0


def make(tmp_path: Path, *, all_dirty: bool = False, mirror: str = MIRROR) -> IntentStore:
    return IntentStore.create(
        tmp_path / "web.vkil", GEOMETRY, fmt.Generations(11, 7), mirror=mirror,
        log_id=LOG_ID, all_dirty=all_dirty,
    )  # fmt: skip


def reopen(path: Path, *, log_id: int | None = LOG_ID, size: int = SIZE) -> IntentStore:
    return IntentStore.open(path, mirror=MIRROR, log_id=log_id, volume_size=size)


def activate(store: IntentStore, offset: int, length: int) -> None:
    """What the write path does for a write to a cold extent."""
    extents = store.activity_log.extents_of(offset, length)
    if not store.activity_log.pin(extents):
        snapshot = store.activity_log.transaction()
        assert snapshot is not None
        store.write_snapshot(snapshot)
        store.activity_log.committed(snapshot)
    assert store.activity_log.ready(extents)


def region_offset(page: int, region_in_page: int) -> int:
    return (page * REGIONS_PER_PAGE + region_in_page) * 4096


def marked_log(tmp_path: Path) -> Path:
    """A cleanly closed log with regions marked in pages 0, 1 and 3 (16 MiB in page 1)."""
    store = make(tmp_path)
    store.bitmap.mark(region_offset(0, 7), 4096)
    store.bitmap.mark(region_offset(1, 100), 16 * MiB)
    store.bitmap.mark(SIZE - 4096, 4096)  # the short last page
    store.close()
    return store.path


def scribble(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as raw:
        raw.seek(offset)
        raw.write(data)


def test_new_log_for_a_full_resync_has_every_region_marked(tmp_path: Path) -> None:
    make(tmp_path, all_dirty=True).close()
    path = tmp_path / "web.vkil"
    assert path.stat().st_size == fmt.file_size(image_size(SIZE))
    store = reopen(path)
    assert store.bitmap.marked_bytes == SIZE
    assert (store.recovered_bytes, store.damaged_pages, store.damage_report()) == (0, [], None)
    assert (store.generations.current, store.generations.previous) == (11, 7)
    store.close()


def test_clean_close_keeps_exactly_the_marked_regions(tmp_path: Path) -> None:
    store = make(tmp_path)
    activate(store, 5 * MiB, 4096)
    store.bitmap.mark(5 * MiB, 4096)
    store.bitmap.mark(SIZE - 4096, 4096)  # the short last region of the short last page
    store.persist_bitmap()
    store.close()
    again = reopen(store.path)
    assert again.bitmap.marked_bytes == 8192
    assert again.recovered_bytes == 0
    assert list(again.bitmap.runs()) == [(5 * MiB // 4096, 1), (SIZE // 4096 - 1, 1)]
    again.close()


def test_crash_marks_every_extent_of_the_last_snapshot(tmp_path: Path) -> None:
    store = make(tmp_path)
    activate(store, 3 * MiB + 100, 10)
    activate(store, 9 * MiB, 2 * MiB)  # two extents
    store.bitmap.mark(40 * MiB, 4096)
    store.persist_bitmap()
    del store  # the daemon died: no close(), the header still says "open"
    recovered = reopen(tmp_path / "web.vkil")
    assert recovered.recovered_bytes == 3 * EXTENT
    marked = {first for first, _ in recovered.bitmap.runs(max_regions=1)}
    for extent in (3, 9, 10):
        assert extent * EXTENT // 4096 in marked
    assert 40 * MiB // 4096 in marked
    recovered.close()
    assert reopen(tmp_path / "web.vkil").recovered_bytes == 0  # now clean


def test_a_torn_snapshot_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    store = make(tmp_path)
    activate(store, 0, 1)  # snapshot 1: {0}, ring block 1
    store.activity_log.unpin(store.activity_log.extents_of(0, 1))
    activate(store, 2 * MiB, 1)  # snapshot 2: {0, 2}, ring block 0
    path = store.path
    del store
    scribble(path, fmt.RING_OFFSET + 100, os.urandom(200))  # snapshot 2's write was cut short
    recovered = reopen(path)
    assert recovered.recovered_bytes == EXTENT  # snapshot 1 only: extent 0
    recovered.close()


# -- damaged bitmap pages: never trusted, every region they cover marked, nothing else ----------

PAGE_1 = (REGIONS_PER_PAGE, REGIONS_PER_PAGE)  # (first region, regions) of page 1


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda block: bytes(2048) + os.urandom(2048), id="half-zeros-half-random"),
        pytest.param(lambda block: bytes(BLOCK_BYTES), id="zeroed"),
        pytest.param(lambda block: bytes([block[0] ^ 0x10]) + block[1:], id="flipped-bit-in-seal"),
        pytest.param(
            lambda block: block[:20] + bytes([block[20] ^ 0x01]) + block[21:],
            id="flipped-bit-in-image",
        ),
    ],
)
def test_a_damaged_page_marks_all_of_its_regions(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    path = marked_log(tmp_path)
    offset = fmt.page_offset(1)
    block = path.read_bytes()[offset : offset + BLOCK_BYTES]
    scribble(path, offset, damage(block))
    store = reopen(path)
    assert [(d.page, d.first_region, d.regions) for d in store.damaged_pages] == [(1, *PAGE_1)]
    page_bytes = REGIONS_PER_PAGE * 4096
    assert store.damage_marked_bytes == page_bytes  # none of its bits was trusted
    runs = list(store.bitmap.runs())
    assert runs == [(7, 1), PAGE_1, (SIZE // 4096 - 1, 1)]  # pages 0 and 3 trusted as they were
    assert store.damage_report() == (
        f"intent log: bitmap page 1 (regions {PAGE_1[0]}-{2 * PAGE_1[0] - 1}) failed its check: "
        "127.5 MiB marked for resync"
    )
    store.close()
    again = reopen(path)  # the page was rewritten: found once, not at every start
    assert again.damaged_pages == []
    assert list(again.bitmap.runs()) == runs
    again.close()


def test_a_torn_page_write_fails_its_check(tmp_path: Path) -> None:
    """Power lost while a page was written: the device kept the first sectors of the new
    block and the last ones of the old."""
    path = marked_log(tmp_path)
    old = path.read_bytes()[fmt.page_offset(1) : fmt.page_offset(2)]
    store = reopen(path)
    store.bitmap.mark(region_offset(1, 8), 4096)  # a bit in the first half of page 1
    store.persist_bitmap()
    store.close()
    new = path.read_bytes()[fmt.page_offset(1) : fmt.page_offset(2)]
    assert new[:2048] != old[:2048]
    scribble(path, fmt.page_offset(1), new[:2048] + old[2048:])
    torn = reopen(path)
    assert [d.page for d in torn.damaged_pages] == [1]
    assert torn.bitmap.is_marked(REGIONS_PER_PAGE + 8)
    torn.close()


def test_a_page_from_another_place_or_another_log_fails_its_check(tmp_path: Path) -> None:
    path = marked_log(tmp_path)
    data = path.read_bytes()
    scribble(path, fmt.page_offset(2), data[fmt.page_offset(0) : fmt.page_offset(1)])  # moved
    (tmp_path / "other").mkdir()
    other = IntentStore.create(
        tmp_path / "other" / "web.vkil", GEOMETRY, fmt.Generations(1), mirror=MIRROR,
        log_id=LOG_ID + 1, all_dirty=True,
    )  # fmt: skip
    other.close()
    foreign = other.path.read_bytes()[fmt.page_offset(0) : fmt.page_offset(1)]
    scribble(path, fmt.page_offset(0), foreign)  # page 0 of another log, every region marked
    store = reopen(path)
    assert [d.page for d in store.damaged_pages] == [0, 2]
    store.close()


def test_bits_past_the_end_of_the_volume_fail_the_last_page(tmp_path: Path) -> None:
    path = marked_log(tmp_path)
    last = fmt.page_count(image_size(SIZE)) - 1
    image = bytearray(image_size(SIZE) - last * PAGE_BYTES)
    image[-1] = 0xFF  # 5 regions in the last byte: bits 5..7 lie past the end
    scribble(path, fmt.page_offset(last), fmt.seal_page(LOG_ID, last, bytes(image)))
    store = reopen(path)
    assert [d.page for d in store.damaged_pages] == [last]
    store.close()


def test_read_durable_bitmap_shows_damage_without_repairing(tmp_path: Path) -> None:
    path = marked_log(tmp_path)
    scribble(path, fmt.page_offset(1) + 3000, b"\x5a")  # was 0
    for _ in range(2):
        header, bitmap, damage = read_durable_bitmap(path)
        assert (header.mirror, header.log_id, header.open) == (MIRROR, LOG_ID, False)
        assert [d.page for d in damage] == [1]
        assert list(bitmap.runs()) == [(7, 1), (SIZE // 4096 - 1, 1)]  # page 1 reads clean


# -- logs that cannot be trusted at all: refused, saying why -------------------------------------


def test_a_damaged_header_is_refused(tmp_path: Path) -> None:
    path = marked_log(tmp_path)
    scribble(path, 20, b"\xff")
    with pytest.raises(VolumeError, match="failed its checksum"):
        reopen(path)


@pytest.mark.parametrize("change", [-BLOCK_BYTES, -1, 1, BLOCK_BYTES])
def test_a_log_of_the_wrong_length_is_refused(tmp_path: Path, change: int) -> None:
    path = marked_log(tmp_path)
    os.truncate(path, path.stat().st_size + change)
    how = "truncated" if change < 0 else "extended"
    with pytest.raises(VolumeError, match=f"expected {fmt.file_size(image_size(SIZE))} .{how}"):
        reopen(path)


def test_another_mirrors_log_is_refused_by_name(tmp_path: Path) -> None:
    make(tmp_path, mirror="db: data2 -> beta:data2").close()
    with pytest.raises(VolumeError, match="belongs to mirror 'db: data2 -> beta:data2', not"):
        reopen(tmp_path / "web.vkil")


def test_another_copy_of_the_log_is_refused_by_id(tmp_path: Path) -> None:
    path = marked_log(tmp_path)
    with pytest.raises(VolumeError, match="is log 123456789abcdef0, but the job record names"):
        reopen(path, log_id=LOG_ID + 1)
    reopen(path, log_id=None).close()  # a record older than log ids adopts the log's


def test_a_log_for_another_volume_size_is_refused(tmp_path: Path) -> None:
    path = marked_log(tmp_path)
    with pytest.raises(VolumeError, match=f"volume of {SIZE} bytes; the source volume has"):
        reopen(path, size=SIZE + 4096)


def test_unknown_missing_or_existing_files_are_refused_by_name(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(bytes(BLOCK_BYTES * 4))
    with pytest.raises(VolumeError, match="not a volkeeper intent log"):
        reopen(other)
    with pytest.raises(VolumeError, match="is missing"):
        reopen(tmp_path / "missing")
    make(tmp_path).close()
    with pytest.raises(VolumeError, match="cannot open"):
        make(tmp_path)  # exists already: never overwritten


def test_generations_survive_reopen(tmp_path: Path) -> None:
    store = make(tmp_path)
    store.set_generations(fmt.Generations(99, 11))
    store.close()
    again = reopen(tmp_path / "web.vkil")
    assert (again.generations.current, again.generations.previous) == (99, 11)
    again.close()


# -- format 1 (before page checks): read as it always was, converted -----------------------------


def write_format_1(path: Path, marked: list[int], *, open_: bool, ring: bytes) -> None:
    """A format-1 log as volkeeper wrote it: 52-byte header, raw image at 4096 * 3."""
    g = GEOMETRY
    body = fmt.HEADER_V1.pack(
        fmt.MAGIC, 1, fmt.FLAG_OPEN if open_ else 0, g.volume_size, g.region_size,
        g.extent_bytes, g.al_capacity, 11, 7,
    ).ljust(BLOCK_BYTES - 4, b"\0")  # fmt: skip
    image = bytearray(image_size(SIZE))
    for region in marked:
        image[region // 8] |= 1 << (region % 8)
    path.write_bytes(body + struct.pack(">I", zlib.crc32(body)) + ring + bytes(image))


def test_a_format_1_log_is_read_and_converted(tmp_path: Path) -> None:
    path = tmp_path / "web.vkil"
    donor = IntentStore.create(
        tmp_path / "donor.vkil", GEOMETRY, fmt.Generations(1), mirror=MIRROR, log_id=1,
        all_dirty=False,
    )  # fmt: skip
    activate(donor, 6 * MiB, 1)  # a snapshot of {6} in the ring, as format 1 wrote it too
    ring = donor.path.read_bytes()[fmt.RING_OFFSET : fmt.RING_OFFSET + BLOCK_BYTES * RING_BLOCKS]
    write_format_1(path, [3, 40_000], open_=True, ring=ring)  # it crashed
    store = reopen(path, log_id=None)
    assert store.converted_from == 1
    assert store.recovered_bytes == EXTENT
    assert {3, 40_000, 6 * MiB // 4096} <= {first for first, _ in store.bitmap.runs(1)}
    assert (store.generations.current, store.generations.previous) == (11, 7)
    new_id = store.log_id
    assert new_id not in (0, LOG_ID)
    store.close()
    assert path.stat().st_size == fmt.file_size(image_size(SIZE))
    again = reopen(path, log_id=new_id)
    assert again.converted_from is None
    assert again.bitmap.marked_bytes == EXTENT + 2 * 4096
    again.close()


def test_a_format_1_log_is_refused_where_the_record_names_a_log_id(tmp_path: Path) -> None:
    path = tmp_path / "web.vkil"
    write_format_1(path, [], open_=False, ring=bytes(BLOCK_BYTES * RING_BLOCKS))
    with pytest.raises(VolumeError, match="a format-1 log with no id"):
        reopen(path)


def test_a_truncated_format_1_log_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "web.vkil"
    write_format_1(path, [], open_=False, ring=bytes(BLOCK_BYTES * RING_BLOCKS))
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(VolumeError, match="truncated"):
        reopen(path, log_id=None)
