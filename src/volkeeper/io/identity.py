"""A node's identity and the identities it trusts, as files in its state directory.

How this works: like an SSH host key.  ``create`` makes the node's key (ECDSA P-256) and a
self-signed certificate naming the node (a DNS subjectAltName equal to the node name, not a
CA, valid for a century: identities are revoked by un-pinning, not by expiry) in
``state_dir/identity/``; the key is written 0600 and never leaves the node.  Its fingerprint
(core/fingerprints.py) is what the other nodes pin.  ``load`` reads it back; ``ensure`` makes
it on a node's first start.

``KnownPeers`` is the node's ``known_peers.json``: peer name -> pinned fingerprint, written by
``volkeeper node trust`` (atomically, like every record here), read by the daemon whenever it
changed.  Beside it, ``identity/peers/NAME.pem`` caches each pinned peer's certificate, fetched
from the peer and kept only if its fingerprint is the pinned one: a TLS server can only check a
client's certificate against certificates it holds (io/peer_trust.py).
"""

from __future__ import annotations

import datetime
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from volkeeper.core import fingerprints
from volkeeper.errors import ConfigError
from volkeeper.io.durable_files import WatchedFile, sync_directory, write_json

VALIDITY = datetime.timedelta(days=36500)


@dataclass(frozen=True)
class Identity:
    """This node's certificate and key (PEM files) and the certificate's fingerprint."""

    certificate: Path
    key: Path
    fingerprint: str


def identity_dir(state_dir: Path) -> Path:
    return state_dir / "identity"


def load(state_dir: Path) -> Identity | None:
    """The node's identity, or None if it has none yet."""
    directory = identity_dir(state_dir)
    certificate, key = directory / "node.pem", directory / "node.key"
    if not certificate.exists() and not key.exists():
        return None
    try:
        pem = certificate.read_bytes()
        key.stat()
    except OSError as exc:
        raise ConfigError(
            f"node identity in {directory} is incomplete ({exc.filename}: {exc.strerror}); "
            "remove the directory and run volkeeper node init to make a new one "
            "(peers must then trust its new fingerprint)"
        ) from None
    try:
        der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    except ValueError as exc:
        raise ConfigError(f"{certificate} holds no PEM certificate ({exc})") from None
    return Identity(certificate, key, fingerprints.of(der))


def create(state_dir: Path, node: str) -> Identity:
    """Make a new key and self-signed certificate for ``node``; refuses to overwrite one."""
    directory = identity_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    certificate_path, key_path = directory / "node.pem", directory / "node.key"
    if certificate_path.exists() or key_path.exists():
        raise ConfigError(f"node identity already exists in {directory}")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_path, key_pem, 0o600)
    _write(certificate_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    sync_directory(directory)
    der = certificate.public_bytes(serialization.Encoding.DER)
    return Identity(certificate_path, key_path, fingerprints.of(der))


def ensure(state_dir: Path, node: str) -> tuple[Identity, bool]:
    """The node's identity, made now if it had none; the flag says whether it was made."""
    existing = load(state_dir)
    return (existing, False) if existing is not None else (create(state_dir, node), True)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


class KnownPeers:
    """``known_peers.json`` (pins) and ``identity/peers/`` (their certificates)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "known_peers.json"
        self.certificates = identity_dir(state_dir) / "peers"
        self._file: WatchedFile[dict[str, str]] = WatchedFile(self.path, _read_pins, {})

    def pins(self) -> dict[str, str]:
        """Peer name -> fingerprint, re-read when the file changed."""
        return dict(self._file.read())

    def trust(self, peer: str, fingerprint: str) -> str | None:
        """Pin ``peer`` to ``fingerprint``; returns the fingerprint it replaced, if any."""
        pins = self.pins()
        previous = pins.get(peer)
        pins[peer] = fingerprint
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, dict(sorted(pins.items())))
        return previous if previous != fingerprint else None

    def forget(self, peer: str) -> bool:
        pins = self.pins()
        if pins.pop(peer, None) is None:
            return False
        write_json(self.path, dict(sorted(pins.items())))
        return True

    def certificate(self, peer: str, fingerprint: str) -> bytes | None:
        """The cached PEM certificate of ``peer`` if it is the one ``fingerprint`` pins."""
        try:
            pem = (self.certificates / f"{peer}.pem").read_bytes()
            der = ssl.PEM_cert_to_DER_cert(pem.decode())
            return pem if fingerprints.of(der) == fingerprint else None
        except (OSError, ValueError):
            return None

    def keep_certificate(self, peer: str, der: bytes) -> None:
        self.certificates.mkdir(parents=True, exist_ok=True)
        path = self.certificates / f"{peer}.pem"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(ssl.DER_cert_to_PEM_cert(der))
        temporary.replace(path)


def _read_pins(path: Path) -> dict[str, str]:
    try:
        document = json.loads(path.read_text())
        return {str(name): fingerprints.parse(str(fp)) for name, fp in document.items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a volkeeper known-peers file ({exc})") from None
