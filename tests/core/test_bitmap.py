"""DirtyBitmap: geometry, mark/clear, runs, persistence image and dirty pages, against a set model.

The model is a plain ``set`` of marked region indexes; the expected image is built from it with
the on-disk layout restated here (byte i // 8, bit i % 8, least significant bit first), so a
layout change in the module fails these tests.  Small ``page_bytes`` let small
volumes span many dirty-tracking pages.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from volkeeper.core.bitmap import PAGE_BYTES, DirtyBitmap, image_size

KIB, MIB, GIB, TIB = 1024, 1024**2, 1024**3, 1024**4
REGION_SIZES = [4 * KIB, 8 * KIB, 64 * KIB, 1 * MIB]


# Page sizes the bitmap is tested with: tiny pages make a small volume span many of them
# (pages need not be a power of two; the default is 4080).
PAGE_SIZES = [1, 2, 3, 8, PAGE_BYTES]


# -- model -------------------------------------------------------------------------------------


def model_image(total: int, marked: Iterable[int]) -> bytes:
    image = bytearray((total + 7) // 8)
    for region in marked:
        image[region // 8] |= 1 << (region % 8)
    return bytes(image)


def model_span(volume_size: int, region_size: int, region: int) -> int:
    return min(region_size, volume_size - region * region_size)


def model_runs(marked: Iterable[int], start: int, cap: int | None) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for region in sorted(r for r in marked if r >= start):
        if runs and sum(runs[-1]) == region and (cap is None or runs[-1][1] < cap):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((region, 1))
    return runs


def regions_touched(offset: int, length: int, region_size: int) -> set[int]:
    if length == 0:
        return set()
    return set(range(offset // region_size, (offset + length - 1) // region_size + 1))


# -- geometry and argument checks ---------------------------------------------------------------


@pytest.mark.parametrize("region_size", [0, -4096, 512, 2048, 4095, 6144, 2 * MIB, 3 * MIB])
def test_bad_region_size_is_refused_by_value(region_size: int) -> None:
    with pytest.raises(ValueError, match=str(region_size)):
        DirtyBitmap(1 * GIB, region_size)


@pytest.mark.parametrize("region_size", REGION_SIZES)
def test_region_sizes_accepted(region_size: int) -> None:
    bm = DirtyBitmap(10 * MIB, region_size)
    assert bm.region_size == region_size
    assert bm.total_regions == -(-10 * MIB // region_size)


def test_negative_volume_size_is_refused() -> None:
    with pytest.raises(ValueError, match="-1"):
        DirtyBitmap(-1)


@pytest.mark.parametrize(
    ("volume_size", "region_size", "regions", "image"),
    [
        (0, 4096, 0, 0),
        (1, 4096, 1, 1),
        (4096, 4096, 1, 1),
        (4097, 4096, 2, 1),
        (8 * 4096, 4096, 8, 1),
        (8 * 4096 + 1, 4096, 9, 2),
        (1 * TIB, 4096, 2**28, 2**25),
        (4 * TIB, 4096, 2**30, 2**27),
        (4 * TIB, 1 * MIB, 2**22, 2**19),
    ],
)
def test_sizes(volume_size: int, region_size: int, regions: int, image: int) -> None:
    assert image_size(volume_size, region_size) == image
    if volume_size <= TIB:
        bm = DirtyBitmap(volume_size, region_size)
        assert bm.total_regions == regions
        assert len(bm.to_bytes()) == image
        assert bm.volume_size == volume_size


def test_region_of_and_span_with_short_last_region() -> None:
    bm = DirtyBitmap(10_000)  # regions of 4096, 4096, 1808 bytes
    assert bm.total_regions == 3
    assert [bm.region_of(o) for o in (0, 4095, 4096, 8191, 8192, 9999)] == [0, 0, 1, 1, 2, 2]
    assert [bm.region_span(r) for r in range(3)] == [(0, 4096), (4096, 4096), (8192, 1808)]
    for bad in (-1, 10_000):
        with pytest.raises(ValueError, match="outside"):
            bm.region_of(bad)
    for bad in (-1, 3):
        with pytest.raises(ValueError, match="outside"):
            bm.region_span(bad)
        with pytest.raises(ValueError, match="outside"):
            bm.is_marked(bad)


@pytest.mark.parametrize("volume_size", [1, 512, 4095, 4096])
def test_one_region_volume(volume_size: int) -> None:
    bm = DirtyBitmap(volume_size)
    assert bm.total_regions == 1
    assert bm.mark(volume_size - 1, 1) == 1
    assert bm.mark(0, volume_size) == 0
    assert bm.marked_count == 1
    assert bm.marked_bytes == volume_size
    assert list(bm.runs()) == [(0, 1)]
    assert bm.to_bytes() == b"\x01"
    assert bm.clear_regions(0, 1) == 1
    assert bm.marked_bytes == 0
    assert list(bm.runs()) == []


def test_zero_size_volume() -> None:
    bm = DirtyBitmap(0)
    assert (bm.total_regions, bm.to_bytes()) == (0, b"")
    assert bm.mark(0, 0) == 0
    assert (bm.mark_all(), bm.clear_all()) == (0, 0)
    assert list(bm.runs()) == []
    with pytest.raises(ValueError):
        bm.mark(0, 1)


# -- mark -----------------------------------------------------------------------------------------


def test_mark_returns_newly_set_bits() -> None:
    bm = DirtyBitmap(1 * MIB)
    assert bm.mark(0, 4096) == 1
    assert bm.mark(100, 200) == 0  # already marked: no metadata write needed
    assert bm.mark(4096, 4096) == 1
    assert bm.mark(0, 3 * 4096) == 1  # regions 0, 1 already marked, region 2 new
    assert bm.marked_count == 3
    assert bm.to_bytes()[:1] == b"\x07"


def test_ranges_ending_exactly_on_region_boundaries() -> None:
    bm = DirtyBitmap(1 * MIB)
    assert bm.mark(4096, 4096) == 1  # exactly region 1
    assert [bm.is_marked(r) for r in range(3)] == [False, True, False]
    assert bm.mark(4095, 2) == 1  # last byte of region 0 and first byte of region 1
    assert [bm.is_marked(r) for r in range(3)] == [True, True, False]
    assert bm.mark(3 * 4096 - 1, 1) == 1  # the last byte of region 2 only
    assert bm.mark(1 * MIB - 4096, 4096) == 1  # the very last region, ends on the volume end
    assert list(bm.runs()) == [(0, 3), (255, 1)]


def test_zero_length_marks_nothing() -> None:
    bm = DirtyBitmap(1 * MIB)
    for offset in (0, 4096, 5000, 1 * MIB):  # offset == size is a valid empty range
        assert bm.mark(offset, 0) == 0
    assert bm.marked_count == 0
    assert bm.take_dirty_pages() == []


@pytest.mark.parametrize(
    ("offset", "length"),
    [(-1, 1), (-4096, 4096), (0, -1), (1 * MIB, 1), (1 * MIB - 1, 2), (0, 1 * MIB + 1),
     (1 * MIB + 1, 0), (-1, 0), (2**64, 4096)],
)  # fmt: skip
def test_mark_out_of_range_is_refused_and_changes_nothing(offset: int, length: int) -> None:
    bm = DirtyBitmap(1 * MIB)
    with pytest.raises(ValueError, match="outside the volume"):
        bm.mark(offset, length)
    assert bm.marked_count == 0
    assert bm.to_bytes() == bytes(32)


def test_mark_across_many_regions_sets_whole_bytes() -> None:
    bm = DirtyBitmap(1 * GIB)
    assert bm.mark(4096 * 5 + 7, 4096 * 1000) == 1001  # regions 5 .. 1005
    image = bm.to_bytes()
    assert image[0] == 0b1110_0000
    assert image[1:125] == b"\xff" * 124
    assert image[125] == 0b0011_1111
    assert image[126:] == bytes(len(image) - 126)
    assert bm.mark(0, 1 * GIB) == bm.total_regions - 1001
    assert bm.marked_count == bm.total_regions


def test_clear_regions() -> None:
    bm = DirtyBitmap(100 * 4096)
    bm.mark_all()
    assert bm.clear_regions(10, 20) == 20
    assert bm.clear_regions(5, 10) == 5
    assert bm.clear_regions(0, 0) == 0
    assert bm.marked_count == 75
    assert list(bm.runs()) == [(0, 5), (30, 70)]
    for first, count in [(-1, 1), (0, -1), (99, 2), (100, 1)]:
        with pytest.raises(ValueError, match="outside the bitmap"):
            bm.clear_regions(first, count)
    assert bm.clear_regions(100, 0) == 0


def test_marked_bytes_counts_the_short_last_region_exactly() -> None:
    bm = DirtyBitmap(10_000)
    bm.mark(9_999, 1)
    assert bm.marked_bytes == 1808
    bm.mark(0, 1)
    assert bm.marked_bytes == 4096 + 1808
    bm.mark_all()
    assert bm.marked_bytes == 10_000
    bm.clear_regions(2, 1)
    assert bm.marked_bytes == 8192


# -- runs -----------------------------------------------------------------------------------------


def test_runs_are_capped_and_start_anywhere() -> None:
    bm = DirtyBitmap(64 * 4096)
    bm.mark(3 * 4096, 10 * 4096)  # regions 3..12
    bm.mark(20 * 4096, 1)
    bm.mark(63 * 4096, 1)
    assert list(bm.runs()) == [(3, 10), (20, 1), (63, 1)]
    assert list(bm.runs(max_regions=4)) == [(3, 4), (7, 4), (11, 2), (20, 1), (63, 1)]
    assert list(bm.runs(5)) == [(5, 8), (20, 1), (63, 1)]
    assert list(bm.runs(21, 1)) == [(63, 1)]
    assert list(bm.runs(64)) == []
    for start, cap in [(-1, None), (65, None), (0, 0), (0, -3)]:
        with pytest.raises(ValueError):
            bm.runs(start, cap)  # refused at the call, not at the first next()


def test_runs_reads_the_live_bitmap() -> None:
    bm = DirtyBitmap(64 * 4096)
    bm.mark(0, 1)
    bm.mark(40 * 4096, 1)
    walk = bm.runs()
    assert next(walk) == (0, 1)
    bm.clear_regions(0, 1)  # resync cleared what it sent
    bm.mark(50 * 4096, 1)  # an application write ahead of the cursor
    assert list(walk) == [(40, 1), (50, 1)]


@settings(max_examples=60, deadline=None)
@given(
    total=st.integers(1, 2**22),
    ranges=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 300)), max_size=12),
    start=st.floats(0, 1),
    cap=st.none() | st.integers(1, 500),
)
def test_runs_on_large_sparse_bitmaps(
    total: int, ranges: list[tuple[float, int]], start: float, cap: int | None
) -> None:
    """Long clean stretches: the geometric skip and the bisection into the dirty block."""
    bm = DirtyBitmap(total * 4096)
    marked: set[int] = set()
    for where, count in ranges:
        first = min(int(where * total), total - 1)
        count = min(count, total - first)
        bm.mark(first * 4096, count * 4096)
        marked.update(range(first, first + count))
    start_region = int(start * total)
    assert list(bm.runs(start_region, cap)) == model_runs(marked, start_region, cap)
    assert bm.marked_count == len(marked)


class CountingBytearray(bytearray):
    """Counts the Python-level accesses the bitmap makes to its backing store."""

    calls = 0

    def startswith(self, *args: object) -> bool:  # type: ignore[override]
        CountingBytearray.calls += 1
        return super().startswith(*args)  # type: ignore[arg-type]

    def __getitem__(self, key: object) -> object:  # type: ignore[override]
        CountingBytearray.calls += 1
        return super().__getitem__(key)  # type: ignore[index]


def test_runs_skips_clean_stretches_without_testing_bits_one_by_one() -> None:
    """2**27 regions (16 MiB image), 3 marked: a handful of block compares, not 2**27 bit tests."""
    total = 2**27
    bm = DirtyBitmap(total * 4096)
    wanted = [5, total // 2 + 3, total - 1]
    for region in wanted:
        assert bm.mark(region * 4096, 4096) == 1
    bm._bits = CountingBytearray(bm._bits)  # white box: count accesses, not wall-clock time
    CountingBytearray.calls = 0
    assert list(bm.runs()) == [(r, 1) for r in wanted]
    # 16 MiB in 64 KiB blocks is 256 compares per full pass; a per-byte loop would be 2**24.
    assert CountingBytearray.calls < 2_000
    CountingBytearray.calls = 0
    assert list(bm.runs(total // 2 + 4)) == [(total - 1, 1)]
    assert CountingBytearray.calls < 1_000


def test_whole_volume_operations_on_a_large_bitmap() -> None:
    total = 2**27
    bm = DirtyBitmap(total * 4096)
    assert bm.mark(0, total * 4096) == total
    assert bm.marked_bytes == total * 4096
    assert list(bm.runs(max_regions=2**24)) == [(i * 2**24, 2**24) for i in range(8)]
    assert len(bm.take_dirty_pages()) == -(-total // 8 // PAGE_BYTES)  # the last one short
    assert bm.clear_regions(1, total - 2) == total - 2
    assert list(bm.runs()) == [(0, 1), (total - 1, 1)]
    assert bm.clear_all() == 2
    assert list(bm.runs()) == []


# -- persistence and dirty pages -----------------------------------------------------------------


def test_from_bytes_validates_the_length() -> None:
    with pytest.raises(ValueError, match=r"is 3 bytes, expected 4 .* 32 regions"):
        DirtyBitmap.from_bytes(32 * 4096, 4096, b"\x00\x00\x00")
    with pytest.raises(ValueError, match="is 5 bytes, expected 4"):
        DirtyBitmap.from_bytes(32 * 4096, 4096, bytes(5))
    with pytest.raises(ValueError, match="region size"):
        DirtyBitmap.from_bytes(32 * 4096, 1000, bytes(4))


def test_from_bytes_refuses_marks_past_the_end() -> None:
    # 10 regions: the last byte holds regions 8 and 9, its bits 2..7 are padding.
    assert DirtyBitmap.from_bytes(10 * 4096, 4096, b"\x00\x03").marked_count == 2
    with pytest.raises(ValueError, match="past the end"):
        DirtyBitmap.from_bytes(10 * 4096, 4096, b"\x00\x04")
    with pytest.raises(ValueError, match="past the end"):
        DirtyBitmap(10 * 4096).merge(b"\x00\x80")


def test_image_layout_is_lsb_first() -> None:
    bm = DirtyBitmap(24 * 4096)
    for region in (0, 3, 8, 23):
        bm.mark(region * 4096, 1)
    assert bm.to_bytes() == bytes([0b0000_1001, 0b0000_0001, 0b1000_0000])
    loaded = DirtyBitmap.from_bytes(24 * 4096, 4096, bytearray(b"\x01\x80\x00"))
    assert list(loaded.runs()) == [(0, 1), (15, 1)]
    assert loaded.take_dirty_pages() == []


def test_merge_ors_images_in() -> None:
    bm = DirtyBitmap(24 * 4096)
    bm.mark(0, 4096)
    assert bm.merge(bytes([0b0000_0011, 0, 0b1000_0000])) == 2
    assert list(bm.runs()) == [(0, 2), (23, 1)]
    assert bm.marked_count == 3
    assert bm.merge(bytes(3)) == 0
    with pytest.raises(ValueError, match="expected 3"):
        bm.merge(bytes(4))


def test_dirty_pages_follow_changes_only() -> None:
    pages_regions = 8 * PAGE_BYTES
    total = 3 * pages_regions + 5  # three full pages and a short fourth
    bm = DirtyBitmap(total * 4096)
    assert bm.take_dirty_pages() == []
    bm.mark((pages_regions - 1) * 4096, 2 * 4096)  # the last region of page 0, first of page 1
    pages = bm.take_dirty_pages()
    assert [p for p, _ in pages] == [0, 1]
    assert pages[0][1] == bytes(PAGE_BYTES - 1) + b"\x80"
    assert pages[1][1] == b"\x01" + bytes(PAGE_BYTES - 1)
    bm.mark((pages_regions - 1) * 4096, 1)  # already marked: the page did not change
    assert bm.take_dirty_pages() == []
    bm.mark((total - 1) * 4096, 1)
    bm.clear_regions(pages_regions, 1)
    assert bm.dirty_page_count == 2
    assert bm.take_dirty_pages() == [(1, bytes(PAGE_BYTES)), (3, b"\x10")]  # short last page


def test_failed_page_writes_can_be_handed_back() -> None:
    bm = DirtyBitmap(100 * GIB)
    bm.mark(0, 1)
    lost = bm.take_dirty_pages()
    bm.mark_pages_dirty(p for p, _ in lost)
    assert bm.take_dirty_pages() == lost
    with pytest.raises(ValueError, match="outside"):
        bm.mark_pages_dirty([-(-bm.total_regions // 8 // PAGE_BYTES)])  # one past the last


# -- stateful test against the set model ---------------------------------------------------------


@st.composite
def geometries(draw: st.DrawFn) -> tuple[int, int, int]:
    page_bytes = draw(st.sampled_from(PAGE_SIZES))
    region_size = draw(st.sampled_from(REGION_SIZES))
    full = draw(st.integers(0, 300))
    rest = draw(st.sampled_from([0, 0, 1, 512, region_size - 1]) | st.integers(0, region_size - 1))
    return page_bytes, full * region_size + rest, region_size


class BitmapModel(RuleBasedStateMachine):
    bm: DirtyBitmap
    persisted: bytearray

    def __init__(self) -> None:
        super().__init__()
        self.marked: set[int] = set()

    @initialize(geometry=geometries())
    def create(self, geometry: tuple[int, int, int]) -> None:
        page_bytes, self.volume_size, self.region_size = geometry
        self.bm = DirtyBitmap(self.volume_size, self.region_size, page_bytes=page_bytes)
        self.total = self.bm.total_regions
        self.persisted = bytearray(self.bm.to_bytes())

    def offsets(self) -> st.SearchStrategy[int]:
        rs, size = self.region_size, self.volume_size
        near_boundary = st.builds(
            lambda r, d: min(max(r * rs + d, 0), size),
            st.integers(0, self.total),
            st.sampled_from([-1, 0, 1]),
        )
        return near_boundary | st.integers(0, size)

    @rule(data=st.data())
    def mark(self, data: st.DataObject) -> None:
        offset = data.draw(self.offsets())
        size, rs = self.volume_size, self.region_size
        end = data.draw(
            st.sampled_from([offset, min(offset + 1, size), min(offset + rs, size)])
            | self.offsets()
        )
        offset, end = min(offset, end), max(offset, end)
        new = regions_touched(offset, end - offset, rs) - self.marked
        assert self.bm.mark(offset, end - offset) == len(new)
        self.marked |= new

    @rule(offset=st.integers(-(2**40), 2**40), length=st.integers(-(2**40), 2**40))
    def mark_out_of_range(self, offset: int, length: int) -> None:
        if offset >= 0 and length >= 0 and offset + length <= self.volume_size:
            return
        before = self.bm.to_bytes()
        with pytest.raises(ValueError):
            self.bm.mark(offset, length)
        assert self.bm.to_bytes() == before

    @rule(data=st.data())
    def clear_regions(self, data: st.DataObject) -> None:
        first = data.draw(st.integers(0, self.total))
        count = data.draw(st.integers(0, self.total - first))
        cleared = self.marked & set(range(first, first + count))
        assert self.bm.clear_regions(first, count) == len(cleared)
        self.marked -= cleared

    @rule()
    def mark_all(self) -> None:
        assert self.bm.mark_all() == self.total - len(self.marked)
        self.marked = set(range(self.total))

    @rule()
    def clear_all(self) -> None:
        assert self.bm.clear_all() == len(self.marked)
        self.marked = set()

    @rule(data=st.data())
    def merge(self, data: st.DataObject) -> None:
        theirs = data.draw(st.sets(st.integers(0, self.total - 1))) if self.total else set()
        assert self.bm.merge(model_image(self.total, theirs)) == len(theirs - self.marked)
        self.marked |= theirs

    @rule(data=st.data())
    def runs(self, data: st.DataObject) -> None:
        start = data.draw(st.integers(0, self.total))
        cap = data.draw(st.none() | st.integers(1, self.total + 1))
        assert list(self.bm.runs(start, cap)) == model_runs(self.marked, start, cap)

    @rule(data=st.data())
    def probe_region(self, data: st.DataObject) -> None:
        if not self.total:
            return
        region = data.draw(st.integers(0, self.total - 1))
        assert self.bm.is_marked(region) == (region in self.marked)
        offset, length = self.bm.region_span(region)
        assert length == model_span(self.volume_size, self.region_size, region)
        assert self.bm.region_of(offset) == self.bm.region_of(offset + length - 1) == region

    @rule()
    def write_dirty_pages(self) -> None:
        """Apply the returned pages to the previous image: they must reproduce the current one."""
        page = self.bm.page_bytes
        previous = bytes(self.persisted)
        pages = self.bm.take_dirty_pages()
        indexes = [p for p, _ in pages]
        assert indexes == sorted(set(indexes))
        for index, content in pages:
            assert content == self.bm.to_bytes()[index * page : (index + 1) * page]
            self.persisted[index * page : index * page + len(content)] = content
        assert bytes(self.persisted) == self.bm.to_bytes()
        changed = {
            i // page
            for i, (a, b) in enumerate(zip(previous, self.persisted, strict=True))
            if a != b
        }
        assert changed <= set(indexes)
        assert self.bm.take_dirty_pages() == []

    @rule()
    def restart_from_persisted_image(self) -> None:
        """Crash and reload: what was written is what comes back, dirty pages included."""
        self.write_dirty_pages()
        self.bm = DirtyBitmap.from_bytes(
            self.volume_size, self.region_size, bytes(self.persisted), page_bytes=self.bm.page_bytes
        )
        assert self.bm.take_dirty_pages() == []

    @invariant()
    def matches_model(self) -> None:
        if not hasattr(self, "bm"):
            return
        assert self.bm.marked_count == len(self.marked)
        assert self.bm.marked_bytes == sum(
            model_span(self.volume_size, self.region_size, r) for r in self.marked
        )
        assert self.bm.to_bytes() == model_image(self.total, self.marked)

    @invariant()
    def round_trips(self) -> None:
        if not hasattr(self, "bm"):
            return
        copy = DirtyBitmap.from_bytes(self.volume_size, self.region_size, self.bm.to_bytes())
        assert copy.to_bytes() == self.bm.to_bytes()
        assert copy.marked_count == self.bm.marked_count
        assert copy.marked_bytes == self.bm.marked_bytes
        assert list(copy.runs()) == list(self.bm.runs())


TestBitmapModel = BitmapModel.TestCase
TestBitmapModel.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)


def test_an_image_is_copied_once() -> None:
    """Opening a big log holds its image twice at most (the file's bytes and the bitmap's),
    never a zeroed bitmap and a temporary copy besides (bench/scale.py: 16 TiB)."""
    import tracemalloc

    image = bytearray(b"\x01" * (8 * MIB))
    tracemalloc.start()
    try:
        bitmap = DirtyBitmap.from_bytes(len(image) * 8 * 4096, 4096, image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert bitmap.marked_count == len(image)
    assert peak < 1.25 * len(image)
