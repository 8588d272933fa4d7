"""Adding a target, switchover and failover from the GUI, each confirmed first."""

from __future__ import annotations

from playwright.sync_api import Page, expect

from tests.gui.browser.cluster import Cluster, Shoot
from volkeeper_lab.launcher import LocalGui


def test_a_target_is_added_after_a_confirmation_that_names_it(
    cluster: Cluster, gui: LocalGui, page: Page, shoot: Shoot
) -> None:
    cluster.mirrored_job()
    page.goto(f"{gui.url}/jobs/web")
    form = page.locator("form.add-target")
    expect(form.locator("select[name=target] option")).to_have_text(["beta:data2 (16.0 MiB)"])
    form.locator("select[name=mode]").select_option("async")
    form.locator("button").click()
    expect(page.locator("h1")).to_have_text("Add beta:data2 to job web?")
    expect(page.locator("label.confirm-box")).to_have_text("overwrite beta:data2")
    shoot(page, "confirm-add-target")
    page.check("input[name=overwrite]")
    page.click("form.confirm button")
    expect(page.locator(".flash.ok")).to_contain_text("beta:data2 added")
    second = page.locator("section.mirror[data-target='beta:data2'] h3 .state")
    expect(second).to_have_text("Mirroring", timeout=30_000)
    with cluster.alpha.api() as api:
        mirrors = {m["target"]: m["mode"] for m in api.get("/jobs").json()[0]["mirrors"]}
    assert mirrors == {"beta:data1": "sync", "beta:data2": "async"}


def test_switchover_and_promotion(cluster: Cluster, gui: LocalGui, page: Page) -> None:
    cluster.mirrored_job()
    page.goto(f"{gui.url}/jobs/web")
    page.click("section.mirror button[data-action=switchover]")
    expect(page.locator("p.explains")).to_contain_text("the copy on beta becomes the source")
    page.click("button[data-confirm=switchover]")
    expect(page.locator(".flash.ok")).to_contain_text("beta is the source")
    expect(page.locator("p.summary")).to_contain_text("source node beta")
    state = page.locator("section.mirror[data-target='alpha:data1'] h3 .state")
    expect(state).to_have_text("Mirroring", timeout=30_000)

    # the source (now beta) goes away: the mirror is Unknown, and alpha may be promoted
    cluster.beta.kill()
    expect(state).to_have_text("Unknown", timeout=10_000)
    promote = page.locator("section.mirror button[data-action=promote]")
    promote.click()
    expect(page.locator("p.explains")).to_contain_text("alpha:data1 becomes the source")
    page.click("button[data-confirm=promote]")
    expect(page.locator(".flash.ok")).to_contain_text("data1 promoted")
    expect(page.locator("p.summary")).to_contain_text("source node alpha")
    with cluster.alpha.api() as api:
        assert api.get("/jobs").json()[0]["role"] == "source"
