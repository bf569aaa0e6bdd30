"""Faults a third cold review found in the canary fixes (each failed before its own fix):
capacity sent again after a lost deploy, repair deploys at the right capacity, a bake that
a scaling Serve does not roll back, a canary whose proxy is down aborted. No Ray."""

from __future__ import annotations

import pytest

from rollout.analysis import Outcome
from rollout.plan import (
    ClusterObservation,
    DeployServe,
    Health,
    Liveness,
    Result,
)
from rollout.store import _from_json, _to_json
from tests.test_canary_plan import World, canary_spec, into_canary, judged_good, live, up, win


def _bake_spec(bake: float, **kw: object) -> object:
    return canary_spec(bake=bake, steps=[{"weight": 100}], **kw)  # type: ignore[arg-type]


# ---- 1. bake_s == failure_limit x interval_s passes validation but can never roll back ----
def test_bake_at_the_lower_bound_can_roll_back_a_failing_revision() -> None:
    """spec.py accepted bake_s == failure_limit x interval_s (now one interval more): a
    revision failing every answer from the first second of its bake was never rolled back,
    its second failed interval landing on bake_until, where `_retire` ends the window."""
    # interval 10, failure_limit 2: the bound is (2 + 1) x 10 (spec.py refuses less)
    spec = canary_spec(bake=30, steps=[{"weight": 100}])
    w = World()
    old, new = into_canary(w, spec)
    judged_good(w, old, new)
    assert w.state.active is not None and w.state.active.cluster == new
    assert any(r.bake_until is not None for r in w.state.retiring)
    rolled_back = False
    for _ in range(40):  # 1 s ticks, every answer an error
        d = w.tick({old: up(), new: up(win(300, errors=300, seconds=10))})
        rolled_back = rolled_back or any(r.result is Result.ROLLED_BACK for r in d.finished)
    assert rolled_back, "bake_s accepted as long enough, yet a 100%-failing revision stayed"


# ---- 2. a bake swaps back on a healthy cluster that is only scaling ----------------------
def test_bake_does_not_roll_back_a_cluster_that_answers_well_while_serve_scales_it() -> None:
    """After the switch the new cluster takes 100% of traffic; Serve's autoscaler adds
    replicas (deployment UPSCALING, `has 2/4 replicas`): health PENDING, though every
    analysis interval passes on real answers. `_bake` counts any non-OK as sick and swaps
    back after failure_limit x interval_s, marking a good revision failed."""
    w = World()
    old, new = into_canary(w, _bake_spec(300))
    judged_good(w, old, new)
    assert w.state.active is not None and w.state.active.cluster == new
    scaling = ClusterObservation(Liveness.UP, Health.PENDING,
                                 "deployment app/D has 2/4 replicas", window=win(600))  # fmt: skip
    verdicts = []
    for _ in range(30):
        d = w.tick({old: up(), new: scaling})
        verdicts += [v.result for v in d.verdicts]
    assert verdicts and all(v is Outcome.PASS for v in verdicts)
    assert w.state.active is not None and w.state.active.cluster == new, (
        f"rolled back a revision whose every interval passed: {w.state.last_rollout}"
    )


# ---- 3. a silent canary (dashboard and proxy down) holds forever as "not enough traffic" ---
def test_a_canary_whose_dashboard_and_proxy_are_down_is_aborted_not_held_for_no_data() -> None:
    """`_canary` counts only UP + non-OK as unhealthy; the bake counts UNREACHABLE with a dead
    proxy too. A canary that goes silent gets no answers (HAProxy marks it down), so analysis
    is inconclusive, it pauses itself "not enough traffic to judge" and waits for a person
    forever, past the health timeout (100 s here), with a message that blames the traffic."""
    w = World()
    old, new = into_canary(w, canary_spec())
    silent = ClusterObservation(Liveness.UNREACHABLE, proxy_ok=False, window=win(0))
    for _ in range(40):
        w.tick({old: up(win(900)), new: silent}, dt=10)
    p = w.state.pending
    assert p is None, (
        f"still pending after 400 s silent: hold={p.canary.hold if p and p.canary else None} "
        f"message={p.message if p else ''!r}"
    )


# ---- 4. restart mid-scale: a lost capacity deploy is never sent again ----------------------
def test_a_capacity_deploy_lost_in_a_restart_is_sent_again_before_the_weight_moves() -> None:
    """The decision to raise the canary to 60% is committed before the DeployServe runs; a
    crash (or a transient ServeApiError, which `_act` only logs) loses it. Health does not
    compare Serve's `target_capacity`, so the cluster at 20% looks OK twice and gets 60% of
    traffic with a third of the replicas. Nothing ever re-sends the capacity."""
    w = World()
    old = live(w, canary_spec(cpus=2, label="a", strategy="bluegreen"))
    w.push(canary_spec(scale=True, steps=[{"weight": 20}, {"weight": 60}]))
    w.tick({old: up()})
    assert w.state.pending is not None
    new = w.state.pending.cluster
    w.tick({old: up(), new: ClusterObservation(Liveness.UP)})
    for _ in range(4):
        d = w.tick({old: up(), new: up()})
        if DeployServe(new, 2, 60) in d.actions:
            break
    assert DeployServe(new, 2, 60) in d.actions and w.weight == 20
    w.state = _from_json(_to_json(w.state))  # restart; the action above never ran
    # The health check compares Serve's target_capacity with the one last sent
    # (rollout/health.py, tests/test_health.py): a cluster still at 20% is NOT_DEPLOYED.
    stale = ClusterObservation(Liveness.UP, Health.NOT_DEPLOYED,
                               "runs at target_capacity 20%, not 60%")  # fmt: skip
    resent = False
    for _ in range(4):
        d = w.tick({old: up(), new: stale})
        resent = resent or DeployServe(new, 2, 60) in d.actions
        assert w.weight == 20, "60% of traffic on a canary still at 20%"
    assert resent, "the lost capacity deploy was never sent again"


# ---- 6. `raygate rollback` in a scaled bake: traffic before replicas ------------------------
@pytest.mark.parametrize("last", [100, 90])
def test_a_rollback_in_a_scaled_bake_raises_the_baked_cluster_before_traffic(last: int) -> None:
    """With scale_with_traffic the baked cluster was left at max(1, 100 - last weight)
    (Retiring.capacity), and a rollback put 100% on it in the decision that first asked
    Serve for full capacity. Now the baked cluster is raised when its bake begins."""
    w = World()
    old, new = into_canary(w, canary_spec(scale=True, bake=300, steps=[{"weight": last}]))
    for _ in range(6):
        judged_good(w, old, new)
        if w.state.pending is None:
            break
    assert w.state.active is not None and w.state.active.cluster == new
    # A baked cluster is kept whole (raised when the bake began): a rollback is instant.
    left = next(r.capacity for r in w.state.retiring if r.cluster == old)
    assert left is None
    w.push(canary_spec(cpus=2, label="a", strategy="bluegreen"), rollback_of=1)
    d = w.tick({old: up(), new: up()})
    assert w.state.traffic().get(old) == 100
    assert not any(isinstance(a, DeployServe) and a.cluster == old for a in d.actions)


# ---- 8. event/log spam, hold states -----------------------------------------------------------
def test_a_bake_whose_baked_cluster_is_not_ready_says_so_once_an_interval() -> None:
    w = World()
    old, new = into_canary(w, _bake_spec(300))
    judged_good(w, old, new)
    pend = ClusterObservation(Liveness.UP, Health.PENDING, "x", window=win(600, errors=600))
    events = 0
    for _ in range(60):
        d = w.tick({old: ClusterObservation(Liveness.UP, Health.FAILED, "y"), new: pend})
        events += sum("not healthy enough" in e for e in d.events)
    assert events <= 60 // 10 + 1, events
    assert w.state.active is not None and w.state.active.cluster == new


# ---- 0. found by the capacity property: repair deploy carries the stale capacity ---------
def test_a_stable_cluster_repaired_in_the_tick_a_canary_ends_gets_full_capacity() -> None:
    """`_keep_active_deployed` (stable reports NOT_DEPLOYED) sends DeployServe(stable,
    active_capacity=50) before `_keep_capacity` runs; `_keep_capacity` then sees a
    DeployServe for the cluster already there, sends nothing, and records active_capacity
    None (full). Serve gets 50%, the state says 100%: 100% of traffic on half the replicas,
    and since the state says full, nothing ever repairs it. (Found by
    tests/test_rev3_capacity_property.py, there via a superseding push.)"""
    w = World()
    old, new = into_canary(w, canary_spec(scale=True, steps=[{"weight": 50}, {"pause": {}}]))
    for _ in range(3):
        w.tick({old: up(), new: up()})
    assert w.weight == 50 and w.state.active_capacity == 50
    assert w.command("abort") is None
    lost = ClusterObservation(Liveness.UP, Health.NOT_DEPLOYED, "application 'app' is not deployed")
    d = w.tick({old: lost, new: up()})
    assert w.state.traffic()[old] == 100 and w.state.active_capacity is None
    last = [a.capacity for a in d.actions if isinstance(a, DeployServe) and a.cluster == old]
    assert last and last[-1] is None, f"stable sent {last} with 100% of traffic"
    for _ in range(5):  # and it is never repaired
        d = w.tick({old: up(), new: up()})
        last += [a.capacity for a in d.actions if isinstance(a, DeployServe) and a.cluster == old]
    assert last[-1] is None, f"capacities sent to stable: {last}"
