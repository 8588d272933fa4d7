"""A FUSE filesystem that loses every write not yet fsync'ed when its "power" goes.

Run it as a process of its own (``python tests/integration/powerloss_fs.py BACKING MOUNT``);
tests drive it with ``PowerLossDisk`` below.

How this works: the mount shows the files of the real directory BACKING.  Namespace and size
changes (create, mkdir, rename, unlink, truncate) reach BACKING at once, but the data of every
``write`` is only held in this process's memory -- the volatile write cache of a disk -- as an
ordered list of pending writes per file (keyed by the backing inode, so a rename keeps them),
plus an overlay of 4 KiB page images so reads see them.  ``fsync``/``fdatasync`` of any
descriptor of a file applies that file's pending writes to BACKING in order; so does a
``truncate`` (before it changes the size).  ``flush`` (close) and ``release`` make nothing
durable.  ``fallocate`` is not implemented: the kernel answers EOPNOTSUPP, and volkeeper's
volume falls back to writing zeros.  The mount uses ``direct_io``, so the kernel's page cache
holds nothing: every read and write reaches this process.

Power loss is whatever kills this process before an fsync: ``kill -9`` leaves BACKING with
only what was fsync'ed.  A command on stdin makes it more adversarial, like a disk that had
written part of its cache when the power went:

    crash SEED FRACTION [torn]
                          apply each pending 4 KiB-aligned piece with probability FRACTION
                          (a seeded choice, in the order written), print a JSON line, exit;
                          with ``torn``, every other piece keeps its first 2 KiB (a disk of
                          512-byte sectors that wrote 4 of a page's 8 when the power went)
    hold                  from now on every fsync waits (a flush that never ends), so
                          whatever is written after stays pending for ``crash``, until
    unhold                lets the held fsyncs go on (a disk that hung for a while)
    slow MS               from now on every read, write and fsync takes MS milliseconds
                          longer (``slow 0``: full speed again)
    sync                  apply everything pending (a clean shutdown), print a JSON line
    stats                 print a JSON line of counters
    fail ERRNO OP... [only=FILE]
                          from now on, every OP (write, fsync, read) of a file (of FILE,
                          a path in the mount, with ``only=``) fails with the errno named
                          ERRNO (EIO, ENOSPC, ...): a failing disk (or bad sectors of one
                          file); a failed write leaves the file as it was
    heal                  stop failing

A write is torn at 4 KiB boundaries of the file (a 4Kn disk's atomic unit), never inside one,
unless ``crash`` is told ``torn``.
The process prints ``{"ready": ...}`` once the kernel has mounted it, logs every fsync to
stderr (with its time, for reading a failed test), and unmounts itself (lazily) if its stdin
closes.  mfusepy (ctypes bindings for libfuse 3) is the FUSE library.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE = 4096


def is_mounted(mountpoint: Path) -> bool:
    """From the mount table: ``os.path.ismount`` says False for a dead FUSE mount (ENOTCONN)."""
    target = str(Path(mountpoint).absolute())
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            where = line.split()[1]
            for escaped, char in (("\\040", " "), ("\\011", "\t"), ("\\134", "\\")):
                where = where.replace(escaped, char)
            if where == target:
                return True
    return False


def lazy_unmount(mountpoint: Path) -> None:
    """Detach a (maybe dead) FUSE mount; a no-op if nothing is mounted there."""
    if not is_mounted(mountpoint):
        return
    if shutil.which("fusermount3"):
        argv = ["fusermount3", "-u", "-z", str(mountpoint)]
    else:
        argv = ["umount", "-l", str(mountpoint)]
    subprocess.run(argv, capture_output=True, timeout=10, check=False)


# -- the filesystem (runs in its own process) ------------------------------------------------


@dataclass
class Pending:
    """The unflushed writes of one backing file."""

    fd: int  # a descriptor of the backing file, to apply them through
    size: int  # the file's size as the mount shows it (pending writes may extend it)
    writes: list[tuple[int, bytes]] = field(default_factory=list)
    pages: dict[int, bytearray] = field(default_factory=dict)  # page -> image (base + writes)
    bytes: int = 0


class PowerLossFs:
    use_ns = True  # mfusepy: times in nanoseconds

    def __init__(self, backing: Path) -> None:
        self.backing = backing
        self.mutex = threading.RLock()
        self.handles: dict[int, tuple[int, int]] = {}  # fh -> (backing fd, inode)
        self.next_fh = 1
        self.pending: dict[int, Pending] = {}  # inode -> unflushed writes
        self.counters = {"writes": 0, "fsyncs": 0, "applied_writes": 0, "failed": 0}
        self.failing: dict[str, int] = {}  # operation -> errno it fails with
        self.failing_file: str | None = None  # only this file's operations fail (None: all)
        self.flowing = threading.Event()  # clear: fsync waits (``hold``) until set again
        self.flowing.set()
        self.delay = 0.0  # seconds added to every read, write and fsync (``slow``)

    def _gate(self, op: str, path: str) -> None:
        if self.delay:
            time.sleep(self.delay)
        code = self.failing.get(op)
        if code is not None and (
            self.failing_file is None or path.lstrip("/") == self.failing_file
        ):
            self.counters["failed"] += 1
            raise OSError(code, os.strerror(code))

    def _real(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    # -- pending writes ------------------------------------------------------------------

    def _base_page(self, fd: int, page: int) -> bytearray:
        data = bytearray(os.pread(fd, PAGE, page * PAGE))
        return data + bytes(PAGE - len(data))

    def _apply(self, inode: int) -> None:
        entry = self.pending.pop(inode, None)
        if entry is None:
            return
        for offset, data in entry.writes:
            os.pwrite(entry.fd, data, offset)
        self.counters["applied_writes"] += len(entry.writes)
        os.close(entry.fd)

    def apply_all(self) -> dict[str, int]:
        with self.mutex:
            count = sum(len(p.writes) for p in self.pending.values())
            size = sum(p.bytes for p in self.pending.values())
            for inode in list(self.pending):
                self._apply(inode)
            return {"applied_writes": count, "applied_bytes": size}

    def crash(self, seed: int, fraction: float, torn: bool = False) -> dict[str, int]:
        """Apply a seeded random subset of pending 4 KiB pieces (and, ``torn``, the first
        half of every other one); the caller exits at once."""
        rng = random.Random(seed)
        pieces = applied = applied_bytes = torn_pieces = 0
        for inode in sorted(self.pending):
            entry = self.pending[inode]
            for offset, data in entry.writes:
                position = offset
                while position < offset + len(data):
                    end = min((position // PAGE + 1) * PAGE, offset + len(data))
                    pieces += 1
                    chunk = data[position - offset : end - offset]
                    if rng.random() < fraction:
                        os.pwrite(entry.fd, chunk, position)
                        applied += 1
                        applied_bytes += len(chunk)
                    elif torn and position % PAGE < PAGE // 2:
                        half = position - position % PAGE + PAGE // 2
                        os.pwrite(entry.fd, chunk[: half - position], position)
                        torn_pieces += 1
                    position = end
        return {
            "pending_writes": sum(len(p.writes) for p in self.pending.values()),
            "pending_pieces": pieces,
            "applied_pieces": applied,
            "applied_bytes": applied_bytes,
            "torn_pieces": torn_pieces,
        }

    def stats(self) -> dict[str, int]:
        with self.mutex:
            return {
                **self.counters,
                "pending_writes": sum(len(p.writes) for p in self.pending.values()),
                "pending_bytes": sum(p.bytes for p in self.pending.values()),
            }

    # -- FUSE operations (mfusepy calls these; an OSError becomes its errno) -----------------

    def init(self, path: str) -> None:
        print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        with self.mutex:
            st = os.lstat(self._real(path))
            attrs = {
                key: getattr(st, key)
                for key in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino")
            }
            attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
            attrs["st_blocks"] = st.st_blocks
            entry = self.pending.get(st.st_ino)
            if entry is not None:
                attrs["st_size"] = entry.size
            return attrs

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", *os.listdir(self._real(path))]

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self._real(path))
        keys = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree")
        return {key: getattr(sv, key) for key in (*keys, "f_favail", "f_namemax")}

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._real(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._real(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._real(path))

    def rename(self, old: str, new: str) -> None:
        os.rename(self._real(old), self._real(new))

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._real(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._real(path), uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        if times is None:
            os.utime(self._real(path))
        else:
            os.utime(self._real(path), ns=times)

    def _open(self, path: str, flags: int, mode: int = 0o600) -> int:
        with self.mutex:
            real = self._real(path)
            if flags & os.O_TRUNC:
                with contextlib.suppress(FileNotFoundError):
                    self._apply(os.stat(real).st_ino)
            keep = os.O_CREAT | os.O_EXCL | os.O_TRUNC
            fd = os.open(real, os.O_RDWR | (flags & keep) | os.O_CLOEXEC, mode)
            fh = self.next_fh
            self.next_fh += 1
            self.handles[fh] = (fd, os.fstat(fd).st_ino)
            return fh

    def open(self, path: str, flags: int) -> int:
        return self._open(path, flags)

    def create(self, path: str, mode: int, flags: int) -> int:
        return self._open(path, flags | os.O_CREAT, mode)

    def release(self, path: str, fh: int) -> None:
        with self.mutex:
            fd, _ = self.handles.pop(fh)
            os.close(fd)

    def flush(self, path: str, fh: int) -> None:
        """close(): not a barrier."""

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self.mutex:
            self._gate("read", path)
            fd, inode = self.handles[fh]
            entry = self.pending.get(inode)
            if entry is None:
                return os.pread(fd, size, offset)
            end = min(offset + size, entry.size)
            if offset >= end:
                return b""
            out = bytearray(os.pread(fd, end - offset, offset))
            out += bytes(end - offset - len(out))
            for page in range(offset // PAGE, (end - 1) // PAGE + 1):
                image = entry.pages.get(page)
                if image is not None:
                    lo, hi = max(offset, page * PAGE), min(end, (page + 1) * PAGE)
                    out[lo - offset : hi - offset] = image[lo - page * PAGE : hi - page * PAGE]
            return bytes(out)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self.mutex:
            self._gate("write", path)
            fd, inode = self.handles[fh]
            entry = self.pending.get(inode)
            if entry is None:
                entry = Pending(os.dup(fd), os.fstat(fd).st_size)
                self.pending[inode] = entry
            entry.writes.append((offset, bytes(data)))
            entry.bytes += len(data)
            end = offset + len(data)
            for page in range(offset // PAGE, (end - 1) // PAGE + 1):
                image = entry.pages.get(page)
                if image is None:
                    image = entry.pages[page] = self._base_page(fd, page)
                lo, hi = max(offset, page * PAGE), min(end, (page + 1) * PAGE)
                image[lo - page * PAGE : hi - page * PAGE] = data[lo - offset : hi - offset]
            entry.size = max(entry.size, end)
            self.counters["writes"] += 1
            return len(data)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        with self.mutex:
            if fh is not None:
                fd, inode = self.handles[fh]
                self._apply(inode)
                os.ftruncate(fd, length)
            else:
                real = self._real(path)
                self._apply(os.stat(real).st_ino)
                os.truncate(real, length)

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        self.flowing.wait()
        with self.mutex:
            self._gate("fsync", path)
            _, inode = self.handles[fh]
            entry = self.pending.get(inode)
            self._apply(inode)
            self.counters["fsyncs"] += 1
            count = len(entry.writes) if entry else 0
            print(f"{time.monotonic():.6f} fsync {path} applied {count} writes", file=sys.stderr)

    def fsyncdir(self, path: str, datasync: int, fh: int) -> None:
        """Namespace changes are applied at once: nothing to do."""

    def access(self, path: str, amode: int) -> None:
        if not os.access(self._real(path), amode):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))


def _control(fs: PowerLossFs, mountpoint: Path) -> None:
    """Read commands from stdin until it closes; then unmount and go."""
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "crash":
            fs.mutex.acquire()  # never released: no FUSE request is served after this
            report = fs.crash(int(words[1]), float(words[2]), words[3:] == ["torn"])
            print(json.dumps({"crashed": True, **report}), flush=True)
            os._exit(0)
        elif words[0] == "sync":
            print(json.dumps({"synced": True, **fs.apply_all()}), flush=True)
        elif words[0] == "stats":
            print(json.dumps(fs.stats()), flush=True)
        elif words[0] == "fail" and len(words) > 2 and hasattr(errno, words[1]):
            ops = [word for word in words[2:] if not word.startswith("only=")]
            only = [word.removeprefix("only=") for word in words[2:] if word.startswith("only=")]
            with fs.mutex:
                fs.failing = {op: getattr(errno, words[1]) for op in ops}
                fs.failing_file = only[0] if only else None
            print(json.dumps({"failing": fs.failing, "only": fs.failing_file}), flush=True)
        elif words[0] == "hold":
            fs.flowing.clear()
            print(json.dumps({"holding": True}), flush=True)
        elif words[0] == "unhold":
            fs.flowing.set()
            print(json.dumps({"holding": False}), flush=True)
        elif words[0] == "slow" and len(words) == 2 and words[1].isdigit():
            fs.delay = int(words[1]) / 1000
            print(json.dumps({"slow_ms": int(words[1])}), flush=True)
        elif words[0] == "heal":
            with fs.mutex:
                fs.failing = {}
            print(json.dumps({"failing": {}}), flush=True)
        else:
            print(json.dumps({"error": f"unknown command {words[0]!r}"}), flush=True)
    lazy_unmount(mountpoint)
    os._exit(1)


def main(argv: list[str]) -> int:
    import mfusepy

    backing, mountpoint = Path(argv[0]).resolve(), Path(argv[1]).resolve()
    fs = PowerLossFs(backing)
    threading.Thread(target=_control, args=(fs, mountpoint), daemon=True).start()
    mfusepy.FUSE(
        fs, str(mountpoint), foreground=True, nothreads=True, direct_io=True, fsname="powerloss"
    )
    return 0


# -- the test side ---------------------------------------------------------------------------


class PowerLossDisk:
    """One mount of ``PowerLossFs``: ``start``, then ``power_loss`` or ``shutdown``."""

    def __init__(self, backing: Path, mountpoint: Path, log: Path) -> None:
        self.backing, self.mountpoint, self.log = backing, mountpoint, log
        backing.mkdir(parents=True, exist_ok=True)
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 15.0) -> None:
        stderr = self.log.open("a")
        self.process = subprocess.Popen(
            [sys.executable, __file__, str(self.backing), str(self.mountpoint)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        stderr.close()
        answer = self._answer(timeout)
        if not answer.get("ready"):
            raise RuntimeError(f"powerloss_fs did not mount {self.mountpoint}: {answer}")
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mountpoint):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.mountpoint} is not a mount point after {timeout}s")
            time.sleep(0.02)

    def _answer(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        stdout, result = self.process.stdout, []
        reader = threading.Thread(target=lambda: result.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not result or not result[0]:
            code = self.process.poll()
            raise RuntimeError(
                f"powerloss_fs gave no answer (exit status {code}):\n{self.log.read_text()}"
            )
        answer: dict[str, Any] = json.loads(result[0])
        return answer

    def command(self, line: str) -> dict[str, Any]:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self._answer()

    def power_loss(
        self, seed: int | None = None, fraction: float = 0.5, torn: bool = False
    ) -> dict[str, Any]:
        """The power goes: kill -9 (``seed`` None), or persist a seeded part of the cache
        (``torn``: and half of each other page) and die.  Users of the mount should be dead
        already (or blocked in a held fsync).  The mount is detached after."""
        assert self.process is not None
        report: dict[str, Any] = {"mode": "kill -9"}
        if seed is None:
            os.kill(self.process.pid, signal.SIGKILL)
        else:
            line = f"crash {seed} {fraction}" + (" torn" if torn else "")
            report = {"mode": line, **self.command(line)}
        self.process.wait(10)
        self._close_pipes()
        self.process = None
        lazy_unmount(self.mountpoint)
        return report

    def shutdown(self) -> dict[str, Any]:
        """Clean: write everything back, then unmount (every user must have closed its files)."""
        if self.process is None:
            lazy_unmount(self.mountpoint)
            return {}
        report = self.command("sync")
        unmount = ["fusermount3", "-u"] if shutil.which("fusermount3") else ["umount"]
        done = subprocess.run(
            [*unmount, str(self.mountpoint)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            lazy_unmount(self.mountpoint)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._close_pipes()
        self.process = None
        return report

    def _close_pipes(self) -> None:
        assert self.process is not None
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def abandon(self) -> None:
        """Teardown after a failure: kill by PID, detach the mount."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process is not None:
            self._close_pipes()
        self.process = None
        lazy_unmount(self.mountpoint)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
