"""io_uring reads: right data, many at once, errors handed back, nothing left in flight."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from volkeeper.errors import VolumeError
from volkeeper.io import uring
from volkeeper.io.uring import UringReads
from volkeeper.io.volume import open_volume
from volkeeper.io.volume_service import VolumeService
from volkeeper.io.workers import IoWorkers

pytestmark = pytest.mark.timeout(30)
SIZE = 4 << 20


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path / "data1.img"
    path.write_bytes(data)
    return path, data


@pytest.fixture
def ring() -> UringReads:
    made = UringReads.create()
    if made is None:
        pytest.fail("io_uring is unavailable here: this machine kind has it (kernel >= 5.6)")
    return made


def test_reads_come_back_whole_and_right_and_a_full_ring_says_so(
    image: tuple[Path, bytes], ring: UringReads
) -> None:
    path, data = image
    fd = os.open(path, os.O_RDONLY)

    async def scenario() -> dict[int, tuple[int, bytearray | None]]:
        answers: dict[int, tuple[int, bytearray | None]] = {}
        finished = asyncio.Event()
        count = uring.ENTRIES  # all queued in one loop pass
        for n in range(count + 1):
            offset = (n * 7919 * 512) % (SIZE - 8192)

            def done(buffer: bytearray | None, n: int = n, offset: int = offset) -> None:
                answers[n] = (offset, buffer)
                if len(answers) == count:
                    finished.set()

            accepted = ring.read(fd, offset, 4096 + 512 * (n % 4), done)
            assert accepted == (n < count)  # one more than ENTRIES in flight is refused
        assert ring.in_flight == count
        await asyncio.wait_for(finished.wait(), 10)
        return answers

    try:
        answers = asyncio.run(scenario())
    finally:
        ring.close()
        os.close(fd)
    assert len(answers) == uring.ENTRIES
    for offset, buffer in answers.values():
        assert buffer is not None and buffer == data[offset : offset + len(buffer)]
    assert ring.in_flight == 0


def test_a_failed_or_short_read_answers_none(image: tuple[Path, bytes], ring: UringReads) -> None:
    path, _ = image
    write_only = os.open(path, os.O_WRONLY)  # reading it is EBADF
    readable = os.open(path, os.O_RDONLY)

    async def scenario() -> list[bytearray | None]:
        got: list[bytearray | None] = []
        ring.read(write_only, 0, 4096, got.append)
        ring.read(readable, SIZE - 1024, 4096, got.append)  # past the end of the file: short
        ring.settle()  # waits on this thread until both have answered
        return got

    try:
        assert asyncio.run(scenario()) == [None, None]
    finally:
        ring.close()
        os.close(write_only)
        os.close(readable)


def test_without_the_binding_there_is_no_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uring, "liburing", None)
    assert UringReads.create() is None


def test_a_volume_service_reads_through_the_ring_and_falls_back_for_its_errors(
    image: tuple[Path, bytes], ring: UringReads
) -> None:
    path, data = image
    volume = open_volume("data1", str(path), sector_size=512)
    readers = IoWorkers(2, "test-read")
    service = VolumeService(volume, readers, ring=ring)

    async def read(offset: int, length: int) -> tuple[object, BaseException | None]:
        future: asyncio.Future[tuple[object, BaseException | None]] = (
            asyncio.get_running_loop().create_future()
        )

        def done(result: object, error: BaseException | None) -> None:
            future.set_result((result, error))

        service.submit(volume.read, offset, length, mutating=False, on_done=done)
        return await future

    async def scenario() -> None:
        result, error = await read(8192, 65536)
        assert error is None and result == data[8192 : 8192 + 65536]
        pending = asyncio.ensure_future(read(0, 4096))
        await asyncio.sleep(0)
        assert ring.in_flight == 1  # it went to the ring, not to a thread
        assert (await pending)[0] == data[:4096]
        result, error = await read(SIZE - 512, 4096)  # refused: the thread path says why
        assert isinstance(error, VolumeError) and error.errno == errno.EINVAL
        assert "ends past the end of the volume" in str(error)
        service.close()
        ring.close()

    try:
        asyncio.run(scenario())
    finally:
        readers.shutdown()
