"""The GUI's HTTP surface without a browser: forgery, login, bad requests, a node away.

Each test runs ``volkeeper gui`` as a process over a node that was never started (its
socket does not exist), and talks to it with a plain HTTP client.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from volkeeper_lab.launcher import LocalGui, LocalNode, free_tcp_port

TOKEN = "a-token-of-sixteen-or-more"


def serve(tmp_path: Path, *args: str, listen: str = "") -> Iterator[httpx.Client]:
    gui = LocalGui(tmp_path / "gui", [LocalNode(tmp_path / "alpha", "alpha")], listen, list(args))
    gui.start()
    try:
        with httpx.Client(base_url=gui.url, timeout=10) as client:
            yield client
    finally:
        assert gui.stop() == 0, gui.log_path.read_text()


@pytest.fixture
def away(tmp_path: Path) -> Iterator[httpx.Client]:
    """The GUI on localhost over one node that is not there."""
    yield from serve(tmp_path)


@pytest.fixture
def exposed(tmp_path: Path) -> Iterator[httpx.Client]:
    """The same GUI on every address: a login is required."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"admin {TOKEN}\n")
    yield from serve(tmp_path, "--tokens", str(tokens), listen=f"0.0.0.0:{free_tcp_port()}")


def csrf(client: httpx.Client) -> str:
    client.get("/static/gui.css")
    return str(client.cookies["vk_csrf"])


def test_pages_carry_protective_headers_and_a_strict_csrf_cookie(away: httpx.Client) -> None:
    answer = away.get("/")
    assert answer.status_code == 200
    assert answer.headers["x-frame-options"] == "DENY"
    assert "default-src 'self'" in answer.headers["content-security-policy"]
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith("vk_csrf=") and "HttpOnly" in cookie and "SameSite=strict" in cookie


def test_a_node_that_is_not_there_is_unknown_and_its_job_pages_say_so(away: httpx.Client) -> None:
    page = away.get("/").text
    assert 'class="state unknown">Unknown</span>' in page and "reconnecting" in page
    assert "Failed" not in page and "state bad" not in page
    assert "knows a job named web" in away.get("/jobs/web").text
    assert "watches no node named gamma" in away.get("/nodes/gamma").text


@pytest.mark.parametrize(
    ("form", "headers", "why"),
    [
        ({}, {}, "anti-forgery token is missing or stale"),
        ({"csrf": "guessed"}, {}, "anti-forgery token is missing or stale"),
        ({"csrf": None}, {"origin": "https://evil.example"}, "came from another site"),
    ],
)
def test_forged_state_changes_are_refused(
    away: httpx.Client, form: dict[str, str | None], headers: dict[str, str], why: str
) -> None:
    token = csrf(away)
    fields = {"job": "web", "action": "pause", "target": "beta:data1"}
    fields |= {k: v or token for k, v in form.items()}
    for path in ("/act", "/wizard", "/jobs/web/settings", "/jobs/web/targets", "/logout"):
        answer = away.post(path, data=fields, headers=headers, follow_redirects=False)
        assert answer.status_code == 403, path
        assert why in answer.text


def test_bad_actions_and_wizard_steps_get_a_clear_answer(away: httpx.Client) -> None:
    token = csrf(away)
    answer = away.post("/act", data={"csrf": token, "job": "web", "action": "explode"},
                       follow_redirects=True)  # fmt: skip
    assert "no such action or job" in answer.text
    step = away.post("/wizard", data={"csrf": token, "name": "bad name", "go": "targets"})
    assert "give the job a name" in step.text
    step = away.post("/wizard", data={"csrf": token, "name": "web", "source": "alpha:data1",
                                      "go": "review"})  # fmt: skip
    assert "choose a source volume from the list" in step.text  # alpha does not answer


def test_beyond_localhost_everything_but_the_login_needs_a_session(exposed: httpx.Client) -> None:
    answer = exposed.get("/jobs/web", follow_redirects=False)
    assert (answer.status_code, answer.headers["location"]) == (303, "/login?next=/jobs/web")
    assert exposed.get("/live").status_code == 401
    assert exposed.post("/act", data={}).status_code == 401
    assert exposed.get("/static/gui.js").status_code == 200
    token = csrf(exposed)
    wrong = exposed.post("/login", data={"csrf": token, "token": "nope", "next": "/"})
    assert wrong.status_code == 401
    right = exposed.post("/login", data={"csrf": token, "token": TOKEN, "next": "//evil.example/"},
                         follow_redirects=False)  # fmt: skip
    assert (right.status_code, right.headers["location"]) == (303, "/")
    assert exposed.get("/jobs/web", follow_redirects=False).status_code == 200
