"""TLS on the replication link, over real loopback sockets with real certificates (trustme).

Node ``beta`` serves, node ``alpha`` dials it by name; each presents a certificate naming
itself, signed by the CA both trust.  The refusals are the ways a deployment goes wrong: a
certificate from another CA, one that names another node, no client certificate, TLS on one
side only, and files that are not what the ``[tls]`` table says they are.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
import trustme
import uvloop

from tests.support.peer_side import Side, until
from volkeeper.core.addresses import TcpAddress
from volkeeper.core.peer.wire import Ack, Hello, Write
from volkeeper.errors import ConfigError, PeerError
from volkeeper.io import peer_server
from volkeeper.io.identity import KnownPeers
from volkeeper.io.peer_link import PeerLink, connect
from volkeeper.io.peer_server import PeerServer
from volkeeper.io.peer_tls import (
    check_own_certificate,
    client_context,
    describe,
    looks_like_tls,
    server_context,
)
from volkeeper.io.peer_trust import PeerPolicy, PeerTrust
from volkeeper_lab.launcher import free_tcp_port


@dataclass(frozen=True)
class Files:
    certificate: Path
    key: Path
    ca: Path


def node_files(
    directory: Path, ca: trustme.CA, name: str, trusted: trustme.CA | None = None
) -> Files:
    """PEM files for node ``name``: a certificate from ``ca``, trusting ``trusted`` (or ``ca``)."""
    directory.mkdir(parents=True, exist_ok=True)
    issued = ca.issue_cert(name)
    files = Files(directory / f"{name}.crt", directory / f"{name}.key", directory / "ca.crt")
    issued.cert_chain_pems[0].write_to_path(str(files.certificate))
    issued.private_key_pem.write_to_path(str(files.key))
    (trusted or ca).cert_pem.write_to_path(str(files.ca))
    return files


@dataclass(frozen=True)
class Dialer:
    """``connect``'s credentials as a test states them: one context, and the CA's checks."""

    context: ssl.SSLContext | None

    def client_context(self, peer: str) -> ssl.SSLContext | None:
        return self.context

    def check_server(self, peer: str, der: bytes | None) -> None:
        return None


def site_trust(files: Files, node: str) -> PeerTrust:
    """A node of a site CA (its [tls] table), with alpha, beta and gamma as peers."""
    peers = {n: PeerPolicy(TcpAddress("127.0.0.1", 1)) for n in ("alpha", "beta", "gamma")}
    del peers[node]
    return PeerTrust(node, peers, KnownPeers(files.certificate.parent / "state"), site=files)


async def serve(files: Files, side: Side) -> PeerServer:
    server = PeerServer(side.make, trust=site_trust(files, "beta"))
    await server.listen(TcpAddress("127.0.0.1", free_tcp_port()))
    return server


async def dial(
    server: PeerServer, side: Side, tls: ssl.SSLContext | None, name: str = "beta"
) -> PeerLink:
    assert server.address is not None
    return await connect(
        server.address, side.on_frame, side.on_lost, trust=Dialer(tls), peer_name=name
    )


async def round_trip(server: PeerServer, server_side: Side, files: Files) -> None:
    """A WRITE goes out, its ACK comes back, over a fresh TLS connection."""
    client_side = Side()
    link = await dial(server, client_side, client_context(files))
    link.send(Write(4096, b"x" * 100_000))
    await until(lambda: any(isinstance(f, Write) for f in server_side.frames[-1:]))
    server_side.links[-1].send(Ack(link.last_received + 1, 0, durable=True))
    await until(lambda: client_side.frames)
    assert client_side.frames == [Ack(1, 0, durable=True)]
    link.close("done")


def run(scenario: Callable[[], Coroutine[Any, Any, None]], loop: str = "asyncio") -> None:
    (uvloop.run if loop == "uvloop" else asyncio.run)(scenario())


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


# -- a working link -------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_frames_round_trip_over_tls(tmp_path: Path, ca: trustme.CA, loop: str) -> None:
    beta, alpha = node_files(tmp_path / "b", ca, "beta"), node_files(tmp_path / "a", ca, "alpha")

    async def scenario() -> None:
        server_side, client_side = Side(), Side()
        server = await serve(beta, server_side)
        link = await dial(server, client_side, client_context(alpha))
        payload = bytes(range(256)) * 4096  # 1 MiB: many TLS records
        link.send(Write(0, payload))
        await until(lambda: server_side.frames)
        (write,) = server_side.frames
        assert isinstance(write, Write) and bytes(write.data) == payload
        accepted = server_side.links[0]
        accepted.send(Ack(1, 0, durable=True))
        await until(lambda: client_side.frames)
        assert client_side.frames == [Ack(1, 0, durable=True)]
        for end in (link, accepted):  # an SSL transport still gives us the socket and the TLS
            transport = end._transport
            assert transport is not None
            assert transport.get_extra_info("ssl_object").version() == "TLSv1.3"
            sock = transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        link.close("done")
        await until(lambda: server_side.lost)
        await server.close()

    run(scenario, loop)


def test_contexts_require_tls_13_and_verify_both_ways(tmp_path: Path, ca: trustme.CA) -> None:
    files = node_files(tmp_path, ca, "alpha")
    server, client = server_context(files), client_context(files)
    assert server.minimum_version == client.minimum_version == ssl.TLSVersion.TLSv1_3
    assert server.verify_mode == client.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname


# -- refusals ------------------------------------------------------------------------------

LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])  # the daemon runs on uvloop


@LOOPS
def test_server_certificate_from_another_ca_is_refused(
    tmp_path: Path, ca: trustme.CA, loop: str
) -> None:
    beta = node_files(tmp_path / "b", trustme.CA(), "beta", trusted=ca)
    alpha = node_files(tmp_path / "a", ca, "alpha")

    async def scenario() -> None:
        server_side = Side()
        server = await serve(beta, server_side)
        with structlog.testing.capture_logs() as logs:
            with pytest.raises(PeerError) as info:
                await dial(server, Side(), client_context(alpha))
            await until(lambda: _handshake_failures(logs))
        message = str(info.value)
        assert message.startswith(f"TLS handshake with beta at {server.address} failed: ")
        assert "certificate was rejected: unable to get local issuer certificate" in message
        assert "closed the connection during the handshake" in _handshake_failures(logs)[0]["why"]
        assert all(link._transport is None for link in server_side.links)  # never connected
        await server.close()

    run(scenario, loop)


@LOOPS
def test_certificate_naming_another_node_is_refused(
    tmp_path: Path, ca: trustme.CA, loop: str
) -> None:
    gamma = node_files(tmp_path / "g", ca, "gamma")  # at beta's address, gamma's certificate
    alpha = node_files(tmp_path / "a", ca, "alpha")

    async def scenario() -> None:
        server = await serve(gamma, Side())
        with pytest.raises(PeerError, match="certificate is not valid for 'beta'"):
            await dial(server, Side(), client_context(alpha), name="beta")
        await server.close()

    run(scenario, loop)


@LOOPS
def test_client_certificate_from_another_ca_is_refused(
    tmp_path: Path, ca: trustme.CA, loop: str
) -> None:
    beta = node_files(tmp_path / "b", ca, "beta")
    impostor = node_files(tmp_path / "m", trustme.CA(), "alpha", trusted=ca)

    async def scenario() -> None:
        server_side = Side()
        server = await serve(beta, server_side)
        with structlog.testing.capture_logs() as logs:
            reason = await _refused(server, client_context(impostor))
            await until(lambda: _handshake_failures(logs))
        assert "it may have refused our TLS certificate" in reason
        why = _handshake_failures(logs)[0]["why"]
        assert why.startswith("the other end's certificate was rejected: unable to get local")
        assert server_side.frames == []  # nothing reached a link on the server
        await round_trip(server, server_side, node_files(tmp_path / "a", ca, "alpha"))
        await server.close()

    run(scenario, loop)


@LOOPS
def test_client_without_certificate_is_refused(tmp_path: Path, ca: trustme.CA, loop: str) -> None:
    beta = node_files(tmp_path / "b", ca, "beta")

    async def scenario() -> None:
        server_side = Side()
        server = await serve(beta, server_side)
        anonymous = ssl.create_default_context(cafile=str(beta.ca))
        with structlog.testing.capture_logs() as logs:
            reason = await _refused(server, anonymous)
            await until(lambda: _handshake_failures(logs))
        assert "it may have refused our TLS certificate" in reason
        assert "sent no client certificate" in _handshake_failures(logs)[0]["why"]
        assert server_side.frames == []
        await server.close()

    run(scenario, loop)


@LOOPS
def test_plain_client_is_closed_and_server_keeps_serving(
    tmp_path: Path, ca: trustme.CA, loop: str
) -> None:
    beta = node_files(tmp_path / "b", ca, "beta")

    async def scenario() -> None:
        server_side, plain_side = Side(), Side()
        server = await serve(beta, server_side)
        with structlog.testing.capture_logs() as logs:
            plain = await dial(server, plain_side, None)  # TCP connects; TLS never starts
            plain.send(_hello())
            await until(lambda: plain_side.lost)
            await until(lambda: _refusals(logs))
        assert "closed by the other end before it sent anything" in plain_side.lost[0]
        assert "no peer is configured insecure" in _refusals(logs)[0]["why"]
        assert server_side.frames == []
        for _ in range(2):  # and the server still serves good clients
            await round_trip(server, server_side, node_files(tmp_path / "a", ca, "alpha"))
        await server.close()

    run(scenario, loop)


@LOOPS
def test_tls_client_against_plain_server(tmp_path: Path, ca: trustme.CA, loop: str) -> None:
    alpha = node_files(tmp_path / "a", ca, "alpha")

    async def scenario() -> None:
        server_side = Side()
        server = PeerServer(server_side.make)  # [tls] missing on this node
        await server.listen(TcpAddress("127.0.0.1", free_tcp_port()))
        with pytest.raises(PeerError, match=r"TLS handshake with beta .* failed: the other end"):
            await dial(server, Side(), client_context(alpha))
        await until(lambda: server_side.lost)
        assert "the peer speaks TLS and this link does not" in server_side.lost[0]
        await server.close()

    run(scenario, loop)


@LOOPS
def test_silent_and_stalled_clients_time_out_and_server_keeps_serving(
    tmp_path: Path, ca: trustme.CA, loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peer_server, "HANDSHAKE_TIMEOUT", 0.3)
    beta = node_files(tmp_path / "b", ca, "beta")

    async def scenario() -> None:
        server_side = Side()
        server = await serve(beta, server_side)
        assert server.address is not None
        with structlog.testing.capture_logs() as logs:
            silent = await asyncio.open_connection("127.0.0.1", server.address.port)
            stalled = await asyncio.open_connection("127.0.0.1", server.address.port)
            stalled[1].write(b"\x16\x03\x01")  # a TLS record starts, and nothing follows
            await until(lambda: _handshake_failures(logs) and _dropped(logs))
            for reader, writer in (silent, stalled):
                assert await reader.read() == b""  # and the server hung up on both
                writer.close()
        assert "sent nothing in 0.3 s" in _dropped(logs)[0]["why"]
        why = _handshake_failures(logs)[0]["why"]
        assert "SSL handshake is taking longer than 0.3 seconds" in why
        await round_trip(server, server_side, node_files(tmp_path / "a", ca, "alpha"))
        await server.close()

    run(scenario, loop)


async def _refused(server: PeerServer, tls: ssl.SSLContext) -> str:
    """With TLS 1.3 the client finishes its handshake before the server checks the client's
    certificate: the refusal then arrives as the link's loss, not as connect's error."""
    side = Side()
    try:
        link = await dial(server, side, tls)
    except PeerError as exc:
        return str(exc)
    link.send(_hello())
    await until(lambda: side.lost)
    return side.lost[0]


def _handshake_failures(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "replication TLS handshake failed"]


def _refusals(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "replication connection refused"]


def _dropped(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "replication connection dropped"]


def _hello() -> Hello:
    return Hello(
        node="alpha", volume="data1", job="web", source_volume="data1", volume_size=1 << 20,
        sector_size=512, current_generation=1, previous_generation=0,
    )  # fmt: skip


# -- loading the files ----------------------------------------------------------------------


def test_file_that_is_not_a_certificate(tmp_path: Path, ca: trustme.CA) -> None:
    files = node_files(tmp_path, ca, "alpha")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=rf"^tls.certificate: {junk} holds no PEM certificate"):
        server_context(Files(junk, files.key, files.ca))
    with pytest.raises(ConfigError, match=rf"^tls.certificate: {files.key} holds no PEM cert"):
        client_context(Files(files.key, files.key, files.ca))  # the key in its place
    with pytest.raises(ConfigError, match=rf"^tls.ca: {junk} holds no PEM certificate"):
        client_context(Files(files.certificate, files.key, junk))


def test_file_that_is_not_a_key(tmp_path: Path, ca: trustme.CA) -> None:
    files = node_files(tmp_path, ca, "alpha")
    with pytest.raises(ConfigError, match=rf"^tls.key: {files.certificate} is not a PEM private"):
        server_context(Files(files.certificate, files.certificate, files.ca))


def test_key_of_another_certificate(tmp_path: Path, ca: trustme.CA) -> None:
    files = node_files(tmp_path, ca, "alpha")
    other = node_files(tmp_path / "other", ca, "alpha")
    with pytest.raises(ConfigError, match=r"^tls.key: .* does not match the certificate in"):
        client_context(Files(files.certificate, other.key, files.ca))


def test_encrypted_key_is_refused_not_prompted_for(tmp_path: Path, ca: trustme.CA) -> None:
    from cryptography.hazmat.primitives import serialization

    files = node_files(tmp_path, ca, "alpha")
    key = serialization.load_pem_private_key(files.key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match=f"^tls.key: {encrypted} is encrypted"):
        server_context(Files(files.certificate, encrypted, files.ca))


def test_own_certificate_check(tmp_path: Path, ca: trustme.CA) -> None:
    files = node_files(tmp_path, ca, "alpha")
    assert check_own_certificate(files, "alpha") is None
    assert check_own_certificate(files, "beta") == (
        "this node's certificate fails its own CA's check as a server named 'beta': "
        "Hostname mismatch, certificate is not valid for 'beta'."
    )
    foreign = node_files(tmp_path / "f", trustme.CA(), "alpha", trusted=ca)
    assert check_own_certificate(foreign, "alpha") == (
        "this node's certificate fails its own CA's check as a server named 'alpha': "
        "unable to get local issuer certificate"
    )


def test_describe_and_tls_sniffing() -> None:
    assert describe(ConnectionResetError("reset")) == "reset"
    error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    error.reason = "WRONG_VERSION_NUMBER"  # as OpenSSL's error reports it
    assert describe(error) == (
        "the other end does not speak TLS (is [tls] configured on both nodes?) "
        "(WRONG_VERSION_NUMBER)"
    )
    assert looks_like_tls(b"\x16\x03\x01\x02\x00")  # a ClientHello
    assert looks_like_tls(b"\x15\x03\x03")  # an alert
    assert not looks_like_tls(b"VKP1") and not looks_like_tls(b"\x16\x03")
