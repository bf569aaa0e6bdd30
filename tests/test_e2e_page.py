"""The status page in a real browser (Debian's Chromium, headless) against a real `raygate
up` on real Ray: a wrong token is refused, a login shows the service go from deploying to
live, a blue-green's pending revision and then the new active one appear without a reload,
a failed rollout shows Serve's error, the service's own page has the event log and the Serve
config, the page carries on across a raygate restart, and the Delete button asks first.

One raygate and two cluster starts (v1, then v2's blue-green) for the whole story; the
failed rollout is an in-place push (no cluster start). Screenshots of each state are saved
under the test's temp dir (printed on failure).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.browser import chromium
from tests.harness import EXAMPLES, Load, running_raygate, wait_for

pytestmark = pytest.mark.ray

SPECS = Path(__file__).resolve().parent / "specs"
CARD = "section.card[data-name=digits]"


def shot(page: Page, shots: Path, name: str) -> None:
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def test_status_page_follows_a_service_live_in_a_browser(tmp_path: Path) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"screenshots: {shots}")
    with running_raygate(tmp_path / "state", "python") as rg, chromium() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))

        # A wrong token: the form says so, and nothing of the service is shown
        page.goto(rg.admin_url + "/")
        page.fill("input[name=token]", "not-the-" + rg.token)
        page.click("button[type=submit]")
        expect(page.locator(".error")).to_have_text("wrong token")
        assert "digits" not in page.content()
        assert page.context.cookies() == []
        shot(page, shots, "1-wrong-token")

        page.fill("input[name=token]", rg.token)
        page.click("button[type=submit]")
        [cookie] = page.context.cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert rg.token not in cookie["value"]
        card = page.locator(CARD)
        expect(card).to_have_attribute("data-phase", "deploying", timeout=30_000)
        expect(card.locator(".badge.phase")).to_have_text("deploying")
        page.evaluate("window.__samePage = true")  # gone if the page ever reloads
        shot(page, shots, "2-deploying")
        expect(card).to_have_attribute("data-phase", "live", timeout=300_000)
        expect(card.locator(".badge.phase")).to_have_text("live")
        expect(card.locator("[data-role=active]")).to_have_attribute("data-revision", "1")
        shot(page, shots, "3-live")

        # Blue-green with requests flowing (they fill the chart)
        with Load(rg.url, workers=1, max_s=400) as load:
            out = rg.cli("push", str(EXAMPLES / "v2.yaml"))
            assert out.returncode == 0, out.stdout + out.stderr
            pending = card.locator("[data-role=pending]")
            expect(pending).to_have_attribute("data-revision", "2", timeout=30_000)
            expect(card).to_have_attribute("data-phase", "upgrading")
            expect(card.locator(".rollout .steps li.now")).to_be_visible()
            shot(page, shots, "4-pending")
            health = card.locator(".rollout .steps li.now")
            expect(health).to_contain_text("health gates", timeout=120_000)
            expect(health).to_contain_text("/3 in a row")  # the streak and what it needs
            shot(page, shots, "4b-health-gates")
            active = card.locator("[data-role=active]")
            expect(active).to_have_attribute("data-revision", "2", timeout=300_000)
            expect(card).to_have_attribute("data-phase", "live")
            expect(card.locator(".chart polyline").first).to_be_visible(timeout=30_000)
            load.wait_for_requests(len(load.outcomes) + 5)
            shot(page, shots, "5-switched")
        assert page.evaluate("window.__samePage") is True, "the page was reloaded"

        # A failed rollout: Serve's own error on the page
        out = rg.cli("push", str(SPECS / "broken-in-place.yaml"))
        assert out.returncode == 0, out.stdout + out.stderr
        message = card.locator(".rollout pre.msg")
        expect(message).to_contain_text("no_such_builder", timeout=180_000)
        expect(message).to_contain_text("DEPLOY_FAILED")
        expect(card.locator(".history tbody tr").first.locator(".badge")).to_have_text("aborted")
        shot(page, shots, "6-failed-rollout")

        # The service's own page: every event and the Serve config deployed
        detail = context.new_page()  # the same session
        detail.goto(rg.admin_url + "/services/digits")
        expect(detail.locator(".configs pre.json").first).to_contain_text('"import_path"')
        expect(detail.locator(".events li").first).to_be_visible()
        assert detail.locator(".events li").count() > 6  # the full log, not the last few
        shot(detail, shots, "7-service-page")
        detail.close()

        # raygate restarts: the page says so, then carries on by itself (same session)
        rg.kill(signal.SIGKILL)
        expect(page.locator("#conn")).to_contain_text("unreachable", timeout=20_000)
        shot(page, shots, "8-raygate-down")
        rg.start()
        expect(page.locator("#conn")).to_contain_text("live", timeout=60_000)
        expect(card).to_have_attribute("data-phase", "live", timeout=60_000)
        assert page.evaluate("window.__samePage") is True

        # Delete asks first: dismissed, nothing happens; accepted, the service goes
        changes: list[str] = []
        page.on("request", lambda r: changes.append(r.url) if r.method != "GET" else None)
        page.once("dialog", lambda d: d.dismiss())
        card.locator("[data-action=delete]").click()
        with page.expect_response(lambda r: "/ui/state" in r.url):
            pass  # the next poll: a DELETE sent on dismiss would have gone out before it
        assert changes == [] and rg.status("digits")["phase"] == "live"
        asked: list[str] = []

        def accept(dialog: object) -> None:
            asked.append(dialog.message)  # type: ignore[attr-defined]
            dialog.accept()  # type: ignore[attr-defined]

        page.once("dialog", accept)
        card.locator("[data-action=delete]").click()
        expect(page.locator(".empty")).to_be_visible(timeout=120_000)
        assert asked and "digits" in asked[0]
        wait_for("the cluster gone", lambda: not rg.clusters_running(), 60)
        assert errors == [], errors
