"""The target end of a mirror's connection over real loopback TCP: handshake, ordered apply.

The harness (``Source``, ``hello``, ``Target``, ``run``) is in tests/support/target_session.py.
"""

from __future__ import annotations

import asyncio
import errno
import json
import threading
from pathlib import Path

import pytest
import structlog

from tests.support.target_session import (
    MiB,
    Source,
    Target,
    hello,
    run,
)
from volkeeper.core.peer import wire as pw
from volkeeper.core.peer.wire import FrameEncoder
from volkeeper.daemon.jobs.job_record import JobRecord, MirrorRecord
from volkeeper.io.faults import FaultyVolume, VolumeFilter
from volkeeper.io.memory import MemoryVolume
from volkeeper.io.peer_link import connect
from volkeeper.io.volume import Data


def test_first_hello_claims_the_volume_and_writes_apply_in_order(tmp_path: Path) -> None:
    volume = MemoryVolume("data1", 8 * MiB)

    async def scenario(target: Target) -> None:
        source = await target.source(hello())
        ok = source.frames[0]
        assert isinstance(ok, pw.HelloOk)
        assert (ok.volume_size, ok.sector_size, ok.data_state) == (
            8 * MiB,
            512,
            pw.DataState.INCONSISTENT,
        )
        assert target.services["data1"].lock_reason is not None
        assert "job 'web' from alpha:data0" in target.services["data1"].lock_reason
        link = source.link
        assert link is not None
        for i in range(50):  # overlapping writes: the last one must win
            link.send(pw.Write(0, bytes([i]) * 4096))
        link.send(pw.ResyncData(MiB, b"r" * 8192))
        link.send(pw.Zero(2 * MiB, 4096))
        link.send(pw.Flush())
        link.send(pw.State(pw.DataState.UP_TO_DATE, 0x1234, 0))
        answers = await source.answers(1 + 54)
        acks = [f for f in answers[1:] if isinstance(f, pw.Ack)]
        assert [a.sequence for a in acks] == list(range(2, 56))
        assert all(a.errno == 0 for a in acks)
        assert [a.durable for a in acks][-2:] == [True, True]  # FLUSH and STATE
        assert volume.read(0, 4096) == bytes([49]) * 4096
        assert volume.read(MiB, 8192) == b"r" * 8192
        record = json.loads((tmp_path / "targets" / "data1.json").read_text())
        assert record["data_state"] == "UP_TO_DATE" and record["current_generation"] == 0x1234
        link.close("done")

    run(tmp_path, [volume], scenario)


def test_a_source_must_start_with_hello(tmp_path: Path) -> None:
    async def scenario(target: Target) -> None:
        source = Source()
        source.link = await connect(target.address, source.on_frame, source.on_lost)
        source.link.send(pw.Write(0, b"x" * 512))
        async with asyncio.timeout(5):
            while not source.lost:
                await asyncio.sleep(0.01)
        assert target.services["data1"].volume.read(0, 512) == bytes(512)

    run(tmp_path, [MemoryVolume("data1", 8 * MiB)], scenario)


def test_a_silent_connection_is_closed_after_the_hello_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("volkeeper.daemon.target.target_session.HELLO_TIMEOUT", 0.2)
    monkeypatch.setattr("volkeeper.io.peer_server.HANDSHAKE_TIMEOUT", 0.2)

    async def scenario(target: Target) -> None:
        silent, stalled, talker = Source(), Source(), Source()
        silent.link = await connect(target.address, silent.on_frame, silent.on_lost)
        stalled.link = await connect(target.address, stalled.on_frame, stalled.on_lost)
        transport = stalled.link._transport
        assert transport is not None
        transport.write(b"".join(FrameEncoder().encode(hello()))[:5])  # and no more
        talker.link = await connect(target.address, talker.on_frame, talker.on_lost)
        talker.link.send(hello())
        await asyncio.sleep(0.6)
        assert silent.lost, "a connection that never sent a byte is still open"
        assert stalled.lost, "a connection that never said HELLO is still open"
        assert not talker.lost and isinstance(talker.frames[0], pw.HelloOk)
        talker.link.close("done")

    run(tmp_path, [MemoryVolume("data1", 8 * MiB)], scenario)


def silences(monkeypatch: pytest.MonkeyPatch, target: Target, peer_timeout: float) -> None:
    """``target`` drops a silent source after ``peer_timeout``, however short (the floor of
    two of a source's longest ping interval, 4 s, scaled down with it)."""
    monkeypatch.setattr("volkeeper.daemon.target.silence.MAX_PING_INTERVAL", 0.1)
    target.targets.peer_timeout = peer_timeout


async def busy(target: Target) -> bool:
    """A second source's HELLO for data1 is refused as BUSY (the first session holds it)."""
    second = await target.source(hello())
    refuse = second.frames[0]
    if isinstance(refuse, pw.HelloOk):
        assert second.link is not None
        second.link.close("done")
        return False
    assert isinstance(refuse, pw.Refuse), refuse
    return refuse.reason == pw.RefuseReason.BUSY


def test_a_source_that_falls_silent_is_dropped_after_peer_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source cut off by a partition, or gone with its host, stops sending and leaves a
    half-open connection: once it has pinged, the target closes it after ``peer_timeout``
    of silence (not before), says so in its log, and the source's next HELLO is admitted
    instead of being refused as BUSY for ever."""

    async def scenario(target: Target) -> None:
        silences(monkeypatch, target, 0.5)
        loop = asyncio.get_running_loop()
        first = await target.source(hello())
        assert isinstance(first.frames[0], pw.HelloOk) and first.link is not None
        with structlog.testing.capture_logs() as logs:
            sent = loop.time()
            first.link.send(pw.Ping(1))  # a mirror's source: it pings
            assert (await first.answers(2))[1] == pw.Pong(1)
            assert await busy(target)  # then nothing more from it: the partition
            async with asyncio.timeout(5):
                while not first.lost:
                    await asyncio.sleep(0.01)
            assert loop.time() - sent >= 0.5, "dropped before peer_timeout"
        (dropped,) = [e for e in logs if e["event"] == "mirror source silent: session dropped"]
        assert (dropped["volume"], dropped["peer_timeout"]) == ("data1", 0.5), dropped
        assert dropped["silent_s"] >= 0.5 and dropped["log_level"] == "warning", dropped
        (view,) = target.targets.views()
        assert view["state"] == "Unknown" and view["source_lost_at"] is not None, view
        assert not await busy(target)  # the source's next HELLO is admitted

    run(tmp_path, [MemoryVolume("data1", 8 * MiB)], scenario)


def test_a_pinging_source_and_one_that_never_pinged_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mirror's source pings all along: kept however long it has nothing else to send.  A
    short session (a claim, a release, a handover) never pings and may wait in silence for
    an answer or for the other targets of a job: kept too."""

    async def scenario(target: Target) -> None:
        silences(monkeypatch, target, 0.3)
        pinging = await target.source(hello())
        assert pinging.link is not None
        for token in range(1, 11):  # 2 s, one PING every 0.2 s
            pinging.link.send(pw.Ping(token))
            await asyncio.sleep(0.2)
        assert not pinging.lost and await busy(target)
        assert len(pinging.frames) == 11  # HELLO_OK and every PONG
        pinging.link.close("done")
        await asyncio.sleep(0.05)

        claiming = await target.source(hello())
        assert claiming.link is not None
        job = JobRecord("web", "alpha", (MirrorRecord("data0", "beta", "data1"),))
        claiming.link.send(pw.Job(job.to_json()))  # a claim: its ACK, then silence
        ack = (await claiming.answers(2))[1]
        assert isinstance(ack, pw.Ack) and ack.errno == 0, ack
        await asyncio.sleep(1.5)
        assert not claiming.lost and await busy(target)
        claiming.link.close("done")

    run(tmp_path, [MemoryVolume("data1", 8 * MiB)], scenario)


def test_a_failed_write_makes_the_copy_inconsistent_until_the_source_says_up_to_date(
    tmp_path: Path,
) -> None:
    """A write the disk refuses is ACKed with its errno; the record goes Inconsistent at once
    (durably), a STATE(UP_TO_DATE) already queued behind the failed write is refused, and the
    volume's last error is shown until a later session ends with UpToDate recorded."""
    memory = MemoryVolume("data1", 8 * MiB)
    volume = FaultyVolume(memory, errno=errno.ENOSPC, ranges=[(MiB, MiB)])
    volume.armed = False

    def record_on_disk() -> str:
        state: str = json.loads((tmp_path / "targets" / "data1.json").read_text())["data_state"]
        return state

    async def scenario(target: Target) -> None:
        source = await target.source(hello())
        link = source.link
        assert link is not None
        link.send(pw.State(pw.DataState.UP_TO_DATE, 0x1234, 0))  # a mirror that was in sync
        await source.answers(2)
        assert record_on_disk() == "UP_TO_DATE"
        volume.armed = True
        link.send(pw.Write(0, b"a" * 4096))
        link.send(pw.Write(MiB, b"b" * 65536))  # ENOSPC
        link.send(pw.Write(2 * MiB, b"c" * 4096))
        link.send(pw.State(pw.DataState.UP_TO_DATE, 0x1234, 0))  # queued behind the failure
        acks = [f for f in (await source.answers(6))[2:] if isinstance(f, pw.Ack)]
        assert [(a.sequence, a.errno) for a in acks] == [
            (3, 0), (4, errno.ENOSPC), (5, 0), (6, errno.EIO)
        ]  # fmt: skip
        volumes = target.targets
        (view,) = volumes.views()
        assert view["data_state"] == "Inconsistent", view
        assert "No space left on device" in view["last_error"], view
        assert view["target_errors"] == 2
        await asyncio.sleep(0.1)  # the downgrade is saved in the volume's FIFO
        assert record_on_disk() == "INCONSISTENT"
        link.close("source saw the error")

        volume.armed = False  # the administrator freed space: the source comes back
        source = await target.source(hello())
        ok = source.frames[0]
        assert isinstance(ok, pw.HelloOk) and ok.data_state == pw.DataState.INCONSISTENT
        link = source.link
        assert link is not None
        link.send(pw.ResyncData(MiB, b"b" * 65536))
        link.send(pw.Flush())
        link.send(pw.State(pw.DataState.UP_TO_DATE, 0x1234, 0))
        acks = [f for f in (await source.answers(4))[1:] if isinstance(f, pw.Ack)]
        assert [a.errno for a in acks] == [0, 0, 0]
        (view,) = volumes.views()
        assert (view["data_state"], view["last_error"]) == ("UpToDate", None), view
        assert record_on_disk() == "UP_TO_DATE"
        assert memory.read(MiB, 65536) == b"b" * 65536
        link.close("done")

    run(tmp_path, [volume], scenario)


class HeldVolume(VolumeFilter):
    """Writes wait for ``gate``: a target disk far slower than its source."""

    def __init__(self, inner: MemoryVolume) -> None:
        super().__init__(inner)
        self.gate = threading.Event()

    def write(self, offset: int, data: Data) -> None:
        self.gate.wait(30)
        super().write(offset, data)


def test_a_source_faster_than_the_disk_meets_back_pressure_not_the_targets_memory(
    tmp_path: Path,
) -> None:
    """Frames taken and not yet written are bounded by ``peer_queued_bytes``: past it the
    target stops reading the link (the source's socket fills), and reads again once the
    disk has caught up to half of it."""
    volume = HeldVolume(MemoryVolume("data1", 64 * MiB))

    async def scenario(target: Target) -> None:
        target.targets.limits.peer_queued_bytes = 8 * MiB
        source = await target.source(hello(size=64 * MiB))
        link = source.link
        assert link is not None
        for n in range(48):  # 48 MiB of FUA writes: each goes to the (held) writer thread
            link.send(pw.Write(n * MiB, bytes([n]) * MiB, fua=True))
        await asyncio.sleep(1.0)
        (session,) = target.targets.sessions.values()
        assert session.holding and 8 * MiB < session.queued <= 10 * MiB, session.queued
        assert target.targets.limits.hits["peer_queued_bytes"] == 1
        volume.gate.set()
        answers = await source.answers(1 + 48, timeout=30)
        assert all(isinstance(a, pw.Ack) and a.errno == 0 for a in answers[1:])
        assert not session.holding and session.queued == 0
        assert volume.read(47 * MiB, 4096) == bytes([47]) * 4096
        link.close("done")

    run(tmp_path, [volume], scenario)
