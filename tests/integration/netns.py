"""Two network namespaces joined by a veth pair shaped with tc tbf: a thin link for tests.

How this works: ``ShapedLink(rate)`` creates namespaces ``vkt-src-N`` and ``vkt-dst-N`` (N
unique per process and link), a veth pair between them with 10.W.X.1 and 10.W.X.2, and a tbf
qdisc of ``rate`` on both ends; closing it deletes the namespaces (and so the pair).  Daemons
run inside with ``LocalNode(netns=..., host=...)``; unix sockets (NBD, control) still work
from the test, since the filesystem is shared.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from types import TracebackType

_serial = itertools.count(1)


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


class ShapedLink:
    def __init__(self, rate: str) -> None:
        n = os.getpid() % 200 * 50 + next(_serial) % 50
        self.tag = f"{n}"
        self.source, self.target = f"vkt-src-{n}", f"vkt-dst-{n}"
        self.source_ip = f"10.{100 + n // 256 % 100}.{n % 256}.1"
        self.target_ip = f"10.{100 + n // 256 % 100}.{n % 256}.2"
        self.rate = rate

    def __enter__(self) -> ShapedLink:
        try:
            for ns in (self.source, self.target):
                _sh("ip", "netns", "add", ns)
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
            a, b = f"vta{self.tag}", f"vtb{self.tag}"
            _sh("ip", "link", "add", a, "netns", self.source, "type", "veth",
                "peer", "name", b, "netns", self.target)  # fmt: skip
            for ns, dev, ip in ((self.source, a, self.source_ip), (self.target, b, self.target_ip)):
                _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                _sh("ip", "-n", ns, "link", "set", dev, "up")
                _sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
                    "burst", "64kb", "latency", "100ms")  # fmt: skip
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
        for ns in (self.source, self.target):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
