from __future__ import annotations

import itertools
import os

from hypothesis import given
from hypothesis import strategies as st
from xxhash import xxh3_128_digest

from volkeeper.core.region_hash import differing_runs, digests


def test_digests_are_xxh3_128_per_region_the_last_one_short() -> None:
    data = os.urandom(3 * 4096 + 100)
    out = digests(data, 4096)
    assert len(out) == 4 * 16
    assert out[:16] == xxh3_128_digest(data[:4096])
    assert out[48:] == xxh3_128_digest(data[3 * 4096 :])


def test_runs_of_differing_regions() -> None:
    base = os.urandom(10 * 512)
    changed = bytearray(base)
    for region in (1, 2, 3, 7, 9):
        changed[region * 512] ^= 0xFF
    assert differing_runs(digests(base, 512), digests(changed, 512)) == [(1, 3), (7, 1), (9, 1)]
    assert differing_runs(digests(base, 512), digests(base, 512)) == []


def test_a_missing_digest_counts_as_a_difference() -> None:
    ours = digests(bytes(4 * 512), 512)
    assert differing_runs(ours, ours[:32]) == [(2, 2)]


@given(st.lists(st.booleans(), min_size=1, max_size=64))
def test_runs_cover_exactly_the_changed_regions(flips: list[bool]) -> None:
    base = bytes(len(flips) * 512)
    changed = bytearray(base)
    for index, flip in enumerate(flips):
        if flip:
            changed[index * 512 + 7] = 1
    runs = differing_runs(digests(base, 512), digests(changed, 512))
    covered = [i for first, count in runs for i in range(first, first + count)]
    assert covered == [i for i, flip in enumerate(flips) if flip]
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(runs))  # maximal runs
