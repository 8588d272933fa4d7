"""A node's target volumes over real loopback TCP: admission, claims, locks across restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.target_session import MiB, Target, hello, run
from volkeeper.core.peer import wire as pw
from volkeeper.io.memory import MemoryVolume


@pytest.mark.parametrize(
    ("frame", "reason", "words"),
    [
        (hello("nope"), pw.RefuseReason.NO_SUCH_VOLUME, "no volume 'nope'"),
        (hello(sector=4096), pw.RefuseReason.SECTOR_SIZE, "512-byte sectors, the source 4096"),
        (hello(size=64 * MiB), pw.RefuseReason.SIZE, "smaller than the source's"),
    ],
)
def test_refusals_name_the_reason(
    tmp_path: Path, frame: pw.Hello, reason: pw.RefuseReason, words: str
) -> None:
    async def scenario(target: Target) -> None:
        source = await target.source(frame)
        refusal = source.frames[0]
        assert isinstance(refusal, pw.Refuse) and refusal.reason == reason
        assert words in refusal.message
        assert target.services["data1"].lock_reason is None  # nothing claimed

    run(tmp_path, [MemoryVolume("data1", 8 * MiB)], scenario)


def test_a_target_has_one_source_and_one_feed(tmp_path: Path) -> None:
    async def scenario(target: Target) -> None:
        first = await target.source(hello())
        busy = await target.source(hello())
        assert isinstance(busy.frames[0], pw.Refuse)
        assert busy.frames[0].reason == pw.RefuseReason.BUSY
        other = await target.source(hello(job="db", node="gamma"))
        assert isinstance(other.frames[0], pw.Refuse)
        assert other.frames[0].reason == pw.RefuseReason.ALREADY_TARGET
        assert "job 'web' from alpha:data0" in other.frames[0].message
        assert first.link is not None
        first.link.close("bye")

    run(tmp_path, [MemoryVolume("data1", 8 * MiB)], scenario)


def test_locks_survive_a_restart_and_goodbye_deleted_releases(tmp_path: Path) -> None:
    async def claim(target: Target) -> None:
        source = await target.source(hello())
        assert source.link is not None
        source.link.close("bye")

    run(tmp_path, [MemoryVolume("data1", 8 * MiB)], claim)

    async def release(target: Target) -> None:
        assert target.services["data1"].lock_reason is not None  # locked from the record
        source = await target.source(hello())
        assert source.link is not None
        source.link.send(pw.Goodbye(pw.GoodbyeReason.DELETED, "job deleted"))
        async with asyncio.timeout(5):
            while target.services["data1"].lock_reason is not None:
                await asyncio.sleep(0.01)
        assert not (tmp_path / "targets" / "data1.json").exists()

    run(tmp_path, [MemoryVolume("data1", 8 * MiB)], release)
