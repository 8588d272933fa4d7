"""The mirror's Sender over a real loopback PeerLink pair: lanes, rates, order, abandon.

How this works: each test builds a connected ``PeerLink`` pair (``PeerServer`` + ``connect``,
as tests/io/test_peer_link.py does) inside one asyncio loop and puts a ``Sender`` on the
client end.  The server end decodes every frame with its own ``PeerLink`` and its ``on_frame``
callback records an ``Arrival`` (loop time, frame type, payload bytes on the wire): what the
target would see, in the order it would see it.  Nothing is mocked: the throttle, the
resync_min / resync_max buckets and the compression threads run for real, so the rates here
are measured from arrival times, over windows of a second or more, with tolerances wide
enough for a loaded 2-core machine -- and narrow enough that a sender without the mechanism
under test (one FIFO, no credit bucket, no ceiling, sending frames as compression finishes)
fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop

from volkeeper.core.addresses import TcpAddress
from volkeeper.core.peer import wire as pw
from volkeeper.daemon.source.sender import INLINE_COMPRESS, Sender, SendSettings
from volkeeper.io.codecs import compressor_for, decompress
from volkeeper.io.peer_link import PeerLink, connect
from volkeeper.io.peer_server import PeerServer
from volkeeper.io.workers import IoWorkers
from volkeeper_lab.launcher import free_tcp_port

pytestmark = pytest.mark.serial  # measures lane rates: runs alone

KiB = 1024
MiB = 1024 * KiB
FRAME = 64 * KiB
RESYNC_KINDS = (pw.ResyncData, pw.ResyncCompressed)
DATA_KINDS = (pw.Write, pw.ResyncData, pw.WriteCompressed, pw.ResyncCompressed)

# -- the receiving end ------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    at: float  # loop time the receiving link decoded it
    frame: pw.Frame
    size: int  # payload bytes on the wire (compressed size for *_Z frames)

    @property
    def kind(self) -> str:
        return type(self.frame).__name__

    @property
    def resync(self) -> bool:
        return isinstance(self.frame, RESYNC_KINDS)

    @property
    def offset(self) -> int | None:
        return self.frame.offset if isinstance(self.frame, DATA_KINDS) else None


def _payload(frame: pw.Frame) -> int:
    if not isinstance(frame, DATA_KINDS):
        return 0
    data = frame.data
    return data.nbytes if isinstance(data, memoryview) else len(data)


@dataclass
class Wire:
    """The target's end of the link: records every frame it decodes."""

    arrivals: list[Arrival] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    def on_frame(self, link: PeerLink, frame: pw.Frame) -> None:
        now = asyncio.get_running_loop().time()
        self.arrivals.append(Arrival(now, frame, _payload(frame)))

    def on_lost(self, link: PeerLink, reason: str) -> None:
        self.lost.append(reason)

    def lane(self, resync: bool) -> list[Arrival]:
        return [a for a in self.arrivals if a.resync == resync and a.offset is not None]

    async def until(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.arrivals) < count:
                await asyncio.sleep(0.005)


@dataclass
class Sent:
    """What ``on_sent`` told the caller: (context, sequence), in call order."""

    calls: list[tuple[Any, int]] = field(default_factory=list)

    def __call__(self, context: Any, sequence: int) -> None:
        self.calls.append((context, sequence))

    @property
    def contexts(self) -> list[Any]:
        return [context for context, _ in self.calls]


@dataclass
class Rig:
    sender: Sender
    link: PeerLink  # the sending end
    wire: Wire
    sent: Sent
    loop: asyncio.AbstractEventLoop

    def now(self) -> float:
        return self.loop.time()


@contextlib.asynccontextmanager
async def rig(settings: SendSettings) -> AsyncIterator[Rig]:
    """A connected loopback pair with a Sender on the client end; all closed afterwards."""
    wire = Wire()
    server = PeerServer(lambda: PeerLink(wire.on_frame, wire.on_lost))
    await server.listen(TcpAddress("127.0.0.1", free_tcp_port()))
    assert server.address is not None
    link = await connect(server.address, lambda link, frame: None, lambda link, why: None)
    pool = IoWorkers(2, "test-sender-z")
    try:
        sender = Sender(link, pool, settings)
        yield Rig(sender, link, wire, Sent(), asyncio.get_running_loop())
    finally:
        if link.is_open:
            link.close("test over")
        await server.close()
        pool.shutdown()


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(30):
            await scenario()

    uvloop.run(bounded())  # the daemon's loop: its timer handles differ from asyncio's


def rate(arrivals: list[Arrival], start: float, stop: float) -> float:
    """Bytes per second of the arrivals in [start, stop]: the bytes after the first one over
    the time from the first to the last (no frame-granularity error at the window's edges)."""
    inside = [a for a in arrivals if start <= a.at <= stop]
    assert len(inside) >= 3, f"only {len(inside)} frames arrived in the window"
    return sum(a.size for a in inside[1:]) / (inside[-1].at - inside[0].at)


class Feeder:
    """Keeps one lane of a sender ``depth`` 64 KiB frames deep (what the resync does with
    ``drained()``, or an application with a deep queue) until ``stop``."""

    def __init__(self, rig: Rig, resync: bool, base: int, depth: int = 4) -> None:
        self.rig, self.resync, self.base, self.depth = rig, resync, base, depth
        self.given = 0
        self.left = 0
        self.data = os.urandom(FRAME)

    def _on_sent(self, context: Any, sequence: int) -> None:
        self.left += 1

    async def run(self, stop: float) -> None:
        kind = pw.ResyncData if self.resync else pw.Write
        while self.rig.now() < stop:
            # at most ``depth`` frames a tick: a lane that nothing holds back cannot spin here
            for _ in range(self.depth - (self.given - self.left)):
                frame = kind(self.base + self.given * FRAME, self.data)
                self.rig.sender.send(frame, FRAME, self._on_sent, self.given, self.resync)
                self.given += 1
            await asyncio.sleep(0.005)


# -- (a) fast path ------------------------------------------------------------------------------


def test_fast_path_sends_at_once_in_order_and_counts_payload() -> None:
    async def scenario() -> None:
        async with rig(SendSettings()) as r:
            payloads = [os.urandom(n) for n in (1, 4096, MiB, 3, 70_000)]
            frames: list[tuple[pw.Frame, int, bool]] = [
                (pw.Write(i * MiB, data), len(data), False) for i, data in enumerate(payloads)
            ]
            frames.insert(2, (pw.Flush(), 0, False))
            frames.append((pw.ResyncData(64 * MiB, payloads[1]), 4096, True))
            frames.append((pw.Ping(9), 0, False))
            for i, (frame, size, resync) in enumerate(frames):
                r.sender.send(frame, size, r.sent, i, resync)
                # the fast path: on the link before send() returns, nothing queued
                assert r.sent.contexts == list(range(i + 1))
                assert r.sender.queued_bytes == 0
            sequences = [sequence for _, sequence in r.sent.calls]
            assert sequences == sorted(set(sequences)), sequences
            assert sequences == list(range(sequences[0], sequences[0] + len(frames)))
            assert r.sender.wire_bytes == sum(size for _, size, _ in frames)
            await r.wire.until(len(frames))
            assert [a.frame for a in r.wire.arrivals] == [f for f, _, _ in frames]

    run(scenario)


# -- (b) two lanes --------------------------------------------------------------------------------


@pytest.mark.parametrize("resync_min", [None, 2 * MiB // 10], ids=["no-resync-min", "tenth"])
def test_application_frames_overtake_queued_resync_frames(resync_min: int | None) -> None:
    """20 resync frames queued, then 20 application frames, under a 2 MiB/s throttle: every
    application frame leaves before the resync frames still queued, except the few that
    resync_min (a tenth of the throttle) lets through meanwhile."""
    throttle = 2 * MiB

    async def scenario() -> None:
        async with rig(SendSettings(throttle=throttle, resync_min=resync_min)) as r:
            data = os.urandom(FRAME)
            for i in range(20):
                r.sender.send(pw.ResyncData(i * FRAME, data), FRAME, r.sent, ("r", i), True)
            for i in range(20):
                r.sender.send(pw.Write(i * FRAME, data), FRAME, r.sent, ("w", i))
            await r.wire.until(40)
            assert r.sender.wire_bytes == 40 * FRAME and r.sender.queued_bytes == 0

        order = "".join("r" if a.resync else "w" for a in r.wire.arrivals)
        first, last = order.index("w"), order.rindex("w")
        early = order[:first].count("r")  # left before the application frames were queued
        between = order[first:last].count("r")
        print(f"arrival order: {order}")
        assert early < 20, order
        app = r.wire.lane(False)
        span = app[-1].at - app[0].at
        if resync_min is None:
            assert between == 0, f"resync frames overtook application frames: {order}"
            assert order == "r" * early + "w" * 20 + "r" * (20 - early), order
        else:
            # the bucket's burst (64 KiB) plus its rate over the span, in frames, plus one
            allowed = int((64 * KiB + resync_min * span) / FRAME) + 2
            assert between <= allowed, (
                f"{between} resync frames among the application frames over {span:.2f} s "
                f"(resync_min {resync_min} B/s allows {allowed}): {order}"
            )
        # the lanes kept their own order
        assert [a.offset for a in app] == [i * FRAME for i in range(20)]
        assert [a.offset for a in r.wire.lane(True)] == [i * FRAME for i in range(20)]
        assert sorted(r.sent.contexts, key=str) == sorted(
            [("r", i) for i in range(20)] + [("w", i) for i in range(20)], key=str
        )

    run(scenario)


# -- (c) resync_min -------------------------------------------------------------------------------


THROTTLE = 2 * MiB
RESYNC_MIN = 512 * KiB


def test_resync_min_holds_under_an_application_load_that_fills_the_throttle() -> None:
    async def scenario() -> None:
        settings = SendSettings(throttle=THROTTLE, resync_min=RESYNC_MIN)
        async with rig(settings) as r:
            start = r.now()
            stop = start + 2.6
            app, resync = Feeder(r, False, 0), Feeder(r, True, 1 << 40)
            await asyncio.gather(app.run(stop), resync.run(stop))
            assert app.given - app.left > 0, "the application lane ran dry: no load"
        window = (start + 0.6, stop)
        resync_rate = rate(r.wire.lane(True), *window)
        app_rate = rate(r.wire.lane(False), *window)
        print(f"resync {resync_rate / KiB:.0f} KiB/s, application {app_rate / KiB:.0f} KiB/s")
        assert 0.75 * RESYNC_MIN <= resync_rate <= 1.25 * RESYNC_MIN, resync_rate
        # the application gets the rest; together they fill the throttle, not more
        assert app_rate >= 0.6 * (THROTTLE - RESYNC_MIN), app_rate
        assert resync_rate + app_rate <= 1.1 * THROTTLE, (resync_rate, app_rate)

    run(scenario)


def test_resync_min_holds_when_the_load_starts_after_the_resync_ran_alone() -> None:
    """The resync has the link to itself for a second (it runs at the throttle's rate), then
    an application load that alone fills the throttle starts: the resync must still get
    resync_min, at once -- not only after the bytes it sent alone, beyond resync_min, have
    been "paid back" (DRBD's c-min-rate looks at the resync's current rate)."""

    async def scenario() -> None:
        settings = SendSettings(throttle=THROTTLE, resync_min=RESYNC_MIN)
        async with rig(settings) as r:
            start = r.now()
            resync = Feeder(r, True, 1 << 40)
            alone = asyncio.ensure_future(resync.run(start + 3.1))
            await asyncio.sleep(1.0)
            loaded = r.now()
            await Feeder(r, False, 0).run(loaded + 2.1)
            await alone
        alone_rate = rate(r.wire.lane(True), start + 0.2, loaded)
        window = (loaded + 0.3, loaded + 2.1)
        under_load = [a for a in r.wire.lane(True) if window[0] <= a.at <= window[1]]
        got = sum(a.size for a in under_load) / (window[1] - window[0])
        print(f"resync alone {alone_rate / KiB:.0f} KiB/s, then under load {got / KiB:.0f} KiB/s")
        assert alone_rate >= 0.8 * THROTTLE, alone_rate
        assert got >= 0.75 * RESYNC_MIN, (
            f"after running alone at {alone_rate / KiB:.0f} KiB/s the resync got "
            f"{got / KiB:.0f} KiB/s under load (resync_min {RESYNC_MIN / KiB:.0f} KiB/s): "
            f"{len(under_load)} frames in {window[1] - window[0]:.1f} s"
        )

    run(scenario)


# -- (d) resync_max -------------------------------------------------------------------------------

RESYNC_MAX = 1 * MiB


def test_resync_max_caps_the_resync_and_does_not_delay_application_frames() -> None:
    async def scenario() -> None:
        async with rig(SendSettings(resync_max=RESYNC_MAX)) as r:
            start = r.now()
            stop = start + 2.5
            resync = Feeder(r, True, 1 << 40)
            feeding = asyncio.ensure_future(resync.run(stop))
            given: dict[int, float] = {}
            data = os.urandom(FRAME)
            i = 0
            while r.now() < stop:  # 64 KiB every 20 ms: about 3 MiB/s of application writes
                given[i * FRAME] = r.now()
                r.sender.send(pw.Write(i * FRAME, data), FRAME)
                i += 1
                await asyncio.sleep(0.02)
            await feeding
            async with asyncio.timeout(5):
                while len(r.wire.lane(False)) < len(given):
                    await asyncio.sleep(0.01)
        resync_rate = rate(r.wire.lane(True), start + 0.5, stop)
        delays = sorted(a.at - given[a.offset] for a in r.wire.lane(False) if a.offset is not None)
        p90 = delays[int(0.9 * len(delays))]
        mean = statistics.fmean(delays)
        print(
            f"resync {resync_rate / KiB:.0f} KiB/s; application delay mean {mean * 1000:.1f} ms, "
            f"p90 {p90 * 1000:.1f} ms, max {delays[-1] * 1000:.1f} ms over {len(delays)} frames"
        )
        assert 0.85 * RESYNC_MAX <= resync_rate <= 1.15 * RESYNC_MAX, resync_rate
        # A resync frame waiting for its bucket (64 ms per frame at 1 MiB/s) must not hold an
        # application frame back: it goes straight through.
        assert mean < 0.025 and p90 < 0.04, (mean, p90, delays[-5:])

    run(scenario)


# -- (e) order within a lane, with compression ---------------------------------------------------


def _block(n: int, i: int) -> bytes:
    """Every third block random (incompressible, sent as it is), the rest compressible."""
    if i % 3 == 2:
        return os.urandom(n)
    return (os.urandom(32) * (n // 32 + 1))[:n]


SIZES = (300, 600, 4096, 200_000, 1000, 20_000, MiB, 700, 16 * KiB, 16 * KiB + 1, 70_000, 2048)


def test_each_lane_keeps_its_order_with_compression_on_two_threads() -> None:
    async def scenario() -> None:
        settings = SendSettings(compressor=compressor_for("zstd:1"))
        async with rig(settings) as r:
            expected: dict[bool, list[tuple[str, int | None]]] = {False: [], True: []}
            blocks: dict[tuple[bool, int], bytes] = {}
            count = 0
            for i in range(72):
                size, resync = SIZES[i % len(SIZES)], i % 4 == 3
                data = _block(size, i)
                offset = i * 2 * MiB
                blocks[(resync, offset)] = data
                kind = pw.ResyncData if resync else pw.Write
                r.sender.send(kind(offset, data), size, r.sent, (resync, offset), resync)
                expected[resync].append(("data", offset))
                count += 1
                if i % 5 == 4:  # control frames keep their place in their lane
                    r.sender.send(pw.Flush(), 0, r.sent, (resync, "flush", i), resync)
                    expected[resync].append(("flush", None))
                    count += 1
                if i % 8 == 0:
                    await asyncio.sleep(0)  # let some compressions finish meanwhile
            await r.wire.until(count)
            assert r.sender.queued_bytes == 0

        arrivals = r.wire.arrivals
        wire_bytes = sum(a.size for a in arrivals)
        assert r.sender.wire_bytes == wire_bytes
        seen: dict[bool, list[tuple[str, int | None]]] = {False: [], True: []}
        lane_of_flush: list[bool] = [key[0] for key in r.sent.contexts if len(key) == 3]
        flushes = iter(lane_of_flush)
        for a in arrivals:
            if isinstance(a.frame, pw.Flush):
                seen[next(flushes)].append(("flush", None))
                continue
            assert a.offset is not None
            seen[a.resync].append(("data", a.offset))
            frame, raw = a.frame, blocks[(a.resync, a.offset)]
            if isinstance(frame, pw.WriteCompressed | pw.ResyncCompressed):
                assert decompress(frame.codec, bytes(frame.data), frame.raw_length) == raw
            else:
                assert isinstance(frame, pw.Write | pw.ResyncData)
                assert bytes(frame.data) == raw
        assert seen[False] == expected[False], "the application lane was reordered"
        assert seen[True] == expected[True], "the resync lane was reordered"
        # on_sent named the sequences in the order the frames went out, per lane in send order
        sequences = [sequence for _, sequence in r.sent.calls]
        assert sequences == sorted(sequences)
        for resync in (False, True):
            mine = [c for c in r.sent.contexts if c[0] is resync and len(c) == 2]
            assert mine == [
                (resync, offset) for kind, offset in expected[resync] if offset is not None
            ]
        # compression really happened, inline and on the threads, in both lanes
        kinds = {
            (a.kind, a.frame.raw_length > INLINE_COMPRESS)
            for a in arrivals
            if isinstance(a.frame, pw.WriteCompressed | pw.ResyncCompressed)
        }
        assert ("WriteCompressed", True) in kinds and ("ResyncCompressed", True) in kinds, kinds
        assert ("WriteCompressed", False) in kinds, kinds
        assert any(a.kind == "Write" and a.size > INLINE_COMPRESS for a in arrivals)  # random

    run(scenario)


# -- (f) abandon ----------------------------------------------------------------------------------


def test_abandon_returns_the_unsent_frames_of_both_lanes() -> None:
    async def scenario() -> None:
        settings = SendSettings(compressor=compressor_for("zstd:1"), throttle=256 * KiB)
        async with rig(settings) as r:
            data = os.urandom(FRAME)
            everything: list[Any] = []
            for i in range(5):
                r.sender.send(pw.ResyncData(i * FRAME, data), FRAME, r.sent, ("r", i), True)
                everything.append(("r", i))
            for i in range(5):
                r.sender.send(pw.Write(i * FRAME, data), FRAME, r.sent, ("w", i))
                everything.append(("w", i))
            r.sender.send(pw.Flush(), 0, r.sent, ("w", "flush"))
            big = bytes(MiB)  # compressible: on a compression thread when the link goes
            r.sender.send(pw.Write(8 * MiB, big), MiB, r.sent, ("w", "big"))
            everything += [("w", "flush"), ("w", "big")]
            await asyncio.sleep(0.05)
            sent_before = list(r.sent.contexts)
            assert 0 < len(sent_before) < 4, sent_before  # the throttle holds the rest

            r.link.close("test: link lost")
            unsent = r.sender.abandon()
            await asyncio.sleep(0.5)  # the throttle's timer and the compression come and go
            assert r.sender.abandon() == []

        assert r.sent.contexts == sent_before, "on_sent was called after the link was lost"
        assert set(unsent).isdisjoint(sent_before), (unsent, sent_before)
        assert sorted(map(str, unsent + sent_before)) == sorted(map(str, everything))
        assert any(c[0] == "r" for c in unsent) and any(c[0] == "w" for c in unsent), unsent
        for lane in ("r", "w"):  # each lane's leftovers in their order
            mine = [c for c in unsent if c[0] == lane]
            assert mine == [c for c in everything if c[0] == lane and c in mine]
        assert r.sender.queued_bytes == 0
        received = [a for a in r.wire.arrivals if a.offset is not None]
        assert len(received) <= len(sent_before)

    run(scenario)
