"""Logins and the anti-forgery check."""

from __future__ import annotations

from pathlib import Path

import pytest

from volkeeper.errors import ConfigError
from volkeeper.gui.access import Access, load_tokens

TOKEN = "0123456789abcdef-token"


def test_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# logins\nadmin {TOKEN}\n\n{TOKEN}-2  # the operator\n")
    assert load_tokens(path) == {TOKEN: "admin", f"{TOKEN}-2": "token 2"}
    for text, problem in [("", "holds no token"), ("short\n", "at least 16"),
                          (f"a b {TOKEN}\n", "expected TOKEN or NAME TOKEN")]:  # fmt: skip
        path.write_text(text)
        with pytest.raises(ConfigError, match=problem):
            load_tokens(path)
    with pytest.raises(ConfigError, match="cannot read the GUI's token file"):
        load_tokens(tmp_path / "missing")


def test_beyond_localhost_the_gui_needs_tokens() -> None:
    with pytest.raises(ConfigError, match="needs a login: give --tokens FILE"):
        Access(login_required=True, tokens={}, https=False)


def test_a_session_cookie_is_signed_and_expires() -> None:
    access = Access(login_required=True, tokens={TOKEN: "admin"}, https=True)
    assert access.user_for(TOKEN) == "admin" and access.user_for(TOKEN + "x") is None
    cookie = access.session_cookie("admin", now=1000.0)
    assert access.session_user(cookie, now=1001.0) == "admin"
    assert access.session_user(cookie, now=1000.0 + 13 * 3600) is None  # expired
    user, expires, signature = cookie.split("|")
    assert access.session_user(f"root|{expires}|{signature}", now=1001.0) is None
    assert access.session_user(f"{user}|{int(expires) + 99}|{signature}", now=1001.0) is None
    other = Access(login_required=True, tokens={TOKEN: "admin"}, https=True)
    assert other.session_user(cookie, now=1001.0) is None  # another GUI's secret
    assert access.session_user(None) is None and access.session_user("a|b") is None


def test_forged_requests_are_refused() -> None:
    forged = Access.forged
    host = "gui.example.org:8470"
    assert forged("abc", "abc", None, host) == ""
    assert forged("abc", "abc", f"https://{host}", host) == ""
    assert forged("abc", "abc", f"https://{host}/jobs/web", host) == ""  # a Referer
    assert "missing or stale" in forged("abc", "abd", None, host)
    assert "missing or stale" in forged(None, "abc", None, host)
    assert "missing or stale" in forged("abc", None, None, host)
    assert "another site" in forged("abc", "abc", "https://evil.example", host)
    assert "another site" in forged("abc", "abc", "null", host)
