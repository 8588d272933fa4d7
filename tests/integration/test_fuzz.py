"""Fuzzing a running daemon's NBD listener with garbage, half-messages and abandoned sockets.

How this works: one ``volkeeper daemon`` serves three volumes for the whole module: ``data1``
(read-write), ``ro1`` (read-only) and ``big`` (40 MiB, written only by the tests that say so).
Hypothesis generates a few hundred hostile inputs -- random bytes as a handshake, random bytes
after a valid OPT_GO, valid request streams with one corrupted byte, truncated requests,
options declaring huge lengths -- and each is sent on a fresh connection, followed by a
half-close.  Hand-written hostile clients add a WRITE claiming 4 GiB, a 32 MiB WRITE cut one
byte short, 200 handshakes abandoned at once, a connect/close storm, a client that never reads
its replies, and a pipelined flood larger than the server's in-flight window.  After each
blast the server must close the connection within a few seconds (it never waits
forever on a client that has gone).  Raw sockets and short deadlines throughout: nothing here
can hang.

After every test the ``healthy`` check proves the daemon survived unharmed (DESIGN invariant 7:
bad input "never crashes the node, never corrupts a volume"):

* the process is alive and logged no error or traceback;
* a well-behaved client completes a write + flush + read round trip (the raw client, and
  nbdinfo when installed);
* no backing file changed size (nothing was written past a volume's end), the read-only
  volume's bytes are unchanged, and ``big`` holds only what the tests wrote to it;
* every dropped connection was reaped (``volkeeper_nbd_connections`` falls back to zero).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.integration import rawnbd as nbd
from tests.integration.rawnbd import NbdClosed, NbdTimeout, RawNbd
from volkeeper_lab.launcher import LocalNode, VolumeSpec

KiB, MiB = 1 << 10, 1 << 20
SIZE = 1 * MiB + 512
BIG = 40 * MiB
CLOSE_DEADLINE = 5.0  # the server must hang up this soon after the client's EOF
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def fuzz(examples: int) -> settings:
    return settings(FUZZ, max_examples=examples)


@dataclass
class Daemon:
    node: LocalNode
    images: dict[str, Path]
    ro_digest: str
    big_expected: bytearray = field(default_factory=lambda: bytearray(BIG))

    @property
    def address(self) -> str:
        return str(self.node.nbd_socket)

    def metric(self, name: str) -> float:
        with self.node.api() as api:
            text = api.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    return float(sample.value)
        raise AssertionError(f"metric {name} missing")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("fuzz")
    ro_image = root / "ro1.img"
    ro_image.write_bytes(random.Random(7).randbytes(SIZE))
    volumes = [
        VolumeSpec("data1", size=SIZE),
        VolumeSpec("ro1", size=SIZE, path=ro_image, read_only=True),
        VolumeSpec("big", size=BIG),
    ]
    node = LocalNode(root / "node", "fuzz", volumes)
    try:
        node.start()
        images = {v.name: node.volume_path(v) for v in volumes}
        yield Daemon(node, images, digest(ro_image))
    finally:
        code = node.stop()
        assert code == 0, f"daemon exit status on SIGTERM: {code}\n{node.log_text()[-3000:]}"


def round_trip(address: str, seed: int) -> None:
    rng = random.Random(seed)
    data, offset = rng.randbytes(4096), rng.randrange(0, SIZE - 4096)
    with RawNbd.open(address, "data1", block_size=True, timeout=10) as client:
        assert client.write(offset, data).error == nbd.OK
        assert client.flush().error == nbd.OK
        reply = client.read(offset, 4096)
        assert (reply.error, reply.data) == (nbd.OK, data)
        client.disconnect()
        assert client.closed_within(CLOSE_DEADLINE)


def assert_healthy(daemon: Daemon) -> None:
    node = daemon.node
    assert node.process is not None and node.process.poll() is None, (
        f"the daemon died:\n{node.log_text()[-3000:]}"
    )
    round_trip(daemon.address, seed=time.monotonic_ns())
    if shutil.which("nbdinfo"):
        size = subprocess.run(
            ["nbdinfo", "--size", node.uri("data1")],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert int(size) == SIZE
    sizes = {name: path.stat().st_size for name, path in daemon.images.items()}
    assert sizes == {"data1": SIZE, "ro1": SIZE, "big": BIG}, "a volume changed size"
    assert digest(daemon.images["ro1"]) == daemon.ro_digest, "the read-only volume changed"
    assert daemon.images["big"].read_bytes() == daemon.big_expected, "big holds a stray write"
    deadline = time.monotonic() + 10
    while daemon.metric("volkeeper_nbd_connections") != 0:
        assert time.monotonic() < deadline, "dropped NBD connections were never reaped"
        time.sleep(0.05)
    bad = [
        line
        for line in node.log_text().splitlines()
        if "level='error'" in line or "level='critical'" in line or "Traceback" in line
    ]
    assert not bad, "the daemon logged errors:\n" + "\n".join(bad[:20])


@pytest.fixture
def healthy(daemon: Daemon) -> Iterator[Daemon]:
    yield daemon
    assert_healthy(daemon)


# -- sending garbage ------------------------------------------------------------------------


def blast(address: str, data: bytes) -> bytes:
    """Connect, send ``data``, half-close, read until the server hangs up.

    Returns what the server sent.  Fails if the server does not close within
    CLOSE_DEADLINE of our EOF (a connection that outlives its client is a leak).
    """
    received = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CLOSE_DEADLINE)
        sock.connect(address)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return bytes(received)  # the server already hung up: fine
        deadline = time.monotonic() + CLOSE_DEADLINE
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the server kept the connection open after our EOF"
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            except TimeoutError as exc:
                raise AssertionError("the server kept the connection open after our EOF") from exc
            if not chunk:
                break
            received += chunk
    return bytes(received)


def classify(received: bytes) -> None:
    """Record how far the server let an input get (hypothesis statistics)."""
    replies = received.count(nbd.SIMPLE_REPLY.pack(nbd.SIMPLE_REPLY_MAGIC, 0, 0)[:4])
    if replies:
        event(f"server sent simple replies ({min(replies, 5)}{'+' if replies >= 5 else ''})")
    elif nbd.REPLY_MAGIC.to_bytes(8, "big") in received:
        event("server sent option replies")
    else:
        event(f"server sent {'the greeting only' if len(received) <= 18 else 'other bytes'}")


def go_prefix(name: bytes, *, via: str = "go") -> bytes:
    """Client flags and the option that enters transmission, sent without waiting."""
    flags = nbd.CLIENT_FLAGS.pack(nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES)
    if via == "go":
        return flags + nbd.option_bytes(nbd.OPT_GO, nbd.go_data(name))
    return flags + nbd.option_bytes(nbd.OPT_EXPORT_NAME, name)


EXPORTS = st.sampled_from([b"data1", b"ro1"])  # never "big": its content is checked exactly
VIA = st.sampled_from(["go", "export_name"])
U32, U64 = st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 64) - 1)


@st.composite
def raw_request(draw: st.DrawFn) -> bytes:
    """A request header with fields anywhere from plausible to absurd, maybe a payload."""
    magic = draw(st.one_of(st.just(nbd.REQUEST_MAGIC), st.just(nbd.REQUEST_MAGIC), U32))
    flags = draw(st.one_of(st.just(0), st.integers(0, 0xFFFF)))
    cmd = draw(st.one_of(st.integers(0, 10), st.integers(0, 0xFFFF)))
    offset = draw(st.one_of(st.integers(0, SIZE + 4096), U64))
    length = draw(st.one_of(st.integers(0, 4096), U32))
    cookie = draw(U64)
    payload = draw(st.binary(max_size=512))
    return nbd.REQUEST.pack(magic, flags, cmd, cookie, offset, length) + payload


@st.composite
def valid_stream(draw: st.DrawFn) -> bytes:
    """A few well-formed requests in range of a 1 MiB export (WRITEs with their payload)."""
    out = bytearray()
    for cookie in range(draw(st.integers(1, 6))):
        cmd = draw(st.sampled_from([0, 1, 1, 3, 4, 5, 6]))
        length = 0 if cmd == 3 else draw(st.integers(1, 8192))
        offset = 0 if cmd == 3 else draw(st.integers(0, SIZE - length))
        flags = draw(st.sampled_from([0, nbd.FLAG_FUA]))
        payload = random.Random(cookie).randbytes(length) if cmd == 1 else b""
        out += nbd.request_bytes(
            cmd, flags=flags, cookie=cookie, offset=offset, length=length, payload=payload
        )
    return bytes(out)


# -- hypothesis fuzzers -------------------------------------------------------------------


CLIENT_FLAGS = st.sampled_from(
    [b"", b"\x00\x00\x00\x00", b"\x00\x00\x00\x01", b"\x00\x00\x00\x03", b"\x00\x00\x00\x03"]
)


@fuzz(80)
@given(prefix=CLIENT_FLAGS, data=st.binary(min_size=1, max_size=2048))
def test_random_bytes_as_handshake(healthy: Daemon, prefix: bytes, data: bytes) -> None:
    """Random bytes from the first byte on, or right after valid client flags."""
    classify(blast(healthy.address, prefix + data))


@fuzz(60)
@given(
    prefix=CLIENT_FLAGS,
    magic=st.one_of(st.just(nbd.IHAVEOPT), st.just(nbd.IHAVEOPT), st.integers(0, (1 << 64) - 1)),
    option=st.one_of(st.integers(0, 12), U32),
    data=st.binary(max_size=600),
    declared=st.one_of(st.none(), st.none(), U32),
)
def test_random_options(
    healthy: Daemon, prefix: bytes, magic: int, option: int, data: bytes, declared: int | None
) -> None:
    """Options of any number, with a length that may lie about the data that follows."""
    length = len(data) if declared is None else declared
    classify(blast(healthy.address, prefix + nbd.OPTION.pack(magic, option, length) + data))


@fuzz(80)
@given(name=EXPORTS, via=VIA, tail=st.one_of(st.binary(min_size=1, max_size=2048), raw_request()))
def test_random_bytes_after_go(healthy: Daemon, name: bytes, via: str, tail: bytes) -> None:
    classify(blast(healthy.address, go_prefix(name, via=via) + tail))


@fuzz(60)
@given(name=EXPORTS, requests=st.lists(raw_request(), min_size=1, max_size=8))
def test_random_request_headers(healthy: Daemon, name: bytes, requests: list[bytes]) -> None:
    classify(blast(healthy.address, go_prefix(name) + b"".join(requests)))


@fuzz(80)
@given(
    name=EXPORTS,
    stream=valid_stream(),
    where=st.floats(0, 1, exclude_max=True),
    xor=st.integers(1, 255),
)
def test_valid_requests_with_one_corrupted_byte(
    healthy: Daemon, name: bytes, stream: bytes, where: float, xor: int
) -> None:
    whole = bytearray(go_prefix(name) + stream)
    position = int(where * len(whole))
    whole[position] ^= xor
    classify(blast(healthy.address, bytes(whole)))


@fuzz(50)
@given(name=EXPORTS, stream=valid_stream(), cut=st.floats(0, 1, exclude_max=True))
def test_truncated_streams(healthy: Daemon, name: bytes, stream: bytes, cut: float) -> None:
    """The connection ends anywhere: in the handshake, in a header, in a WRITE's payload."""
    whole = go_prefix(name) + stream
    classify(blast(healthy.address, whole[: int(cut * len(whole))]))


# -- hand-written hostile clients -----------------------------------------------------------


@pytest.mark.parametrize("declared", [0xFFFFFFFF, 1 << 31, 64 * KiB + 1, 16 * MiB])
@pytest.mark.parametrize("option", [nbd.OPT_GO, nbd.OPT_LIST, nbd.OPT_EXPORT_NAME, 0x4242])
def test_option_declaring_a_huge_length(healthy: Daemon, option: int, declared: int) -> None:
    """The server must not wait for (or buffer) gigabytes of option data: it hangs up."""
    with RawNbd.connect(healthy.address) as client:
        client.greeting()
        client.send_client_flags()
        client.send_option(option, b"x" * 1000, length=declared)
        assert client.closed_within(CLOSE_DEADLINE), "still waiting for the option data"


@pytest.mark.parametrize(
    "offset, flags",
    [(0, 0), (0, nbd.FLAG_FUA), (SIZE, 0), (0, nbd.FLAG_NO_HOLE), ((1 << 64) - 1, 0)],
)
def test_write_claiming_4_gib_then_closing(healthy: Daemon, offset: int, flags: int) -> None:
    """Refused (out of range, or a bad flag) and far too big to skip: hang up at once."""
    with RawNbd.open(healthy.address, "data1") as client:
        client.send_request(nbd.CMD_WRITE, flags=flags, offset=offset, length=0xFFFFFFFF)
        with contextlib.suppress(NbdClosed):  # it may hang up before we are done
            client.send(b"\xee" * 64 * KiB)
        assert client.closed_within(CLOSE_DEADLINE)


def test_write_claiming_4_gib_on_a_big_volume(healthy: Daemon) -> None:
    """Out of range even on 40 MiB, so refused: the server hangs up; big stays all zeros."""
    with RawNbd.open(healthy.address, "big") as client:
        client.send_request(nbd.CMD_WRITE, offset=0, length=0xFFFFFFFF)
        with contextlib.suppress(NbdClosed):  # it may hang up before we are done
            client.send(b"\xee" * 4096)
        assert client.closed_within(CLOSE_DEADLINE)


def test_partial_write_payload_is_never_applied(healthy: Daemon) -> None:
    """A 32 MiB WRITE whose payload stops one byte short is not written, not even in part;
    while it hangs, other clients are served."""
    with RawNbd.open(healthy.address, "big") as client:
        client.send_request(nbd.CMD_WRITE, offset=4 * MiB, length=32 * MiB)
        client.send(b"\xcc" * (32 * MiB - 1))
        round_trip(healthy.address, seed=1)
        client.timeout = 0.3
        with pytest.raises(NbdTimeout):
            client.recv_simple_reply()  # no reply: the WRITE is still incomplete
    # The client is gone: healthy checks big is still all zeros.


def test_write_after_partial_then_complete(healthy: Daemon) -> None:
    """Control for the test above: the same WRITE, completed, lands where it should."""
    data = random.Random(3).randbytes(1 * MiB)
    with RawNbd.open(healthy.address, "big") as client:
        assert client.write(8 * MiB, data).error == nbd.OK
        assert client.flush().error == nbd.OK
    healthy.big_expected[8 * MiB : 9 * MiB] = data


def _abandon(sock: socket.socket, step: int) -> None:
    """Leave a handshake at one of several points."""
    flags = nbd.CLIENT_FLAGS.pack(nbd.FLAG_C_FIXED_NEWSTYLE)
    steps = [
        b"",
        flags[:2],
        flags,
        flags + nbd.option_bytes(nbd.OPT_GO, nbd.go_data("data1"))[:10],
        flags + nbd.option_bytes(nbd.OPT_LIST),
        flags + nbd.option_bytes(nbd.OPT_GO, nbd.go_data("data1")) + b"\x25\x60",
        flags + nbd.option_bytes(nbd.OPT_INFO, nbd.go_data("data1")[:-1], length=200),
    ]
    sock.sendall(steps[step % len(steps)])


def test_many_connections_dropped_mid_handshake(healthy: Daemon) -> None:
    """200 clients stall at assorted points of the handshake; a real client is still served;
    then they all vanish at once, half of them with a RST instead of a FIN."""
    sockets = []
    try:
        for i in range(200):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.settimeout(5)
            sock.connect(healthy.address)
            if i % 3 == 0:
                sock.recv(18)  # read the greeting, or part of it
            _abandon(sock, i)
        round_trip(healthy.address, seed=2)
    finally:
        for i, sock in enumerate(sockets):
            if i % 2:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()


def test_connect_and_close_storm(healthy: Daemon) -> None:
    """Connections that close before, during and right after the greeting, one after another."""
    for i in range(300):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(healthy.address)
            if i % 2:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if i % 3 == 1:
                sock.recv(1)


def test_client_that_never_reads_its_replies(healthy: Daemon) -> None:
    """Hundreds of READs whose 25 MiB of replies nobody reads, then a RST: the server stops
    reading (back-pressure) instead of buffering, and reaps the connection."""
    client = RawNbd.open(healthy.address, "data1")
    stream = b"".join(
        nbd.request_bytes(nbd.CMD_READ, cookie=cookie, length=64 * KiB) for cookie in range(400)
    )
    client.timeout = 1.0
    try:
        with contextlib.suppress(NbdTimeout):  # the server may stop reading us: that is fine
            client.send(stream)
        time.sleep(0.3)
    finally:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()


def test_pipelined_flood_is_answered_in_full(healthy: Daemon) -> None:
    """300 requests sent without waiting (more than the server keeps in flight): every one is
    answered exactly once, by cookie, and the data read back is what was written."""
    rng = random.Random(4)
    blocks = {i: rng.randbytes(4096) for i in range(100)}
    stream = bytearray()
    expected: dict[int, int] = {}
    for i, block in blocks.items():  # writes (some FUA), then reads of the same blocks
        flags = nbd.FLAG_FUA if i % 7 == 0 else 0
        stream += nbd.request_bytes(
            nbd.CMD_WRITE, flags=flags, cookie=i, offset=i * 4096, payload=block
        )
        expected[i] = 0
    stream += nbd.request_bytes(nbd.CMD_FLUSH, cookie=1000)
    expected[1000] = 0
    for i in blocks:
        stream += nbd.request_bytes(nbd.CMD_READ, cookie=2000 + i, offset=i * 4096, length=4096)
        expected[2000 + i] = 4096
    with RawNbd.open(healthy.address, "data1", timeout=20) as client:
        sender = threading.Thread(target=client.send, args=(bytes(stream),))
        sender.start()  # the server stops reading while its replies are not read: send aside
        try:
            replies = client.recv_replies(expected)
        finally:
            sender.join(30)
        assert all(reply.error == nbd.OK for reply in replies.values())
        # Writes and reads were pipelined, so a READ may overtake the WRITE before it; what
        # must hold is that once all WRITEs are answered, the data is there.
        for i, block in blocks.items():
            assert client.read(i * 4096, 4096).data == block
