"""Review round 4 of issue 12: faults a user meets, each shown by a test that failed before
its fix (the commit says which)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rollout.plan import (
    ClusterObservation,
    DeleteCluster,
    Health,
    Liveness,
    Observation,
    Step,
    plan,
)
from rollout.preview import held_revisions, preview
from rollout.spec import parse_spec
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


# ---- the preview against the planner, in any state a sequence of pushes leads to ---------
def _variant(i: int) -> dict[str, Any]:
    """A small pool of specs: serve-only, cluster, upgrade-only, canary and bake changes."""
    raw = spec(label="ab"[i % 2])
    if i & 2:
        raw["cluster"]["env"]["APP_VERSION"] = "2"
    if i & 4:
        raw = canary_baked(raw)
    if i & 8:
        raw["upgrade"]["bake_s"] = 600
    return raw


POOL = [_variant(i) for i in range(16)]
# One step of a history: push POOL[i] (then a tick), i ticks with every cluster healthy,
# or a wait of 700 s (then a tick).
Op = tuple[str, int]


def _tick(store: Store, now: float, n: int) -> Any:
    state = store.load("digits")
    assert state is not None
    latest = store.latest("digits")
    revisions = {h["revision"]: store.revision("digits", h["revision"])
                 for h in store.history("digits")}  # fmt: skip
    obs = {c: ClusterObservation(Liveness.UP, Health.OK) for c in state.clusters()}
    d = plan(state, latest, revisions, Observation(obs), now, f"c{n}")
    loaded = store.load_versioned("digits")
    assert loaded is not None
    store.commit(d.state, d.finished, d.events, now, version=loaded[1])
    return d


def _check_preview_against_push(ops: list[Op], final: int, tmp: Path) -> None:
    store = Store(tmp / "raygate.db")
    try:
        now = 10.0
        n = 0
        for op, i in ops:
            if op == "push":
                store.push(parse_spec(POOL[i]), now)
            if op == "wait":  # past a bake, a drain, a deletion delay
                now += 700
            for _ in range(i if op == "tick" else 1):
                if store.load("digits") is not None:
                    _tick(store, now, n)
                n += 1
                now += 7
        target = parse_spec(POOL[final])
        state = store.load("digits")
        revisions = {r: store.revision("digits", r) for r in held_revisions(state)}
        results = {h["revision"]: h["result"] for h in store.history("digits")}
        said = preview(target, state, revisions, store.identical(target), results, now)
        before = state
        number, unchanged = store.push(target, now)
        assert unchanged == (said["change"] == "none"), (said, before)
        if unchanged:
            return
        d = _tick(store, now, 999)
        after = d.state
        waits = any("waits for retiring" in r for r in said["reasons"])
        bakes = any("still bakes" in r for r in said["reasons"])
        took_back = after.active is not None and after.active.revision == number
        assert bakes or not took_back, (said, before, after)  # said when it happens
        if took_back:  # no slot was needed: a wait, if said, was said as a maybe
            assert not any(r.startswith("waits for") for r in said["reasons"]), said
            return
        # A retiring cluster whose requests are done goes this very tick (`_retire`, before
        # the push is planned): the preview, blind to in-flight counts, said it may wait.
        went = {a.cluster for a in d.actions if isinstance(a, DeleteCluster)}
        gone = {r.cluster for r in before.retiring} if before is not None else set()
        drained = bool(gone) and gone <= went
        assert waits == bool(after.waiting) or (waits and drained), (said, before, after)
        if waits and not after.waiting:
            waits = False
        if waits:  # no rollout starts
            return
        p = after.pending
        assert p is not None and p.revision == number, (said, before, after)
        assert p.kind.value == said["change"], (said, before, after)
    finally:
        store.close()

# A service live first (a push, then ticks enough to go live), then anything.
LIVE = st.tuples(st.tuples(st.just("push"), st.integers(0, 15)), st.just(("tick", 6)))
STEP = st.one_of(
    st.tuples(st.just("push"), st.integers(0, 15)),
    st.tuples(st.just("tick"), st.integers(1, 8)),
    st.tuples(st.just("wait"), st.just(0)),
)
OPS = st.builds(lambda first, rest: [*first, *rest], LIVE, st.lists(STEP, max_size=8))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=OPS, final=st.integers(0, 15))
# Live with a bake, then a cluster change goes live while the first cluster bakes, then the
# first spec again: traffic goes back to the baking cluster, no wait for a slot.
@example(ops=[("push", 8), ("tick", 6), ("push", 10), ("tick", 6)], final=0)
def test_the_preview_says_what_a_push_then_does_after_any_history(
    ops: list[Op], final: int, tmp_path_factory: Any
) -> None:
    """Any sequence of pushes and healthy ticks (rollouts in place and on new clusters,
    canaries, bakes, supersedes), then a preview and the push itself: `none` exactly when
    the push is a no-op; a wait for a retiring cluster exactly when the planner waits;
    otherwise the rollout the first tick starts is of the previewed kind."""
    _check_preview_against_push(ops, final, tmp_path_factory.mktemp("s"))
