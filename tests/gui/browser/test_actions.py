"""The rest of a mirror's actions in a real browser, with resync progress, chart and events."""

from __future__ import annotations

from playwright.sync_api import Page, expect

from tests.gui.browser.cluster import Cluster, Shoot
from volkeeper_lab.launcher import LocalGui


def click(page: Page, action: str) -> None:
    page.click(f"section.mirror button[data-action={action}]")


def test_resync_progress_then_every_resync_verify_and_delete(
    cluster: Cluster, gui: LocalGui, page: Page, shoot: Shoot
) -> None:
    cluster.create_job(throttle="6MiB")  # the 16 MiB full resync takes a few seconds
    page.goto(f"{gui.url}/jobs/web")
    mirror = page.locator("section.mirror[data-target='beta:data1']")
    expect(mirror.locator("progress")).to_be_visible()
    expect(mirror.locator(".progress-text")).to_contain_text("ETA")
    shoot(page, "job-resyncing")
    state = mirror.locator("h3 .state")
    expect(state).to_have_text("Mirroring", timeout=30_000)
    expect(page.locator("#job-chart polyline").first).to_be_attached()
    expect(mirror.locator("dl.facts")).to_contain_text("bitmap 512 B (4.0 KiB per bit)")

    click(page, "resync")
    expect(page.locator(".flash.ok")).to_have_text("Resync: done")
    click(page, "verify")
    expect(page.locator(".flash.ok")).to_have_text("Verify: done")
    expect(mirror.locator("dl.facts")).to_contain_text("done: 0 B differ of 16.0 MiB compared",
                                                 timeout=30_000)  # fmt: skip
    click(page, "resync_checksum")
    expect(page.locator(".flash.ok")).to_have_text("Checksum resync: done")
    expect(state).to_have_text("Mirroring", timeout=30_000)

    with cluster.alpha.api() as api:
        sent_before = api.get("/jobs").json()[0]["mirrors"][0]["resync_sent_bytes"]
    click(page, "resync_full")
    expect(page.locator("p.explains")).to_contain_text("overwriting all of beta:data1")
    page.click("button[data-confirm=resync_full]")
    expect(page.locator(".flash.ok")).to_have_text("Full resync: done")
    expect(state).to_have_text("Mirroring", timeout=30_000)
    with cluster.alpha.api() as api:
        sent_after = api.get("/jobs").json()[0]["mirrors"][0]["resync_sent_bytes"]
    assert sent_after - sent_before >= 16 * 1024 * 1024
    expect(page.locator("#job-events")).to_contain_text("because: full resync requested")
    expect(page.locator("#job-events")).to_contain_text("because: checksum resync requested")

    click(page, "delete_mirror")
    expect(page.locator("p.explains")).to_contain_text("beta:data1 is unlocked")
    page.click("button[data-confirm=delete_mirror]")
    expect(page.locator(".flash.ok")).to_have_text("Delete mirror: done")
    expect(page.locator("#job-state")).to_contain_text("knows a job named web")
    with cluster.alpha.api() as api:
        assert api.get("/jobs").json() == []
