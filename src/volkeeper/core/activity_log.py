"""Activity log: the bounded set of hot extents that makes "intent before data" cheap.

How this works (DRBD's activity log is the model): the volume is cut into extents
(``extent_bytes``, 4 MiB by default).  Before a write to an extent may be issued, the extent
must be *durably active*: listed in the last snapshot of the active set that reached stable
storage.  Steady writes to recently used extents find them active already and cost no
metadata I/O at all.  A write to a cold extent asks for it (``pin`` returns False); the
adapter then persists ``transaction()`` -- a snapshot of the new active set, written to
alternate blocks of a small ring -- and calls ``committed()``; every write waiting for an
extent of that snapshot may then go.  Several writes waiting at once share one transaction,
and a sequential writer reaching a cold extent brings in the next few with it
(``anticipate``): one transaction per several extents, not one per extent.

Pins: an extent stays pinned from the moment a write to it is accepted until that write is
durable everywhere it must be (locally and on every target), or until the regions it touched
are marked in the durable bitmap (the mirror layer's job when a target is lost).  Only
unpinned extents are evicted, least recently used first, to make room; when every slot is
pinned, new extents wait (``transaction()`` returns what fits) until some are unpinned.

Crash rule: after a crash the last valid snapshot on disk lists every extent that may hold a
write a target never got, so recovery marks those extents for resync.  The log's capacity
therefore bounds the resync after a source crash: ``capacity * extent_bytes`` bytes.
A torn snapshot write fails its checksum and the previous snapshot -- a superset of what was
safely in use, since new extents are only used after their snapshot is durable -- is used.

On-disk block (``BLOCK_BYTES``), all big-endian:
    u32 magic "VKAL", u16 version, u16 reserved, u64 transaction number, u32 extent_bytes,
    u32 count, count x u32 extent numbers (sorted), zero padding, u32 crc32 of the block's
    first BLOCK_BYTES - 4 bytes (the last 4 bytes of the block).
Transaction N goes to ring block N % RING_BLOCKS.
"""

from __future__ import annotations

import struct
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

BLOCK_BYTES = 4096
RING_BLOCKS = 2
MAGIC = 0x564B414C  # "VKAL"
VERSION = 1
DEFAULT_EXTENT_BYTES = 4 * 1024 * 1024
BLOCK_HEADER = struct.Struct(">IHHQII")  # magic, version, reserved, number, extent_bytes, count
CRC = struct.Struct(">I")
MAX_CAPACITY = (BLOCK_BYTES - BLOCK_HEADER.size - CRC.size) // 4  # 1017 extents
DEFAULT_CAPACITY = 512  # 2 GiB of 4 MiB extents: the resync bound after a source crash


@dataclass(frozen=True)
class Snapshot:
    """One activity-log transaction: the whole active set as it must be on disk."""

    number: int
    extent_bytes: int
    extents: tuple[int, ...]

    @property
    def ring_block(self) -> int:
        return self.number % RING_BLOCKS

    def encode(self) -> bytes:
        body = BLOCK_HEADER.pack(
            MAGIC, VERSION, 0, self.number, self.extent_bytes, len(self.extents)
        )
        body += struct.pack(f">{len(self.extents)}I", *self.extents)
        body = body.ljust(BLOCK_BYTES - CRC.size, b"\0")
        return body + CRC.pack(zlib.crc32(body))


def decode_block(block: bytes) -> Snapshot | None:
    """The snapshot in one ring block, or None if it is blank, torn or not ours."""
    if len(block) != BLOCK_BYTES:
        return None
    body, (crc,) = block[: -CRC.size], CRC.unpack_from(block, BLOCK_BYTES - CRC.size)
    if zlib.crc32(body) != crc:
        return None
    magic, version, _, number, extent_bytes, count = BLOCK_HEADER.unpack_from(body)
    if magic != MAGIC or version != VERSION or count > MAX_CAPACITY:
        return None
    extents = struct.unpack_from(f">{count}I", body, BLOCK_HEADER.size)
    return Snapshot(number, extent_bytes, tuple(extents))


def recover(blocks: Sequence[bytes]) -> Snapshot | None:
    """The newest valid snapshot among the ring's blocks (None on a fresh log)."""
    snapshots = [s for s in map(decode_block, blocks) if s is not None]
    return max(snapshots, key=lambda s: s.number, default=None)


class ActivityLog:
    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        extent_bytes: int = DEFAULT_EXTENT_BYTES,
        recovered: Snapshot | None = None,
    ) -> None:
        if not 1 <= capacity <= MAX_CAPACITY:
            raise ValueError(f"activity log capacity must be 1..{MAX_CAPACITY}, got {capacity}")
        if extent_bytes <= 0 or extent_bytes & (extent_bytes - 1):
            raise ValueError(f"extent size must be a power of two, got {extent_bytes}")
        self.capacity = capacity
        self.extent_bytes = extent_bytes
        self._shift = extent_bytes.bit_length() - 1
        start = recovered.extents[:capacity] if recovered else ()
        self._active: OrderedDict[int, int] = OrderedDict((e, 0) for e in start)  # -> pins
        self._durable: frozenset[int] = frozenset(self._active)
        self._wanted: dict[int, int] = {}  # extents asked for, not yet active -> pins
        self._number = recovered.number if recovered else 0
        self._in_flight: Snapshot | None = None
        self._rewrite = False  # a snapshot could not be written: the next one must be

    # -- the write path -------------------------------------------------------------------

    def extents_of(self, offset: int, length: int) -> range:
        last = (offset + max(length, 1) - 1) >> self._shift
        return range(offset >> self._shift, last + 1)

    def pin(self, extents: Iterable[int]) -> bool:
        """Pin extents for a write; True if all are durably active (the write may go now)."""
        ready = True
        for extent in extents:
            if extent in self._active:
                self._active[extent] += 1
                self._active.move_to_end(extent)
                ready = ready and extent in self._durable
            else:
                self._wanted[extent] = self._wanted.get(extent, 0) + 1
                ready = False
        return ready

    def anticipate(self, offset: int, length: int, count: int, limit: int) -> None:
        """A write just asked for a cold extent.  If it looks sequential -- it covers the start
        of its last extent, and the extent before that one is active -- ask for the ``count``
        extents after it too (below ``limit``, unpinned), so that one transaction covers the
        writes that come next.  A random writer seldom starts right at an extent boundary."""
        last = (offset + max(length, 1) - 1) >> self._shift
        if offset > last << self._shift or last - 1 not in self._active:
            return
        for extent in range(last + 1, min(last + 1 + count, limit)):
            if extent not in self._active and extent not in self._wanted:
                self._wanted[extent] = 0

    def ready(self, extents: Iterable[int]) -> bool:
        """All extents active and in the durable snapshot (an extent evicted by the snapshot
        being written is still in the old durable one, but must not be used)."""
        return all(extent in self._durable and extent in self._active for extent in extents)

    def unpin(self, extents: Iterable[int]) -> None:
        """The write is durable everywhere (or marked in the durable bitmap)."""
        for extent in extents:
            if extent in self._active:
                self._active[extent] -= 1
            else:  # still waiting for its transaction: the write gave up
                self._wanted[extent] -= 1
                if not self._wanted[extent]:
                    del self._wanted[extent]

    # -- transactions -----------------------------------------------------------------------

    def transaction(self) -> Snapshot | None:
        """The next snapshot to persist, or None (nothing wanted, one in flight, or full)."""
        if self._in_flight is not None or not (self._wanted or self._rewrite):
            return None
        admitted, self._rewrite = self._rewrite, False
        for extent in list(self._wanted):
            if len(self._active) >= self.capacity and not self._evict_one():
                break
            self._active[extent] = self._wanted.pop(extent)
            admitted = True
        if not admitted:
            return None
        self._number += 1
        self._in_flight = Snapshot(self._number, self.extent_bytes, tuple(sorted(self._active)))
        return self._in_flight

    def committed(self, snapshot: Snapshot) -> None:
        """``snapshot`` is on stable storage: its extents may now be written."""
        if snapshot is not self._in_flight:
            raise ValueError(f"snapshot {snapshot.number} is not the one being written")
        self._durable = frozenset(snapshot.extents)
        self._in_flight = None

    def abandoned(self, snapshot: Snapshot) -> None:
        """``snapshot`` could not be written: the log stays as durable as it was, and the
        next ``transaction`` (whenever the store can write again) holds its extents."""
        if snapshot is not self._in_flight:
            raise ValueError(f"snapshot {snapshot.number} is not the one being written")
        self._in_flight = None
        self._rewrite = True

    def _evict_one(self) -> bool:
        for extent, pins in self._active.items():  # least recently used first
            if pins == 0:
                del self._active[extent]
                return True
        return False

    # -- reporting --------------------------------------------------------------------------

    @property
    def active_extents(self) -> frozenset[int]:
        return self._durable

    @property
    def pinned_extents(self) -> int:
        return sum(1 for pins in self._active.values() if pins)

    @property
    def waiting(self) -> bool:
        """Some extent is wanted but not yet in the log."""
        return bool(self._wanted)

    @property
    def resync_bound_bytes(self) -> int:
        """Most bytes a source crash can leave to resync on account of this log."""
        return self.capacity * self.extent_bytes
