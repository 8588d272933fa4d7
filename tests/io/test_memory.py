"""MemoryVolume: behaves like a FileVolume, minus the disk."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volkeeper.errors import VolumeError
from volkeeper.io.memory import MemoryVolume
from volkeeper.io.volume import Volume, open_volume

SIZE = 64 * 1024


def test_starts_zeroed_and_round_trips_at_unaligned_offsets() -> None:
    v = MemoryVolume("m", SIZE, sector_size=4096)
    assert (v.name, v.path, v.size, v.sector_size, v.kind) == ("m", None, SIZE, 4096, "memory")
    assert v.read(0, SIZE) == bytes(SIZE)
    v.write(4095, b"hello")
    v.write(SIZE - 3, memoryview(b"end"))
    assert v.read(4094, 7) == b"\0hello\0"
    assert v.read(SIZE - 3, 3) == b"end"


def test_nowait_calls_always_complete() -> None:
    v = MemoryVolume("m", SIZE)
    assert v.write_nowait(10, bytearray(b"abc")) == 3
    assert v.read_nowait(10, 3) == b"abc"


@pytest.mark.parametrize("may_trim", [True, False])
def test_trim_and_write_zeroes_read_back_as_zeros(may_trim: bool) -> None:
    v = MemoryVolume("m", SIZE)
    v.write(0, b"\xff" * SIZE)
    v.trim(10, 20)
    v.write_zeroes(100, 50, may_trim=may_trim)
    data = v.read(0, 200)
    assert data == b"\xff" * 10 + bytes(20) + b"\xff" * 70 + bytes(50) + b"\xff" * 50


def test_out_of_range_requests_get_the_nbd_errnos() -> None:
    v = MemoryVolume("m", SIZE)
    cases = [
        (lambda: v.read(SIZE - 1, 2), errno.EINVAL),
        (lambda: v.read_nowait(-1, 1), errno.EINVAL),
        (lambda: v.write(SIZE, b"x"), errno.ENOSPC),
        (lambda: v.write_nowait(SIZE - 1, b"xy"), errno.ENOSPC),
        (lambda: v.trim(0, SIZE + 1), errno.ENOSPC),
        (lambda: v.write_zeroes(SIZE, 1, may_trim=False), errno.ENOSPC),
        (lambda: v.cache(SIZE, 1), errno.EINVAL),
    ]
    for call, code in cases:
        with pytest.raises(VolumeError) as info:
            call()
        assert info.value.errno == code
        assert "'m'" in str(info.value)
    assert v.read(0, SIZE) == bytes(SIZE)


def test_closed_volume_raises_ebadf_and_close_is_idempotent() -> None:
    v = MemoryVolume("m", SIZE)
    v.flush()
    v.cache(0, SIZE)
    v.close()
    v.close()
    for call in (v.flush, lambda: v.read(0, 1), lambda: v.write(0, b"x")):
        with pytest.raises(VolumeError) as info:
            call()
        assert info.value.errno == errno.EBADF


@pytest.mark.parametrize(("size", "sector_size"), [(1000, 512), (4096 + 512, 4096), (0, 512)])
def test_bad_geometry_is_refused(size: int, sector_size: int) -> None:
    with pytest.raises(VolumeError) as info:
        MemoryVolume("m", size, sector_size=sector_size)
    assert info.value.errno == errno.EINVAL


def test_bad_sector_size_is_refused() -> None:
    with pytest.raises(VolumeError):
        MemoryVolume("m", 8192, sector_size=2048)


# Each step is (operation, offset, length, byte); both backends must end up identical.
steps = st.lists(
    st.tuples(
        st.sampled_from(["write", "write_nowait", "trim", "zero", "zero_keep"]),
        st.integers(0, SIZE - 1),
        st.integers(0, 20_000),
        st.integers(1, 255),
    ),
    max_size=25,
)


def apply(v: Volume, op: str, offset: int, length: int, byte: int) -> None:
    length = min(length, SIZE - offset)
    if op == "write":
        v.write(offset, bytes([byte]) * length)
    elif op == "write_nowait":
        data = bytes([byte]) * length
        done = v.write_nowait(offset, data)
        v.write(offset + done, data[done:])
    elif op == "trim":
        v.trim(offset, length)
    else:
        v.write_zeroes(offset, length, may_trim=op == "zero")


@settings(max_examples=60, deadline=None)
@given(steps=steps)
def test_memory_and_file_volumes_agree(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, int, int, int]]
) -> None:
    path = tmp_path_factory.mktemp("agree") / "v.img"
    with open_volume("f", str(path), size=SIZE) as file_volume:
        memory_volume = MemoryVolume("m", SIZE)
        for step in steps:
            apply(file_volume, *step)
            apply(memory_volume, *step)
        assert file_volume.read(0, SIZE) == memory_volume.read(0, SIZE)
    assert Path(path).read_bytes() == memory_volume.read(0, SIZE)
