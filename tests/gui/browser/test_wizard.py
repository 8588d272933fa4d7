"""The new-job wizard in a real browser: three steps, an explicit overwrite, a live result."""

from __future__ import annotations

from playwright.sync_api import Page, expect

from tests.gui.browser.cluster import Cluster, Shoot
from volkeeper_lab.launcher import LocalGui


def test_the_wizard_creates_a_job_that_reaches_mirroring_on_screen(
    cluster: Cluster, gui: LocalGui, page: Page, shoot: Shoot
) -> None:
    page.goto(f"{gui.url}/wizard")
    page.fill("input[name=name]", "web")
    # only usable volumes: every standalone volume of both nodes, nothing else
    sources = page.locator("input[name=source]")
    expect(sources).to_have_count(4)
    page.check("input[value='alpha:data1']")
    shoot(page, "wizard-1-source")
    page.click("button[value=targets]")

    options = page.locator("select[name=target_1] option")
    expect(options).to_have_text(["choose…", "beta:data1 (16.0 MiB)", "beta:data2 (16.0 MiB)"])
    page.select_option("select[name=target_1]", "beta:data1")
    page.select_option("select[name=compression_1]", "lz4")
    shoot(page, "wizard-2-targets")
    page.click("button[value=review]")

    box = page.locator("label.confirm-box")
    expect(box).to_have_text("overwrite beta:data1")
    shoot(page, "wizard-3-review")
    page.click("button[value=create]")  # not ticked: nothing is created
    expect(page.locator("#problem")).to_contain_text("its data is overwritten")
    with cluster.alpha.api() as api:
        assert api.get("/jobs").json() == []

    page.check("input[name=overwrite][value='beta:data1']")
    page.click("button[value=create]")
    expect(page).to_have_url(f"{gui.url}/jobs/web?flash=" + page.url.rsplit("=", 1)[-1])
    expect(page.locator(".flash.ok")).to_contain_text("job web created")
    state = page.locator("section.mirror[data-target='beta:data1'] .state").first
    expect(state).to_have_text("Mirroring", timeout=30_000)
    shoot(page, "job")

    with cluster.alpha.api() as api:
        (job,) = api.get("/jobs").json()
    assert job["mirrors"][0]["state"] == "Mirroring"
    assert job["mirrors"][0]["compression"] == "lz4"


def test_a_refusal_of_the_node_is_shown_verbatim(
    cluster: Cluster, gui: LocalGui, page: Page
) -> None:
    page.goto(f"{gui.url}/wizard")
    page.fill("input[name=name]", "web")
    page.check("input[value='alpha:data1']")
    page.click("button[value=targets]")
    page.select_option("select[name=target_1]", "beta:data2")
    page.fill("input[name=throttle_1]", "fast")
    page.click("button[value=review]")
    page.check("input[name=overwrite][value='beta:data2']")
    page.click("button[value=create]")

    body = {"name": "web", "description": "", "confirm": True, "mirrors": [
        {"source": "alpha:data1", "target": "beta:data2", "mode": "sync",
         "compression": "none", "throttle": "fast"}]}  # fmt: skip
    with cluster.alpha.api() as api:
        refused = api.post("/jobs", json=body)
    assert refused.status_code == 400, refused.text
    message = refused.json()["error"]["message"]
    expect(page.locator(".flash.refused .flash-message")).to_have_text(f"alpha refused: {message}")
    expect(page.locator("form.wizard")).to_have_attribute("data-step", "review")
