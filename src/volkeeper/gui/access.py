"""Who may use the GUI: a login off localhost, and no request forged from another site.

How this works: ``Access`` is built from the listen address and an optional token file.  On a
loopback address the GUI is as open as the machine's own users (as the node's unix socket
is); on any other address a login is required, and the GUI refuses to start without tokens.
The token file holds one token per line, optionally ``NAME TOKEN``; ``#`` starts a comment.
A login compares the token in constant time and sets a session cookie signed with a secret
made at start (HMAC-SHA256, HttpOnly, SameSite=Strict, Secure over HTTPS), good for
``SESSION_S``.

Cross-site request forgery: every page carries the value of the ``vk_csrf`` cookie (random,
set on the first answer) in each form; a POST is refused unless its ``csrf`` field equals the
cookie, and unless its Origin (or Referer), when the browser sends one, is the GUI's own.  A
page on another site can neither read the cookie nor set the field.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from volkeeper.errors import ConfigError

SESSION_COOKIE = "vk_session"
CSRF_COOKIE = "vk_csrf"
SESSION_S = 12 * 3600


def load_tokens(path: Path) -> dict[str, str]:
    """token -> user name, from ``path``; a clear error if it is missing or holds none."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the GUI's token file {path}: {exc.strerror}") from None
    tokens: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            raise ConfigError(
                f"{path}:{number}: expected TOKEN or NAME TOKEN, got {len(words)} words"
            )
        name, token = (f"token {len(tokens) + 1}", words[0]) if len(words) == 1 else words
        if len(token) < 16:
            raise ConfigError(f"{path}:{number}: a token needs at least 16 characters")
        tokens[token] = name
    if not tokens:
        raise ConfigError(f"the GUI's token file {path} holds no token")
    return tokens


@dataclass
class Access:
    login_required: bool
    tokens: dict[str, str]
    https: bool
    secret: bytes = b""

    def __post_init__(self) -> None:
        self.secret = self.secret or secrets.token_bytes(32)
        if self.login_required and not self.tokens:
            raise ConfigError(
                "a GUI listening beyond localhost needs a login: give --tokens FILE "
                "(one token per line), or listen on 127.0.0.1"
            )

    # -- login -------------------------------------------------------------------------------

    def user_for(self, token: str) -> str | None:
        found = None
        for known, name in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = name
        return found

    def session_cookie(self, user: str, now: float | None = None) -> str:
        expires = int((now or time.time()) + SESSION_S)
        payload = f"{user.replace('|', '_')}|{expires}"
        return f"{payload}|{self._sign(payload)}"

    def session_user(self, cookie: str | None, now: float | None = None) -> str | None:
        if not cookie or cookie.count("|") != 2:
            return None
        user, expires, signature = cookie.split("|")
        payload = f"{user}|{expires}"
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        if not expires.isdigit() or int(expires) < (now or time.time()):
            return None
        return user

    def _sign(self, payload: str) -> str:
        return hmac.new(self.secret, payload.encode(), hashlib.sha256).hexdigest()

    # -- forgery -----------------------------------------------------------------------------

    @staticmethod
    def new_csrf() -> str:
        return secrets.token_urlsafe(24)

    @staticmethod
    def forged(cookie: str | None, field: str | None, origin: str | None, host: str) -> str:
        """Why a state-changing request is refused as forged; empty when it is not."""
        if not cookie or not field or not hmac.compare_digest(cookie, field):
            return "the form's anti-forgery token is missing or stale: reload the page"
        if origin and urlsplit(origin).netloc != host:
            return f"the request came from another site ({origin})"
        return ""
