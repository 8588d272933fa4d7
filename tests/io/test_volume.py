"""FileVolume and open_volume against real files, a real loop device, a real full filesystem
and (where the kernel has device-mapper) a real failing disk."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from volkeeper.errors import VolumeError
from volkeeper.io import volume as volume_module
from volkeeper.io.volume import FileVolume, open_volume

MiB = 1 << 20


def pattern(length: int, seed: int = 1) -> bytes:
    """Deterministic non-zero bytes, different at every offset of a sector."""
    return bytes((i * 7 + seed) % 251 + 1 for i in range(length))


@pytest.fixture
def vol(tmp_path: Path) -> Iterator[FileVolume]:
    with open_volume("v1", str(tmp_path / "v1.img"), size=MiB) as v:
        yield v


def raw(path: str | None, offset: int, length: int) -> bytes:
    assert path is not None
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _unsupported(fd: int, mode: int, offset: int, length: int) -> None:
    raise OSError(errno.EOPNOTSUPP, "not supported")


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def need_root(tool: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{tool} needs root")
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


# -- creating and opening -------------------------------------------------------------------


def test_missing_file_is_created_sparse_with_parent_dirs(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "v.img"
    with open_volume("v", str(path), size=4 * MiB, sector_size=4096) as v:
        assert (v.size, v.sector_size, v.kind, v.path) == (4 * MiB, 4096, "file", str(path))
        assert v.read(0, 4096) == bytes(4096)
    st = path.stat()
    assert st.st_size == 4 * MiB
    assert st.st_blocks == 0  # sparse


def test_smaller_file_is_extended_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "v.img"
    path.write_bytes(pattern(8192))
    with open_volume("v", str(path), size=MiB) as v:
        assert v.size == MiB
        assert v.read(0, 8192) == pattern(8192)
        assert v.read(8192, 4096) == bytes(4096)
    assert path.stat().st_size == MiB


def test_larger_file_is_never_shrunk(tmp_path: Path) -> None:
    path = tmp_path / "v.img"
    path.write_bytes(pattern(16384))
    with open_volume("v", str(path), size=8192) as v:
        assert v.size == 16384
    assert path.read_bytes() == pattern(16384)


def test_existing_file_without_size_uses_its_own_size(tmp_path: Path) -> None:
    path = tmp_path / "v.img"
    path.write_bytes(bytes(12288))
    with open_volume("v", str(path), sector_size=4096) as v:
        assert v.size == 12288


def test_missing_file_without_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nope.img"
    with pytest.raises(VolumeError) as info:
        open_volume("data1", str(path))
    assert info.value.errno == errno.ENOENT
    assert "data1" in str(info.value)
    assert "does not exist" in str(info.value)
    assert "size =" in str(info.value)
    assert not path.exists()


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VolumeError) as info:
        open_volume("v", str(tmp_path), size=MiB)
    assert info.value.errno == errno.EISDIR


def test_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    with pytest.raises(VolumeError) as info:
        open_volume("v", str(path))
    assert info.value.errno == errno.EINVAL
    assert "neither a regular file nor a block device" in str(info.value)


@pytest.mark.parametrize(("size", "sector_size"), [(1000, 512), (6144, 4096), (0, 512)])
def test_size_not_a_multiple_of_the_sector_size_is_refused(
    tmp_path: Path, size: int, sector_size: int
) -> None:
    path = tmp_path / "v.img"
    with pytest.raises(VolumeError) as info:
        open_volume("v", str(path), size=size, sector_size=sector_size)
    assert info.value.errno == errno.EINVAL
    assert f"sector size {sector_size}" in str(info.value)
    assert not path.exists()


def test_existing_file_of_odd_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v.img"
    path.write_bytes(bytes(1000))
    with pytest.raises(VolumeError) as info:
        open_volume("v", str(path))
    assert info.value.errno == errno.EINVAL
    assert "1000 bytes" in str(info.value)


def test_sector_size_other_than_512_or_4096_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VolumeError) as info:
        open_volume("v", str(tmp_path / "v.img"), size=MiB, sector_size=1024)
    assert info.value.errno == errno.EINVAL


def test_read_only_volume(tmp_path: Path) -> None:
    path = tmp_path / "v.img"
    path.write_bytes(pattern(8192))
    with open_volume("v", str(path), read_only=True) as v:
        assert v.read_only
        assert v.read(0, 8192) == pattern(8192)
        for call in (
            lambda: v.write(0, b"x"),
            lambda: v.trim(0, 512),
            lambda: v.write_nowait(0, b"x"),
        ):
            with pytest.raises(VolumeError) as info:
                call()
            assert info.value.errno == errno.EPERM
    assert path.read_bytes() == pattern(8192)
    with pytest.raises(VolumeError) as grow:
        open_volume("v", str(path), size=MiB, read_only=True)
    assert grow.value.errno == errno.EPERM
    with pytest.raises(VolumeError) as create:
        open_volume("v", str(tmp_path / "new.img"), size=MiB, read_only=True)
    assert create.value.errno == errno.ENOENT


# -- reading and writing --------------------------------------------------------------------


@pytest.mark.parametrize("sector_size", [512, 4096])
@pytest.mark.parametrize("offset", [0, 1, 511, 512, 4095, 4097, 65536 + 3])
def test_round_trip_at_any_offset(tmp_path: Path, sector_size: int, offset: int) -> None:
    path = str(tmp_path / "v.img")
    data = pattern(10_000, seed=offset)
    with open_volume("v", path, size=MiB, sector_size=sector_size) as v:
        v.write(offset, data)
        assert v.read(offset, len(data)) == data
        if offset:
            assert v.read(offset - 1, 1) == b"\0"
        assert v.read(offset + len(data), 7) == bytes(7)
        v.flush()
    assert raw(path, offset, len(data)) == data
    with open_volume("v", path, sector_size=sector_size) as again:
        assert again.read(offset, len(data)) == data


def test_write_accepts_memoryview_and_bytearray(vol: FileVolume) -> None:
    vol.write(100, memoryview(pattern(300))[50:250])
    vol.write(1000, bytearray(b"abc"))
    assert vol.read(100, 200) == pattern(300)[50:250]
    assert vol.read(1000, 3) == b"abc"


def test_short_writes_and_reads_are_completed(
    vol: FileVolume, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pwrite, real_preadv = os.pwrite, os.preadv
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: real_pwrite(fd, data[:100], off))
    monkeypatch.setattr(
        os, "preadv", lambda fd, bufs, off, *flags: real_preadv(fd, [bufs[0][:99]], off, *flags)
    )
    vol.write(5, pattern(1000))
    assert vol.read(5, 1000) == pattern(1000)


@pytest.mark.parametrize(("offset", "length"), [(MiB, 1), (MiB - 10, 11), (2 * MiB, 512), (-1, 10)])
def test_writes_outside_the_volume_are_refused_and_change_nothing(
    vol: FileVolume, offset: int, length: int
) -> None:
    expected = errno.EINVAL if offset < 0 else errno.ENOSPC
    for call in (
        lambda: vol.write(offset, b"x" * length),
        lambda: vol.write_nowait(offset, b"x" * length),
        lambda: vol.trim(offset, length),
        lambda: vol.write_zeroes(offset, length, may_trim=False),
    ):
        with pytest.raises(VolumeError) as info:
            call()
        assert info.value.errno == expected
    assert os.stat(str(vol.path)).st_size == MiB
    assert vol.read(MiB - 10, 10) == bytes(10)


def test_reads_outside_the_volume_are_einval(vol: FileVolume) -> None:
    for call in (
        lambda: vol.read(MiB - 1, 2),
        lambda: vol.read_nowait(MiB, 1),
        lambda: vol.cache(MiB, 4096),
    ):
        with pytest.raises(VolumeError) as info:
            call()
        assert info.value.errno == errno.EINVAL


def test_zero_length_requests_at_the_end_are_fine(vol: FileVolume) -> None:
    assert vol.read(MiB, 0) == b""
    vol.write(MiB, b"")
    vol.trim(MiB, 0)


def test_flush_and_cache_work(vol: FileVolume) -> None:
    vol.write(0, pattern(4096))
    vol.flush()
    vol.cache(0, MiB)
    assert vol.read(0, 4096) == pattern(4096)


def test_close_is_idempotent_and_later_calls_raise_volume_error(vol: FileVolume) -> None:
    vol.close()
    vol.close()
    for call in (vol.flush, lambda: vol.read(0, 1), lambda: vol.write(0, b"x")):
        with pytest.raises(VolumeError) as info:
            call()
        assert info.value.errno == errno.EBADF
    with pytest.raises(VolumeError) as msg:
        vol.read(4096, 512)
    assert "'v1'" in str(msg.value) and "read at offset 4096 length 512" in str(msg.value)
    assert "the volume is closed" in str(msg.value)


# -- the non-blocking calls -----------------------------------------------------------------


def nowait_supported(path: str, write: bool) -> bool:
    """What the kernel says, asked directly, about RWF_NOWAIT on this file's filesystem."""
    fd = os.open(path, os.O_RDWR)
    try:
        if write:
            os.pwritev(fd, [b"\0"], 0, os.RWF_NOWAIT)
        else:
            os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
        return True
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return False
        raise
    finally:
        os.close(fd)


def test_read_nowait_returns_cached_data(vol: FileVolume) -> None:
    data = pattern(8192)
    vol.write(4096, data)  # now in the page cache
    got = vol.read_nowait(4096, len(data))
    if nowait_supported(str(vol.path), write=False):
        assert got == data
    else:
        assert got is None


def test_write_nowait_writes_what_it_reports(vol: FileVolume) -> None:
    data = pattern(4096)
    done = vol.write_nowait(512, data)
    if nowait_supported(str(vol.path), write=True):
        assert 0 < done <= len(data)
    else:
        assert done == 0
    vol.write(512 + done, memoryview(data)[done:])
    assert vol.read(512, len(data)) == data


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.EINVAL])
def test_unsupported_nowait_is_remembered(
    vol: FileVolume, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    calls: list[str] = []

    def refuse(*args: object) -> int:
        calls.append("call")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "pwritev", refuse)
    monkeypatch.setattr(os, "preadv", refuse)
    assert [vol.write_nowait(0, b"abc") for _ in range(3)] == [0, 0, 0]
    assert [vol.read_nowait(0, 3) for _ in range(3)] == [None, None, None]
    assert len(calls) == 2


def test_eagain_is_not_remembered_and_real_errors_raise(
    vol: FileVolume, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = [errno.EAGAIN, errno.EAGAIN, errno.EIO]

    def answer(*args: object) -> int:
        code = answers.pop(0)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "pwritev", answer)
    assert vol.write_nowait(0, b"abc") == 0
    assert vol.write_nowait(0, b"abc") == 0
    with pytest.raises(VolumeError) as info:
        vol.write_nowait(0, b"abc")
    assert info.value.errno == errno.EIO


def test_short_nowait_read_returns_none(vol: FileVolume, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off, flags: len(bufs[0]) - 1)
    assert vol.read_nowait(0, 4096) is None


# -- trim and write_zeroes ------------------------------------------------------------------

ZEROERS: dict[str, Callable[[FileVolume, int, int], None]] = {
    "trim": lambda v, o, n: v.trim(o, n),
    "zeroes_may_trim": lambda v, o, n: v.write_zeroes(o, n, may_trim=True),
    "zeroes_keep": lambda v, o, n: v.write_zeroes(o, n, may_trim=False),
}


def check_zeroed(v: FileVolume, start: int, end: int, total: int) -> None:
    """[start, end) reads as zeros and the rest of [0, total) still holds the pattern."""
    data = pattern(total)
    got = v.read(0, total)
    assert got[:start] == data[:start]
    assert got[start:end] == bytes(end - start)
    assert got[end:] == data[end:]


@pytest.mark.parametrize("how", sorted(ZEROERS))
@pytest.mark.parametrize(("start", "end"), [(0, 65536), (1000, 50_001), (4096, 3 * MiB // 4)])
def test_zeroing_reads_back_as_zeros(vol: FileVolume, how: str, start: int, end: int) -> None:
    vol.write(0, pattern(MiB))
    ZEROERS[how](vol, start, end - start)
    check_zeroed(vol, start, end, MiB)
    vol.flush()
    assert raw(vol.path, start, end - start) == bytes(end - start)


def allocated(v: FileVolume) -> int:
    return os.stat(str(v.path)).st_blocks * 512


def test_write_zeroes_keeps_blocks_and_trim_frees_them(vol: FileVolume) -> None:
    vol.write(0, pattern(MiB))
    vol.flush()
    assert allocated(vol) >= MiB
    vol.write_zeroes(0, MiB, may_trim=False)
    assert allocated(vol) >= MiB
    assert vol.read(0, MiB) == bytes(MiB)
    vol.write(0, pattern(MiB))
    vol.trim(0, MiB)
    assert allocated(vol) < MiB // 4
    vol.write(0, pattern(MiB))
    vol.write_zeroes(0, MiB, may_trim=True)
    assert allocated(vol) < MiB // 4


@pytest.mark.parametrize("how", sorted(ZEROERS))
def test_unsupported_fallocate_falls_back_to_writing_zeros_once(
    vol: FileVolume, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    modes: list[int] = []
    writes: list[int] = []
    real_pwrite = os.pwrite

    def no_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        raise OSError(errno.EOPNOTSUPP, "not supported")

    def counting_pwrite(fd: int, data: memoryview, offset: int) -> int:
        writes.append(len(data))
        return real_pwrite(fd, data, offset)

    vol.write(0, pattern(MiB))
    monkeypatch.setattr(volume_module, "_fallocate", no_fallocate)
    monkeypatch.setattr(os, "pwrite", counting_pwrite)
    ZEROERS[how](vol, 10, MiB - 20)
    ZEROERS[how](vol, 0, 10)
    check_zeroed(vol, 0, MiB - 10, MiB)
    assert len(modes) == 1
    assert max(writes) <= volume_module.ZERO_CHUNK
    assert sum(writes) == MiB - 10


def test_fallocate_io_error_is_reported_not_papered_over(
    vol: FileVolume, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(volume_module, "_fallocate", broken)
    with pytest.raises(VolumeError) as info:
        vol.trim(4096, 8192)
    assert info.value.errno == errno.EIO
    assert "'v1'" in str(info.value) and "trim at offset 4096 length 8192" in str(info.value)
    assert os.strerror(errno.EIO) in str(info.value)


def test_zero_chunks_are_at_most_one_mib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real_pwrite = os.pwrite
    with open_volume("v", str(tmp_path / "v.img"), size=3 * MiB + 4096) as v:
        monkeypatch.setattr(volume_module, "_fallocate", _unsupported)
        monkeypatch.setattr(
            os, "pwrite", lambda fd, d, o: sizes.append(len(d)) or real_pwrite(fd, d, o)
        )
        v.write_zeroes(100, 3 * MiB, may_trim=False)
    assert sizes == [MiB, MiB, MiB]


# -- a real block device (loop) -------------------------------------------------------------


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    need_root("losetup")
    backing = tmp_path / f"loop-{os.getpid()}.img"
    with open(backing, "wb") as f:
        f.truncate(8 * MiB)
    attach = run("losetup", "--find", "--show", "--sector-size", "4096", str(backing))
    if attach.returncode != 0:
        pytest.skip(f"losetup cannot attach a loop device: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    try:
        yield device
    finally:
        run("losetup", "--detach", device)


def test_block_device_size_and_sector_size_are_detected(loop_device: str) -> None:
    with open_volume("blk", loop_device, sector_size=4096) as v:
        assert (v.kind, v.size, v.sector_size) == ("block", 8 * MiB, 4096)
    with pytest.raises(VolumeError) as small_sectors:
        open_volume("blk", loop_device, sector_size=512)
    assert small_sectors.value.errno == errno.EINVAL
    assert "4096" in str(small_sectors.value) and "512" in str(small_sectors.value)
    with pytest.raises(VolumeError) as too_big:
        open_volume("blk", loop_device, sector_size=4096, size=16 * MiB)
    assert too_big.value.errno == errno.ENOSPC


@pytest.mark.parametrize("fallback", ["fallocate", "blkzeroout", "write"])
@pytest.mark.parametrize("how", sorted(ZEROERS))
def test_block_device_round_trip_and_zeroing(
    loop_device: str, monkeypatch: pytest.MonkeyPatch, fallback: str, how: str
) -> None:
    zeroouts: list[bytes] = []
    real_ioctl = fcntl.ioctl

    def ioctl(fd: int, request: int, arg: bytes) -> object:
        if request != volume_module.BLKZEROOUT:
            return real_ioctl(fd, request, arg)
        zeroouts.append(arg)
        if fallback == "write":
            raise OSError(errno.ENOTTY, "not supported")
        return real_ioctl(fd, request, arg)

    monkeypatch.setattr(fcntl, "ioctl", ioctl)
    if fallback != "fallocate":
        monkeypatch.setattr(volume_module, "_fallocate", _unsupported)
    with open_volume("blk", loop_device, sector_size=4096) as v:
        v.write(0, pattern(MiB))
        ZEROERS[how](v, 1000, 200_000)  # unaligned to 4096 at both ends
        v.flush()
        check_zeroed(v, 1000, 201_000, MiB)
        with open(loop_device, "rb") as f:  # not through our fd: what the device holds
            assert f.read(MiB) == v.read(0, MiB)
    # the fast calls saw only the aligned middle, [4096, 200704)
    expected = [] if fallback == "fallocate" else [struct.pack("=QQ", 4096, 196608)]
    assert zeroouts == expected


# -- a real full filesystem -----------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    need_root("mount")
    mnt = tmp_path / f"tmpfs-{os.getpid()}"
    mnt.mkdir()
    mounted = run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        run("umount", str(mnt))


def test_full_filesystem_gives_enospc(tiny_tmpfs: Path) -> None:
    chunk = pattern(64 * 1024)
    with open_volume("full", str(tiny_tmpfs / "v.img"), size=4 * MiB) as v:
        with pytest.raises(VolumeError) as info:
            for offset in range(0, v.size, len(chunk)):
                v.write(offset, chunk)
        assert info.value.errno == errno.ENOSPC
        assert offset < 2 * MiB
        assert "'full'" in str(info.value) and "write at offset" in str(info.value)
        assert os.strerror(errno.ENOSPC) in str(info.value)


# -- a real failing disk (device-mapper "error" target) -------------------------------------


@pytest.fixture
def error_device() -> Iterator[str]:
    need_root("dmsetup")
    with open("/proc/misc") as misc:
        if "device-mapper" not in misc.read():
            pytest.skip("the kernel has no device-mapper driver (no device-mapper in /proc/misc)")
    name = f"volkeeper-test-error-{os.getpid()}"
    created = run("dmsetup", "create", name, "--table", "0 2048 error")
    if created.returncode != 0:
        pytest.skip(f"dmsetup cannot create an error target: {created.stderr.strip()}")
    try:
        run("dmsetup", "mknodes", name)
        yield f"/dev/mapper/{name}"
    finally:
        run("dmsetup", "remove", "--retry", name)


def test_failing_disk_gives_eio(error_device: str) -> None:
    with open_volume("bad", error_device) as v:
        assert (v.kind, v.size) == ("block", 2048 * 512)
        with pytest.raises(VolumeError) as read_error:
            v.read(0, 4096)
        assert read_error.value.errno == errno.EIO
        with pytest.raises(VolumeError) as write_error:
            v.write(0, pattern(4096))  # may land in the page cache ...
            v.flush()  # ... but then cannot reach the disk
        assert write_error.value.errno == errno.EIO
