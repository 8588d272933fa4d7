"""Node identities end to end: real daemons, TLS 1.3 with pinned fingerprints, real NBD.

Each test gives its nodes identities and pins (``introduce``, as ``volkeeper node init`` and
``node trust`` do; ``test_safe_by_default_...`` goes through the CLI itself) or leaves them
unpinned, then starts them with the ``start_node`` fixture (``secure=True``: no ``insecure``
peers).  A target learns its source from its own ``[peers]`` (the fixture adds it there, as an
administrator must).  The attacks are the issue's: a node that is not the pinned one can
neither write into a target nor receive a mirror's data.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from tests.conftest import NodeFactory, need
from tests.integration.rawnbd import RawNbd
from tests.integration.tcp_proxy import TcpProxy
from tests.support.mirroring import (
    cli,
    data1,
    mirror_view,
    ok,
    post_job,
    random_file,
    sha256,
    stop_both_and_compare,
    wait_state,
)
from volkeeper.io import identity
from volkeeper.io.identity import KnownPeers
from volkeeper_lab.launcher import LocalNode, VolumeSpec, free_tcp_port

SIZE = "16MiB"
MiB = 1024 * 1024


def introduce(root: Path, *names: str) -> dict[str, str]:
    """Identities for ``names`` (nodes of the fixture under ``root``), each pinning the others."""
    prints = {name: identity.ensure(root / name / "state", name)[0].fingerprint for name in names}
    for name in names:
        for other in names:
            if other != name:
                KnownPeers(root / name / "state").trust(other, prints[other])
    return prints


def wait_log(node: LocalNode, text: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in node.log_text():
        assert time.monotonic() < deadline, f"{text!r} not in {node.name}'s log:\n{node.log_text()}"
        time.sleep(0.05)


def secure_pair(start_node: NodeFactory) -> tuple[LocalNode, LocalNode]:
    beta = start_node("beta", [VolumeSpec("data1", SIZE)], secure=True)
    alpha = start_node(
        "alpha", [VolumeSpec("data1", SIZE)], peers={"beta": beta.peer_port}, secure=True
    )
    return alpha, beta


def test_mirroring_between_pinned_identities(start_node: NodeFactory, tmp_path: Path) -> None:
    need("nbdcopy")
    prints = introduce(tmp_path, "alpha", "beta")
    alpha, beta = secure_pair(start_node)
    wait_log(beta, "peer certificate fetched")  # alpha's, for beta's TLS server to check
    ok("nbdcopy", str(random_file(tmp_path / "data.bin", 8 * MiB)), alpha.uri())
    response = post_job(alpha)
    assert response.status_code == 201, response.text
    view = wait_state(alpha, "Mirroring")
    assert view["last_error"] is None and view["sent_bytes"] >= 8 * MiB, view

    status = alpha.status()
    assert status["identity"] == prints["alpha"]
    assert status["peers"] == [
        {"name": "beta", "address": f"127.0.0.1:{beta.peer_port}", "link": "pinned",
         "fingerprint": prints["beta"]},
    ]  # fmt: skip
    with alpha.api() as api:
        metrics = api.get("/metrics").text
    assert 'volkeeper_peer_link_info{link="pinned",peer="beta"} 1.0' in metrics
    assert 'volkeeper_peer_link_insecure{peer="beta"} 0.0' in metrics
    for node in (alpha, beta):
        assert "replication link: TLS 1.3 with mutual authentication" in node.log_text()
        assert "INSECURE" not in node.log_text()
    stop_both_and_compare(alpha, beta)


def test_safe_by_default_then_trusted_without_a_restart(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    """Peers listed without pins: nothing flows, the refusal quotes the fingerprint and the
    command; ``node trust`` on both sides (daemons running) is all it takes."""
    alpha, beta = secure_pair(start_node)
    refused = post_job(alpha)
    assert refused.status_code >= 400, refused.text
    message = refused.json()["error"]["message"]
    beta_print = beta.status()["identity"]
    assert f"peer beta is not trusted yet: it presents {beta_print}" in message, message
    assert f"volkeeper node trust beta {beta_print}" in message
    assert alpha.status()["peers"][0]["link"] == "unpinned"
    assert "peer not trusted yet" in alpha.log_text()

    alpha_print = alpha.status()["identity"]
    for node, peer, fingerprint in ((alpha, "beta", beta_print), (beta, "alpha", alpha_print)):
        done = cli("node", "trust", peer, fingerprint, "--config", str(node.config_path))
        assert done.returncode == 0, done.stderr
    wait_log(beta, "peer certificate fetched")
    response = post_job(alpha)
    assert response.status_code == 201, response.text
    wait_state(alpha, "Mirroring")
    assert alpha.status()["peers"][0]["link"] == "pinned"


def test_an_impostor_can_neither_write_into_a_target_nor_receive_a_mirror(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    need("nbdcopy")
    introduce(tmp_path, "alpha", "beta")
    alpha, beta = secure_pair(start_node)
    wait_log(beta, "peer certificate fetched")
    ok("nbdcopy", str(random_file(tmp_path / "data.bin", 4 * MiB)), alpha.uri())
    assert post_job(alpha).status_code == 201
    wait_state(alpha, "Mirroring")
    assert alpha.stop() == 0 and beta.stop() == 0
    held = sha256(data1(beta))

    # mallory calls itself alpha and pins beta's real fingerprint, but has a key of its own.
    beta.start()
    mallory = LocalNode(tmp_path / "mallory", "alpha", [VolumeSpec("data1", SIZE)],
                        peers={"beta": beta.peer_port}, secure=True)  # fmt: skip
    KnownPeers(mallory.state_dir).trust("beta", beta.status()["identity"])  # type: ignore[arg-type]
    mallory.start()
    try:
        ok("nbdcopy", str(random_file(tmp_path / "evil.bin", 4 * MiB)), mallory.uri())
        refused = post_job(mallory)
        assert refused.status_code >= 400, refused.text
        assert "refused our TLS certificate" in refused.json()["error"]["message"]
        wait_log(beta, "not the identity of a peer this node has pinned")
    finally:
        assert mallory.stop() == 0
    assert beta.stop() == 0
    assert sha256(data1(beta)) == held  # nothing of mallory's reached it

    # An impostor beta (a key of its own) at beta's address: alpha sends it nothing.
    fake = LocalNode(tmp_path / "fake", "beta", [VolumeSpec("data1", SIZE)],
                     peers={"alpha": alpha.peer_port}, peer_port=beta.peer_port,
                     secure=True)  # fmt: skip
    fake.start()
    before = sha256(data1(fake))
    alpha.start()
    try:
        deadline = time.monotonic() + 15
        while "identity of peer beta has changed" not in str(mirror_view(alpha)["last_error"]):
            assert time.monotonic() < deadline, mirror_view(alpha)
            time.sleep(0.1)
        view = mirror_view(alpha)
        assert view["state"] != "Mirroring" and view["sent_bytes"] == 0, view
        assert "REFUSED: the identity of peer beta has changed" in view["last_error"]
    finally:
        assert alpha.stop() == 0 and fake.stop() == 0
    assert sha256(data1(fake)) == before


def test_an_insecure_peer_is_shown_loudly(start_node: NodeFactory) -> None:
    beta = start_node("beta", [VolumeSpec("data1", SIZE)])  # the fixture's default: insecure
    alpha = start_node("alpha", [VolumeSpec("data1", SIZE)], peers={"beta": beta.peer_port})
    assert post_job(alpha).status_code == 201
    wait_state(alpha, "Mirroring")
    assert alpha.status()["peers"][0]["link"] == "insecure"  # type: ignore[index]
    with alpha.api() as api:
        assert 'volkeeper_peer_link_insecure{peer="beta"} 1.0' in api.get("/metrics").text
    shown = cli("status", "--node", alpha.control)
    assert "INSECURE replication link to beta: plain TCP" in shown.stdout, shown.stdout
    assert "INSECURE replication link: plain TCP" in alpha.log_text()


def test_a_config_pin_works_without_known_peers(start_node: NodeFactory, tmp_path: Path) -> None:
    """``[peers] beta = { address, fingerprint }`` alone is enough on the dialling side."""
    prints = {n: identity.ensure(tmp_path / n / "state", n)[0].fingerprint for n in ("a", "b")}
    port = free_tcp_port()
    beta = start_node("b", [VolumeSpec("data1", SIZE)], secure=True,
                      peers={"a": port})  # fmt: skip
    KnownPeers(beta.state_dir).trust("a", prints["a"])
    alpha = LocalNode(tmp_path / "a", "a", [VolumeSpec("data1", SIZE)], peer_port=port,
                      secure=True, peers={"b": beta.peer_port})  # fmt: skip
    text = alpha.write_config().read_text()
    pinned = f'b = {{ address = "127.0.0.1:{beta.peer_port}", fingerprint = "{prints["b"]}" }}'
    alpha.config_path.write_text(text.replace(f'b = "127.0.0.1:{beta.peer_port}"', pinned))
    alpha.start()
    try:
        wait_log(beta, "peer certificate fetched")
        response = post_job(alpha, source="a:data1", target="b:data1")
        assert response.status_code == 201, response.text
        wait_state(alpha, "Mirroring")
        assert alpha.status()["peers"][0]["fingerprint"] == prints["b"]  # type: ignore[index]
    finally:
        assert alpha.stop() == 0


def test_a_tampered_replayed_or_reordered_record_ends_the_link_not_the_data(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    """A proxy on the path flips a bit, replays a chunk or sends two out of order, while sync
    writes flow: TLS's record integrity rejects each, the link drops, the writes' regions stay
    marked and are resent, and the copies end identical."""
    introduce(tmp_path, "alpha", "beta")
    beta = start_node("beta", [VolumeSpec("data1", SIZE)], secure=True)
    with TcpProxy(beta.peer_port) as proxy:
        alpha = start_node(
            "alpha", [VolumeSpec("data1", SIZE)], peers={"beta": proxy.port}, secure=True
        )
        wait_log(beta, "peer certificate fetched")
        assert post_job(alpha).status_code == 201
        wait_state(alpha, "Mirroring")
        rng = random.Random(16)
        with RawNbd.open(str(alpha.nbd_socket), "data1") as client:
            for rounds, how in enumerate(("flip", "replay", "reorder"), start=1):
                proxy.tamper(how)
                deadline = time.monotonic() + 20
                while beta.log_text().count("TLS record rejected") < rounds:
                    assert time.monotonic() < deadline, (how, beta.log_text()[-3000:])
                    offset = rng.randrange(int(SIZE.removesuffix("MiB")) * 16) * 64 * 1024
                    assert client.write(offset, rng.randbytes(64 * 1024)).error == 0
                assert proxy.tampered == rounds
                wait_state(alpha, "Mirroring")  # reconnected, marked regions resent
            assert client.flush().error == 0
        closes = [line for line in beta.log_text().splitlines() if "TLS record rejected" in line]
        assert len(closes) == 3, closes
        assert all("peer link closed" in line for line in closes), closes
        stop_both_and_compare(alpha, beta)
