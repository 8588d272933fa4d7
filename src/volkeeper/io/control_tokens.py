"""Bearer tokens for the control API on TCP: made once, stored hashed, read or admin.

How this works: ``TokenStore`` is ``state_dir/tokens.json``: token name -> the SHA-256 of the
token and its role.  ``create`` draws 32 random bytes (``vk_`` and 43 url-safe characters),
stores only their hash and returns the token, which is shown once and never again (a lost
token is revoked and made anew).  The tokens are random, so a plain SHA-256 is enough: there
is nothing to guess a preimage from.  ``role_of`` hashes what a request presents and compares
it with every stored hash in constant time; the daemon re-reads the file when it changed, so
``volkeeper token create`` and ``revoke`` take effect without a restart.  ``read`` tokens may
only look (GET); ``admin`` tokens may act.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from pathlib import Path

from volkeeper.errors import ConfigError
from volkeeper.io.durable_files import WatchedFile, write_json

ROLES = ("read", "admin")
PREFIX = "vk_"
MINIMUM_LENGTH = 32


class TokenStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "tokens.json"
        self._file: WatchedFile[dict[str, dict[str, str]]] = WatchedFile(
            self.path, _read_tokens, {}
        )

    def tokens(self) -> dict[str, dict[str, str]]:
        """Name -> {"sha256", "role"}, re-read when the file changed."""
        return dict(self._file.read())

    def create(self, name: str, role: str, token: str | None = None) -> str:
        """A new token ``name`` with ``role``; returns the token (shown once).  ``token``
        installs one made elsewhere (the same token on every node a GUI watches)."""
        if role not in ROLES:
            raise ConfigError(f"a token's role is read or admin, got {role!r}")
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"a token's name is letters, digits, - and _, got {name!r}")
        tokens = self.tokens()
        if name in tokens:
            raise ConfigError(f"token {name} exists; revoke it first to make a new one")
        if token is None:
            token = PREFIX + secrets.token_urlsafe(32)
        elif len(token) < MINIMUM_LENGTH or not token.isprintable() or " " in token:
            raise ConfigError(
                f"a token given is at least {MINIMUM_LENGTH} printable characters without "
                "spaces (volkeeper token create prints one to copy)"
            )
        tokens[name] = {"sha256": _digest(token), "role": role}
        self._write(tokens)
        return token

    def revoke(self, name: str) -> None:
        tokens = self.tokens()
        if tokens.pop(name, None) is None:
            raise ConfigError(f"no token named {name}")
        self._write(tokens)

    def role_of(self, presented: str) -> tuple[str, str] | None:
        """(name, role) of the token presented, or None if it is none of ours."""
        digest = _digest(presented)
        found = None
        for name, entry in self.tokens().items():  # every one compared: no early exit
            if hmac.compare_digest(digest, entry["sha256"]):
                found = (name, entry["role"])
        return found

    def _write(self, tokens: dict[str, dict[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, dict(sorted(tokens.items())))
        self.path.chmod(0o600)


def _read_tokens(path: Path) -> dict[str, dict[str, str]]:
    try:
        document = json.loads(path.read_text())
        tokens = {
            str(name): {"sha256": str(entry["sha256"]), "role": str(entry["role"])}
            for name, entry in document.items()
        }
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a volkeeper token file ({exc!r})") from None
    bad = [name for name, entry in tokens.items() if entry["role"] not in ROLES]
    if bad:
        raise ConfigError(f"{path}: token {bad[0]} has no valid role")
    return tokens


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
