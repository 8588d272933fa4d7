"""Access in a real browser: off localhost a login is required (over HTTPS here)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from playwright.sync_api import Page, expect

from tests.gui.browser.cluster import Cluster, Shoot
from volkeeper_lab.launcher import LocalGui, free_tcp_port

TOKEN = "s3cret-token-for-the-gui-test"


@pytest.fixture
def exposed(cluster: Cluster, tmp_path: Path) -> Iterator[LocalGui]:
    """The GUI on every address, with a token file and a certificate."""
    ca = trustme.CA()
    served = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "gui.pem", tmp_path / "gui.key"
    served.cert_chain_pems[0].write_to_path(str(cert))
    served.private_key_pem.write_to_path(str(key))
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# GUI logins\nadmin {TOKEN}\n")
    gui = cluster.gui("--tokens", str(tokens), "--cert", str(cert), "--key", str(key),
                      listen=f"0.0.0.0:{free_tcp_port()}")  # fmt: skip
    gui.start()
    try:
        yield gui
    finally:
        assert gui.stop() == 0, gui.log_path.read_text()


def test_off_localhost_a_login_is_required(exposed: LocalGui, page: Page, shoot: Shoot) -> None:
    assert exposed.url.startswith("https://")
    page.goto(f"{exposed.url}/nodes/alpha")
    expect(page).to_have_url(f"{exposed.url}/login?next=/nodes/alpha")
    expect(page.locator("main")).not_to_contain_text("data1")
    shoot(page, "login")

    page.fill("input[name=token]", "not-the-token-at-all")
    page.click("form.login button")
    expect(page.locator(".flash.refused")).to_have_text("that token is not accepted")

    page.fill("input[name=token]", TOKEN)
    page.click("form.login button")
    expect(page).to_have_url(f"{exposed.url}/nodes/alpha")
    expect(page.locator("tr[data-volume=data1]")).to_be_visible()
    expect(page.locator("form.logout")).to_contain_text("admin")
    cookie = next(c for c in page.context.cookies() if c["name"] == "vk_session")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"

    page.click("form.logout button")
    page.goto(exposed.url)
    expect(page).to_have_url(f"{exposed.url}/login?next=/")


def test_off_localhost_without_tokens_the_gui_refuses_to_start(cluster: Cluster) -> None:
    listen = f"0.0.0.0:{free_tcp_port()}"
    command = [sys.executable, "-m", "volkeeper", "gui", "--listen", listen,
               "--node", f"unix:{cluster.alpha.control_socket}"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "needs a login: give --tokens FILE" in done.stderr
