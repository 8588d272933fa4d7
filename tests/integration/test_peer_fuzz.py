"""Hostile input on a running daemon's replication (peer) port: invariant 7 for peer frames.

What this proves: whatever arrives on the replication port -- random bytes, frames built with
the project's own ``FrameEncoder`` and then corrupted (magic, checksum, length, sequence, one
flipped byte), truncated frames, frames out of place, HELLOs the node must refuse, a storm of
connections opened and dropped -- the target daemon (DESIGN invariant 7):

* closes that one connection (within a deadline, and at once when the bad part is complete,
  without waiting for our EOF), answers a HELLO it will not take with a REFUSE frame naming a
  clear reason (decoded with ``FrameDecoder``), and never answers garbage;
* never applies a write that came before HELLO or that arrived corrupt inside an admitted
  session, and never claims (locks) a volume for a refused or malformed HELLO;
* stays alive and answers ``GET /status``, logs no traceback, leaks no file descriptor and no
  session (the scratch volume can be admitted again), and keeps ``data1`` -- which no valid
  session ever writes -- byte-identical (sha256) while ``scratch`` holds exactly what the
  valid sessions of these tests wrote (a model kept here);
* and still serves a real mirror: a second daemon's job reaches Mirroring on the same port,
  shrugs off garbage and an impersonating HELLO sent alongside it, and replicates exactly.

One target daemon serves the whole module (``data1`` and ``scratch`` are pre-filled with
random bytes so a stray write of any content shows).  Every socket has a deadline: nothing
here can hang; every daemon is stopped by PID and must exit 0 on SIGTERM.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from xxhash import xxh3_64_digest

from tests.integration import rawnbd
from tests.integration.rawnbd import RawNbd
from tests.support.raw_peer import (
    DEADLINE,
    Peer,
    encoded,
)
from volkeeper.core.peer import wire as pw
from volkeeper_lab.launcher import LocalNode, VolumeSpec, free_tcp_port

KiB, MiB = 1 << 10, 1 << 20
DATA1_SIZE = 32 * MiB
SCRATCH_SIZE = 4 * MiB
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# The identity every test session on ``scratch`` uses: the first admitted HELLO records it,
# and a HELLO naming another job would (rightly) be refused as ALREADY_TARGET.
IDENTITY = {"node": "fuzzer", "job": "fuzz", "source_volume": "src"}


# -- the target daemon ------------------------------------------------------------------------


@dataclass
class Target:
    node: LocalNode
    data1: Path
    scratch: Path
    data1_digest: str
    scratch_model: bytearray
    data1_role: str = "standalone"
    fd_baseline: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.node.peer_port

    @property
    def pid(self) -> int:
        assert self.node.process is not None
        return self.node.process.pid

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def volumes(self) -> dict[str, dict[str, Any]]:
        with self.node.api() as api:
            return {v["name"]: v for v in api.get("/volumes").json()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("peerfuzz")
    rng = random.Random(1234)
    data1, scratch = root / "data1.img", root / "scratch.img"
    data1.write_bytes(rng.randbytes(DATA1_SIZE))
    scratch.write_bytes(rng.randbytes(SCRATCH_SIZE))
    volumes = [
        VolumeSpec("data1", DATA1_SIZE, path=data1),
        VolumeSpec("scratch", SCRATCH_SIZE, path=scratch),
    ]
    # The fuzzer and the real source of the last test are insecure peers of beta: a target
    # takes a HELLO only from a node it lists (and plain TCP only from an insecure one).
    sources = {"fuzzer": free_tcp_port(), "alpha": free_tcp_port()}
    node = LocalNode(root / "beta", "beta", volumes, peers=dict(sources))
    try:
        node.start()
        state = Target(node, data1, scratch, sha256(data1), bytearray(scratch.read_bytes()))
        state.fd_baseline = state.open_fds()
        yield state
    finally:
        code = node.stop()
        assert code == 0, f"target exit status on SIGTERM: {code}\n{node.log_text()[-3000:]}"


def assert_healthy(target: Target) -> None:
    node = target.node
    assert node.process is not None and node.process.poll() is None, (
        f"the target daemon died:\n{node.log_text()[-3000:]}"
    )
    status = node.status()
    assert status["node"] == "beta", status
    assert sha256(target.data1) == target.data1_digest, "data1 changed without a valid session"
    assert target.data1.stat().st_size == DATA1_SIZE
    assert_scratch_is_the_model(target)
    roles = {name: v["role"] for name, v in target.volumes().items()}
    assert roles["data1"] == target.data1_role, roles
    # Dropped sessions were reaped: scratch is admitted again (BUSY only while one lingers).
    with admitted(target) as peer:
        peer.send(pw.Ping(77))
        assert peer.recv_frame() == pw.Pong(77)
    deadline = time.monotonic() + 10
    while (fds := target.open_fds()) > target.fd_baseline + 4:
        assert time.monotonic() < deadline, f"fd leak: {fds} open, {target.fd_baseline} at start"
        time.sleep(0.05)
    bad = [
        line
        for line in node.log_text().splitlines()
        if "Traceback" in line
        or "level='critical'" in line
        or "crashed" in line
        or "Exception in" in line
    ]
    assert not bad, "the target logged a crash:\n" + "\n".join(bad[:20])


def assert_scratch_is_the_model(target: Target) -> None:
    actual = target.scratch.read_bytes()
    if actual != target.scratch_model:
        blocks = [
            offset // 512
            for offset in range(0, SCRATCH_SIZE, 512)
            if actual[offset : offset + 512] != target.scratch_model[offset : offset + 512]
        ]
        raise AssertionError(f"scratch differs from the model in 512-byte blocks {blocks[:20]}")


@pytest.fixture
def healthy(target: Target) -> Iterator[Target]:
    yield target
    assert_healthy(target)


# -- a raw peer built on the project's codec --------------------------------------------------


def raw_frame(kind: int, body: bytes, *, sequence: int = 1, flags: int = 0) -> bytes:
    """A frame with any type, flags and body, and a correct checksum (to reach the parser)."""
    head = pw.HEADER.pack(pw.MAGIC, kind, flags, len(body), sequence) + body
    return head + xxh3_64_digest(head)


def flip(raw: bytes, at: int, mask: int = 0xFF) -> bytes:
    at %= len(raw)
    return raw[:at] + bytes([raw[at] ^ mask]) + raw[at + 1 :]


def hello(volume: str = "scratch", **changes: Any) -> pw.Hello:
    fields: dict[str, Any] = {
        **IDENTITY,
        "volume": volume,
        "volume_size": SCRATCH_SIZE if volume == "scratch" else DATA1_SIZE,
        "sector_size": 512,
        "current_generation": 0,
        "previous_generation": 0,
    }
    fields.update(changes)
    return pw.Hello(**fields)


def hello_bytes(volume: str = "scratch", sequence: int = 1, **changes: Any) -> bytes:
    return b"".join(bytes(p) for p in hello(volume, **changes).encode(sequence))


def admit_scratch(peer: Peer, target: Target) -> pw.HelloOk:
    peer.send(hello())
    answer = peer.recv_frame()
    assert isinstance(answer, pw.HelloOk), f"scratch HELLO answered with {answer!r}"
    assert (answer.volume, answer.volume_size, answer.sector_size) == (
        "scratch",
        SCRATCH_SIZE,
        512,
    )
    return answer


@contextlib.contextmanager
def admitted(target: Target) -> Iterator[Peer]:
    """An admitted session on scratch; retries while an earlier one is still being reaped."""
    deadline = time.monotonic() + DEADLINE
    while True:
        peer = Peer(target.port)
        peer.send(hello())
        answer = peer.recv_frame()
        if isinstance(answer, pw.HelloOk):
            break
        peer.close()
        busy = isinstance(answer, pw.Refuse) and answer.reason == pw.RefuseReason.BUSY
        assert busy, f"scratch HELLO answered with {answer!r}"
        assert time.monotonic() < deadline, "an old session on scratch was never reaped"
        time.sleep(0.05)
    try:
        yield peer
    finally:
        peer.close()


def expect_silent_hangup(peer: Peer) -> None:
    frames = peer.hangs_up()
    assert frames == [], f"the target answered garbage with {frames}"


def scratch_write(peer: Peer, target: Target, offset: int, data: bytes) -> None:
    """A valid WRITE in an admitted session: ACKed with errno 0, and in the model."""
    sequence = peer.encoder.sequence + 1
    peer.send(pw.Write(offset, data))
    ack = peer.recv_frame()
    assert ack == pw.Ack(sequence, 0), ack
    target.scratch_model[offset : offset + len(data)] = data


# -- 1. random bytes ---------------------------------------------------------------------------


@settings(FUZZ, max_examples=60)
@given(
    prefix=st.sampled_from([b"", pw.MAGIC.to_bytes(4, "big")]),
    data=st.binary(min_size=1, max_size=4096),
)
def test_random_bytes_are_never_answered(healthy: Target, prefix: bytes, data: bytes) -> None:
    """Random bytes from the first byte on, or after a valid magic: closed, never answered."""
    with Peer(healthy.port) as peer:
        peer.send_raw(prefix + data)
        peer.half_close()
        expect_silent_hangup(peer)


FRAMES_BEFORE_HELLO: list[pw.Frame] = [
    pw.Write(0, b"\xaa" * 4096),
    pw.Write(0, b"\xbb" * (256 * KiB), fua=True),
    pw.ResyncData(8192, b"\xcc" * 4096),
    pw.Zero(0, MiB),
    pw.Trim(0, MiB),
    pw.Flush(),
    pw.State(pw.DataState.UP_TO_DATE, 1, 2),
    pw.Ack(1),
    pw.Ping(5),
    pw.Goodbye(pw.GoodbyeReason.DELETED, "release it"),
    pw.HelloOk(
        node="x",
        volume="data1",
        volume_size=DATA1_SIZE,
        sector_size=512,
        current_generation=0,
        previous_generation=0,
        data_state=pw.DataState.UP_TO_DATE,
    ),
    pw.Refuse(pw.RefuseReason.OTHER, "no"),
]


@settings(FUZZ, max_examples=40)
@given(
    first=st.sampled_from(FRAMES_BEFORE_HELLO),
    at=st.integers(0, 1 << 20),
    mask=st.integers(1, 255),
)
def test_one_flipped_byte_in_a_first_frame(
    healthy: Target, first: pw.Frame, at: int, mask: int
) -> None:
    """A valid HELLO or other frame with one byte flipped, as the first frame: closed."""
    raw = flip(hello_bytes("data1") if at % 3 == 0 else encoded(pw.FrameEncoder(), first), at, mask)
    with Peer(healthy.port) as peer:
        peer.send_raw(raw)
        peer.half_close()
        expect_silent_hangup(peer)


# -- 2. corrupted frames, built with the project's encoder -------------------------------------


def test_wrong_magic_wrong_checksum_and_unknown_type_close_at_once(healthy: Target) -> None:
    """The whole bad frame is here: the target hangs up without waiting for our EOF."""
    good = hello_bytes("data1")
    wrong_magic = b"VKP2" + good[4:]
    wrong_checksum = flip(good, -1, 0x01)
    unknown_type = raw_frame(99, b"")
    unknown_flags = raw_frame(pw.FrameType.FLUSH, b"", flags=0x8000)
    for raw in (wrong_magic, wrong_checksum, unknown_type, unknown_flags):
        with Peer(healthy.port) as peer:
            peer.send_raw(raw)
            expect_silent_hangup(peer)


@pytest.mark.parametrize(
    ("kind", "length"),
    [
        (pw.FrameType.WRITE, pw.MAX_BODY + 1),
        (pw.FrameType.RESYNC_DATA, 0xFFFFFFFF),
        (pw.FrameType.HELLO, 64 * KiB),  # over HELLO's own bound, under MAX_BODY
        (pw.FrameType.FLUSH, 1),  # FLUSH has no body
    ],
)
def test_body_length_over_the_limit_is_refused_from_the_header(
    healthy: Target, kind: int, length: int
) -> None:
    """A header declaring too long a body: hung up on from the header alone (no EOF sent,
    no body sent: waiting for 4 GiB would be a memory and connection leak)."""
    with Peer(healthy.port) as peer:
        peer.send_raw(pw.HEADER.pack(pw.MAGIC, kind, 0, length, 1) + b"\x00" * 100)
        expect_silent_hangup(peer)


def test_truncated_frames_then_eof(healthy: Target) -> None:
    """A HELLO cut mid-header and mid-body, a WRITE cut mid-body: EOF closes, nothing applied,
    nothing claimed (a HELLO for data1 cut one byte short must not lock it)."""
    good = hello_bytes("data1")
    write = encoded(pw.FrameEncoder(), pw.Write(0, b"\xdd" * (128 * KiB)))
    cuts = [good[:1], good[:10], good[: pw.HEADER.size], good[:30], good[:-1]]
    cuts += [write[:100], write[: len(write) // 2], write[:-1]]
    for raw in cuts:
        with Peer(healthy.port) as peer:
            peer.send_raw(raw)
            peer.half_close()
            expect_silent_hangup(peer)
    assert healthy.volumes()["data1"]["locked"] is None
    for size in (4 * KiB, 128 * KiB):  # inside an admitted session, small and direct path
        for cut in (10, pw.HEADER.size + 8, size // 2, size + pw.HEADER.size + 8 + 7):
            with admitted(healthy) as peer:
                raw = encoded(peer.encoder, pw.Write(MiB, b"\xdd" * size))
                peer.send_raw(raw[:cut])  # the last cut leaves one checksum byte out
                peer.half_close()
                expect_silent_hangup(peer)


def _hello_body(
    low: int = 1, high: int = 1, role: int = 0, names: list[bytes] | None = None
) -> bytes:
    fixed = pw.HELLO_FIXED.pack(low, high, DATA1_SIZE, 512, 0, 0, role, 0, 0)
    parts = names if names is not None else [b"fuzzer", b"data1", b"fuzz", b"src"]
    return fixed + b"".join(pw.STR_LEN.pack(len(p)) + p for p in parts)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_hello_body(low=3, high=2), id="min-version-above-max"),
        pytest.param(_hello_body(role=9), id="unknown-role"),
        pytest.param(_hello_body(names=[b"fuzzer", b"data\xff1", b"fuzz", b"src"]), id="bad-utf8"),
        pytest.param(_hello_body() + b"\x00", id="stray-byte"),
        pytest.param(_hello_body(names=[b"fuzzer", b"data1", b"fuzz"]), id="three-names"),
        pytest.param(_hello_body()[:-3] + b"\x00\x09src", id="name-runs-past-end"),
    ],
)
def test_malformed_hello_body_with_a_valid_checksum(healthy: Target, body: bytes) -> None:
    """The checksum is right, the HELLO body is not: closed unanswered, data1 not claimed."""
    with Peer(healthy.port) as peer:
        peer.send_raw(raw_frame(pw.FrameType.HELLO, body))
        expect_silent_hangup(peer)
    assert healthy.volumes()["data1"]["locked"] is None


# -- 3. frames out of place ---------------------------------------------------------------------


@pytest.mark.parametrize("first", FRAMES_BEFORE_HELLO, ids=lambda f: type(f).__name__)
def test_frames_before_hello_are_not_applied(healthy: Target, first: pw.Frame) -> None:
    """Any frame but HELLO first -- even a perfect WRITE -- closes the connection unanswered
    (no ACK, no PONG) and touches no volume (healthy checks data1's sha256).  A valid HELLO
    pipelined right behind it is never looked at."""
    encoder = pw.FrameEncoder()
    raw = encoded(encoder, first) + encoded(encoder, hello("data1"))
    scratch_before = healthy.volumes()["scratch"]["role"]
    with Peer(healthy.port) as peer:
        peer.send_raw(raw)
        expect_silent_hangup(peer)
    volumes = healthy.volumes()
    assert volumes["data1"]["locked"] is None
    assert volumes["scratch"]["role"] == scratch_before, "a frame before HELLO changed a claim"


def test_sequence_gap_repeat_and_a_first_frame_numbered_2(healthy: Target) -> None:
    # A HELLO numbered 2 on a fresh connection (frame 1 missing).
    with Peer(healthy.port) as peer:
        peer.send_raw(hello_bytes("data1", sequence=2))
        expect_silent_hangup(peer)
    # In a session: WRITE numbered 3 right after HELLO 1 (a gap), then a repeat of 1.
    for sequence in (3, 1, 2 + (1 << 40)):
        with admitted(healthy) as peer:
            data = random.randbytes(4096)
            parts = pw.Write(64 * KiB, data).encode(sequence)
            peer.send_raw(b"".join(bytes(p) for p in parts))
            expect_silent_hangup(peer)
        assert_scratch_is_the_model(healthy)


# -- 4. HELLOs the target refuses ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "reason", "words"),
    [
        (hello("nosuch"), pw.RefuseReason.NO_SUCH_VOLUME, ["'nosuch'", "beta"]),
        (hello("data1", volume_size=DATA1_SIZE + MiB), pw.RefuseReason.SIZE, ["smaller"]),
        (hello("data1", sector_size=4096), pw.RefuseReason.SECTOR_SIZE, ["4096", "512"]),
        (hello("data1", min_version=2, max_version=9), pw.RefuseReason.VERSION, ["2..9"]),
        (hello("scratch", job="other"), pw.RefuseReason.ALREADY_TARGET, ["'fuzz'"]),
    ],
    ids=["no-such-volume", "larger", "sector-size", "version", "already-target"],
)
def test_refused_hello_gets_a_refuse_frame_with_a_clear_reason(
    healthy: Target, frame: pw.Hello, reason: pw.RefuseReason, words: list[str]
) -> None:
    if reason == pw.RefuseReason.ALREADY_TARGET:
        with admitted(healthy):  # make sure scratch's record (job "fuzz") exists
            pass
        time.sleep(0.1)
    with Peer(healthy.port) as peer:
        peer.send(frame)
        frames = peer.hangs_up()
    assert len(frames) == 1, f"expected one REFUSE, got {frames}"
    (refusal,) = frames
    assert isinstance(refusal, pw.Refuse), refusal
    assert refusal.reason == reason, refusal
    assert all(word in refusal.message for word in words), refusal.message
    assert healthy.volumes()["data1"]["locked"] is None
    assert not (healthy.node.directory / "state" / "targets" / "data1.json").exists()


def test_second_feed_for_an_admitted_volume_is_refused_busy(healthy: Target) -> None:
    with admitted(healthy) as first, Peer(healthy.port) as second:
        second.send(hello())
        frames = second.hangs_up()
        assert [type(f) for f in frames] == [pw.Refuse], frames
        assert frames[0].reason == pw.RefuseReason.BUSY  # type: ignore[union-attr]
        first.send(pw.Ping(1))  # the first session was not disturbed
        assert first.recv_frame() == pw.Pong(1)


# -- 5. garbage and corruption inside an admitted session ---------------------------------------


def test_valid_hello_then_garbage(healthy: Target) -> None:
    for garbage in (b"\x00" * 64, random.Random(5).randbytes(3000), b"VKP1" + b"\xff" * 40):
        with admitted(healthy) as peer:
            peer.send_raw(garbage)
            expect_silent_hangup(peer)


@pytest.mark.parametrize("size", [4 * KiB, 1 * MiB], ids=["4KiB", "1MiB-direct-path"])
def test_corrupt_write_in_an_admitted_session_is_not_applied(healthy: Target, size: int) -> None:
    """A valid WRITE and FLUSH are applied and ACKed (the session works); then a WRITE with a
    bad checksum: the target closes the connection, sends no ACK, and does not apply it."""
    rng = random.Random(size)
    good, bad = rng.randbytes(size), rng.randbytes(size)
    with admitted(healthy) as peer:
        scratch_write(peer, healthy, 0, good)
        peer.send(pw.Flush())
        assert peer.recv_frame() == pw.Ack(peer.encoder.sequence, 0, durable=True)
        raw = encoded(peer.encoder, pw.Write(2 * MiB, bad, fua=True))
        peer.send_raw(flip(raw, len(raw) - 3, 0x10))  # in the checksum
        expect_silent_hangup(peer)
    assert healthy.scratch.read_bytes()[:size] == good


@settings(FUZZ, max_examples=40)
@given(
    size=st.sampled_from([512, 4096, 70 * KiB, 300 * KiB]),
    offset=st.integers(0, (SCRATCH_SIZE - 300 * KiB) // 512).map(lambda s: s * 512),
    at=st.integers(0, 1 << 20),
    mask=st.integers(1, 255),
    eof=st.booleans(),
)
def test_one_flipped_byte_in_a_session_write(
    healthy: Target, size: int, offset: int, at: int, mask: int, eof: bool
) -> None:
    """Any single corrupted byte of a WRITE (header, offset, data or checksum) in an admitted
    session: the connection is closed without an ACK and the volume is unchanged."""
    data = random.Random(at).randbytes(size)
    with admitted(healthy) as peer:
        raw = encoded(peer.encoder, pw.Write(offset, data))
        peer.send_raw(flip(raw, at, mask))
        if eof or not _length_intact(raw, at):
            peer.half_close()  # a grown length makes the target (rightly) wait for more
        frames = peer.hangs_up()
        assert frames == [], f"a corrupt WRITE was answered: {frames}"
    with healthy.scratch.open("rb") as f:
        f.seek(offset)
        assert f.read(size) == healthy.scratch_model[offset : offset + size]


def _length_intact(raw: bytes, at: int) -> bool:
    """Whether the flipped byte left the header's length field alone (bytes 8..11): if it grew,
    the target rightly waits for the rest of a frame we never send."""
    return not 8 <= at % len(raw) < 12


def test_bad_ranges_in_a_session_are_refused_with_an_errno_and_the_session_lives(
    healthy: Target,
) -> None:
    """Valid frames whose ranges run past the volume's end: an ACK carrying ENOSPC, nothing
    written, the file does not grow, and the session goes on."""
    with admitted(healthy) as peer:
        for frame in (
            pw.Write(SCRATCH_SIZE - 512, b"\xee" * 4096),
            pw.Write((1 << 64) - 512, b"\xee" * 512),
            pw.Zero(SCRATCH_SIZE - 4096, 1 << 40),
            pw.Trim(SCRATCH_SIZE, 4096),
            pw.ResyncData(SCRATCH_SIZE, b"\xee" * 512),
        ):
            sequence = peer.encoder.sequence + 1
            peer.send(frame)
            ack = peer.recv_frame()
            assert isinstance(ack, pw.Ack) and ack.sequence == sequence, (frame, ack)
            assert ack.errno == errno.ENOSPC and not ack.durable, (frame, ack)
        peer.send(pw.Ping(9))
        assert peer.recv_frame() == pw.Pong(9)
        scratch_write(peer, healthy, SCRATCH_SIZE - 4096, b"\x11" * 4096)  # the last block: fine
    assert healthy.scratch.stat().st_size == SCRATCH_SIZE


@pytest.mark.parametrize(
    "frame",
    [
        hello(),
        pw.HelloOk(
            node="x",
            volume="scratch",
            volume_size=SCRATCH_SIZE,
            sector_size=512,
            current_generation=0,
            previous_generation=0,
            data_state=pw.DataState.UP_TO_DATE,
        ),
        pw.Refuse(pw.RefuseReason.OTHER, "no"),
    ],
    ids=lambda f: type(f).__name__,
)
def test_handshake_frames_inside_a_session_close_it(healthy: Target, frame: pw.Frame) -> None:
    with admitted(healthy) as peer:
        encoder = peer.encoder
        raw = encoded(encoder, frame) + encoded(encoder, pw.Write(0, b"\x99" * 4096))
        peer.send_raw(raw)
        expect_silent_hangup(peer)


# -- 6. connection storm --------------------------------------------------------------------


def test_connection_storm(healthy: Target) -> None:
    """300 connections at once -- silent, half a HELLO, a whole scratch HELLO (one may be
    admitted, the rest BUSY), garbage -- then all dropped, half of them with a RST.  Healthy
    checks no fd and no session lingers and the node still answers."""
    rng = random.Random(99)
    good = hello_bytes()
    socks = []
    try:
        for i in range(300):
            sock = socket.create_connection(("127.0.0.1", healthy.port), timeout=DEADLINE)
            socks.append(sock)
            kind = i % 4
            payload = [b"", good[: rng.randrange(1, len(good))], good, rng.randbytes(200)][kind]
            with contextlib.suppress(OSError):
                sock.sendall(payload)
        assert healthy.node.status()["node"] == "beta"  # answers while they are all open
    finally:
        for i, sock in enumerate(socks):
            if i % 2:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()


# -- 7. the port still serves a real mirror ----------------------------------------------------


def test_a_real_mirror_still_works_beside_hostile_connections(
    healthy: Target, tmp_path: Path
) -> None:
    """After everything above, a real source daemon's job on data1 reaches Mirroring; garbage
    and a HELLO impersonating the live mirror (BUSY) do not disturb it; every write arrives."""
    assert healthy.volumes()["data1"]["role"] == "standalone"
    source_image = tmp_path / "alpha-data1.img"
    source_image.write_bytes(random.Random(42).randbytes(DATA1_SIZE))
    alpha = LocalNode(
        tmp_path / "alpha",
        "alpha",
        [VolumeSpec("data1", DATA1_SIZE, path=source_image)],
        peers={"beta": healthy.port},
        peer_port=int(healthy.node.peers["alpha"]),
    )
    try:
        alpha.start()
        body = {"name": "web", "source": "alpha:data1", "target": "beta:data1", "mode": "sync"}
        with alpha.api() as api:
            created = api.post("/jobs", json={**body, "confirm": True})
        assert created.status_code == 201, created.text
        wait_mirroring(alpha)
        healthy.data1_role = "target"
        closed = alpha.log_text().count("peer link closed")  # the creation's claim session

        impostor = hello("data1", node="alpha", job="web", source_volume="data1")
        rng = random.Random(7)
        with RawNbd.open(str(alpha.nbd_socket), "data1", timeout=10) as client:
            for i in range(200):
                data = rng.randbytes(4096)
                assert client.write(rng.randrange(DATA1_SIZE // 4096) * 4096, data).error == 0
                if i % 20 == 0:  # hostile connections while writes flow
                    with Peer(healthy.port) as peer:
                        peer.send(impostor)
                        (refusal,) = peer.hangs_up()
                        assert isinstance(refusal, pw.Refuse), refusal
                        assert refusal.reason == pw.RefuseReason.BUSY, refusal
                    with Peer(healthy.port) as peer:
                        peer.send_raw(rng.randbytes(500))
                        expect_silent_hangup(peer)
                    with Peer(healthy.port) as peer:
                        peer.send(hello("data1", job="other"))
                        (refusal,) = peer.hangs_up()
                        assert isinstance(refusal, pw.Refuse), refusal
                        assert refusal.reason == pw.RefuseReason.ALREADY_TARGET, refusal
            assert client.flush().error == rawnbd.OK
        view = mirror_view(alpha)
        assert (view["state"], view["out_of_sync_bytes"]) == ("Mirroring", 0), view
        assert alpha.log_text().count("peer link closed") == closed, "the live mirror was disturbed"
    finally:
        code = alpha.stop()
    assert code == 0, f"source exit status on SIGTERM: {code}"
    healthy.data1_digest = sha256(source_image)
    assert sha256(healthy.data1) == healthy.data1_digest, "the mirror target differs"


def test_hello_for_a_volume_that_is_a_mirror_source_here_is_refused(tmp_path: Path) -> None:
    """A node whose data1 is the source of a live mirror must refuse to become a target of
    data1 too (invariant 4): else a peer's WRITEs reach data1 behind the mirror's back."""
    size = 4 * MiB
    delta_port = free_tcp_port()
    gamma = LocalNode(
        tmp_path / "gamma", "gamma", [VolumeSpec("data1", size)], peers={"delta": delta_port}
    )
    delta = LocalNode(
        tmp_path / "delta", "delta", [VolumeSpec("data1", size)], peer_port=delta_port,
        peers={"gamma": 0, "fuzzer": free_tcp_port()},
    )  # fmt: skip
    try:
        gamma.start()
        delta.peers["gamma"] = gamma.peer_port
        delta.start()
        body = {"name": "web", "source": "delta:data1", "target": "gamma:data1", "mode": "sync"}
        with delta.api() as api:
            assert api.post("/jobs", json={**body, "confirm": True}).status_code == 201
        wait_mirroring(delta)
        with Peer(delta.peer_port) as peer:
            peer.send(hello("data1", volume_size=size))
            answer = peer.recv_frame()
        assert isinstance(answer, pw.Refuse), f"a mirror source admitted a HELLO: {answer}"
        assert answer.reason == pw.RefuseReason.IS_SOURCE, answer
        assert "source of a mirror here" in answer.message, answer
        assert mirror_view(delta)["state"] == "Mirroring"
    finally:
        codes = (delta.stop(), gamma.stop())
    assert codes == (0, 0), f"exit status on SIGTERM: {codes}"


def mirror_view(node: LocalNode) -> dict[str, Any]:
    mirrors = node.status()["mirrors"]
    assert isinstance(mirrors, list) and len(mirrors) == 1, mirrors
    view: dict[str, Any] = mirrors[0]
    return view


def wait_mirroring(node: LocalNode, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (view := mirror_view(node))["state"] != "Mirroring":
        assert time.monotonic() < deadline, f"not Mirroring: {view}\n{node.log_text()[-3000:]}"
        time.sleep(0.05)
