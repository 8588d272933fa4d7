"""Control API tokens on a real state directory: made once, kept hashed, revoked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from volkeeper.errors import ConfigError
from volkeeper.io.control_tokens import TokenStore


def test_a_token_is_shown_once_and_kept_only_as_its_hash(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token = store.create("ops", "admin")
    assert token.startswith("vk_") and len(token) == 46
    document = json.loads((tmp_path / "tokens.json").read_text())
    assert token not in json.dumps(document)
    assert document["ops"]["role"] == "admin" and len(document["ops"]["sha256"]) == 64
    assert store.role_of(token) == ("ops", "admin")
    assert store.role_of(token + "x") is None and store.role_of("") is None
    viewer = store.create("viewer", "read")
    assert TokenStore(tmp_path).role_of(viewer) == ("viewer", "read")  # from disk
    store.revoke("ops")
    assert store.role_of(token) is None and store.role_of(viewer) == ("viewer", "read")


@pytest.mark.parametrize(
    ("name", "role", "message"),
    [("ops", "root", "a token's role is read or admin"), ("a b", "read", "a token's name is"),
     ("", "read", "a token's name is")],
)  # fmt: skip
def test_bad_token_requests_are_refused(tmp_path: Path, name: str, role: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TokenStore(tmp_path).create(name, role)


def test_names_are_unique_and_revoking_nothing_says_so(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    store.create("ops", "read")
    with pytest.raises(ConfigError, match="token ops exists; revoke it first"):
        store.create("ops", "admin")
    with pytest.raises(ConfigError, match="no token named nobody"):
        store.revoke("nobody")


def test_a_damaged_token_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "tokens.json").write_text('{"ops": {"sha256": "00", "role": "god"}}')
    with pytest.raises(ConfigError, match="token ops has no valid role"):
        TokenStore(tmp_path).tokens()
    (tmp_path / "tokens.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a volkeeper token file"):
        TokenStore(tmp_path).tokens()


def test_a_token_made_elsewhere_can_be_installed(tmp_path: Path) -> None:
    shared = "s" * 40
    assert TokenStore(tmp_path / "a").create("gui", "admin", shared) == shared
    assert TokenStore(tmp_path / "b").create("gui", "admin", shared) == shared
    assert TokenStore(tmp_path / "b").role_of(shared) == ("gui", "admin")
    for weak in ("short", "x" * 31, "has space" * 5):
        with pytest.raises(ConfigError, match="at least 32 printable characters"):
            TokenStore(tmp_path / "c").create("gui", "admin", weak)
