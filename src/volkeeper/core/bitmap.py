"""The intent log's dirty-region bitmap: one bit per region of a volume, kept in memory.

How this works: a volume is cut into regions of ``region_size`` bytes (a power of two, 4 KiB to
1 MiB; the last region may be short).  Bit *i* of a ``bytearray`` says "region *i* may differ on
some target".  The write path calls ``mark(offset, length)`` before it acknowledges a write; the
answer is how many bits were newly set, so ``0`` means the region was already marked and no
metadata write is needed (the common case for a hot region: a few integer operations, no loop
and no allocation).  A range over many regions sets whole bytes by slice assignment, so its cost
grows with bytes, not bits.  Resync walks the marked regions in order with ``runs()``, which
skips clean stretches with ``bytearray.startswith`` against a block of zeros (a C ``memcmp``) and
bisects into the first dirty block, so an almost clean 128 MiB bitmap (a 4 TiB volume at 4 KiB
regions) is crossed in tens of milliseconds.  After a target has durably applied a region, the
caller clears it with ``clear_regions``.

Nothing here is durable.  The intent-log store persists the image: ``to_bytes()`` for a full
write, or ``take_dirty_pages()`` for the pages of ``PAGE_BYTES`` image bytes that changed
(set or cleared) since the previous call.  Invariant 2 of DESIGN.md is the caller's contract:
the pages holding newly set bits (or a hot-region record covering them) must be on stable
storage before the write is acknowledged; if that write fails, hand the pages back with
``mark_pages_dirty`` so they are not forgotten.  A cleared bit may reach the disk late: a stale
mark only costs a region of extra resync.

On-disk layout of the image (what ``to_bytes`` returns and ``from_bytes`` accepts)::

    length       ceil(total_regions / 8) bytes, no header (the store adds its own)
    byte k       regions 8k .. 8k+7
    bit j of k   (value 1 << j, least significant bit first) is region 8k + j; 1 = marked
    padding      bits past the last region, in the last byte, are always 0
    page p       image bytes [p * PAGE_BYTES, (p + 1) * PAGE_BYTES): regions
                 [p * 8 * PAGE_BYTES, (p + 1) * 8 * PAGE_BYTES); the last page may be short

Region *i* covers volume bytes ``[i * region_size, min((i + 1) * region_size, volume_size))``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

MIN_REGION_SIZE = 4096
MAX_REGION_SIZE = 1024 * 1024
# Bitmap image bytes per dirty-tracking page (32640 regions): one 4 KiB block of the
# intent-log file less its 16-byte seal (core/intent_log_format.py).
PAGE_BYTES = 4080

_FILL_BYTES = 64 * 1024  # the largest block compared or assigned at once
_ZEROS = memoryview(bytes(_FILL_BYTES))
_ONES = memoryview(b"\xff" * _FILL_BYTES)
# _LOWEST_BIT[v] is the index of the lowest set bit of the byte v (v > 0).
_LOWEST_BIT = bytes(((v & -v).bit_length() - 1) if v else 0 for v in range(256))


def image_size(volume_size: int, region_size: int = MIN_REGION_SIZE) -> int:
    """Length in bytes of the bitmap image of a volume (the store preallocates this much)."""
    regions = -(-_check_volume_size(volume_size) // _check_region_size(region_size))
    return (regions + 7) >> 3


def _check_volume_size(volume_size: int) -> int:
    if volume_size < 0:
        raise ValueError(f"volume size must not be negative, got {volume_size}")
    return volume_size


def _check_region_size(region_size: int) -> int:
    if (
        not MIN_REGION_SIZE <= region_size <= MAX_REGION_SIZE
        or region_size & (region_size - 1) != 0
    ):
        raise ValueError(
            f"region size must be a power of two from 4 KiB to 1 MiB, got {region_size}"
        )
    return region_size


class DirtyBitmap:
    """One bit per region of a volume; see the module docstring for the layout.

    ``page_bytes`` (default ``PAGE_BYTES``) only groups the image into pages for
    ``take_dirty_pages``: tests pass tiny pages to make a small volume span many of them; the
    image layout does not depend on it.
    """

    __slots__ = (
        "_bits",
        "_count",
        "_dirty",
        "_last_len",
        "_page_bytes",
        "_region_size",
        "_shift",
        "_total",
        "_volume_size",
    )

    def __init__(
        self,
        volume_size: int,
        region_size: int = MIN_REGION_SIZE,
        *,
        page_bytes: int = PAGE_BYTES,
        image: bytes | bytearray | memoryview | None = None,
    ) -> None:
        """An empty bitmap, or one holding ``image`` (checked, copied once: see from_bytes)."""
        self._volume_size = _check_volume_size(volume_size)
        self._region_size = _check_region_size(region_size)
        self._shift = region_size.bit_length() - 1
        self._total = -(-volume_size // region_size)
        self._last_len = volume_size - ((self._total - 1) << self._shift) if self._total else 0
        if not 1 <= page_bytes <= _FILL_BYTES:
            raise ValueError(f"page_bytes must be 1 to 64 KiB, got {page_bytes}")
        self._page_bytes = page_bytes  # image byte index // page_bytes = page index
        self._count = 0
        self._dirty: set[int] = set()
        if image is None:
            self._bits = bytearray((self._total + 7) >> 3)
            return
        self._bits = bytearray(self._check_image(image))
        size = len(self._bits)
        self._count = sum(
            self._ones_in(start, min(_FILL_BYTES, size - start))
            for start in range(0, size, _FILL_BYTES)
        )

    # -- geometry -----------------------------------------------------------------------------

    @property
    def volume_size(self) -> int:
        return self._volume_size

    @property
    def page_bytes(self) -> int:
        return self._page_bytes

    @property
    def region_size(self) -> int:
        return self._region_size

    @property
    def total_regions(self) -> int:
        return self._total

    @property
    def marked_count(self) -> int:
        """Number of marked regions (kept up to date on every change, O(1))."""
        return self._count

    @property
    def marked_bytes(self) -> int:
        """Bytes of volume covered by marked regions; a short last region counts its length."""
        marked = self._count << self._shift
        if self._count and self._last_len != self._region_size and self.is_marked(self._total - 1):
            marked -= self._region_size - self._last_len
        return marked

    def region_of(self, offset: int) -> int:
        if not 0 <= offset < self._volume_size:
            raise ValueError(f"offset {offset} is outside the volume (size {self._volume_size})")
        return offset >> self._shift

    def region_span(self, region: int) -> tuple[int, int]:
        """(byte offset, byte length) of a region; the last region may be short."""
        self._check_region(region)
        if region == self._total - 1:
            return region << self._shift, self._last_len
        return region << self._shift, self._region_size

    def is_marked(self, region: int) -> bool:
        self._check_region(region)
        return bool(self._bits[region >> 3] >> (region & 7) & 1)

    def __repr__(self) -> str:
        return (
            f"DirtyBitmap(volume_size={self._volume_size}, region_size={self._region_size}, "
            f"marked={self._count}/{self._total})"
        )

    # -- changes ------------------------------------------------------------------------------

    def mark(self, offset: int, length: int) -> int:
        """Mark every region the byte range touches; return how many bits were newly set."""
        end = offset + length
        if not 0 <= offset < end <= self._volume_size:
            return self._mark_unusual(offset, length)
        shift = self._shift
        first = offset >> shift
        last = (end - 1) >> shift
        if first != last:
            return self._change(first, last - first + 1, True)
        index = first >> 3
        bit = 1 << (first & 7)
        bits = self._bits
        old = bits[index]
        if old & bit:
            return 0
        bits[index] = old | bit
        self._count += 1
        self._dirty.add(index // self._page_bytes)
        return 1

    def _mark_unusual(self, offset: int, length: int) -> int:
        if length == 0 and 0 <= offset <= self._volume_size:
            return 0
        raise ValueError(
            f"range offset={offset} length={length} is outside the volume "
            f"(size {self._volume_size})"
        )

    def clear_regions(self, first: int, count: int) -> int:
        """Clear regions ``first .. first + count - 1``; return how many bits were cleared."""
        if first < 0 or count < 0 or first + count > self._total:
            raise ValueError(
                f"regions first={first} count={count} are outside the bitmap "
                f"({self._total} regions)"
            )
        return self._change(first, count, False) if count else 0

    def mark_all(self) -> int:
        """Mark every region (full resync); return how many bits were newly set."""
        if self._count == self._total:
            return 0
        return self._change(0, self._total, True)

    def clear_all(self) -> int:
        """Clear every region; return how many bits were cleared."""
        if self._count == 0:
            return 0
        return self._change(0, self._total, False)

    def merge(self, other: bytes | bytearray | memoryview) -> int:
        """OR another image of the same geometry in; return how many bits were newly set."""
        view = self._check_image(other)
        bits = self._bits
        page = self._page_bytes
        newly = 0
        for start in range(0, len(bits), page):
            theirs = int.from_bytes(view[start : start + page], "little")
            if not theirs:
                continue
            old = int.from_bytes(bits[start : start + page], "little")
            new = old | theirs
            if new != old:
                newly += new.bit_count() - old.bit_count()
                size = min(page, len(bits) - start)
                bits[start : start + size] = new.to_bytes(size, "little")
                self._dirty.add(start // page)
        self._count += newly
        return newly

    def _change(self, first: int, count: int, set_: bool) -> int:
        """Set or clear bits ``first .. first + count - 1`` page by page, tracking dirty pages."""
        page_bits = self._page_bytes * 8
        end = first + count
        changed = 0
        lo = first
        while lo < end:
            page = lo // page_bits
            hi = min(end, (page + 1) * page_bits)
            n = self._change_in_page(lo, hi, set_)
            if n:
                self._dirty.add(page)
                changed += n
            lo = hi
        self._count += changed if set_ else -changed
        return changed

    def _change_in_page(self, lo: int, hi: int, set_: bool) -> int:
        """Set or clear bits ``lo .. hi - 1`` (one page at most); return how many changed."""
        head, tail = lo >> 3, (hi - 1) >> 3
        if head == tail:
            return self._change_byte(head, ((1 << (hi - lo)) - 1) << (lo & 7), set_)
        changed = self._change_byte(head, (0xFF << (lo & 7)) & 0xFF, set_)
        changed += self._change_byte(tail, (2 << ((hi - 1) & 7)) - 1, set_)
        n = tail - head - 1
        if n:
            ones = self._ones_in(head + 1, n)
            if set_ and ones != 8 * n:
                changed += 8 * n - ones
                self._bits[head + 1 : tail] = _ONES[:n]
            elif not set_ and ones:
                changed += ones
                self._bits[head + 1 : tail] = _ZEROS[:n]
        return changed

    def _ones_in(self, start: int, n: int) -> int:
        """Number of set bits in image bytes ``start .. start + n - 1`` (n <= 64 KiB)."""
        bits = self._bits
        if bits.startswith(_ZEROS[:n], start):
            return 0
        if bits.startswith(_ONES[:n], start):
            return 8 * n
        return int.from_bytes(bits[start : start + n], "little").bit_count()

    def _change_byte(self, index: int, mask: int, set_: bool) -> int:
        old = self._bits[index]
        new = old | mask if set_ else old & ~mask
        if new == old:
            return 0
        self._bits[index] = new
        return (new ^ old).bit_count()

    # -- walking ------------------------------------------------------------------------------

    def runs(
        self, start_region: int = 0, max_regions: int | None = None
    ) -> Iterator[tuple[int, int]]:
        """Yield (first_region, count) of consecutive marked regions, ascending, from start_region.

        Each run is at most ``max_regions`` long (a longer one comes out in pieces).  The walk
        reads the live bitmap lazily: regions marked behind its cursor are seen by the next walk.
        """
        if not 0 <= start_region <= self._total:
            raise ValueError(f"start region {start_region} is outside 0..{self._total}")
        if max_regions is not None and max_regions < 1:
            raise ValueError(f"max_regions must be at least 1, got {max_regions}")
        return self._runs(start_region, max_regions)

    def _runs(self, region: int, max_regions: int | None) -> Iterator[tuple[int, int]]:
        total = self._total
        while True:
            first = self._find(region, total, 0x00)
            if first >= total:
                return
            limit = total if max_regions is None else min(total, first + max_regions)
            region = self._find(first, limit, 0xFF)
            yield first, region - first

    def _find(self, region: int, limit: int, fill: int) -> int:
        """First region in ``region .. limit - 1`` whose bit differs from ``fill``, else limit."""
        if region >= limit:
            return limit
        index = region >> 3
        value = (self._bits[index] ^ fill) >> (region & 7)
        if not value:
            index = self._skip(index + 1, (limit + 7) >> 3, _ONES if fill else _ZEROS)
            if index << 3 >= limit:
                return limit
            value = self._bits[index] ^ fill
            region = index << 3
        return min(limit, region + _LOWEST_BIT[value])

    def _skip(self, index: int, end: int, fill: memoryview) -> int:
        """First byte index in ``index .. end - 1`` that differs from ``fill``, else end."""
        bits = self._bits
        step = 64
        while index < end:
            n = min(step, end - index)
            if not bits.startswith(fill[:n], index):
                while n > 1:  # bisect: a differing byte lies in index .. index + n - 1
                    half = n >> 1
                    if bits.startswith(fill[:half], index):
                        index, n = index + half, n - half
                    else:
                        n = half
                return index
            index += n
            step = min(step << 2, _FILL_BYTES)
        return end

    # -- persistence --------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    @classmethod
    def from_bytes(
        cls,
        volume_size: int,
        region_size: int,
        data: bytes | bytearray | memoryview,
        *,
        page_bytes: int = PAGE_BYTES,
    ) -> DirtyBitmap:
        """A bitmap holding a persisted image; it starts with no dirty pages.  The image is
        copied once, into the bitmap's own bytes (a 16 TiB volume's is 512 MiB at 4 KiB
        regions: opening its log holds it twice, briefly, never three times)."""
        return cls(volume_size, region_size, page_bytes=page_bytes, image=data)

    def take_dirty_pages(self) -> list[tuple[int, bytes]]:
        """(page index, page bytes) of every page changed since the last call, ascending."""
        page = self._page_bytes
        dirty, self._dirty = sorted(self._dirty), set()
        return [(p, bytes(self._bits[p * page : (p + 1) * page])) for p in dirty]

    def mark_pages_dirty(self, pages: Iterable[int]) -> None:
        """Hand pages back to the tracking (their write to stable storage failed)."""
        count = -(-len(self._bits) // self._page_bytes)
        for page in pages:
            if not 0 <= page < count:
                raise ValueError(f"page {page} is outside the bitmap ({count} pages)")
            self._dirty.add(page)

    @property
    def dirty_page_count(self) -> int:
        return len(self._dirty)

    # -- checks -------------------------------------------------------------------------------

    def _check_region(self, region: int) -> None:
        if not 0 <= region < self._total:
            raise ValueError(f"region {region} is outside the bitmap ({self._total} regions)")

    def _check_image(self, data: bytes | bytearray | memoryview) -> memoryview:
        view = memoryview(data).cast("B")
        expected = (self._total + 7) >> 3
        if len(view) != expected:
            raise ValueError(
                f"bitmap image is {len(view)} bytes, expected {expected} for "
                f"{self._total} regions (volume size {self._volume_size}, "
                f"region size {self._region_size})"
            )
        spare = self._total & 7
        if spare and view[-1] >> spare:
            raise ValueError(
                f"bitmap image marks regions past the end of the volume "
                f"(last byte {view[-1]:#04x}, {self._total} regions)"
            )
        return view
