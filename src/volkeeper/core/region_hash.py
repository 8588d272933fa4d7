"""Per-region digests, for checksum resync and online verify.

How this works: a range is cut into regions of ``region_size`` bytes (the last one may be
short, at the end of a volume) and each is hashed with xxh3-128: fast enough to hash at
memory speed, and 128 bits make an accidental match of two different regions negligible
(a verify compares billions of them).  Source and target hash the same range the same way;
``differing_runs`` lists the runs of regions whose digests differ, as (first, count).
"""

from __future__ import annotations

from xxhash import xxh3_128_digest

from volkeeper.core.peer.layout import DIGEST_SIZE, Buffer


def digests(data: Buffer, region_size: int) -> bytes:
    view = memoryview(data)
    return b"".join(
        xxh3_128_digest(view[start : start + region_size])
        for start in range(0, len(view), region_size)
    )


def differing_runs(ours: bytes, theirs: bytes) -> list[tuple[int, int]]:
    """Runs of regions whose digests differ; a digest missing on either side differs."""
    count = max(len(ours), len(theirs)) // DIGEST_SIZE
    runs: list[tuple[int, int]] = []
    for index in range(count):
        at = index * DIGEST_SIZE
        if ours[at : at + DIGEST_SIZE] != theirs[at : at + DIGEST_SIZE]:
            if runs and runs[-1][0] + runs[-1][1] == index:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((index, 1))
    return runs
