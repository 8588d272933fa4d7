"""FaultyVolume: injected failures, where and when they were asked for, and nowhere else."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import pytest

from volkeeper.errors import VolumeError
from volkeeper.io.faults import OPS, FaultyVolume, VolumeFilter
from volkeeper.io.memory import MemoryVolume
from volkeeper.io.volume import Volume, open_volume

SIZE = 64 * 1024


def inner() -> MemoryVolume:
    return MemoryVolume("m", SIZE)


def test_default_fails_writes_with_eio_and_lets_reads_through() -> None:
    base = inner()
    v = FaultyVolume(base)
    assert (v.name, v.size, v.sector_size, v.kind) == ("m", SIZE, 512, "memory")
    with pytest.raises(VolumeError) as info:
        v.write(100, b"abc")
    assert info.value.errno == errno.EIO
    assert "'m'" in str(info.value) and "write at offset 100 length 3" in str(info.value)
    assert "injected" in str(info.value)
    assert base.read(100, 3) == bytes(3)
    assert v.read(100, 3) == bytes(3)
    v.flush()
    assert v.injected == 1


CALLS: dict[str, Callable[[Volume], object]] = {
    "read": lambda v: v.read(0, 1),
    "write": lambda v: v.write(0, b"x"),
    "flush": lambda v: v.flush(),
    "trim": lambda v: v.trim(0, 512),
    "write_zeroes": lambda v: v.write_zeroes(0, 512, may_trim=False),
    "cache": lambda v: v.cache(0, 512),
}


def test_every_operation_is_known() -> None:
    assert set(CALLS) == OPS


@pytest.mark.parametrize("op", sorted(CALLS))
def test_only_the_chosen_operation_fails_with_the_chosen_errno(op: str) -> None:
    v = FaultyVolume(inner(), fail_ops={op}, errno=errno.ENOSPC)
    for name, call in CALLS.items():
        if name != op:
            call(v)
    with pytest.raises(VolumeError) as info:
        CALLS[op](v)
    assert info.value.errno == errno.ENOSPC


def test_after_lets_the_first_calls_succeed() -> None:
    base = inner()
    v = FaultyVolume(base, after=2)
    v.write(0, b"a")
    v.write(1, b"b")
    with pytest.raises(VolumeError):
        v.write(2, b"c")
    with pytest.raises(VolumeError):
        v.write(3, b"d")
    assert base.read(0, 4) == b"ab\0\0"
    assert (v.passed, v.injected) == (2, 2)


def test_ranges_limit_failures_to_overlapping_requests() -> None:
    base = inner()
    v = FaultyVolume(base, fail_ops={"write", "read", "flush"}, ranges=[(4096, 512)])
    v.write(0, b"x" * 4096)  # ends where the range starts
    v.write(4608, b"y")  # starts where the range ends
    assert v.read(4095, 1) == b"x"
    for offset, length in [(4095, 2), (4096, 1), (4607, 1), (0, SIZE)]:
        with pytest.raises(VolumeError):
            v.write(offset, b"z" * length)
        with pytest.raises(VolumeError):
            v.read(offset, length)
    with pytest.raises(VolumeError):
        v.flush()  # a flush covers every range
    assert base.read(4095, 514) == b"x" + bytes(512) + b"y"


def test_faults_can_be_disarmed_and_rearmed() -> None:
    v = FaultyVolume(inner())
    v.armed = False
    v.write(0, b"ok")
    v.armed = True
    with pytest.raises(VolumeError):
        v.write(0, b"no")
    assert v.read(0, 2) == b"ok"


def test_nowait_calls_defer_to_the_failing_blocking_call() -> None:
    base = inner()
    v = FaultyVolume(base, fail_ops={"read", "write"}, ranges=[(0, 512)])
    assert v.write_nowait(0, b"abc") == 0
    assert v.read_nowait(0, 3) is None
    assert base.read(0, 3) == bytes(3)
    assert v.injected == 0
    assert v.write_nowait(1024, b"abc") == 3  # outside the range: straight through
    assert v.read_nowait(1024, 3) == b"abc"


def test_nowait_fallback_counts_once_towards_after() -> None:
    v = FaultyVolume(inner(), after=1)
    for offset in (0, 1):
        if v.write_nowait(offset, b"w") == 0:
            try:
                v.write(offset, b"w")
            except VolumeError:
                break
    assert (v.passed, v.injected) == (1, 1)


def test_unknown_operation_is_refused() -> None:
    with pytest.raises(ValueError, match="wirte"):
        FaultyVolume(inner(), fail_ops={"wirte"})


def test_filters_stack() -> None:
    base = inner()
    v = FaultyVolume(FaultyVolume(base, fail_ops={"read"}), fail_ops={"trim"}, errno=errno.EROFS)
    assert isinstance(v.inner, VolumeFilter)
    v.write(0, b"data")
    with pytest.raises(VolumeError) as read_error:
        v.read(0, 4)
    assert read_error.value.errno == errno.EIO
    with pytest.raises(VolumeError) as trim_error:
        v.trim(0, 4)
    assert trim_error.value.errno == errno.EROFS
    v.close()
    assert v.closed and base.closed


def test_wrapping_a_real_file_leaves_it_untouched(tmp_path: Path) -> None:
    path = tmp_path / "v.img"
    with FaultyVolume(open_volume("f", str(path), size=SIZE), fail_ops={"write_zeroes"}) as v:
        v.write(0, b"\xff" * 1024)
        with pytest.raises(VolumeError) as info:
            v.write_zeroes(0, 1024, may_trim=True)
        assert info.value.errno == errno.EIO
        assert str(path) in str(info.value)
    assert path.read_bytes()[:1024] == b"\xff" * 1024
