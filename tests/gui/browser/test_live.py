"""Live state in a real browser: actions change what is shown, a node that goes away is
Unknown (grey, never red) and comes back by itself."""

from __future__ import annotations

import re
import time

from playwright.sync_api import Page, expect

from tests.gui.browser.cluster import Cluster, Shoot
from volkeeper_lab.launcher import LocalGui

RED = re.compile(r"rgb\((\d+), (\d+), (\d+)\)")


def test_pause_and_continue_change_the_state_shown(
    cluster: Cluster, gui: LocalGui, page: Page, shoot: Shoot
) -> None:
    cluster.mirrored_job()
    page.goto(f"{gui.url}/jobs/web")
    state = page.locator("section.mirror[data-target='beta:data1'] h3 .state")
    expect(state).to_have_text("Mirroring")

    explained = page.locator("section.mirror details.explain")
    explained.locator("summary").click()
    expect(explained).to_contain_text("Stop sending to beta:data1.")
    expect(explained).to_contain_text("Break (asks first)")
    page.click("section.mirror button[data-action=pause]")
    expect(page.locator(".flash.ok")).to_have_text("Pause: done")
    expect(state).to_have_text("Paused")
    with cluster.alpha.api() as api:
        assert api.get("/jobs").json()[0]["mirrors"][0]["state"] == "Paused"
    shoot(page, "job-paused")

    page.click("section.mirror button[data-action=continue]")
    expect(state).to_have_text("Mirroring", timeout=20_000)

    # an action that can lose data asks first, and says what will happen
    page.click("section.mirror button[data-action=break]")
    expect(page.locator("p.explains")).to_contain_text("only a full resync can repair")
    shoot(page, "confirm-break")
    page.click("button[data-confirm=break]")
    expect(state).to_have_text("Broken")
    with cluster.alpha.api() as api:
        assert api.get("/jobs").json()[0]["mirrors"][0]["state"] == "Broken"


def test_a_killed_node_turns_unknown_never_red_and_comes_back_by_itself(
    cluster: Cluster, gui: LocalGui, page: Page, shoot: Shoot
) -> None:
    cluster.mirrored_job()
    page.goto(gui.url)
    row = page.locator("tr[data-job=web][data-target='beta:data1']")
    expect(row.locator(".state")).to_have_text("Mirroring")
    shoot(page, "overview")

    cluster.alpha.kill()
    killed = time.monotonic()
    expect(row.locator(".state")).to_have_text("Unknown", timeout=5_000)
    took = time.monotonic() - killed
    expect(row.locator(".stale")).to_contain_text("last known: Mirroring")
    expect(page.locator(".node-card[data-node=alpha] .state")).to_have_text("Unknown")
    expect(page.locator(".node-card[data-node=alpha] .stale")).to_contain_text("reconnecting")
    text = page.locator("main").inner_text()
    assert "Failed" not in text and "failed" not in text
    assert page.locator(".state.bad, .row-bad").count() == 0
    for element in page.locator(".state.unknown").all():
        red, green, blue = map(int, RED.match(element.evaluate(
            "e => getComputedStyle(e).color")).groups())  # fmt: skip
        assert not (red > 150 and green < 100 and blue < 100), "Unknown shown in red"
    shoot(page, "overview-node-unknown")

    page.goto(f"{gui.url}/nodes/alpha")
    expect(page.locator("#node .state").first).to_have_text("Unknown")
    shoot(page, "node-unknown")
    page.goto(gui.url)

    cluster.alpha.start()  # the GUI is not restarted, the page not reloaded
    expect(row.locator(".state")).to_have_text("Mirroring", timeout=15_000)
    expect(page.locator(".node-card[data-node=alpha] .state")).to_have_text("answers")
    assert took < 5


def test_the_node_page_shows_volumes_roles_and_recent_errors(
    cluster: Cluster, gui: LocalGui, page: Page, shoot: Shoot
) -> None:
    cluster.mirrored_job()
    page.goto(f"{gui.url}/nodes/beta")
    data1 = page.locator("tr[data-volume=data1]")
    expect(data1).to_contain_text("target")
    expect(data1).to_contain_text("UpToDate")
    expect(page.locator("tr[data-volume=data2]")).to_contain_text("standalone")
    shoot(page, "node")

    cluster.beta.stop()
    page.goto(f"{gui.url}/nodes/alpha")
    errors = page.locator("#node table.events")
    expect(errors).to_contain_text("web beta:data1", timeout=10_000)
    shoot(page, "node-errors")


def test_settings_change_live_and_the_gui_stream_reconnects(
    cluster: Cluster, gui: LocalGui, page: Page
) -> None:
    cluster.mirrored_job()
    page.goto(f"{gui.url}/jobs/web")
    form = page.locator("form.settings[data-target='beta:data1']")
    form.locator("input[name=compression]").fill("zstd:3")
    form.locator("input[name=throttle]").fill("20MiB")
    form.locator("button").click()
    expect(page.locator(".flash.ok")).to_have_text("settings of beta:data1 changed")
    with cluster.alpha.api() as api:
        mirror = api.get("/jobs").json()[0]["mirrors"][0]
    assert (mirror["compression"], mirror["throttle"]) == ("zstd:3", 20 * 1024 * 1024)
    expect(page.locator("section.mirror dl.facts")).to_contain_text("zstd:3")

    # the GUI itself restarts: the page says so, then picks the stream up again by itself
    expect(page.locator("body")).to_have_attribute("data-live-state", "open")
    assert gui.stop() == 0
    expect(page.locator("#gui-link")).to_be_visible(timeout=5_000)
    gui.start()
    expect(page.locator("#gui-link")).to_be_hidden(timeout=10_000)
    explained = page.locator("section.mirror details.explain")
    explained.locator("summary").click()
    with cluster.alpha.api() as api:
        api.post("/jobs/web/mirror/pause", json={})
    expect(page.locator("section.mirror h3 .state")).to_have_text("Paused")
    expect(explained).to_have_attribute("open", "")  # a live update keeps it open
