"""Fault injection: stackable volume wrappers in the style of nbdkit filters.

How this works: a ``VolumeFilter`` wraps an inner ``Volume`` and forwards every call to it, so
a filter overrides only the calls it changes and filters stack (a filter's inner volume may be
another filter).  ``FaultyVolume`` makes chosen operations fail with a chosen errno:

- ``fail_ops``: operation names, from ``OPS``;
- ``ranges``: only requests overlapping one of these ``(offset, length)`` byte ranges fail
  (a flush has no range and always matches);
- ``after``: the first ``after`` matching calls still succeed;
- ``armed``: switch the faults off and on at runtime.

A matching ``read_nowait``/``write_nowait`` returns None/0 without touching the inner volume,
so the caller falls back to the blocking call, which fails (and counts towards ``after``).
"""

from __future__ import annotations

import errno as errno_codes
import os
from collections.abc import Iterable

from volkeeper.io.volume import Data, Volume

OPS = frozenset({"read", "write", "flush", "trim", "write_zeroes", "cache"})


class VolumeFilter(Volume):
    """Forwards every call to ``inner``; subclass and override what the filter changes."""

    def __init__(self, inner: Volume) -> None:
        super().__init__(
            inner.name, inner.path, inner.size, inner.sector_size, inner.kind, inner.read_only
        )
        self.inner = inner

    def read(self, offset: int, length: int) -> bytes | bytearray:
        return self.inner.read(offset, length)

    def read_nowait(self, offset: int, length: int) -> bytes | bytearray | None:
        return self.inner.read_nowait(offset, length)

    def write(self, offset: int, data: Data) -> None:
        self.inner.write(offset, data)

    def write_nowait(self, offset: int, data: Data) -> int:
        return self.inner.write_nowait(offset, data)

    @property
    def nowait_writes(self) -> bool:
        return self.inner.nowait_writes

    def flush(self) -> None:
        self.inner.flush()

    def trim(self, offset: int, length: int) -> None:
        self.inner.trim(offset, length)

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        self.inner.write_zeroes(offset, length, may_trim)

    def cache(self, offset: int, length: int) -> None:
        self.inner.cache(offset, length)

    def close(self) -> None:
        self.closed = True
        self.inner.close()


class FaultyVolume(VolumeFilter):
    """Fails ``fail_ops`` with ``errno``; see the module docstring for the knobs."""

    def __init__(
        self,
        inner: Volume,
        *,
        fail_ops: Iterable[str] = ("write",),
        errno: int = errno_codes.EIO,
        after: int = 0,
        ranges: Iterable[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(inner)
        self.fail_ops = frozenset(fail_ops)
        if unknown := self.fail_ops - OPS:
            raise ValueError(f"unknown operations {sorted(unknown)}; choose from {sorted(OPS)}")
        self.errno = errno
        self.after = after
        self.ranges = None if ranges is None else list(ranges)
        self.armed = True
        self.passed = 0  # matching calls let through because of ``after``
        self.injected = 0  # failures raised so far

    def _matches(self, op: str, offset: int, length: int) -> bool:
        if not self.armed or op not in self.fail_ops:
            return False
        if self.ranges is None or op == "flush":
            return True
        return any(offset < start + size and start < offset + length for start, size in self.ranges)

    def _gate(self, op: str, offset: int = 0, length: int = 0) -> None:
        if not self._matches(op, offset, length):
            return
        if self.passed < self.after:
            self.passed += 1
            return
        self.injected += 1
        reason = f"injected fault: {os.strerror(self.errno)}"
        raise self._error(op, self.errno, reason, None if op == "flush" else offset, length)

    def read(self, offset: int, length: int) -> bytes | bytearray:
        self._gate("read", offset, length)
        return super().read(offset, length)

    def read_nowait(self, offset: int, length: int) -> bytes | bytearray | None:
        if self._matches("read", offset, length):
            return None
        return super().read_nowait(offset, length)

    def write(self, offset: int, data: Data) -> None:
        self._gate("write", offset, memoryview(data).nbytes)
        super().write(offset, data)

    def write_nowait(self, offset: int, data: Data) -> int:
        if self._matches("write", offset, memoryview(data).nbytes):
            return 0
        return super().write_nowait(offset, data)

    def flush(self) -> None:
        self._gate("flush")
        super().flush()

    def trim(self, offset: int, length: int) -> None:
        self._gate("trim", offset, length)
        super().trim(offset, length)

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        self._gate("write_zeroes", offset, length)
        super().write_zeroes(offset, length, may_trim)

    def cache(self, offset: int, length: int) -> None:
        self._gate("cache", offset, length)
        super().cache(offset, length)
