"""The throttle over a real thin link: two namespaces, a veth pair shaped to 80 Mbit/s.

Below the link's rate the throttle sets the pace (within 5% over a window of seconds);
above it, the link does, and the mirror still completes its resync and mirrors correctly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import NodeFactory, need
from tests.integration.netns import ShapedLink
from tests.support.mirroring import ok, random_file, sha256
from tests.support.watch import rate_of, sample_wire
from volkeeper_lab.launcher import LocalNode, VolumeSpec

pytestmark = pytest.mark.serial  # measures rates over a shaped link: runs alone

MiB = 1024 * 1024
LINK = 80 * 1000 * 1000 / 8  # bytes/s of "80mbit"


@pytest.fixture
def link() -> Iterator[ShapedLink]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    with ShapedLink("80mbit") as shaped:
        yield shaped


def resync_view(alpha: LocalNode) -> dict[str, object]:
    (view,) = [m for m in alpha.status()["mirrors"] if m["role"] == "source"]  # type: ignore[union-attr]
    return view  # type: ignore[no-any-return]


def test_throttle_below_and_above_a_shaped_link(
    start_node: NodeFactory, link: ShapedLink, tmp_path: Path
) -> None:
    need("nbdcopy")
    beta = start_node("beta", [VolumeSpec("data1", "160MiB")], host=link.target_ip,
                      netns=link.target)  # fmt: skip
    alpha = start_node(
        "alpha", [VolumeSpec("data1", "160MiB")], host=link.source_ip, netns=link.source,
        peers={"beta": f"{link.target_ip}:{beta.peer_port}"},
    )  # fmt: skip
    ok("nbdcopy", str(random_file(tmp_path / "noise.bin", 160 * MiB)), alpha.uri())
    body = {"name": "web", "source": "alpha:data1", "target": "beta:data1", "mode": "async",
            "throttle": "6MiB", "confirm": True}  # fmt: skip
    with alpha.api() as api:
        created = api.post("/jobs", json=body)
    assert created.status_code == 201, created.text

    time.sleep(2.0)  # the full resync runs at the throttle: 6 MiB/s, below the link's 9.5
    throttled = rate_of(sample_wire(alpha, 8.0))
    with alpha.api() as api:
        raised = api.patch("/jobs/web/mirror", json={"throttle": "64MiB"})
    assert raised.status_code == 200, raised.text
    time.sleep(1.0)  # now the link is the limit
    linked = rate_of(sample_wire(alpha, 5.0))
    rates = f"throttled {throttled / MiB:.2f} MiB/s, link-bound {linked / MiB:.2f} MiB/s"
    print(rates)
    assert abs(throttled / (6 * MiB) - 1) <= 0.05, rates
    assert 0.75 * LINK <= linked <= 1.05 * LINK, rates

    deadline = time.monotonic() + 60
    while (view := resync_view(alpha))["state"] != "Mirroring":
        assert time.monotonic() < deadline, view
        time.sleep(0.5)
    codes = [alpha.stop(), beta.stop()]
    assert codes == [0, 0]
    assert sha256(alpha.volume_path(alpha.volumes[0])) == sha256(beta.volume_path(beta.volumes[0]))
