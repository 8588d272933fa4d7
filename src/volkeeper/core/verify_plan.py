"""What an online verify compares, and what its answers mean.

How this works: a verify (daemon/source/verify.py) compares the whole volume in chunks of at
most ``chunk_bytes`` (``verify_chunks``), a few at a time; a chunk an application write raced
proves nothing and is compared again in a later pass.  For each chunk the target's region
digests name the runs of regions that differ (core/region_hash.py); ``differences`` turns
those runs into byte ranges, leaving out regions the intent log marks -- they are known to
differ, and the resync will send them -- and the short last region of the volume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


def verify_chunks(size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of every chunk of a volume of ``size`` bytes, in order."""
    return [(offset, min(chunk_bytes, size - offset)) for offset in range(0, size, chunk_bytes)]


def differences(
    runs: Iterable[tuple[int, int]],
    offset: int,
    length: int,
    region_size: int,
    is_marked: Callable[[int], bool],
) -> list[tuple[int, int]]:
    """The (offset, length) of each differing region of the chunk at ``offset`` that the
    intent log does not mark (``is_marked`` takes a region number of the volume); ``runs``:
    (first region of the chunk, count) that differ."""
    found = []
    end = offset + length
    for first, count in runs:
        start = offset + first * region_size
        stop = min(offset + (first + count) * region_size, end)
        for region_offset in range(start, stop, region_size):
            if not is_marked(region_offset // region_size):
                found.append((region_offset, min(region_size, stop - region_offset)))
    return found
