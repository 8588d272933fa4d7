"""A node's identity files and its known peers, on a real state directory."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from volkeeper.core import fingerprints
from volkeeper.errors import ConfigError
from volkeeper.io import identity
from volkeeper.io.identity import KnownPeers


def test_create_makes_a_private_key_and_a_certificate_naming_the_node(tmp_path: Path) -> None:
    own = identity.create(tmp_path, "alpha")
    assert stat.S_IMODE(own.key.stat().st_mode) == 0o600
    certificate = x509.load_pem_x509_certificate(own.certificate.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["alpha"]
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is False  # it cannot vouch for other certificates
    der = certificate.public_bytes(serialization.Encoding.DER)
    assert own.fingerprint == fingerprints.of(der)
    assert identity.load(tmp_path) == own


def test_an_identity_is_never_overwritten(tmp_path: Path) -> None:
    own = identity.create(tmp_path, "alpha")
    with pytest.raises(ConfigError, match="node identity already exists"):
        identity.create(tmp_path, "alpha")
    assert identity.ensure(tmp_path, "alpha") == (own, False)
    other = tmp_path / "other"
    made, created = identity.ensure(other, "alpha")
    assert created and made.fingerprint != own.fingerprint  # a new key: a new identity


def test_a_damaged_identity_says_what_to_do(tmp_path: Path) -> None:
    own = identity.create(tmp_path, "alpha")
    own.key.unlink()
    with pytest.raises(ConfigError, match=r"is incomplete .*node init to make a new one"):
        identity.load(tmp_path)
    own.certificate.write_text("junk")
    own.key.write_text("junk")
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        identity.load(tmp_path)


def test_known_peers_are_pinned_replaced_forgotten_and_reread(tmp_path: Path) -> None:
    known = KnownPeers(tmp_path)
    assert known.pins() == {}
    first, second = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    assert known.trust("beta", first) is None
    assert known.trust("beta", second) == first  # the one it replaced
    assert known.trust("beta", second) is None
    assert KnownPeers(tmp_path).pins() == {"beta": second}  # on disk
    # Written by another process (the CLI) while this one holds it: read again.
    (tmp_path / "known_peers.json").write_text(json.dumps({"gamma": first.upper()}))
    assert known.pins() == {"gamma": first}
    assert known.forget("gamma") and not known.forget("gamma")
    assert known.pins() == {}


def test_a_corrupt_known_peers_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "known_peers.json").write_text('{"beta": "md5:00"}')
    with pytest.raises(ConfigError, match="not a volkeeper known-peers file"):
        KnownPeers(tmp_path).pins()


def test_only_a_certificate_matching_the_pin_is_used_from_the_cache(tmp_path: Path) -> None:
    beta = identity.create(tmp_path / "beta", "beta")
    known = KnownPeers(tmp_path / "alpha")
    der = x509.load_pem_x509_certificate(beta.certificate.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    known.keep_certificate("beta", der)
    assert known.certificate("beta", beta.fingerprint) == beta.certificate.read_bytes()
    assert known.certificate("beta", "sha256:" + "0" * 64) is None  # pinned to another key
    assert known.certificate("gamma", beta.fingerprint) is None  # nothing cached
