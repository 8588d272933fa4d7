"""A resync pass covers exactly the marked regions, in chunks within marked runs, with a commit
after every batch and at the end."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from volkeeper.core.bitmap import DirtyBitmap
from volkeeper.core.resync_plan import COMMIT, Span, resync_pass

REGION = 4096


@given(
    marked=st.sets(st.integers(0, 199), max_size=120),
    last_region_bytes=st.sampled_from([REGION, 512, 1000]),
    chunk_regions=st.integers(1, 9),
    batch_regions=st.integers(1, 40),
)
def test_a_pass_covers_the_marked_regions_in_batches(
    marked: set[int], last_region_bytes: int, chunk_regions: int, batch_regions: int
) -> None:
    size = 199 * REGION + last_region_bytes  # the last region may be short
    bitmap = DirtyBitmap(size, REGION)
    for region in marked:
        bitmap.mark(region * REGION, 1)
    steps = list(resync_pass(bitmap, chunk_regions * REGION, batch_regions * REGION))
    spans = [step for step in steps if isinstance(step, Span)]
    covered = [r for span in spans for r in range(span.first, span.first + span.count)]
    assert covered == sorted(marked)  # each marked region once, in volume order
    for span in spans:
        assert 1 <= span.count <= chunk_regions
        assert span.offset == span.first * REGION
        assert span.offset + span.length == min((span.first + span.count) * REGION, size)
    assert steps[-1] is COMMIT
    batch = 0
    for step in steps:
        if step is COMMIT:
            batch = 0
        else:
            assert batch < batch_regions * REGION  # a commit came once a batch was full
            batch += step.length


def test_a_pass_over_a_clean_bitmap_only_commits() -> None:
    assert list(resync_pass(DirtyBitmap(64 * REGION, REGION), REGION, REGION)) == [COMMIT]


def test_a_pass_walks_the_live_bitmap() -> None:
    """Lazily: what is marked ahead of the cursor during the pass is in it, what is marked
    behind it is left to the next pass, and what is cleared ahead is not sent."""
    bitmap = DirtyBitmap(100 * REGION, REGION)
    for region in (10, 50, 60):
        bitmap.mark(region * REGION, 1)
    walk = resync_pass(bitmap, REGION, 100 * REGION)
    first = next(walk)
    assert isinstance(first, Span) and first.first == 10
    bitmap.mark(5 * REGION, 1)  # behind the cursor
    bitmap.mark(70 * REGION, 1)  # ahead of it
    bitmap.clear_regions(60, 1)  # sent meanwhile by something else, say
    rest = [step.first for step in walk if isinstance(step, Span)]
    assert rest == [50, 70]


def test_a_huge_scattered_pass_starts_at_once() -> None:
    """A million separate runs: the first chunk comes without listing them all."""
    regions = 2_000_000
    image = b"\x55" * (regions // 8)  # every other region marked
    bitmap = DirtyBitmap.from_bytes(regions * REGION, REGION, image)
    walk = resync_pass(bitmap, 256 * REGION, 1 << 40)
    first = next(walk)
    assert isinstance(first, Span) and (first.first, first.count) == (0, 1)
    bitmap.clear_regions(0, regions)  # the rest of the walk finds nothing left
    assert list(walk) == [COMMIT]
