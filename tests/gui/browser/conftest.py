"""Browser tests: Debian's chromium, driven by Playwright, against real daemons and a real GUI.

How this works: one headless chromium per test module (the Debian package's executable,
``--no-sandbox`` because tests run as root; Playwright's own browser download is never
used); per test, two nodes (alpha, beta; volumes data1 and data2 each), the GUI over both,
and a fresh browser context.  Screenshots go to ``test-artefacts/gui/`` (``shoot``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.gui.browser.cluster import Cluster, Shoot
from volkeeper_lab.launcher import LocalGui

CHROMIUM = "/usr/bin/chromium"
ARTEFACTS = Path(__file__).resolve().parents[3] / "test-artefacts" / "gui"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One chromium per module, not per session: while Playwright's sync API is open its
    event loop counts as running in this thread, and any other test that calls
    ``asyncio.run`` on the same worker would fail."""
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: make test installs Debian's chromium package")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900},
                                  ignore_https_errors=True)  # fmt: skip
    context.set_default_timeout(15_000)
    yield context.new_page()
    context.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def gui(cluster: Cluster) -> Iterator[LocalGui]:
    running = cluster.gui()
    try:
        running.start()
        yield running
    finally:
        assert running.stop() == 0, running.log_path.read_text()


@pytest.fixture
def shoot(request: pytest.FixtureRequest) -> Shoot:
    def screenshot(page: Page, name: str) -> Path:
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTEFACTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return screenshot
