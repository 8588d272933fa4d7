"""Mirroring over a TLS replication link: two real daemons, certificates from trustme.

Each node's ``[tls]`` table names a certificate for the node's own name, its key, and the CA
both trust.  The first test mirrors through real NBD writes and compares the backing files after
both daemons stop; the second gives beta a certificate from another CA: alpha must refuse it,
keep the mirror in "Resync pending" with a ``last_error`` that names the certificate problem,
and both daemons must stay up (and still exit 0 on SIGTERM at teardown).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import trustme

from tests.conftest import NodeFactory, need
from tests.integration.rawnbd import RawNbd
from tests.support.mirroring import (
    data1,
    mirror_view,
    ok,
    post_job,
    random_file,
    sha256,
    stop_both_and_compare,
    wait_state,
)
from volkeeper_lab.launcher import LocalNode, VolumeSpec

MiB = 1 << 20


def pem_files(
    directory: Path, issuer: trustme.CA, name: str, trusted: trustme.CA
) -> tuple[Path, Path, Path]:
    """(certificate, key, ca) for node ``name``, as LocalNode's ``tls`` field wants them."""
    directory.mkdir(parents=True, exist_ok=True)
    issued = issuer.issue_cert(name)
    certificate, key, ca = (
        directory / f"{name}.crt",
        directory / f"{name}.key",
        directory / "ca.crt",
    )
    issued.cert_chain_pems[0].write_to_path(str(certificate))
    issued.private_key_pem.write_to_path(str(key))
    trusted.cert_pem.write_to_path(str(ca))
    key.chmod(0o600)
    return certificate, key, ca


def tls_pair(
    start_node: NodeFactory,
    tmp_path: Path,
    beta_issuer: trustme.CA | None = None,
    alpha_named: str = "alpha",
) -> tuple[LocalNode, LocalNode]:
    """beta (target) then alpha (source), both with [tls]; beta's certificate from
    ``beta_issuer`` (default: the CA both trust), alpha's naming ``alpha_named``."""
    ca = trustme.CA()
    pki = tmp_path / "pki"
    beta = start_node(
        "beta",
        [VolumeSpec("data1", "32MiB")],
        tls=pem_files(pki / "beta", beta_issuer or ca, "beta", ca),
    )
    alpha = start_node(
        "alpha",
        [VolumeSpec("data1", "32MiB")],
        peers={"beta": beta.peer_port},
        tls=pem_files(pki / "alpha", ca, alpha_named, ca),
    )
    return alpha, beta


def wait_log(node: LocalNode, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in node.log_text():
        assert time.monotonic() < deadline, f"{text!r} not in {node.name}'s log:\n{node.log_text()}"
        time.sleep(0.05)


def test_mirroring_over_tls(start_node: NodeFactory, tmp_path: Path) -> None:
    need("nbdcopy")
    alpha, beta = tls_pair(start_node, tmp_path)
    for node in (alpha, beta):
        assert "replication link: TLS 1.3 with mutual authentication" in node.log_text()
        assert "certificates='site CA'" in node.log_text()
        assert "replication TLS certificate problem" not in node.log_text()
    ok("nbdcopy", str(random_file(tmp_path / "before.bin", 8 * MiB)), alpha.uri())

    response = post_job(alpha)
    assert response.status_code == 201, response.text
    view = wait_state(alpha, "Mirroring", timeout=60)
    assert view["last_error"] is None, view
    assert view["sent_bytes"] >= 32 * MiB, view  # the full resync went over TLS

    # Writes while Mirroring travel over the TLS link, synchronously.
    with RawNbd.open(str(alpha.nbd_socket), "data1") as client:
        for offset in (0, 5 * MiB + 4096, 31 * MiB):
            assert client.write(offset, os.urandom(256 * 1024)).error == 0
        assert client.flush().error == 0
    ok("nbdcopy", str(random_file(tmp_path / "after.bin", 4 * MiB)), alpha.uri())
    assert mirror_view(alpha)["state"] == "Mirroring"

    # beta's replication port speaks TLS only: a plain TCP client is dropped and logged.
    with socket.create_connection(("127.0.0.1", beta.peer_port), timeout=5) as plain:
        plain.sendall(b"VKP1" + bytes(60))
        plain.settimeout(5)
        assert plain.recv(100) == b""  # closed by beta
    wait_log(beta, "plain TCP, and no peer is configured insecure = true")
    assert mirror_view(alpha)["state"] == "Mirroring"

    digest = stop_both_and_compare(alpha, beta)
    assert digest == sha256(data1(alpha))


def test_certificate_from_another_ca_refuses_the_job(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    alpha, beta = tls_pair(start_node, tmp_path, beta_issuer=trustme.CA())
    wait_log(beta, "replication TLS certificate problem")  # beta's own start-up check

    response = post_job(alpha)  # the target is prepared first: the handshake fails there
    assert response.status_code == 503, response.text
    message = response.json()["error"]["message"]
    assert "TLS handshake with beta" in message, message
    assert "certificate was rejected: unable to get local issuer certificate" in message
    assert alpha.status()["jobs"] == [] and alpha.status()["mirrors"] == []
    wait_log(beta, "replication TLS handshake failed")

    # The source keeps serving its application; nothing crashed, nothing was claimed.
    with RawNbd.open(str(alpha.nbd_socket), "data1") as client:
        assert client.write(0, os.urandom(64 * 1024)).error == 0
        assert client.flush().error == 0
    for node in (alpha, beta):
        assert node.process is not None and node.process.poll() is None, node.log_text()
        assert node.status()["node"] == node.name
    with beta.api() as api:
        (volume,) = api.get("/volumes").json()
    assert (volume["role"], volume["locked"]) == ("standalone", None), volume


def test_a_source_whose_certificate_names_another_node_is_refused(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    """A certificate from the trusted CA is not enough: it must name the node the HELLO
    claims to be, or any holder of a certificate could feed any target."""
    alpha, beta = tls_pair(start_node, tmp_path, alpha_named="mallory")
    response = post_job(alpha)
    assert response.status_code == 409, response.text
    message = response.json()["error"]["message"]
    assert "names mallory, not the source node 'alpha'" in message, message
    assert alpha.status()["jobs"] == []
    with beta.api() as api:
        (volume,) = api.get("/volumes").json()
    assert (volume["role"], volume["locked"]) == ("standalone", None), volume


def test_daemon_refuses_a_key_that_does_not_match(tmp_path: Path) -> None:
    ca = trustme.CA()
    certificate, _, ca_file = pem_files(tmp_path / "pki", ca, "alpha", ca)
    _, other_key, _ = pem_files(tmp_path / "other", ca, "alpha", ca)
    node = LocalNode(tmp_path / "alpha", "alpha", tls=(certificate, other_key, ca_file))
    try:
        with pytest.raises(RuntimeError, match="exited early"):
            node.start()
    finally:
        code = node.stop()
    assert code == 2
    assert f"tls.key: {other_key} does not match the certificate in {certificate}" in (
        node.log_text()
    )
    assert not (tmp_path / "alpha" / "state").exists()  # refused before anything was created
