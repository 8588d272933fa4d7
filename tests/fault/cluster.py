"""The nemesis's cluster: node daemons in namespaces, each on a disk that can lose power.

How this works: ``FaultCluster(root, names)`` builds a ``Mesh`` (tests/fault/network.py) of
one namespace per node and, per node, a ``PowerLossDisk`` (tests/integration/powerloss_fs.py)
mounted at ``root/NAME/disk`` that holds the volume file and the node's ``state_dir`` (job
and target records, intent logs): a power cut loses whatever the node had not fsync'ed, and
the disk can fail, slow down or hang on command.  Every ordered pair of nodes talks through
a ``DelayProxy`` in the dialler's namespace (its ``[peers]`` entry points at the proxy, the
proxy at the other node's end of their veth pair), so a link can be delayed as well as cut
or shaped.  NBD and control sockets are unix sockets, which the test reaches from outside
the namespaces.

The operations are what the nemesis does to a node -- ``kill`` (-9), ``stop`` (SIGTERM),
``start``, ``freeze``/``thaw`` (SIGSTOP/SIGCONT), ``power_cut`` (kill -9 of the daemon, then
the disk's cache is lost, wholly or in part) -- and what it asks of one: ``status`` (None when
the node cannot be asked, which the checker treats as Unknown) and ``vk`` (the CLI).
``close()`` stops every process it started, by PID, and deletes the namespaces.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.fault.delay_proxy import DelayProxy
from tests.fault.network import Mesh
from tests.integration.powerloss_fs import PowerLossDisk
from volkeeper_lab.launcher import LocalNode, VolumeSpec

VOLUME = "data1"


class FaultNode:
    def __init__(self, root: Path, name: str, size: int, settings: dict[str, Any]) -> None:
        self.name = name
        directory = root.resolve() / name
        self.disk = PowerLossDisk(directory / "backing", directory / "disk", directory / "fs.log")
        self.daemon = LocalNode(
            directory, name, [VolumeSpec(VOLUME, size, path=self.image)], host="0.0.0.0",
            node_settings=settings,
        )  # fmt: skip
        (directory / "state").symlink_to(self.disk.mountpoint / "state")
        self.frozen = False
        self.disk_held = False  # its disk's fsyncs hang: nothing of it can be read meanwhile

    @property
    def image(self) -> Path:
        return self.disk.mountpoint / f"{VOLUME}.img"

    @property
    def alive(self) -> bool:
        return self.daemon.process is not None and self.daemon.process.poll() is None

    @property
    def uri(self) -> str:
        return self.daemon.uri(VOLUME)


class FaultCluster:
    def __init__(
        self, root: Path, names: list[str], size: int, settings: dict[str, Any] | None = None
    ) -> None:
        self.root = root
        self.mesh = Mesh(names)
        self.nodes = {name: FaultNode(root, name, size, settings or {}) for name in names}
        self.proxies: dict[tuple[str, str], DelayProxy] = {}

    def __enter__(self) -> FaultCluster:
        try:
            self.mesh.__enter__()
            for a, b in itertools.permutations(self.nodes, 2):
                proxy = DelayProxy(
                    self.mesh.namespace(a), self.mesh.address(a, b), self.nodes[b].daemon.peer_port
                )
                self.proxies[a, b] = proxy
                self.nodes[a].daemon.peers[b] = f"127.0.0.1:{proxy.port}"
            for node in self.nodes.values():
                node.daemon.netns = self.mesh.namespace(node.name)
                self.start(node.name)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for node in self.nodes.values():
            if node.frozen and node.alive:
                self.thaw(node.name)
            with contextlib.suppress(Exception):
                node.daemon.stop(timeout=10)
            with contextlib.suppress(Exception):
                node.disk.shutdown() if node.disk.process else node.disk.abandon()
        for proxy in self.proxies.values():
            proxy.close()
        self.mesh.close()

    # -- what the nemesis does to a node -------------------------------------------------------

    def kill(self, name: str) -> None:
        self.thaw(name)
        self.nodes[name].daemon.kill()

    def stop(self, name: str) -> int:
        self.thaw(name)
        return self.nodes[name].daemon.stop()

    def start(self, name: str) -> None:
        node = self.nodes[name]
        if node.disk.process is None:
            node.disk.start()
            (node.disk.mountpoint / "state").mkdir(exist_ok=True)
        if not node.alive:
            node.daemon.start()

    def freeze(self, name: str) -> None:
        node = self.nodes[name]
        if node.alive and not node.frozen:
            assert node.daemon.process is not None
            os.kill(node.daemon.process.pid, signal.SIGSTOP)
            node.frozen = True

    def thaw(self, name: str) -> None:
        node = self.nodes[name]
        if node.frozen:
            if node.alive:
                assert node.daemon.process is not None
                os.kill(node.daemon.process.pid, signal.SIGCONT)
            node.frozen = False

    def power_cut(self, name: str, seed: int, fraction: float) -> dict[str, Any]:
        """The daemon dies with its disk; a seeded ``fraction`` of the disk's cache survives."""
        node = self.nodes[name]
        self.kill(name)
        return node.disk.power_loss(seed, fraction)

    def delay(self, a: str, b: str, milliseconds: int) -> None:
        self.proxies[a, b].set_delay(milliseconds)
        self.proxies[b, a].set_delay(milliseconds)

    # -- what the nemesis asks -----------------------------------------------------------------

    def status(self, name: str, timeout: float = 3.0) -> dict[str, Any] | None:
        """The node's /status, or None when it cannot be asked (down, frozen, hung)."""
        node = self.nodes[name]
        if not node.alive or node.frozen:
            return None
        transport = httpx.HTTPTransport(uds=str(node.daemon.control_socket))
        try:
            with httpx.Client(transport=transport, base_url="http://n", timeout=timeout) as api:
                answer = api.get("/status")
        except httpx.HTTPError:
            return None
        document: dict[str, Any] = answer.json() if answer.status_code == 200 else None
        return document

    def vk(self, name: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        node = self.nodes[name]
        env = {k: v for k, v in os.environ.items() if k != "VOLKEEPER_NODE"}
        control = f"unix:{node.daemon.control_socket}"
        return subprocess.run(
            [sys.executable, "-m", "volkeeper", *args, "--node", control],
            capture_output=True, text=True, timeout=timeout, env=env, check=False,
        )  # fmt: skip
