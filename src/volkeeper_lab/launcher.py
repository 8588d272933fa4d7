"""Start and stop node daemons as child processes (for the demo, the tests and benchmarks).

How this works: ``LocalNode`` writes a node config into a directory of its own, starts
``volkeeper daemon --config`` with the same interpreter, waits until the control API answers
``/status`` and the NBD socket accepts, and stops the daemon by PID (SIGTERM, then SIGKILL after
a grace period).  ``kill()`` is the ``kill -9`` of fault tests.  Every daemon logs to
``DIR/NAME.log``.

Peers are written ``insecure = true`` unless the node is ``secure`` (or has ``[tls]``): then
``trust_each_other`` gives the nodes identities and pins them, as ``volkeeper node init`` and
``node trust`` do.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from volkeeper.core.units import parse_size
from volkeeper.io import identity, peer_tls
from volkeeper.io.control_tokens import TokenStore
from volkeeper.io.identity import KnownPeers


def terminate(process: subprocess.Popen[bytes] | None, timeout: float) -> int:
    """SIGTERM ``process``, wait ``timeout``, SIGKILL if it is still there; its exit status
    (0 for no process)."""
    if process is None:
        return 0
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@dataclass
class VolumeSpec:
    name: str
    size: int | str = "64MiB"
    sector_size: int = 512
    path: Path | None = None  # default: DIR/NAME.img
    read_only: bool = False


_RECENT: collections.deque[int] = collections.deque(maxlen=256)  # handed out lately


def free_tcp_port() -> int:
    """A loopback port nothing is bound to, *below* the kernel's ephemeral range: a port that
    bind(0) hands out can be taken, before the daemon binds it, as the local port of any
    outgoing connection on this machine (tests make thousands), and the daemon then fails
    with "Address already in use".  Under pytest-xdist each worker draws from a slice of its
    own, and no port is handed out twice in a row: between this check and the daemon's bind
    another worker, or the same test's next node, could otherwise draw the same port."""
    low, high = _port_range()
    choose = random.SystemRandom()
    for _ in range(200):
        port = choose.randrange(low, high)
        if port in _RECENT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _RECENT.append(port)
        return port
    raise RuntimeError(f"no free TCP port in {low}..{high - 1} (below the ephemeral range)")


def _port_range() -> tuple[int, int]:
    """Ports [low, high) below the ephemeral range; this xdist worker's slice of them."""
    high = _first_ephemeral_port()
    low = max(1024, high - 12000)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if worker[2:].isdigit() and workers > 1:
        span = (high - low) // workers
        low += int(worker[2:]) % workers * span
        high = low + span
    return low, high


def _first_ephemeral_port() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


@dataclass
class LocalNode:
    directory: Path
    name: str = "alpha"
    volumes: list[VolumeSpec] = field(default_factory=lambda: [VolumeSpec("data1")])
    nbd_tcp: bool = False
    peers: dict[str, int | str] = field(default_factory=dict)  # port, or "host:port"
    host: str = "127.0.0.1"  # the replication listener's address
    netns: str | None = None  # run the daemon in this network namespace (ip netns exec)
    tls: tuple[Path, Path, Path] | None = None  # [tls] certificate, key, ca (PEM files)
    # False: every peer is written insecure = true (plain TCP), as most tests of other things
    # want; True: peers are pinned with trust() / trust_each_other() (node identities, TLS).
    secure: bool = False
    bitmap_dir: Path | None = None  # the intent logs' directory, if not state_dir/bitmaps
    peer_port: int = 0  # the replication port; 0: a free one
    node_settings: dict[str, str | int | float] = field(default_factory=dict)  # more [node] keys
    control_tcp: bool = False  # the control API on a loopback TCP port, not a unix socket
    process: subprocess.Popen[bytes] | None = None
    token: str | None = None  # control_tcp: an admin token made for the tests

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.peer_port = self.peer_port or free_tcp_port()
        self.nbd_port = free_tcp_port() if self.nbd_tcp else None
        self.control_port = free_tcp_port() if self.control_tcp else None
        if self.control_tcp:  # TLS with the node's own certificate, and a token
            self.identity()
            self.token = TokenStore(self.state_dir).create("lab", "admin")

    # -- addresses --------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.directory / f"{self.name}.toml"

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.name}.log"

    @property
    def control_socket(self) -> Path:
        return self.directory / f"{self.name}.sock"

    @property
    def control(self) -> str:
        """The control API's address, as ``--node`` takes it (TCP: pinned to its identity;
        the CLI then wants the token in VOLKEEPER_TOKEN)."""
        if self.control_port is not None:
            return f"127.0.0.1:{self.control_port}#{self.served_fingerprint}"
        return f"unix:{self.control_socket}"

    @property
    def nbd_socket(self) -> Path:
        return self.directory / f"{self.name}-nbd.sock"

    def volume_path(self, volume: VolumeSpec) -> Path:
        return volume.path or self.directory / f"{volume.name}.img"

    def uri(self, volume: str = "data1") -> str:
        if self.nbd_port is not None:
            return f"nbd://127.0.0.1:{self.nbd_port}/{volume}"
        return f"nbd+unix:///{volume}?socket={self.nbd_socket}"

    # -- config -----------------------------------------------------------------------------

    def write_config(self) -> Path:
        nbd = f"127.0.0.1:{self.nbd_port}" if self.nbd_port else f"unix:{self.nbd_socket}"
        lines = [
            "[node]",
            f'name = "{self.name}"',
            f'state_dir = "{self.directory / "state"}"',
            f'listen = "{self.host}:{self.peer_port}"',
            f'control = "{self.control.partition("#")[0]}"',
            f'nbd = "{nbd}"',
        ]
        if self.bitmap_dir is not None:
            lines.append(f'bitmap_dir = "{self.bitmap_dir}"')
        lines += [f"{key} = {json.dumps(value)}" for key, value in self.node_settings.items()]
        if self.peers:
            lines += ["", "[peers]"]
            for name, port in self.peers.items():
                address = port if isinstance(port, str) else f"127.0.0.1:{port}"
                insecure = self.tls is None and not self.secure
                entry = (
                    f'{{ address = "{address}", insecure = true }}' if insecure else f'"{address}"'
                )
                lines.append(f"{name} = {entry}")
        if self.tls is not None:
            certificate, key, ca = self.tls
            lines += ["", "[tls]", f'certificate = "{certificate}"']
            lines += [f'key = "{key}"', f'ca = "{ca}"']
        for volume in self.volumes:
            lines += [
                "",
                "[[volume]]",
                f'name = "{volume.name}"',
                f'path = "{self.volume_path(volume)}"',
                f"size = {parse_size(volume.size)}",
                f"sector_size = {volume.sector_size}",
                f"read_only = {'true' if volume.read_only else 'false'}",
            ]
        self.config_path.write_text("\n".join(lines) + "\n")
        return self.config_path

    # -- identity ---------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.directory / "state"

    def identity(self) -> str:
        """This node's fingerprint, its identity made now if it has none yet."""
        own, _ = identity.ensure(self.state_dir, self.name)
        return own.fingerprint

    def trust(self, peer: str, fingerprint: str) -> None:
        """Pin ``peer``, as ``volkeeper node trust`` does."""
        KnownPeers(self.state_dir).trust(peer, fingerprint)

    def admit(self, peer: str, port: int | str) -> None:
        """Add ``peer`` to [peers] (a source this target must know); a running daemon
        reloads its config."""
        if peer in self.peers:
            return
        self.peers[peer] = port
        self.write_config()
        if self.process is not None and self.process.poll() is None:
            with self.api() as api:
                api.post("/reload").raise_for_status()

    # -- process ----------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        if not self.config_path.exists():
            self.write_config()
        log = self.log_path.open("ab")
        netns = ["ip", "netns", "exec", self.netns] if self.netns else []  # execs: same PID
        self.process = subprocess.Popen(
            [
                *netns,
                sys.executable,
                "-m",
                "volkeeper",
                "daemon",
                "--config",
                str(self.config_path),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"daemon {self.name} exited early:\n{self.log_path.read_text()}")
            if self._control_answers():
                return
            time.sleep(0.05)
        raise TimeoutError(f"daemon {self.name} not ready after {timeout}s:\n{self.log_text()}")

    def _control_answers(self) -> bool:
        try:
            return self.api().get("/status").status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def served_certificate(self) -> Path:
        """The certificate a TCP control API serves: [tls]'s, else the identity's."""
        return self.tls[0] if self.tls else identity.identity_dir(self.state_dir) / "node.pem"

    @property
    def served_fingerprint(self) -> str:
        return peer_tls.fingerprint_of(self.served_certificate)

    def api(self) -> httpx.Client:
        if self.control_port is not None:
            verify = ssl.create_default_context(cafile=str(self.served_certificate))
            verify.check_hostname = False
            return httpx.Client(
                base_url=f"https://127.0.0.1:{self.control_port}", verify=verify, timeout=10,
                headers={"Authorization": f"Bearer {self.token}"},
            )  # fmt: skip
        transport = httpx.HTTPTransport(uds=str(self.control_socket))
        return httpx.Client(transport=transport, base_url="http://node", timeout=10)

    def status(self) -> dict[str, object]:
        with self.api() as client:
            document: dict[str, object] = client.get("/status").json()
            return document

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait, SIGKILL if needed; returns the exit status."""
        code, self.process = terminate(self.process, timeout), None
        return code

    def kill(self) -> None:
        """kill -9: no flush, no goodbye."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


def trust_each_other(*nodes: LocalNode) -> None:
    """Every node pins every other one's identity (made now where missing)."""
    for node in nodes:
        for other in nodes:
            if other is not node:
                node.trust(other.name, other.identity())


@dataclass
class LocalGui:
    """``volkeeper gui`` as a child process over ``nodes``, on a free loopback port unless
    ``listen`` says otherwise; ``args`` adds options (--tokens, --cert, --key)."""

    directory: Path
    nodes: list[LocalNode]
    listen: str = ""
    args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.listen = self.listen or f"127.0.0.1:{free_tcp_port()}"

    @property
    def log_path(self) -> Path:
        return self.directory / "gui.log"

    @property
    def url(self) -> str:
        scheme = "https" if "--cert" in self.args else "http"
        host, port = self.listen.rsplit(":", 1)
        return f"{scheme}://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"

    def start(self, timeout: float = 20.0) -> float:
        """Start it and wait until it answers; returns the seconds that took."""
        nodes = [arg for node in self.nodes for arg in ("--node", node.control)]
        command = [sys.executable, "-m", "volkeeper", "gui", *nodes, "--listen", self.listen]
        log = self.log_path.open("ab")
        began = time.monotonic()
        self.process = subprocess.Popen(
            [*command, *self.args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = began + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the GUI exited early:\n{self.log_path.read_text()}")
            try:
                httpx.get(f"{self.url}/static/gui.css", verify=False, timeout=2)
                return time.monotonic() - began
            except httpx.HTTPError:
                time.sleep(0.05)
        raise TimeoutError(f"the GUI did not answer in {timeout} s:\n{self.log_path.read_text()}")

    def stop(self, timeout: float = 10.0) -> int:
        code, self.process = terminate(self.process, timeout), None
        return code
