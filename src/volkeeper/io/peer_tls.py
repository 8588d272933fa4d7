"""TLS contexts for the replication link: a node identity's, or a site CA's (``[tls]``).

How this works, for identities (io/identity.py, io/peer_trust.py): ``pinning_client_context``
presents the node's certificate and leaves the peer's to be checked against its pin after the
handshake; ``accepting_context`` requires a client certificate and trusts what the caller adds
(the pinned peers' certificates, and the site CA if there is one).
``fingerprint_of`` reads a certificate file's fingerprint.

For a site CA: a node has one certificate with its key, and one CA file it trusts.
``server_context`` is what ``PeerServer`` accepts with: it presents the node's certificate and
requires the connecting node to present one that the CA signed (``CERT_REQUIRED``).
``client_context`` is what a mirror dials with: it presents the same certificate, verifies the
target's against the CA and checks that it names the target node as written in ``[peers]``
(``check_hostname``; ``connect`` passes that name as ``server_hostname``).  So every node
certificate must name its node (a DNS subjectAltName equal to the node name) and, if it has an
extended key usage, allow both serverAuth and clientAuth.  Every context is TLS 1.3 only.

Loading reads the files in an order that lets each failure name its key (the CA, then the
certificate alone, then the certificate with its key); every failure is a ``ConfigError``.  An
encrypted key is refused rather than prompted for: a daemon has no terminal.

``check_own_certificate`` runs one handshake in memory between this node's two contexts, with
the node's own name as the server name: it catches, at start, a certificate that has expired,
names another node, or was not signed by the CA the peers trust (as far as this node's CA
tells).  ``describe`` turns an ``ssl`` error into a sentence for logs and ``last_error``.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Protocol

from volkeeper.core import fingerprints
from volkeeper.errors import ConfigError

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_3

# OpenSSL reason codes -> what they mean for a replication link.
_NOT_TLS = "the other end does not speak TLS (is [tls] configured on both nodes?)"
_HINTS = {
    "WRONG_VERSION_NUMBER": _NOT_TLS,
    "HTTP_REQUEST": _NOT_TLS,
    "UNKNOWN_PROTOCOL": _NOT_TLS,
    "PACKET_LENGTH_TOO_LONG": _NOT_TLS,
    "RECORD_LAYER_FAILURE": _NOT_TLS,
    "TLSV1_ALERT_UNKNOWN_CA": "the other end does not trust the CA that signed our certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the other end rejected our certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the other end rejected our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the other end says our certificate has expired",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the other end cannot use our certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the other end wants a client certificate; we sent none",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the other end sent no client certificate",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no TLS version in common (volkeeper needs TLS 1.3)",
    "UNSUPPORTED_PROTOCOL": "no TLS version in common (volkeeper needs TLS 1.3)",
    "NO_PROTOCOLS_AVAILABLE": "no TLS version in common (volkeeper needs TLS 1.3)",
}


class OwnFiles(Protocol):
    """A node's own certificate and key (PEM files): an identity, or the ``[tls]`` table."""

    @property
    def certificate(self) -> Path: ...
    @property
    def key(self) -> Path: ...


class TlsFiles(OwnFiles, Protocol):
    """The ``[tls]`` table (daemon/config/node.py ``TlsSection``): paths of three PEM files."""

    @property
    def ca(self) -> Path: ...


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    raise _EncryptedKey


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """Accepting side: present our certificate, require one signed by the CA."""
    context = _context(ssl.PROTOCOL_TLS_SERVER, files, files.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """Dialling side: present our certificate, verify the target's and its node name."""
    context = _context(ssl.PROTOCOL_TLS_CLIENT, files, files.ca)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def pinning_client_context(files: OwnFiles) -> ssl.SSLContext:
    """Dialling a pinned peer: present our certificate; the caller checks the peer's
    fingerprint against the pin once the handshake is done (io/peer_trust.py)."""
    context = _context(ssl.PROTOCOL_TLS_CLIENT, files, None)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def accepting_context(files: OwnFiles, site: TlsFiles | None) -> ssl.SSLContext:
    """Accepting with pinned peers: require a client certificate, trusting the site CA if
    there is one; the caller adds each pinned peer's certificate (io/peer_trust.py)."""
    context = _context(ssl.PROTOCOL_TLS_SERVER, files, site.ca if site else None)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def fingerprint_of(certificate: Path) -> str:
    """The fingerprint of the PEM certificate at ``certificate``."""
    try:
        return fingerprints.of(ssl.PEM_cert_to_DER_cert(certificate.read_text()))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{certificate}: cannot read its certificate ({exc})") from None


def _context(protocol: ssl._SSLMethod, files: OwnFiles, ca: Path | None) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = MINIMUM_VERSION
    if ca is not None:
        try:
            context.load_verify_locations(cafile=str(ca))
        except ssl.SSLError as exc:
            raise ConfigError(f"tls.ca: {ca} holds no PEM certificate ({_reason(exc)})") from None
    _check_certificate(files.certificate)
    try:
        context.load_cert_chain(str(files.certificate), str(files.key), password=_no_password)
    except _EncryptedKey:
        raise ConfigError(
            f"tls.key: {files.key} is encrypted; volkeeper needs an unencrypted key "
            "(protect it with file permissions instead)"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problem = f"{files.key} does not match the certificate in {files.certificate}"
        else:
            problem = f"{files.key} is not a PEM private key ({_reason(exc)})"
        raise ConfigError(f"tls.key: {problem}") from None
    except OSError as exc:  # the file went away or lost its permissions since config load
        raise ConfigError(f"tls: cannot read {exc.filename or 'a file'}: {exc.strerror}") from None
    return context


def _check_certificate(path: Path) -> None:
    """``load_cert_chain`` says "PEM lib" for a bad certificate and a bad key alike: ask first."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        raise ConfigError(
            f"tls.certificate: {path} holds no PEM certificate ({_reason(exc)})"
        ) from None


def check_own_certificate(files: TlsFiles, node: str) -> str | None:
    """Handshake with ourselves in memory as node ``node``; returns the problem, or None."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context(files).wrap_bio(to_server, to_client, server_side=True)
    client = client_context(files).wrap_bio(to_client, to_server, server_hostname=node)
    # The client end checks our certificate as a server's, the server end as a client's.
    done = {"a server": False, "a client": False}
    for _ in range(8):  # a TLS 1.3 handshake needs at most 3 flights each way
        for role, end in (("a server", client), ("a client", server)):
            if done[role]:
                continue
            try:
                end.do_handshake()
                done[role] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                reason = (
                    exc.verify_message
                    if isinstance(exc, ssl.SSLCertVerificationError)
                    else describe(exc)
                )
                return (
                    f"this node's certificate fails its own CA's check as {role} named "
                    f"{node!r}: {reason}"
                )
        if all(done.values()):
            return None
    return "the in-memory TLS handshake did not complete"


def describe(exc: BaseException) -> str:
    """A sentence for a failed TLS handshake (or any error that ended one)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        unknown = exc.verify_message == "self-signed certificate"
        pinned = " (not the identity of a peer this node has pinned)" if unknown else ""
        return f"the other end's certificate was rejected: {exc.verify_message}{pinned}"
    if isinstance(exc, ssl.SSLError):
        hint = _HINTS.get(exc.reason or "")
        return f"{hint} ({exc.reason})" if hint else f"TLS error: {_reason(exc)}"
    return str(exc) or type(exc).__name__


def looks_like_tls(data: bytes) -> bool:
    """Do these first bytes of a connection start a TLS record (handshake or alert)?"""
    return len(data) >= 3 and data[0] in (0x15, 0x16) and data[1] == 3 and data[2] <= 4


def _reason(exc: ssl.SSLError) -> str:
    return exc.reason or exc.strerror or str(exc)
