"""A verify's chunks cover the volume; its differences leave out marked regions and the end."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from volkeeper.core.verify_plan import differences, verify_chunks

REGION = 4096


@given(size=st.integers(1, 64 * REGION), chunk=st.integers(1, 9))
def test_chunks_cover_the_volume_once_in_order(size: int, chunk: int) -> None:
    chunks = verify_chunks(size, chunk * REGION)
    assert chunks[0][0] == 0 and sum(length for _, length in chunks) == size
    for (offset, length), (next_offset, _) in itertools.pairwise(chunks):
        assert offset + length == next_offset and length == chunk * REGION


def test_differences_skip_marked_regions_and_stop_at_the_chunk_end() -> None:
    marked = {11}  # a region number of the volume
    # a chunk of 3.5 regions at region 10: runs (0, 2) and (3, 1) differ; region 13 is short
    found = differences(
        [(0, 2), (3, 1)], 10 * REGION, 3 * REGION + 2048, REGION, marked.__contains__
    )
    assert found == [(10 * REGION, REGION), (13 * REGION, 2048)]


def test_nothing_differs_when_no_run_does() -> None:
    assert differences([], 0, 8 * REGION, REGION, lambda region: False) == []
