"""The status page in a real browser (Debian's Chromium), without Ray, for the states the
canary test does not draw: a failed first deploy (Serve's error shown), an in-place update
(its own steps, not called blue-green), a cluster baking after a switch (said to be kept,
and until when, not only "retiring"), a service being deleted, also mid-rollout (no
button: the API takes no command then), a canary at its health gates (Abort only: promote
and pause are refused until its steps run) and a canary held for lack of data (Resume).
A real Store served by the real admin app on loopback; the gateway's in-flight counts are a
test double, as in tests/test_page_browser.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect
from prometheus_client import CollectorRegistry

from rollout.api import create_admin_app
from rollout.plan import (
    Active,
    Canary,
    Hold,
    Kind,
    Pending,
    Result,
    Retiring,
    RolloutRecord,
    ServiceState,
    Step,
)
from rollout.rates import RateHistory
from rollout.sessions import Sessions
from rollout.spec import parse_spec
from rollout.store import Store
from tests.browser import chromium
from tests.loopback import served
from tests.test_api import CANARY, put_state, spec

TOKEN = "browser-test-token-of-24-chars"
SERVE_ERROR = (
    'Traceback (most recent call last):\n  File "digits.py", line 3, in <module>\n'
    "ModuleNotFoundError: No module named 'sklearnx'"
)


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[str]:
    store = Store(tmp_path / "raygate.db")
    # A first deploy that failed: no cluster, Serve's error in the last rollout
    store.push(parse_spec(spec("broken", "/broken")), 1.0)
    failed = RolloutRecord(1, Result.ABORTED, SERVE_ERROR)
    put_state(store, ServiceState("broken", last_rollout=failed, failed_up_to=1), failed)
    # An in-place update at its health gates
    store.push(parse_spec(spec("inplace", "/inplace")), 1.0)
    put_state(store, ServiceState("inplace", Active("c1", 1, "h1")),
              RolloutRecord(1, Result.SUCCEEDED, "live"))  # fmt: skip
    store.push(parse_spec(spec("inplace", "/inplace", label="b")), 2.0)
    in_place = Pending(2, Kind.IN_PLACE, "c1", "h1", Step.HEALTH, 5.0, 1)
    put_state(store, ServiceState("inplace", Active("c1", 1, "h1"), in_place))
    # r2 live on c3, r1's cluster c2 baking (weight 0, ready to take traffic back)
    store.push(parse_spec(spec("baked", "/baked")), 1.0)
    store.push(parse_spec(spec("baked", "/baked", label="b")), 2.0)
    bake_until = time.time() + 600
    live = RolloutRecord(2, Result.SUCCEEDED, "revision 2 is live on c3")
    put_state(store, ServiceState("baked", Active("c3", 2, "h3"), last_rollout=live,
                                  retiring=(Retiring("c2", 3.0, 30.0, 0.0, 1, bake_until),)),
              RolloutRecord(1, Result.SUCCEEDED, "live"), live)  # fmt: skip
    # A service being deleted: its cluster drains
    store.push(parse_spec(spec("gone", "/gone")), 1.0)
    put_state(store, ServiceState("gone", retiring=(Retiring("c4", 3.0, 30.0, 0.0, 1),),
                                  deleting=True))  # fmt: skip

    # Deleted mid-rollout: until the controller's next pass ends it, the rollout is still
    # in the state, but no command applies any more (a deleting service takes none)
    store.push(parse_spec(spec("going", "/going")), 1.0)
    put_state(store, ServiceState("going", Active("c6", 1, "h6")))
    store.push(parse_spec(spec("going", "/going", label="b")), 2.0)
    midway = Pending(2, Kind.NEW_CLUSTER, "c7", "h7", Step.HEALTH, 5.0)
    put_state(store, ServiceState("going", Active("c6", 1, "h6"), midway, deleting=True))

    # A canary at its health gates: its steps have not begun, so promote and pause are
    # refused (409) until they do; abort applies
    store.push(parse_spec(spec("gating", "/gating")), 1.0)
    put_state(store, ServiceState("gating", Active("c8", 1, "h8")))
    store.push(parse_spec({**spec("gating", "/gating", label="b"), "upgrade": CANARY}), 2.0)
    gates = Pending(2, Kind.NEW_CLUSTER, "c9", "h9", Step.HEALTH, 5.0, 2)
    put_state(store, ServiceState("gating", Active("c8", 1, "h8"), gates))

    # A canary that held itself for lack of data: `raygate resume` judges again
    store.push(parse_spec(spec("starved", "/starved")), 1.0)
    put_state(store, ServiceState("starved", Active("c10", 1, "h10")))
    store.push(parse_spec({**spec("starved", "/starved", label="b"), "upgrade": CANARY}), 2.0)
    held = Canary(0, 20, 6.0, Hold.NO_DATA)
    starved = Pending(2, Kind.NEW_CLUSTER, "c11", "h11", Step.CANARY, 5.0, 3, "", held)
    put_state(store, ServiceState("starved", Active("c10", 1, "h10"), starved))

    async def in_flight() -> dict[str, int]:  # the gateway's counts: a test double
        return {"c1": 1, "c2": 0, "c3": 2, "c4": 1}

    app = create_admin_app(store, TOKEN, lambda name: None, in_flight, CollectorRegistry(),
                           sessions=Sessions(key=TOKEN.encode()), rates=RateHistory())  # fmt: skip
    with served(app) as url:
        yield url


def test_failed_in_place_baking_and_deleting_cards(admin: str, tmp_path: Path) -> None:
    with chromium() as browser:
        page = browser.new_context(viewport={"width": 1280, "height": 2400}).new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(admin + "/")
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")

        broken = page.locator("section.card[data-name=broken]")
        expect(broken).to_have_attribute("data-phase", "failed")
        expect(broken.locator(".failure")).to_contain_text("Revision 1 failed")
        expect(broken.locator(".failure .exc")).to_have_text(
            "ModuleNotFoundError: No module named 'sklearnx'")  # fmt: skip

        inplace = page.locator("section.card[data-name=inplace]")
        expect(inplace).to_have_attribute("data-phase", "upgrading")
        steps = inplace.locator(".rollout .steps li")
        expect(steps).to_have_count(3)
        expect(steps.nth(0)).to_have_class("done")
        expect(steps.nth(1)).to_have_class("now")
        expect(steps.nth(1)).to_contain_text("healthy 1/3 in a row")
        head = inplace.locator(".rollout h3")
        expect(head).to_contain_text("in place")
        expect(head).not_to_contain_text("bluegreen")  # an in-place update is no blue-green

        baked = page.locator("section.card[data-name=baked]")
        expect(baked).to_have_attribute("data-phase", "live")
        kept = baked.locator(".role[data-cluster=c2]")
        expect(kept).to_contain_text("baking until")
        expect(kept).to_contain_text("ready to take traffic back")

        gone = page.locator("section.card[data-name=gone]")
        expect(gone).to_have_attribute("data-phase", "deleting")
        expect(gone.locator(".actions button")).to_have_count(0)
        expect(gone.locator(".role[data-cluster=c4]")).to_contain_text("1 in flight")
        going = page.locator("section.card[data-name=going]")
        expect(going).to_have_attribute("data-phase", "deleting")
        expect(going.locator(".role[data-cluster=c7]")).to_be_visible()
        expect(going.locator(".actions button")).to_have_count(0)
        gating = page.locator("section.card[data-name=gating]")
        expect(gating.locator(".rollout .steps li").filter(has_text="canary 1")).to_have_class(
            "todo"
        )
        expect(gating.locator("[data-action=abort]")).to_have_count(1)
        expect(gating.locator("[data-action=promote]")).to_have_count(0)
        expect(gating.locator("[data-action=pause]")).to_have_count(0)
        starved_card = page.locator("section.card[data-name=starved]")
        expect(starved_card.locator(".rollout")).to_contain_text("paused: no data")
        expect(starved_card.locator("[data-action=resume]")).to_have_count(1)
        page.screenshot(path=str(tmp_path / "states.png"), full_page=True)
        print("screenshot:", tmp_path / "states.png")
        assert errors == [], errors
