"""A two-node Pacemaker cluster on one machine, for tests: each node in its own namespaces.

How this works: ``TwoNodeCluster`` makes two network namespaces joined by a veth pair
(10.W.X.1 and .2) and, in each, one shell started with ``unshare --mount --ipc`` that gives
the node a private /var/lib/pacemaker, /var/lib/corosync, /run, /dev/shm (libqb's shared
memory) and /etc/volkeeper (the node's own volkeeper config: the agent reads its control
address there, as on a real node), then runs corosync (a two-node udpu ring) and pacemakerd.
Cluster commands run inside a node with ``node.run(...)`` (nsenter into that shell's
namespaces).  ``stop_node`` shuts a node's Pacemaker down cleanly (its resources are
stopped, or moved, first) and ``start_node`` brings it back.  Everything is torn down,
processes by PID and namespaces by name, on the way out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

COROSYNC = """totem {{
    version: 2
    cluster_name: volkeeper-two
    transport: udpu
    crypto_cipher: none
    crypto_hash: none
}}
nodelist {{
    node {{
        ring0_addr: {a}
        name: nodeA
        nodeid: 1
    }}
    node {{
        ring0_addr: {b}
        name: nodeB
        nodeid: 2
    }}
}}
quorum {{
    provider: corosync_votequorum
    two_node: 1
}}
logging {{
    to_logfile: yes
    logfile: {log}
    to_stderr: no
    to_syslog: no
}}
"""

NODE_SHELL = """set -e
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mkdir -p /run/crm /run/resource-agents
for d in lib corosync etc; do mkdir -p "$DIR/$d"; done
mkdir -p "$DIR/lib/cib" "$DIR/lib/cores" "$DIR/lib/pengine" "$DIR/lib/blackbox" /etc/volkeeper
[ -f "$DIR/lib/cib/cib.xml" ] || cp "$CIB" "$DIR/lib/cib/cib.xml"
chown -R hacluster:haclient "$DIR/lib"
chmod 600 "$DIR/lib/cib/cib.xml"
mount --bind "$DIR/lib" /var/lib/pacemaker
mount --bind "$DIR/corosync" /var/lib/corosync
mount --bind "$DIR/etc" /etc/volkeeper
corosync -f -c "$DIR/corosync.conf" >> "$DIR/daemons.out" 2>&1 &
COROSYNC=$!
set +e
for i in $(seq 100); do corosync-quorumtool -s >/dev/null 2>&1 && break; sleep 0.1; done
PCMK_logfile="$DIR/pacemaker.log" pacemakerd >> "$DIR/daemons.out" 2>&1
kill $COROSYNC
wait $COROSYNC
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    if check:
        assert done.returncode == 0, f"{' '.join(argv)}: {done.stdout}{done.stderr}"
    return done


class ClusterNode:
    def __init__(self, name: str, netns: str, directory: Path) -> None:
        self.name, self.netns, self.directory = name, netns, directory
        self.shell: subprocess.Popen[bytes] | None = None

    def start(self, cib: Path) -> None:
        env = {**os.environ, "DIR": str(self.directory), "CIB": str(cib)}
        self.shell = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--ipc",
             "--propagation", "private", "sh", "-c", NODE_SHELL],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command in this node's namespaces (its Pacemaker, its /etc/volkeeper)."""
        assert self.shell is not None, f"{self.name} is not running"
        return sh("nsenter", "-t", str(self.shell.pid), "-m", "-i", "-n", *argv, check=check)

    def stop(self) -> None:
        if self.shell is None or self.shell.poll() is not None:
            return
        self.run("pacemakerd", "--shutdown", check=False)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.shell.wait(60)
        if self.shell.poll() is None:  # whatever is left in its namespaces
            self.run("pkill", "-9", "-f", "corosync|pacemaker", check=False)
            self.shell.kill()
            self.shell.wait()
        self.shell = None


class TwoNodeCluster:
    def __init__(self, directory: Path, cib: str, tag: int) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.cib = directory / "cib.xml"
        self.cib.write_text(cib)
        self.tag = tag
        self.addresses = (f"10.98.{tag}.1", f"10.98.{tag}.2")
        self.nodes = {
            name: ClusterNode(name, f"vkpc-{name}-{tag}", directory / name)
            for name in ("nodeA", "nodeB")
        }

    def __enter__(self) -> TwoNodeCluster:
        try:
            a, b = self.nodes["nodeA"], self.nodes["nodeB"]
            for node in (a, b):
                sh("ip", "netns", "add", node.netns)
                sh("ip", "-n", node.netns, "link", "set", "lo", "up")
                node.directory.mkdir(parents=True, exist_ok=True)
                (node.directory / "etc").mkdir(exist_ok=True)
                conf = COROSYNC.format(a=self.addresses[0], b=self.addresses[1],
                                       log=node.directory / "corosync.log")  # fmt: skip
                (node.directory / "corosync.conf").write_text(conf)
            sh("ip", "link", "add", f"vkpa{self.tag}", "netns", a.netns, "type", "veth",
               "peer", "name", f"vkpb{self.tag}", "netns", b.netns)  # fmt: skip
            for node, address, link in ((a, self.addresses[0], "a"), (b, self.addresses[1], "b")):
                sh("ip", "-n", node.netns, "addr", "add", f"{address}/24", "dev",
                   f"vkp{link}{self.tag}")  # fmt: skip
                sh("ip", "-n", node.netns, "link", "set", f"vkp{link}{self.tag}", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()
        for node in self.nodes.values():
            sh("ip", "netns", "del", node.netns, check=False)

    def config(self, name: str, volkeeper_config: Path) -> None:
        """``name``'s /etc/volkeeper/node.toml: the config of the volkeeper node it runs."""
        shutil.copy(volkeeper_config, self.nodes[name].directory / "etc" / "node.toml")

    def start(self, *names: str) -> None:
        for name in names or tuple(self.nodes):
            self.nodes[name].start(self.cib)
        self.until(lambda: self.online() >= set(names or self.nodes), 90, "nodes online")

    def any_node(self) -> ClusterNode:
        return next(n for n in self.nodes.values() if n.shell is not None)

    def online(self) -> set[str]:
        done = self.any_node().run("crm_mon", "-1", "--output-as=xml", check=False)
        if done.returncode != 0:
            return set()
        document = ET.fromstring(done.stdout)
        return {n.get("name", "") for n in document.iter("node") if n.get("online") == "true"}

    def roles(self, resource: str) -> dict[str, str]:
        """Node -> the role of ``resource`` there ("Promoted", "Unpromoted", "Started")."""
        done = self.any_node().run("crm_mon", "-1", "--output-as=xml")
        found = {}
        for element in ET.fromstring(done.stdout).iter("resource"):
            if element.get("id") == resource and element.get("active") == "true":
                for node in element.iter("node"):
                    found[node.get("name", "")] = element.get("role", "")
        return found

    @staticmethod
    def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
            time.sleep(0.3)
