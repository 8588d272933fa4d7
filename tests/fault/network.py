"""Nodes in network namespaces of their own, every two joined by a veth pair the nemesis breaks.

How this works: ``Mesh(names)`` creates one namespace per node (``vkf<tag>-<name>``, loopback
up) and, for every pair of nodes, a veth pair in its own /24 (``10.<a>.<b>.1`` on the first
node, ``.2`` on the second), so each link can be broken or shaped alone, as between machines
with a cable each.  ``address(a, b)`` is where ``a`` reaches ``b``.

Faults, each undone by its ``heal_*``:

- ``partition(a, b, one_way)``: iptables DROP of everything ``a`` sends on the link to ``b``
  (and, both ways, of everything ``b`` sends to ``a``): packets vanish, connections hang
  half-open until a timeout notices -- a switch that died, not a cable pulled (which the
  kernel would report at once);
- ``shape(a, b, rate)``: a tc tbf qdisc of ``rate`` on both ends of the link.

Delays need a userspace proxy (the kernel here has no netem): tests/fault/delay_proxy.py.
``close()`` deletes the namespaces, which deletes the veth pairs and their rules.
"""

from __future__ import annotations

import itertools
import os
import subprocess

_serial = itertools.count(1)


def sh(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


class Mesh:
    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.tag = f"{os.getpid() % 10000}x{next(_serial)}"
        self.subnet = 100 + (os.getpid() + next(_serial)) % 100
        self.links: dict[frozenset[str], tuple[int, str, str]] = {}  # pair -> (n, dev a, dev b)
        self.cut: set[tuple[str, str]] = set()  # (from, to) pairs whose packets are dropped
        self.shaped: set[frozenset[str]] = set()

    def namespace(self, name: str) -> str:
        return f"vkf{self.tag}-{name}"

    def __enter__(self) -> Mesh:
        try:
            for name in self.names:
                sh("ip", "netns", "add", self.namespace(name))
                sh("ip", "-n", self.namespace(name), "link", "set", "lo", "up")
            for n, (a, b) in enumerate(itertools.combinations(self.names, 2)):
                self._join(n, a, b)
        except BaseException:
            self.close()
            raise
        return self

    def _join(self, n: int, a: str, b: str) -> None:
        dev_a, dev_b = f"vf{self.tag}{n}a", f"vf{self.tag}{n}b"
        sh("ip", "link", "add", dev_a, "netns", self.namespace(a), "type", "veth",
           "peer", "name", dev_b, "netns", self.namespace(b))  # fmt: skip
        for name, dev, host in ((a, dev_a, 1), (b, dev_b, 2)):
            ns = self.namespace(name)
            sh("ip", "-n", ns, "addr", "add", f"10.{self.subnet}.{n}.{host}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        self.links[frozenset((a, b))] = (n, dev_a, dev_b)

    def address(self, a: str, b: str) -> str:
        """The address at which ``a`` reaches ``b``."""
        n, _, _ = self.links[frozenset((a, b))]
        host = 1 if self.names.index(b) < self.names.index(a) else 2
        return f"10.{self.subnet}.{n}.{host}"

    def _device(self, a: str, b: str) -> str:
        """``a``'s end of the link to ``b``."""
        _, dev_a, dev_b = self.links[frozenset((a, b))]
        return dev_a if self.names.index(a) < self.names.index(b) else dev_b

    # -- faults ---------------------------------------------------------------------------------

    def partition(self, a: str, b: str, one_way: bool = False) -> None:
        for sender, receiver in [(a, b)] if one_way else [(a, b), (b, a)]:
            if (sender, receiver) not in self.cut:
                dev = self._device(sender, receiver)
                sh("ip", "netns", "exec", self.namespace(sender),
                   "iptables", "-A", "OUTPUT", "-o", dev, "-j", "DROP")  # fmt: skip
                self.cut.add((sender, receiver))

    def heal_partitions(self) -> None:
        for sender in {s for s, _ in self.cut}:
            sh("ip", "netns", "exec", self.namespace(sender), "iptables", "-F", "OUTPUT")
        self.cut.clear()

    def shape(self, a: str, b: str, rate: str) -> None:
        for name, other in ((a, b), (b, a)):
            sh("tc", "-n", self.namespace(name), "qdisc", "replace", "dev",
               self._device(name, other), "root", "tbf", "rate", rate,
               "burst", "64kb", "latency", "200ms")  # fmt: skip
        self.shaped.add(frozenset((a, b)))

    def heal_shaping(self) -> None:
        for pair in self.shaped:
            a, b = sorted(pair)
            for name, other in ((a, b), (b, a)):
                sh("tc", "-n", self.namespace(name), "qdisc", "del", "dev",
                   self._device(name, other), "root")  # fmt: skip
        self.shaped.clear()

    # -- teardown -------------------------------------------------------------------------------

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "del", self.namespace(name)], capture_output=True)
