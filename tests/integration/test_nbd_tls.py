"""NBD exports over TLS and behind client rules, with real clients (libnbd's nbdinfo/nbdcopy,
qemu-img), a real daemon and certificates from a test CA (trustme).

The server's certificate names ``localhost``, where the clients dial it, and is checked by
them against the CA (GnuTLS, as deployed).  ``require`` answers every option but STARTTLS
with NBD_REP_ERR_TLS_REQD, so a plaintext client learns nothing and attaches nothing.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import trustme

from tests.conftest import NodeFactory, need
from tests.support.mirroring import random_file
from volkeeper_lab.launcher import LocalNode, VolumeSpec

SIZE = "8MiB"


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def pki(tmp_path: Path, client: bool = False) -> tuple[dict[str, str], Path]:
    """Server settings for ``[node]`` and libnbd's certificate directory for a client."""
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    (tmp_path / "server").mkdir()
    certificate, key = tmp_path / "server" / "cert.pem", tmp_path / "server" / "key.pem"
    server.cert_chain_pems[0].write_to_path(str(certificate))
    server.private_key_pem.write_to_path(str(key))
    directory = tmp_path / "client"
    directory.mkdir()
    ca.cert_pem.write_to_path(str(directory / "ca-cert.pem"))  # what libnbd verifies with
    if client:
        issued = ca.issue_cert("client.example")
        issued.cert_chain_pems[0].write_to_path(str(directory / "client-cert.pem"))
        issued.private_key_pem.write_to_path(str(directory / "client-key.pem"))
    return {"nbd_tls_certificate": str(certificate), "nbd_tls_key": str(key)}, directory


def tls_node(start_node: NodeFactory, settings: dict[str, str | int | float]) -> LocalNode:
    return start_node("alpha", [VolumeSpec("data1", SIZE)], nbd_tcp=True, node_settings=settings)


def uri(node: LocalNode, scheme: str = "nbds", query: str = "") -> str:
    return f"{scheme}://localhost:{node.nbd_port}/data1{query}"


def test_tls_required_serves_real_tls_clients_and_tells_plain_ones_nothing(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    need("nbdinfo", "nbdcopy")
    settings, certs = pki(tmp_path)
    node = tls_node(start_node, {**settings, "nbd_tls": "require"})
    secure = uri(node, query=f"?tls-certificates={certs}")
    shown = run("nbdinfo", "--json", secure)
    assert shown.returncode == 0, shown.stderr
    assert '"export-size": 8388608' in shown.stdout and '"is_read_only": false' in shown.stdout

    data = random_file(tmp_path / "data.bin", 4 << 20)
    copied = run("nbdcopy", "--", str(data), secure)
    assert copied.returncode == 0, copied.stderr
    back = tmp_path / "back.bin"
    assert run("nbdcopy", "--", secure, str(back)).returncode == 0
    assert back.read_bytes()[: 4 << 20] == data.read_bytes()
    assert "nbd client on TLS" in node.log_text()

    plain = run("nbdinfo", "--json", uri(node, "nbd"))
    assert plain.returncode != 0
    assert "data1" not in plain.stdout
    listed = run("nbdinfo", "--list", uri(node, "nbd"))
    assert listed.returncode != 0 and "data1" not in listed.stdout


def test_qemu_img_reads_over_tls(start_node: NodeFactory, tmp_path: Path) -> None:
    need("qemu-img")
    settings, certs = pki(tmp_path)
    node = tls_node(start_node, {**settings, "nbd_tls": "require"})
    # qemu's tls-creds-x509 directory uses libnbd's file names: ca-cert.pem
    info = run(
        "qemu-img", "info", "--output=json",
        "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}",
        "--image-opts",
        f"driver=nbd,host=localhost,port={node.nbd_port},export=data1,tls-creds=tls0",
    )  # fmt: skip
    assert info.returncode == 0, info.stderr
    assert '"virtual-size": 8388608' in info.stdout


def test_offered_tls_serves_both_kinds_of_client(start_node: NodeFactory, tmp_path: Path) -> None:
    need("nbdinfo")
    settings, certs = pki(tmp_path)
    node = tls_node(start_node, {**settings, "nbd_tls": "offer"})
    for target in (uri(node, query=f"?tls-certificates={certs}"), uri(node, "nbd")):
        shown = run("nbdinfo", "--size", target)
        assert (shown.returncode, shown.stdout.strip()) == (0, "8388608"), shown.stderr


def test_a_client_certificate_can_be_required(start_node: NodeFactory, tmp_path: Path) -> None:
    need("nbdinfo")
    settings, certs = pki(tmp_path, client=True)
    settings["nbd_tls_ca"] = str(certs / "ca-cert.pem")
    node = tls_node(start_node, {**settings, "nbd_tls": "require"})
    with_cert = run("nbdinfo", "--size", uri(node, query=f"?tls-certificates={certs}"))
    assert with_cert.returncode == 0, with_cert.stderr
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "ca-cert.pem").write_bytes((certs / "ca-cert.pem").read_bytes())
    without = run("nbdinfo", "--size", uri(node, query=f"?tls-certificates={bare}"))
    assert without.returncode != 0
    assert "nbd TLS handshake failed" in node.log_text()


def test_nbd_allow_and_read_only_clients(start_node: NodeFactory, tmp_path: Path) -> None:
    need("nbdinfo", "nbdcopy")
    fenced = start_node("alpha", [VolumeSpec("data1", SIZE)], nbd_tcp=True,
                        node_settings={"nbd_allow": ["10.9.9.0/24"]})  # fmt: skip
    refused = run("nbdinfo", "--size", uri(fenced, "nbd"))
    assert refused.returncode != 0
    assert "nbd client refused" in fenced.log_text() and "not in nbd_allow" in fenced.log_text()

    reader = LocalNode(tmp_path / "beta", "beta", [VolumeSpec("data1", SIZE)], nbd_tcp=True,
                       node_settings={"nbd_allow": ["127.0.0.0/8"]})  # fmt: skip
    config = reader.write_config().read_text()
    reader.config_path.write_text(
        config.replace("read_only = false", 'read_only = false\nread_only_clients = ["127.0.0.1"]')
    )
    reader.start()
    try:
        shown = run("nbdinfo", "--json", uri(reader, "nbd"))
        assert shown.returncode == 0 and '"is_read_only": true' in shown.stdout, shown
        write = run(
            "nbdcopy", "--", str(random_file(tmp_path / "w.bin", 1 << 20)), uri(reader, "nbd")
        )
        assert write.returncode != 0
    finally:
        assert reader.stop() == 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"nbd_tls": "always"}, "node.nbd_tls: must be one of off, offer, require"),
     ({"nbd_allow": ["10.0.0.300"]}, "node.nbd_allow[0]: expected an IP address or network"),
     ({"nbd_tls_certificate": "/etc/hostname"}, "nbd_tls_certificate and nbd_tls_key go together")],
)  # fmt: skip
def test_bad_nbd_access_settings_are_named(
    tmp_path: Path, settings: dict[str, str | int | float], message: str
) -> None:
    node = LocalNode(tmp_path / "alpha", "alpha", [VolumeSpec("data1", SIZE)],
                     node_settings=settings)  # fmt: skip
    with pytest.raises(RuntimeError, match=re.escape(message)):
        node.start()
