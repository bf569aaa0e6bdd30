"""Review round 4 of issue 12: faults a user meets, each shown by a test that failed before
its fix (the commit says which)."""

from __future__ import annotations

import copy
from typing import Any

import httpx

from rollout.plan import ClusterObservation, Health, Liveness, Observation, Step, plan
from rollout.store import Store
from tests import test_api
from tests.test_api import CANARY, spec

store, client = test_api.store, test_api.client  # the admin API over a real Store (fixtures)


def canary_baked(raw: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    out["upgrade"].update(CANARY)
    out["upgrade"]["bake_s"] = 600
    return out


async def test_a_first_deploy_with_strategy_canary_is_previewed_and_shown_as_it_runs(
    client: httpx.AsyncClient, store: Store
) -> None:
    """Nothing live: the planner takes a canary's first deploy live at once, with no steps
    and nothing to bake (`_advance`, `_promote`). `raygate diff` said it would walk four
    canary steps and bake 600 s, and `raygate status` (so `push --wait`) said "canary"
    and drew a canary-steps row while it deployed."""
    raw = canary_baked(spec())
    preview = (await client.post("/v1/services/digits/plan", json=raw)).json()
    assert (await client.put("/v1/services/digits", json=raw)).status_code == 202
    seen_strategies = set()
    walked = False
    now = 10.0
    for _ in range(10):
        state = store.load("digits")
        assert state is not None
        if state.pending is not None:
            status = (await client.get("/v1/services/digits")).json()
            seen_strategies.add(status["pending"]["strategy"])
        latest = store.latest("digits")
        obs = {c: ClusterObservation(Liveness.UP, Health.OK) for c in state.clusters()}
        d = plan(state, latest, {latest.number: latest}, Observation(obs), now, "c1")
        walked |= d.state.pending is not None and d.state.pending.step is Step.CANARY
        loaded = store.load_versioned("digits")
        assert loaded is not None
        store.commit(d.state, d.finished, d.events, now, version=loaded[1])
        now += 5
        if d.state.active is not None:
            break
    final = store.load("digits")
    assert final is not None and final.active is not None and not walked
    assert not any(r.baking(now) for r in final.retiring)
    assert preview["strategy"]["name"] == "bluegreen", preview["strategy"]
    assert preview["strategy"]["steps"] is None and preview["strategy"]["bake_s"] == 0
    assert seen_strategies == {"bluegreen"}
