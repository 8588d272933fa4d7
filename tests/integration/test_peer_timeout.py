"""``[node] peer_timeout`` end to end, through a link that freezes as a partition does.

How this works: beta (the target) and alpha (the source, reaching beta through a
``TcpProxy``) both run with ``peer_timeout = 1``; a sync job is Mirroring when the proxy
freezes the link: packets vanish both ways and nothing is closed, so each side holds a
half-open connection.  A synchronous write must then wait for the silent target no longer
than peer_timeout plus one ping interval; the mirror leaves Mirroring with the write marked;
beta drops the dead session (else it would refuse alpha's next HELLO as busy for ever), and
the mirror comes back by itself, by a partial resync, over a new connection.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import need
from tests.integration.tcp_proxy import TcpProxy
from tests.support.mirroring import (
    MiB,
    mirror_view,
    ok,
    post_job,
    random_file,
    stop_both_and_compare,
    wait_state,
)
from volkeeper_lab.launcher import LocalNode, VolumeSpec, free_tcp_port

PEER_TIMEOUT = 1


@contextlib.contextmanager
def started(
    directory: Path, name: str, peers: dict[str, int | str], peer_port: int = 0
) -> Iterator[LocalNode]:
    """A daemon whose config sets ``[node] peer_timeout``; stopped on the way out (exit 0)."""
    node = LocalNode(
        directory / name, name, [VolumeSpec("data1", "16MiB")], peers=peers, peer_port=peer_port
    )
    config = node.write_config()
    text = config.read_text().replace("[node]\n", f"[node]\npeer_timeout = {PEER_TIMEOUT}\n", 1)
    config.write_text(text)
    node.start()
    try:
        yield node
    finally:
        code = node.stop()
    assert code == 0, f"{name} exit status on SIGTERM: {code}"


def test_a_partitioned_target_holds_sync_writes_for_peer_timeout_at_most(tmp_path: Path) -> None:
    need("nbdcopy")
    alpha_port = free_tcp_port()  # beta, the target, must know its source
    with (
        started(tmp_path, "beta", {"alpha": alpha_port}) as beta,
        TcpProxy(beta.peer_port) as proxy,
        started(tmp_path, "alpha", {"beta": proxy.port}, alpha_port) as alpha,
    ):
        response = post_job(alpha)
        assert response.status_code == 201, response.text
        wait_state(alpha, "Mirroring")
        proxy.freeze()
        data = random_file(tmp_path / "a.bin", MiB)
        began = time.monotonic()
        ok("nbdcopy", str(data), alpha.uri(), timeout=30)
        elapsed = time.monotonic() - began
        view = mirror_view(alpha)
        # peer_timeout + a ping interval (0.25 s) + nbdcopy's own start: not 10 s (the default)
        assert elapsed < 3.5, f"a 1 MiB sync write took {elapsed:.1f} s with the target cut off"
        assert view["state"] in ("Resync pending", "Resyncing"), view
        assert view["out_of_sync_bytes"] > 0, view
        assert "beta:data1 silent for 1 s (peer_timeout)" in alpha.log_text()
        wait_state(alpha, "Mirroring", timeout=30)  # beta let the dead session go
        assert "mirror source silent: session dropped" in beta.log_text()
        assert proxy.accepted >= 2
        stop_both_and_compare(alpha, beta)
