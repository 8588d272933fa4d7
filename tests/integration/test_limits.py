"""Limits against abuse hold under a flood, and a well-behaved client is served meanwhile.

A node with small ``[limits]`` serves NBD on TCP.  Attackers connect from other loopback
addresses (127.0.0.2 and up: each its own "client address"): silent connections
(slow-loris), more connections than allowed, an oversized request, a client that pipelines
reads and never reads the replies.  Each limit must hold -- refuse, close or pause -- be
counted in ``volkeeper_limit_hits_total`` and be logged, while a real client (nbdcopy from
127.0.0.1) copies its data correctly and the replication port does the same for its own flood.
"""

from __future__ import annotations

import contextlib
import errno
import re
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

from tests.conftest import NodeFactory, need
from tests.integration.rawnbd import RawNbd
from tests.support.mirroring import random_file
from volkeeper_lab.launcher import LocalNode, VolumeSpec

LIMITS = {"handshake_timeout": 1, "max_connections": 40, "max_connections_per_client": 4,
          "nbd_in_flight_bytes": "32MiB"}  # fmt: skip
GREETING = 18  # NBDMAGIC, IHAVEOPT, server flags


def limited_node(start_node: NodeFactory) -> LocalNode:
    started = start_node("alpha", [VolumeSpec("data1", "64MiB")], nbd_tcp=True)
    started.stop()
    text = started.config_path.read_text()
    table = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in LIMITS.items())
    started.config_path.write_text(text + "\n[limits]\n" + table + "\n")
    started.start()
    return started


def hits(node: LocalNode) -> dict[str, float]:
    with node.api() as api:
        text = api.get("/metrics").text
    found = re.findall(r'^volkeeper_limit_hits_total\{limit="([a-z_]+)"\} ([0-9.e+]+)$', text, re.M)
    return {limit: float(count) for limit, count in found}


def attacker(port: int, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def closed(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Read until the server closes (True) or ``timeout`` passes (False)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def test_a_flood_of_slow_and_surplus_connections_leaves_a_good_client_served(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    need("nbdcopy")
    node = limited_node(start_node)
    port = node.nbd_port
    assert port is not None
    # Surplus: the fifth connection from one address is closed before its greeting.
    held = [attacker(port, "127.0.0.2") for _ in range(4)]
    surplus = attacker(port, "127.0.0.2")
    assert closed(surplus) and surplus.recv(1) == b""
    # Slow-loris: the four held ones say nothing, and are closed after handshake_timeout.
    began = time.monotonic()
    assert all(closed(sock, timeout=10) for sock in held)
    assert time.monotonic() - began < 8
    # A flood from many addresses while a good client copies 16 MiB.
    stop = threading.Event()

    def flood(source: str) -> None:
        while not stop.is_set():
            try:
                sockets = [attacker(port, source) for _ in range(6)]
            except OSError:
                continue
            time.sleep(0.2)
            for sock in sockets:
                sock.close()

    floods = [threading.Thread(target=flood, args=(f"127.0.0.{n}",)) for n in range(3, 9)]
    for thread in floods:
        thread.start()
    try:
        data = random_file(tmp_path / "data.bin", 16 << 20)
        back = tmp_path / "back.bin"
        uri = f"nbd://127.0.0.1:{port}/data1"
        for argv in (["nbdcopy", "--", str(data), uri], ["nbdcopy", "--", uri, str(back)]):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
    finally:
        stop.set()
        for thread in floods:
            thread.join(10)
    assert back.read_bytes()[: 16 << 20] == data.read_bytes()
    counted = hits(node)
    assert counted.get("nbd_connections_per_client", 0) >= 1, counted
    assert counted.get("nbd_handshake_timeout", 0) >= 4, counted
    log = node.log_text()
    assert "limit reached" in log and "nbd_handshake_timeout" in log


def test_an_oversized_request_and_a_reader_that_never_reads(start_node: NodeFactory) -> None:
    node = limited_node(start_node)
    port = node.nbd_port
    assert port is not None

    def attach(source: str) -> socket.socket:
        sock = attacker(port, source)
        sock.settimeout(5)
        assert len(sock.recv(GREETING, socket.MSG_WAITALL)) == GREETING
        sock.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
        name = b"data1"
        go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(go)) + go)
        replies = b""
        while not replies.endswith(struct.pack(">QIII", 0x3E889045565A9, 7, 1, 0)):
            chunk = sock.recv(4096)
            assert chunk, "closed in negotiation"
            replies += chunk
        return sock

    oversized = attach("127.0.0.10")
    request = struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 1 << 30)  # WRITE of 1 GiB
    oversized.sendall(request + b"x" * 4096)
    assert closed(oversized)  # refused before a buffer is allocated for it

    # A client that pipelines 64 reads of 4 MiB and never reads a reply: the daemon must
    # not hold 256 MiB of answers for it (in flight and queued replies are both bounded).
    before = rss(node)
    hoarder = attach("127.0.0.11")
    hoarder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reads = b"".join(
        struct.pack(">IHHQQI", 0x25609513, 0, 0, n, (n % 16) * (4 << 20), 4 << 20)
        for n in range(64)
    )
    hoarder.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        hoarder.send(reads)
    time.sleep(2)
    grown = rss(node) - before
    assert grown < 96 << 20, f"the daemon grew {grown >> 20} MiB for a client that reads nothing"
    with node.api() as api:  # and it answers everyone else meanwhile
        assert api.get("/status").status_code == 200
    hoarder.close()


def rss(node: LocalNode) -> int:
    assert node.process is not None
    status = Path(f"/proc/{node.process.pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)[1]) * 1024  # type: ignore[index]


def test_the_replication_port_holds_the_same_limits(start_node: NodeFactory) -> None:
    node = limited_node(start_node)
    held = [attacker(node.peer_port, "127.0.0.20") for _ in range(4)]
    surplus = attacker(node.peer_port, "127.0.0.20")
    assert closed(surplus)
    assert all(closed(sock, timeout=10) for sock in held)  # silent: closed after 1 s
    counted = hits(node)
    assert counted.get("replication_connections_per_client", 0) >= 1, counted
    assert counted.get("replication_handshake_timeout", 0) >= 4, counted


def test_bad_limits_are_named(tmp_path: Path) -> None:
    node = LocalNode(tmp_path / "alpha", "alpha", [VolumeSpec("data1", "4MiB")])
    text = node.write_config().read_text()
    node.config_path.write_text(
        text + "\n[limits]\nhandshake_timeout = 0\nmax_connections = 2.5\n"
        'nbd_in_flight_bytes = "1MiB"\nbacklog = 3\n'
    )
    done = subprocess.run(
        [*node_command(), "--config", str(node.config_path)], capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    said = done.stderr
    assert "limits.handshake_timeout: must be from 1 to 600, got 0" in said, said
    assert "limits.max_connections: expected a whole number, got 2.5" in said, said
    assert "limits.nbd_in_flight_bytes: must be at least 32MiB" in said, said
    assert "unknown key limits.backlog" in said, said


def node_command() -> list[str]:
    import sys

    return [sys.executable, "-m", "volkeeper", "daemon"]


def test_the_largest_nbd_request_is_a_setting(start_node: NodeFactory) -> None:
    need("nbdinfo")
    node = start_node("alpha", [VolumeSpec("data1", "8MiB")])
    node.stop()
    node.config_path.write_text(
        node.config_path.read_text() + '\n[limits]\nnbd_max_request = "1MiB"\n'
    )
    node.start()
    shown = subprocess.run(
        ["nbdinfo", "--json", node.uri()], capture_output=True, text=True, timeout=30, check=False
    )
    assert '"block_size_maximum": 1048576' in shown.stdout, shown
    with RawNbd.open(str(node.nbd_socket), "data1") as client:
        assert client.write(0, b"x" * (2 << 20)).error == errno.EINVAL  # refused, not held
        assert client.write(0, b"y" * (1 << 20)).error == 0  # and the connection goes on
        assert client.read(0, 4096).data == b"y" * 4096
