"""One pass of a resync over the intent log: which chunks to send, and where to commit.

How this works: a resync (daemon/source/resync.py) walks the bitmap in passes.  ``resync_pass``
walks the live bitmap lazily, from its first region to its last: marked runs cut into chunks
of at most ``chunk_bytes`` (never across an unmarked region), yielded in volume order with a
``COMMIT`` after every ``batch_bytes`` sent and at the end: the walk sends the target a FLUSH
there, and once it is ACKed the engine clears what the batch proved (core/mirror_engine.py).
A region marked ahead of the cursor during the pass is sent by it; one marked behind, by the
next pass, so passes converge on an empty bitmap, and the engine's ``resync_complete`` says
when the walk may end.  Lazily, because a pass may be huge: 1% of a 16 TiB volume scattered
over 4 KiB regions is 42 million runs -- listed up front, 100 s of the event loop and 4 GiB
(bench/scale.py); walked as sent, a few microseconds per chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from volkeeper.core.bitmap import DirtyBitmap


@dataclass(frozen=True, slots=True)
class Span:
    """A run of marked regions to read and send as one chunk."""

    first: int  # region
    count: int
    offset: int  # bytes
    length: int


COMMIT: Final = None  # make the batch so far durable on the target, then clear it


def resync_pass(bitmap: DirtyBitmap, chunk_bytes: int, batch_bytes: int) -> Iterator[Span | None]:
    """The chunks of one pass, each batch followed by ``COMMIT`` (the last one too)."""
    regions_per_chunk = max(1, chunk_bytes // bitmap.region_size)
    batch = 0
    for first, count in bitmap.runs(0, regions_per_chunk):
        offset = bitmap.region_span(first)[0]
        last_offset, last_length = bitmap.region_span(first + count - 1)
        span = Span(first, count, offset, last_offset + last_length - offset)
        yield span
        batch += span.length
        if batch >= batch_bytes:
            yield COMMIT
            batch = 0
    yield COMMIT
