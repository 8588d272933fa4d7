"""Volume backends: the blocking I/O the NBD server and the replication engine call.

How this works: ``FileVolume`` serves a regular file or a block device through one file
descriptor with positional syscalls, so threads never share a file offset.  Every OSError
leaves as a ``VolumeError`` carrying the errno and naming volume, operation and byte range.
The ``*_nowait`` calls use RWF_NOWAIT so an event loop can serve page-cache hits inline.

Zeroing must leave the range reading back as zeros (replication compares contents).  It tries
the cheapest call that guarantees that: fallocate (punch a hole, or zero the range keeping its
blocks), then BLKZEROOUT on a block device, then writing zeros 1 MiB at a time.  A call that
answers "not supported" is remembered per volume and not tried again, as is RWF_NOWAIT.
The NBD layer validates requests; the range checks here are a last line of defence.
"""

from __future__ import annotations

import abc
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import os
import stat
import struct
from collections.abc import Callable
from types import TracebackType
from typing import Self, TypeVar

from volkeeper.errors import VolumeError

Data = bytes | bytearray | memoryview
T = TypeVar("T")

SECTOR_SIZES = (512, 4096)
ZERO_CHUNK = 1 << 20
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKZEROOUT = 0x127F
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# Answers meaning "this call is not available here", as opposed to a failed I/O.
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS})
_NOWAIT_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.EINVAL})

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _refusal(name: str, text: str, code: int) -> VolumeError:
    return VolumeError(f"volume {name!r}: {text}", code)


def _os_refusal(name: str, doing: str, exc: OSError) -> VolumeError:
    return _refusal(name, f"{doing}: {exc.strerror}", exc.errno or errno.EIO)


class Volume(abc.ABC):
    """A named, fixed-size volume.  Every method may block and raises only ``VolumeError``.

    ``read_nowait`` returns the data only if it can be had without blocking, else None;
    ``write_nowait`` returns how many bytes it wrote without blocking (maybe 0) and the caller
    writes the rest with ``write``.  ``trim`` and ``write_zeroes`` leave the range reading back
    as zeros (``may_trim`` lets the blocks be deallocated).  ``cache`` is a read-ahead hint.
    ``close`` is idempotent.
    """

    def __init__(
        self, name: str, path: str | None, size: int, sector_size: int, kind: str, read_only: bool
    ) -> None:
        self.name = name
        self.path = path
        self.size = size
        self.sector_size = sector_size
        self.kind = kind  # "file", "block" or "memory"
        self.read_only = read_only
        self.closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _error(
        self, op: str, code: int, reason: str, offset: int | None = None, length: int = 0
    ) -> VolumeError:
        where = f" ({self.path})" if self.path else ""
        span = "" if offset is None else f" at offset {offset} length {length}"
        return VolumeError(f"volume {self.name!r}{where}: {op}{span} failed: {reason}", code)

    def _os_error(
        self, op: str, exc: OSError, offset: int | None = None, length: int = 0
    ) -> VolumeError:
        return self._error(op, exc.errno or errno.EIO, exc.strerror or str(exc), offset, length)

    def _check(
        self, op: str, offset: int | None = None, length: int = 0, *, writing: bool = False
    ) -> None:
        if self.closed:
            raise self._error(op, errno.EBADF, "the volume is closed", offset, length)
        if writing and self.read_only:
            raise self._error(op, errno.EPERM, "the volume is read-only", offset, length)
        if offset is None:
            return
        if offset < 0 or length < 0:
            raise self._error(op, errno.EINVAL, "negative offset or length", offset, length)
        if offset + length > self.size:
            code = errno.ENOSPC if writing else errno.EINVAL
            reason = f"the range ends past the end of the volume ({self.size} bytes)"
            raise self._error(op, code, reason, offset, length)

    def readable(self, offset: int, length: int) -> bool:
        """True if ``read(offset, length)`` would not be refused for its range or state."""
        try:
            self._check("read", offset, length)
        except VolumeError:
            return False
        return True

    def read_fd(self) -> int | None:
        """A descriptor whose ``pread`` at a volume offset is this volume's read, for reads
        submitted without a thread (io/uring.py); None where reads must go through ``read``
        (memory volumes, fault-injecting wrappers)."""
        return None

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> bytes | bytearray: ...

    @abc.abstractmethod
    def read_nowait(self, offset: int, length: int) -> bytes | bytearray | None: ...

    @abc.abstractmethod
    def write(self, offset: int, data: Data) -> None: ...

    @abc.abstractmethod
    def write_nowait(self, offset: int, data: Data) -> int: ...

    @property
    def nowait_writes(self) -> bool:
        """False once the kernel said it cannot do non-blocking buffered writes here."""
        return True

    @abc.abstractmethod
    def flush(self) -> None: ...

    @abc.abstractmethod
    def trim(self, offset: int, length: int) -> None: ...

    @abc.abstractmethod
    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None: ...

    @abc.abstractmethod
    def cache(self, offset: int, length: int) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class FileVolume(Volume):
    """A regular file or a block device."""

    def __init__(
        self, name: str, path: str, *, sector_size: int = 512, read_only: bool = False
    ) -> None:
        try:
            _check_kind(name, path, os.stat(path).st_mode)  # before open: no FIFOs, no ttys
            fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            raise _os_refusal(name, f"cannot open {path}", exc) from exc
        try:
            kind, size, granule = _probe(fd, name, path, sector_size)
        except BaseException:
            os.close(fd)
            raise
        super().__init__(name, path, size, sector_size, kind, read_only)
        self._fd = fd
        self._granule = granule  # the alignment fallocate/BLKZEROOUT need (1 for files)
        self._unsupported: set[str] = set()

    def read(self, offset: int, length: int) -> bytearray:
        self._check("read", offset, length)
        buf = bytearray(length)
        view = memoryview(buf)
        done = 0
        while done < length:
            n = self._call(
                "read", offset, length, os.preadv, self._fd, [view[done:]], offset + done
            )
            if n == 0:
                raise self._error("read", errno.EIO, "unexpected end of file", offset, length)
            done += n
        return buf

    def read_fd(self) -> int | None:
        return None if self.closed else self._fd

    def read_nowait(self, offset: int, length: int) -> bytearray | None:
        self._check("read", offset, length)
        buf = bytearray(length)
        call = functools.partial(os.preadv, self._fd, [buf], offset, os.RWF_NOWAIT)
        return buf if self._nowait("read", offset, length, call) == length else None

    def write(self, offset: int, data: Data) -> None:
        view = memoryview(data).cast("B")
        self._check("write", offset, len(view), writing=True)
        self._pwrite_all("write", offset, view)

    def write_nowait(self, offset: int, data: Data) -> int:
        view = memoryview(data).cast("B")
        self._check("write", offset, len(view), writing=True)
        call = functools.partial(os.pwritev, self._fd, [view], offset, os.RWF_NOWAIT)
        return self._nowait("write", offset, len(view), call) or 0

    @property
    def nowait_writes(self) -> bool:
        return "nowait_write" not in self._unsupported

    def flush(self) -> None:
        self._check("flush")
        self._call("flush", None, 0, os.fdatasync, self._fd)

    def trim(self, offset: int, length: int) -> None:
        self._check("trim", offset, length, writing=True)
        self._zero("trim", offset, length, punch=True)

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        self._check("write_zeroes", offset, length, writing=True)
        self._zero("write_zeroes", offset, length, punch=may_trim)

    def cache(self, offset: int, length: int) -> None:
        self._check("cache", offset, length)
        advice = os.POSIX_FADV_WILLNEED
        self._call("cache", offset, length, os.posix_fadvise, self._fd, offset, length, advice)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._call("close", None, 0, os.close, self._fd)

    def _call(
        self, op: str, offset: int | None, length: int, fn: Callable[..., T], *args: object
    ) -> T:
        try:
            return fn(*args)
        except OSError as exc:
            raise self._os_error(op, exc, offset, length) from exc

    def _nowait(self, op: str, offset: int, length: int, call: Callable[[], int]) -> int | None:
        key = f"nowait_{op}"
        if key in self._unsupported:
            return None
        try:
            return call()
        except OSError as exc:
            if exc.errno in _NOWAIT_UNSUPPORTED:
                self._unsupported.add(key)
            elif exc.errno != errno.EAGAIN:
                raise self._os_error(op, exc, offset, length) from exc
            return None

    def _pwrite_all(self, op: str, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            pos, rest = offset + done, len(view) - done
            n = self._call(op, pos, rest, os.pwrite, self._fd, view[done:], pos)
            if n == 0:
                raise self._error(op, errno.EIO, "nothing was written", pos, rest)
            done += n

    def _zero(self, op: str, offset: int, length: int, *, punch: bool) -> None:
        """Zero the range: its aligned middle the fast way, unaligned edges by writing."""
        g, end = self._granule, offset + length
        lo = min(-(-offset // g) * g, end)  # first aligned boundary (or the end)
        hi = max(end // g * g, lo)  # last aligned boundary, not before lo
        self._write_zero_buffers(op, offset, lo - offset)
        if hi > lo:
            self._fast_zero(op, lo, hi - lo, punch)
        self._write_zero_buffers(op, hi, end - hi)

    def _fast_zero(self, op: str, offset: int, length: int, punch: bool) -> None:
        key, mode = ("punch", FALLOC_FL_PUNCH_HOLE) if punch else ("zero", FALLOC_FL_ZERO_RANGE)
        mode |= FALLOC_FL_KEEP_SIZE
        calls: list[tuple[str, Callable[[], object]]] = [
            (key, functools.partial(_fallocate, self._fd, mode, offset, length))
        ]
        if self.kind == "block":
            arg = struct.pack("=QQ", offset, length)
            calls.append(("blkzeroout", functools.partial(fcntl.ioctl, self._fd, BLKZEROOUT, arg)))
        for how, call in calls:
            if how in self._unsupported:
                continue
            try:
                call()
                return
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise self._os_error(op, exc, offset, length) from exc
                self._unsupported.add(how)
        self._write_zero_buffers(op, offset, length)

    def _write_zero_buffers(self, op: str, offset: int, length: int) -> None:
        zeros = memoryview(bytes(min(length, ZERO_CHUNK)))
        for pos in range(offset, offset + length, ZERO_CHUNK):
            self._pwrite_all(op, pos, zeros[: offset + length - pos])


def open_volume(
    name: str,
    path: str,
    *,
    sector_size: int = 512,
    size: int | None = None,
    read_only: bool = False,
) -> FileVolume:
    """Open a volume, first creating it as a sparse file of ``size`` bytes if it is missing.

    A file smaller than ``size`` is extended, never shrunk; a block device must hold at least
    ``size`` bytes.  A read-only volume is never created or extended.
    """
    if size is not None:
        check_geometry(name, size, sector_size, "the configured size")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        _create(name, path, size, read_only)
    except OSError as exc:
        raise _os_refusal(name, f"cannot open {path}", exc) from exc
    else:
        if size is not None and stat.S_ISREG(st.st_mode) and st.st_size < size:
            _extend(name, path, size, st.st_size, read_only)
    volume = FileVolume(name, path, sector_size=sector_size, read_only=read_only)
    if size is not None and volume.size < size:
        volume.close()
        text = f"{path} holds {volume.size} bytes, less than the configured size {size}"
        raise _refusal(name, text, errno.ENOSPC)
    return volume


def _create(name: str, path: str, size: int | None, read_only: bool) -> None:
    if size is None or read_only:
        how = (
            "a read-only volume is never created"
            if read_only
            else ('set size = "..." in its [[volume]] config to create it as a sparse file')
        )
        raise _refusal(name, f"volume file {path} does not exist; {how}", errno.ENOENT)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        _open_sync(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, size)
        _open_sync(parent, os.O_RDONLY | os.O_DIRECTORY)  # make the new entry durable
    except OSError as exc:
        raise _os_refusal(name, f"cannot create {path}", exc) from exc


def _extend(name: str, path: str, size: int, current: int, read_only: bool) -> None:
    if read_only:
        text = f"{path} is {current} bytes, less than the configured size {size}"
        raise _refusal(name, f"{text}, and a read-only volume is never extended", errno.EPERM)
    try:
        _open_sync(path, os.O_WRONLY, size)
    except OSError as exc:
        raise _os_refusal(name, f"cannot extend {path} to {size} bytes", exc) from exc


def _open_sync(path: str, flags: int, size: int | None = None) -> None:
    """Open path, set its size if one is given, fsync it and close it."""
    fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    try:
        if size is not None:
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_geometry(name: str, size: int, sector_size: int, what: str = "the size") -> None:
    """Refuse a sector size other than 512/4096, or a size that is not a multiple of it."""
    if sector_size not in SECTOR_SIZES:
        text = f"sector size {sector_size} is not one of {SECTOR_SIZES}"
        raise _refusal(name, text, errno.EINVAL)
    if size <= 0 or size % sector_size:
        text = f"{what} ({size} bytes) is not a positive multiple of the sector size {sector_size}"
        raise _refusal(name, text, errno.EINVAL)


def _check_kind(name: str, path: str, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise _refusal(name, f"{path} is a directory", errno.EISDIR)
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        text = f"{path} is neither a regular file nor a block device"
        raise _refusal(name, text, errno.EINVAL)


def _probe(fd: int, name: str, path: str, sector_size: int) -> tuple[str, int, int]:
    """Kind, size in bytes and zeroing alignment of an open volume; refuses unusable ones."""
    try:
        st = os.fstat(fd)
        _check_kind(name, path, st.st_mode)
        kind, size, granule = "file", st.st_size, 1
        if stat.S_ISBLK(st.st_mode):
            kind = "block"
            (size,) = struct.unpack("=Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))
            (granule,) = struct.unpack("=i", fcntl.ioctl(fd, BLKSSZGET, bytes(4)))
    except OSError as exc:
        raise _os_refusal(name, f"cannot inspect {path}", exc) from exc
    if granule > sector_size:
        text = (
            f"{path} has a logical sector size of {granule} bytes, larger than the configured "
            f"sector size {sector_size}; set sector_size = {granule}"
        )
        raise _refusal(name, text, errno.EINVAL)
    check_geometry(name, size, sector_size, f"the size of {path}")
    return kind, size, granule
