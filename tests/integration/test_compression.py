"""Compression and throttle on the replication link, with real daemons, NBD clients and files.

What this proves, end to end (the unit tests prove the codecs and the token bucket alone):

* compressed mirrors (zstd, lz4, zlib; sync and async; two jobs) stay byte-identical under fio
  loads with crc32c verify and nbdcopy, and really compress: each source mirror view shows
  ``wire_bytes < sent_bytes`` with ``compression_ratio > 1.5`` (over the whole life and over
  the load alone), the metric ``volkeeper_mirror_wire_bytes_total`` says what the view says,
  and incompressible data goes out as it is (wire bytes grow by the bytes written);
* codec and throttle change live under load (``volkeeper mirror set``) without a state change
  or a reconnection, and each codec takes effect from the next frame on;
* the throttle holds its rate: the initial full resync is throttled, and a 10 s window of
  application writes at 8 MiB/s is within 5 % of it, then 16 MiB/s within 10 % after a live
  change (rates measured from ``wire_bytes`` in ``GET /status`` sampled every 0.5 s);
* a corrupt WRITE_Z from a raw peer (garbage for its codec, or data of another length than
  announced) is answered with an ACK carrying EBADMSG and not applied; the target keeps
  serving; a valid WRITE_Z right after is applied; and a small zstd WRITE_Z whose frame
  header claims far more than its announced raw length must not make the target allocate it.

Nodes come from the ``start_node`` fixture (stopped by PID at teardown, exit 0 required); every
client process started here is stopped by PID.  Data is compared on disk after the daemons
stopped, sources first so the targets get everything.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lz4.block
import pytest
import zstandard

from tests.conftest import NodeFactory, need
from tests.support.metrics import metric, metrics
from tests.support.mirroring import (
    VERIFY,
    MiB,
    fio_argv,
    fio_result,
    ok,
    pair,
    random_file,
    start_fio,
    stop_process,
)
from tests.support.raw_peer import Peer
from tests.support.topologies import (
    Load,
    assert_identical,
    mirror,
    path,
    post,
    stop_in_order,
    trio,
    vk_ok,
    wait_mirror,
)
from tests.support.watch import (
    EventWatch,
    rate_of,
    sample_wire,
)
from volkeeper.core.peer import wire as pw
from volkeeper.io.codecs import compressor_for
from volkeeper_lab.launcher import LocalNode, VolumeSpec, free_tcp_port

KiB = 1 << 10
COMPRESSIBLE = ("--buffer_compress_percentage=70", "--refill_buffers")

# -- helpers ---------------------------------------------------------------------------------


def drained(node: LocalNode, job: str, target: str, timeout: float = 60) -> dict[str, Any]:
    """Mirroring, nothing queued, nothing marked: everything written has reached the target."""
    deadline = time.monotonic() + timeout
    while True:
        view = mirror(node, job, target)
        if (view["state"], view["queue_bytes"], view["out_of_sync_bytes"]) == ("Mirroring", 0, 0):
            return view
        assert time.monotonic() < deadline, (
            f"{job} -> {target} did not drain in {timeout}s: {view}\n"
            f"--- {node.name} log (tail) ---\n{node.log_text()[-3000:]}"
        )
        time.sleep(0.05)


def partly_compressible(file: Path, size: int) -> Path:
    """Per 64 KiB: 16 KiB of random bytes, then 48 KiB of repeated text (~3:1 overall)."""
    text = b"volkeeper replicates blocks; " * 2000
    with file.open("wb") as f:
        for _ in range(size // (64 * KiB)):
            f.write(os.urandom(16 * KiB) + text[: 48 * KiB])
    return file


def run_fios(*jobs: tuple[str, Path, tuple[str, ...]], timeout: float = 120) -> None:
    """fio jobs (uri, cwd, options) side by side; each must finish with no error and verify."""
    started: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    try:
        for uri, cwd, job in jobs:
            cwd.mkdir(parents=True, exist_ok=True)
            process, output = start_fio(uri, cwd, *job)
            started.append((process, output, cwd))
        deadline = time.monotonic() + timeout
        for process, output, cwd in started:
            code = process.wait(max(1.0, deadline - time.monotonic()))
            log = (cwd / "fio.stderr").read_text()
            assert code == 0, f"fio failed ({code}):\n{log}"
            result = fio_result(output)
            assert result["error"] == 0, result
            # every byte written was read back and checked (VERIFY)
            assert result["read"]["io_bytes"] == result["write"]["io_bytes"] > 0, result
    finally:
        for process, _, _ in started:
            stop_process(process)


def ratio(before: dict[str, Any], after: dict[str, Any]) -> float:
    """sent / wire over the stretch between two views of one mirror."""
    sent: int = after["sent_bytes"] - before["sent_bytes"]
    wire: int = after["wire_bytes"] - before["wire_bytes"]
    assert sent > 0 and wire > 0, (before, after)
    return sent / wire


@pytest.fixture
def stoppers() -> Iterator[list[Any]]:
    """Background helpers of a test (fio loops, event watches), stopped before the nodes."""
    started: list[Any] = []
    yield started
    for item in reversed(started):
        if isinstance(item, Load):
            item.abort()
        elif isinstance(item, subprocess.Popen):
            stop_process(item, grace=2)
        else:
            item.stop()


# -- 1. compressed mirrors under load ---------------------------------------------------------


def test_compressed_mirrors_are_byte_identical_under_load(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    need("fio", "nbdcopy")
    alpha, beta, gamma = trio(start_node, alpha=("data1", "data2"), beta=("data1", "data2"))
    web = post(alpha, {
        "name": "web",
        "mirrors": [
            {"source": "alpha:data1", "target": "beta:data1", "mode": "sync",
             "compression": "zstd:3"},
            {"source": "alpha:data1", "target": "gamma:data1", "mode": "async",
             "compression": "lz4"},
        ],
        "confirm": True,
    })  # fmt: skip
    assert web.status_code == 201, web.text
    db = post(alpha, {"name": "db", "source": "alpha:data2", "target": "beta:data2",
                      "mode": "sync", "compression": "zlib:1", "confirm": True})  # fmt: skip
    assert db.status_code == 201, db.text
    mirrors = [("web", "beta:data1"), ("web", "gamma:data1"), ("db", "beta:data2")]
    for job, target in mirrors:
        wait_mirror(alpha, job, target, "Mirroring", timeout=60)
    settings = {(j, t): mirror(alpha, j, t)["compression"] for j, t in mirrors}
    assert settings == {
        ("web", "beta:data1"): "zstd:3",
        ("web", "gamma:data1"): "lz4",
        ("db", "beta:data2"): "zlib:1",
    }, settings
    before = {(j, t): drained(alpha, j, t) for j, t in mirrors}

    # Compressible loads on both volumes at once: random 4 KiB and sequential 1 MiB writes,
    # each read back and checked by fio (crc32c), then a partly compressible file by nbdcopy.
    rand = ("--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=32m", "--io_size=12m")
    seq = ("--rw=write", "--bs=1M", "--iodepth=4", "--size=32m")
    one, two = alpha.uri("data1"), alpha.uri("data2")
    run_fios(
        (one, tmp_path / "fio1", (*rand, *COMPRESSIBLE, *VERIFY)),
        (two, tmp_path / "fio2", (*seq, *COMPRESSIBLE, *VERIFY)),
    )
    run_fios(
        (one, tmp_path / "fio3", (*seq, *COMPRESSIBLE, *VERIFY)),
        (two, tmp_path / "fio4", (*rand, *COMPRESSIBLE, *VERIFY)),
    )
    mixed = partly_compressible(tmp_path / "mixed.bin", 8 * MiB)
    ok("nbdcopy", str(mixed), one)
    ok("nbdcopy", str(mixed), two)
    after = {(j, t): drained(alpha, j, t) for j, t in mirrors}

    for key, view in after.items():
        assert view["wire_bytes"] < view["sent_bytes"], (key, view)
        assert view["compression_ratio"] is not None and view["compression_ratio"] > 1.5, view
        loaded = ratio(before[key], view)
        print(f"{key}: ratio {view['compression_ratio']} overall, {loaded:.2f}:1 under the load")
        assert loaded > 1.5, f"{key}: the load compressed only {loaded:.2f}:1 ({view})"
        assert view["sent_bytes"] - before[key]["sent_bytes"] >= 32 * MiB + 8 * MiB, view

    # The metric says what the view says (read between two views; nothing moves now).
    for job, target in mirrors:
        first = mirror(alpha, job, target)
        text = metrics(alpha)
        last = mirror(alpha, job, target)
        wire = metric(text, "volkeeper_mirror_wire_bytes_total", job=job, target=target)
        sent = metric(text, "volkeeper_mirror_sent_bytes_total", job=job, target=target)
        assert first["wire_bytes"] <= wire <= last["wire_bytes"], (wire, first, last)
        assert first["sent_bytes"] <= sent <= last["sent_bytes"], (sent, first, last)
        assert wire < sent, (job, target, wire, sent)

    # Incompressible data on the zstd (and lz4) mirrors goes out as it is.
    start = {t: mirror(alpha, "web", t) for t in ("beta:data1", "gamma:data1")}
    noise = random_file(tmp_path / "noise.bin", 8 * MiB)
    ok("nbdcopy", str(noise), one)
    for target, was in start.items():
        now = drained(alpha, "web", target)
        sent = now["sent_bytes"] - was["sent_bytes"]
        wire = now["wire_bytes"] - was["wire_bytes"]
        assert 8 * MiB <= sent <= 8 * MiB + 64 * KiB, (target, was, now)
        print(f"incompressible to {target}: {sent} bytes written, {wire} on the wire")
        assert 0.98 * sent <= wire <= sent, f"{target}: {sent} bytes written, {wire} on the wire"

    stop_in_order(alpha, beta, gamma)
    assert_identical(path(alpha), path(beta), path(gamma))
    assert_identical(path(alpha, "data2"), path(beta, "data2"))


# -- 2. live changes under load ---------------------------------------------------------------


@pytest.mark.serial  # measures throttled rates
def test_codec_and_throttle_change_live_under_load(
    start_node: NodeFactory, tmp_path: Path, stoppers: list[Any]
) -> None:
    need("fio")
    alpha, beta = pair(start_node, "32MiB")
    vk_ok(alpha, "job", "create", "web", "--source", "alpha:data1", "--target", "beta:data1",
          "--yes")  # fmt: skip
    wait_mirror(alpha, "web", "beta:data1", "Mirroring", timeout=60)

    watch = EventWatch(alpha, tmp_path / "events.jsonl")
    stoppers.append(watch)
    writes = Load(alpha.uri(), tmp_path / "load", 0, 32 * MiB, rate_iops=1500)
    writes.job = (*writes.job, *COMPRESSIBLE)  # type: ignore[assignment]
    stoppers.append(writes)
    writes.start()
    writes.wait_running()

    steps = [
        (("--compression", "zstd:1"), "compression zstd:1, throttle none"),
        (("--compression", "lz4"), "compression lz4, throttle none"),
        (("--compression", "none"), "compression none, throttle none"),
        (("--throttle", "20MiB"), "compression none, throttle 20.0 MiB/s"),
        (("--throttle", "none"), "compression none, throttle none"),
    ]
    ratios: dict[str, float] = {}
    for option, shown in steps:
        out = vk_ok(alpha, "mirror", "set", "web", *option)
        assert shown in out, out
        time.sleep(0.2)  # frames compressed under the old setting are gone by now
        was = mirror(alpha, "web", "beta:data1")
        time.sleep(1.0)
        now = mirror(alpha, "web", "beta:data1")
        assert not writes.errors, writes.errors
        ratios[" ".join(option)] = ratio(was, now)
        assert now["state"] == "Mirroring", now
    writes.wait_running(writes.runs + 1)
    writes.finish()
    time.sleep(0.3)
    watch.stop()

    print(f"ratios per phase: {ratios}")
    # The codecs took effect live: compressed under zstd and lz4, as it is under none.
    assert ratios["--compression zstd:1"] > 1.5, ratios
    assert ratios["--compression lz4"] > 1.5, ratios
    assert ratios["--compression none"] == 1.0, ratios
    events = watch.of_mirror("web", "beta:data1")
    states = [e for e in events if "state" in e]
    assert states == [], f"the mirror changed state during the changes: {states}"
    settings = [(e["type"], e["compression"], e["throttle"]) for e in events]
    assert settings == [
        ("change", "zstd:1", None),
        ("change", "lz4", None),
        ("change", "none", None),
        ("change", "none", 20 * MiB),
        ("change", "none", None),
    ], events
    assert [e for e in watch.events() if e["object"] not in ("mirror", "node")] == []

    view = drained(alpha, "web", "beta:data1")
    assert (view["compression"], view["throttle"], view["mode"]) == ("none", None, "sync"), view
    target = mirror(beta, "web", "beta:data1")
    assert target["state"] == "Mirroring" and target["data_state"] == "UpToDate", target
    stop_in_order(alpha, beta)
    assert_identical(path(alpha), path(beta))


# -- 3. throttle accuracy ---------------------------------------------------------------------

RATE = 8 * MiB


@pytest.mark.serial  # measures throttled rates
def test_throttle_holds_its_rate_for_resync_and_writes(
    start_node: NodeFactory, tmp_path: Path, stoppers: list[Any]
) -> None:
    need("fio")
    alpha, beta = pair(start_node, "128MiB")
    size = 128 * MiB
    body = {"name": "web", "source": "alpha:data1", "target": "beta:data1", "mode": "async",
            "queue_limit": "256MiB", "throttle": "8MiB", "confirm": True}  # fmt: skip

    # The initial full resync is throttled too.
    created_at = time.monotonic()
    created = post(alpha, body)
    assert created.status_code == 201, created.text
    resync: list[tuple[float, int]] = []
    with alpha.api() as api:
        while True:
            (view,) = api.get("/status").json()["mirrors"]
            now = time.monotonic()
            if view["state"] == "Mirroring":
                break
            resync.append((now, view["wire_bytes"]))
            assert now - created_at < 60, f"no Mirroring after 60 s: {view}"
            time.sleep(0.5)
    took = time.monotonic() - created_at
    assert view["throttle"] == RATE and view["sent_bytes"] >= size, view
    assert took >= 0.9 * size / RATE, f"a 128 MiB resync at 8 MiB/s took only {took:.1f}s"
    middle = [(t, w) for t, w in resync if created_at + 2 <= t <= created_at + took - 2]
    resync_rate = rate_of(middle)
    assert abs(resync_rate / RATE - 1) <= 0.10, f"resync at {resync_rate / MiB:.2f} MiB/s"

    # Incompressible writes at 20 MiB/s (> 8 and > 16): the sender always has a backlog.
    load = tmp_path / "load"
    load.mkdir()
    argv = fio_argv(alpha.uri(), load / "fio.json", "--rw=write", "--bs=256k", "--iodepth=4",
                    "--size=128m", "--rate=20m", "--time_based", "--runtime=60",
                    "--refill_buffers")  # fmt: skip
    with (load / "fio.stderr").open("wb") as log:
        writer = subprocess.Popen(argv, cwd=load, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    stoppers.append(writer)
    time.sleep(2.0)
    assert writer.poll() is None, (load / "fio.stderr").read_text()
    eight = rate_of(sample_wire(alpha, 10.0))
    out = vk_ok(alpha, "mirror", "set", "web", "--throttle", "16MiB")
    assert "throttle 16.0 MiB/s" in out, out
    time.sleep(0.5)
    sixteen = rate_of(sample_wire(alpha, 5.0))
    backlog = mirror(alpha, "web", "beta:data1")
    assert writer.poll() is None, (load / "fio.stderr").read_text()
    stop_process(writer)
    print(f"resync: {took:.1f} s, {resync_rate / MiB:.3f} MiB/s")
    rates = f"8 MiB/s window: {eight / MiB:.3f} MiB/s, 16 MiB/s window: {sixteen / MiB:.3f} MiB/s"
    print(rates)
    assert abs(eight / RATE - 1) <= 0.05, rates
    assert abs(sixteen / (2 * RATE) - 1) <= 0.10, rates
    assert backlog["queue_bytes"] > 0, f"no backlog: the load did not outrun the throttle {backlog}"

    vk_ok(alpha, "mirror", "set", "web", "--throttle", "none")
    view = drained(alpha, "web", "beta:data1", timeout=60)
    assert view["throttle"] is None, view
    stop_in_order(alpha, beta)
    assert_identical(path(alpha), path(beta))


# -- 4. a corrupt WRITE_Z from a raw peer -----------------------------------------------------

VOLUME = 4 * MiB


def hello(volume: str, job: str) -> pw.Hello:
    return pw.Hello(node="rawpeer", volume=volume, job=job, source_volume="src",
                    volume_size=VOLUME, sector_size=512, current_generation=0,
                    previous_generation=0)  # fmt: skip


@contextlib.contextmanager
def session(node: LocalNode, volume: str, job: str) -> Iterator[Peer]:
    """An admitted raw session; retries while the node still reaps an earlier one (BUSY)."""
    deadline = time.monotonic() + 10
    while True:
        peer = Peer(node.peer_port)
        peer.send(hello(volume, job))
        answer = peer.recv_frame()
        if isinstance(answer, pw.HelloOk):
            break
        peer.close()
        busy = isinstance(answer, pw.Refuse) and answer.reason == pw.RefuseReason.BUSY
        assert busy, f"HELLO for {volume} answered with {answer!r}"
        assert time.monotonic() < deadline, f"an old session on {volume} was never reaped"
        time.sleep(0.05)
    try:
        yield peer
    finally:
        peer.close()


def answer_to(peer: Peer, frame: pw.Frame) -> pw.Ack:
    sequence = peer.encoder.sequence + 1
    peer.send(frame)
    ack = peer.recv_frame()
    assert isinstance(ack, pw.Ack) and ack.sequence == sequence, (frame, ack)
    return ack


def flushed(peer: Peer) -> None:
    ack = answer_to(peer, pw.Flush())
    assert (ack.errno, ack.durable) == (0, True), ack


def packed(setting: str, data: bytes) -> tuple[pw.Codec, bytes]:
    compressor = compressor_for(setting)
    assert compressor is not None
    squeezed = compressor.compress(data)
    assert squeezed is not None, f"{setting} did not compress the test data"
    return compressor.codec, squeezed


def digest(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def target_node(start_node: NodeFactory, tmp_path: Path) -> tuple[LocalNode, Path, Path]:
    """beta with data1 and data2 filled with random bytes (so a stray write shows)."""
    files = (tmp_path / "data1.img", tmp_path / "data2.img")
    for file in files:
        file.write_bytes(os.urandom(VOLUME))
    volumes = [VolumeSpec(f.stem, VOLUME, path=f) for f in files]
    # "rawpeer", the HELLOs' node, is an insecure peer of beta: a target admits only those.
    return start_node("beta", volumes, peers={"rawpeer": free_tcp_port()}), *files


def corrupt_frames() -> list[tuple[str, pw.WriteCompressed]]:
    page = b"0123456789abcdef" * 256  # 4 KiB that every codec squeezes
    z = {name: packed(name, page) for name in ("zlib:1", "zstd:3", "lz4")}
    double = {name: packed(name, page * 2) for name in ("zlib:1", "zstd:3", "lz4")}
    frames = [
        ("zlib garbage", pw.WriteCompressed(0, pw.Codec.ZLIB, 4096, os.urandom(300))),
        ("zstd garbage", pw.WriteCompressed(0, pw.Codec.ZSTD, 4096, os.urandom(300))),
        ("lz4 garbage", pw.WriteCompressed(0, pw.Codec.LZ4, 4096, b"\xff" * 300)),
        ("zstd magic, bad body", pw.WriteCompressed(0, pw.Codec.ZSTD, 4096,
                                                    b"\x28\xb5\x2f\xfd" + os.urandom(60))),
        ("zlib truncated", pw.WriteCompressed(0, pw.Codec.ZLIB, 4096, z["zlib:1"][1][:-6])),
    ]  # fmt: skip
    for name, (codec, data) in z.items():  # 4 KiB announced as 8 KiB: too short
        frames.append((f"{name} short", pw.WriteCompressed(8192, codec, 8192, data)))
    for name, (codec, data) in double.items():  # 8 KiB announced as 4 KiB: too long
        frames.append((f"{name} long", pw.WriteCompressed(8192, codec, 4096, data)))
    return frames


def test_corrupt_compressed_frame_from_a_raw_peer_gets_ebadmsg(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    beta, data1, data2 = target_node(start_node, tmp_path)
    original = digest(data1)
    frames = corrupt_frames()
    with session(beta, "data1", "raw") as peer:
        for name, frame in frames:
            ack = answer_to(peer, frame)
            assert (ack.errno, ack.durable) == (errno.EBADMSG, False), (name, ack)
        flushed(peer)
        assert digest(data1) == original, "a corrupt WRITE_Z changed the volume"

        # The node is alive and serves another session meanwhile, and this one still works.
        assert beta.process is not None and beta.process.poll() is None
        assert beta.status()["node"] == "beta"
        block = os.urandom(2048) * 2
        codec, data = packed("zstd:3", block)
        with session(beta, "data2", "other") as other:
            ack = answer_to(other, pw.WriteCompressed(64 * KiB, codec, len(block), data))
            assert ack.errno == 0, ack
            flushed(other)
        with data2.open("rb") as f:
            f.seek(64 * KiB)
            assert f.read(len(block)) == block
        peer.send(pw.Ping(3))
        assert peer.recv_frame() == pw.Pong(3)
    assert digest(data1) == original

    # A valid WRITE_Z on a new session is applied, for each codec.
    expected = bytearray(data1.read_bytes())
    with session(beta, "data1", "raw") as peer:
        for i, setting in enumerate(("zlib:6", "zstd:3", "lz4")):
            block = (os.urandom(512) + bytes(1536)) * 4  # 8 KiB, about 4:1
            codec, data = packed(setting, block)
            offset = (i + 1) * 128 * KiB
            ack = answer_to(peer, pw.WriteCompressed(offset, codec, len(block), data))
            assert ack.errno == 0, (setting, ack)
            expected[offset : offset + len(block)] = block
        flushed(peer)
        assert data1.read_bytes() == bytes(expected), "a valid WRITE_Z was not applied"

    log = beta.log_text()
    assert log.count("a mirror frame's data is corrupt") >= len(frames), log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert beta.process is not None and beta.process.poll() is None


def _zstd_bomb(size: int) -> bytes:
    """A zstd frame of a few dozen KiB whose header says ``size`` bytes (of zeros)."""
    compressor = zstandard.ZstdCompressor(level=3, write_content_size=True)
    stream = compressor.compressobj(size=size)
    chunk, parts = bytes(MiB), []
    for _ in range(size // MiB):
        parts.append(stream.compress(chunk))
    parts.append(stream.flush())
    return b"".join(parts)


def peak_rss(node: LocalNode) -> int:
    assert node.process is not None
    for line in Path(f"/proc/{node.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * KiB
    raise AssertionError("no VmHWM")


def test_compressed_frame_that_inflates_beyond_its_raw_length_is_bounded(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    """codecs.py promises a bad frame cannot make the target allocate more than it announces
    (at most MAX_PAYLOAD): a 4 KiB WRITE_Z whose zstd data says 1 GiB must be refused cheaply."""
    beta, data1, _ = target_node(start_node, tmp_path)
    original = digest(data1)
    bomb = _zstd_bomb(1 << 30)
    assert len(bomb) < 64 * KiB
    # lz4 and zlib too, for comparison: their decoders are bounded by the announced length.
    zeros = bytes(16 * MiB)
    lz4_bomb = lz4.block.compress(zeros, store_size=False)
    zlib_bomb = zlib.compress(zeros, 9)
    before = peak_rss(beta)
    with session(beta, "data1", "raw") as peer:
        for codec, data in ((pw.Codec.LZ4, lz4_bomb), (pw.Codec.ZLIB, zlib_bomb),
                            (pw.Codec.ZSTD, bomb)):  # fmt: skip
            ack = answer_to(peer, pw.WriteCompressed(0, codec, 4096, data))
            assert ack.errno == errno.EBADMSG, (codec, ack)
        flushed(peer)
    assert digest(data1) == original
    grown = peak_rss(beta) - before
    assert grown < 128 * MiB, (
        f"decompressing a WRITE_Z announced as 4096 bytes raised the target's peak RSS by "
        f"{grown / MiB:.0f} MiB (the zstd frame header says 1 GiB)"
    )
