"""The status page in a real browser (Debian's Chromium), without Ray: the admin API over a
real store holding a canary mid-rollout (a test double only for the gateway's in-flight
counts), served by uvicorn on loopback. The page draws the canary's steps, weight and
analysis; its Pause button asks first and then reaches the real API through the session
cookie and the CSRF header (the command is queued in the store); a request with the cookie
but without that header changes nothing. Fast: the Ray story is tests/test_e2e_page.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect
from prometheus_client import CollectorRegistry

from rollout.analysis import Outcome, Verdict
from rollout.api import create_admin_app
from rollout.plan import Active, Canary, Result, RolloutRecord, ServiceState
from rollout.rates import RateHistory
from rollout.sessions import Sessions
from rollout.spec import parse_spec
from rollout.store import Store
from tests.browser import chromium
from tests.loopback import served
from tests.test_api import canary_spec, canary_state, put_state, spec

TOKEN = "browser-test-token-of-24-chars"


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[tuple[str, Store]]:
    store = Store(tmp_path / "raygate.db")
    store.push(parse_spec(spec()), 1.0)
    put_state(store, ServiceState("digits", Active("c1", 1, "h1")),
              RolloutRecord(1, Result.SUCCEEDED, "live"))  # fmt: skip
    store.push(parse_spec(canary_spec()), 2.0)
    verdict = Verdict(Outcome.PASS, "error rate 0.0%, p99 24 ms over 96 requests", 96, 390,
                      0.0, 0.0, 24.0)  # fmt: skip
    put_state(store, canary_state(Canary(1, 20, 6.0), verdict=verdict))

    async def in_flight() -> dict[str, int]:  # the gateway's counts: a test double
        return {"c1": 3, "c2": 1}

    app = create_admin_app(store, TOKEN, lambda name: None, in_flight, CollectorRegistry(),
                           sessions=Sessions(key=TOKEN.encode()), rates=RateHistory())  # fmt: skip
    with served(app) as url:
        yield url, store


def test_canary_page_and_a_confirmed_pause(admin: tuple[str, Store], tmp_path: Path) -> None:
    url, store = admin
    with chromium() as browser:
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + "/")
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")
        card = page.locator("section.card[data-name=digits]")
        expect(card).to_have_attribute("data-phase", "upgrading")
        steps = card.locator(".rollout .steps li")
        expect(steps.filter(has_text="canary 1: weight 20%")).to_have_class("done")
        expect(steps.filter(has_text="canary 2: pause 30")).to_have_class("now")
        expect(card.locator(".rollout")).to_contain_text("Canary weight now 20%")
        expect(card.locator(".analysis")).to_contain_text("pass")
        bar = card.locator(".bar .seg")
        expect(bar).to_have_count(2)
        expect(bar.first).to_have_text("80%")
        page.screenshot(path=str(tmp_path / "canary.png"), full_page=True)

        asked: list[str] = []

        def accept(dialog: object) -> None:
            asked.append(dialog.message)  # type: ignore[attr-defined]
            dialog.accept()  # type: ignore[attr-defined]

        page.once("dialog", accept)
        card.locator("[data-action=pause]").click()
        expect(page.locator(".toast")).to_have_text("pause: accepted")
        assert asked == ["Pause the rollout of digits?"]
        state = store.load("digits")
        assert state is not None and [c.kind for c in state.commands] == ["pause"]

        # A script on the page can use the API only with the page's CSRF token
        status = page.evaluate("""async () => (await fetch('/v1/services/digits/abort',
            {method: 'POST', body: '{}', credentials: 'same-origin'})).status""")
        assert status == 401
        assert [c.kind for c in store.load("digits").commands] == ["pause"]  # type: ignore[union-attr]
        assert errors == [], errors
