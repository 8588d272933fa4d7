"""One pass of a resync over the intent log: which chunks to send, and where to commit.

How this works: a resync (daemon/source/resync.py) walks the bitmap in passes.  ``resync_pass``
takes a snapshot of the marked runs when the pass starts, cuts them into chunks of at most
``chunk_bytes`` (never across an unmarked region), and yields them in volume order with a
``COMMIT`` after every ``batch_bytes`` sent and at the end: the walk sends the target a FLUSH
there, and once it is ACKed the engine clears what the batch proved (core/mirror_engine.py).
Writes during the pass mark regions again; the next pass sends those, so passes converge on
an empty bitmap, and the engine's ``resync_complete`` says when the walk may end.
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
    for first, count in list(bitmap.runs(0, regions_per_chunk)):
        offset = bitmap.region_span(first)[0]
        last_offset, last_length = bitmap.region_span(first + count - 1)
        span = Span(first, count, offset, last_offset + last_length - offset)
        yield span
        batch += span.length
        if batch >= batch_bytes:
            yield COMMIT
            batch = 0
    yield COMMIT
