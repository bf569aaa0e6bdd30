"""The planner's canary, bake and rollback paths, on their own: scenarios first, then
property tests over random histories with canary steps, commands and restarts."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollout.analysis import Outcome, WindowStats
from rollout.plan import (
    ClusterObservation,
    Command,
    CreateCluster,
    DeleteCluster,
    DeployServe,
    Health,
    Hold,
    Kind,
    Liveness,
    Phase,
    Result,
    Step,
    refusal,
)
from rollout.spec import ServiceSpec
from rollout.store import _from_json, _to_json
from tests.test_plan import World as PlanWorld

STEPS: list[dict[str, Any]] = [
    {"weight": 10},
    {"pause": {"duration_s": 30}},
    {"weight": 50},
    {"pause": {}},
]


def canary_spec(
    cpus: int = 4,
    label: str = "b",
    steps: list[dict[str, Any]] | None = None,
    bake: float = 0.0,
    scale: bool = False,
    strategy: str = "canary",
    **analysis: Any,
) -> ServiceSpec:
    upgrade: dict[str, Any] = {
        "health": {"timeout_s": 100, "consecutive_successes": 2},
        "drain_timeout_s": 30,
        "strategy": strategy,
        "bake_s": bake,
    }
    if strategy == "canary":
        upgrade["canary"] = {
            "steps": STEPS if steps is None else steps,
            "analysis": {"interval_s": 10, "min_requests": 20, "failure_limit": 2,
                         "inconclusive_limit": 3, **analysis},
            "scale_with_traffic": scale,
        }  # fmt: skip
    elif analysis:
        raise ValueError("analysis settings need strategy canary")
    return ServiceSpec.model_validate(
        {
            "name": "svc",
            "cluster": {"num_cpus": cpus},
            "serve": {"applications": [{
                "name": "app", "route_prefix": "/app", "import_path": "m:app",
                "deployments": [{"name": "D", "user_config": {"label": label}}],
            }]},
            "upgrade": upgrade,
        }
    )  # fmt: skip


def win(requests: int, errors: int = 0, seconds: float = 10.0, slow: int = 0) -> WindowStats:
    """A window: `slow` answers took 0.9 s, the others 10 ms."""
    fast = requests - slow
    return WindowStats(requests, errors, (0.05, 1.0, math.inf), (fast, requests, requests),
                       seconds)  # fmt: skip


def up(window: WindowStats | None = None, in_flight: int = 0) -> ClusterObservation:
    return ClusterObservation(Liveness.UP, Health.OK, in_flight=in_flight, window=window)


class World(PlanWorld):
    """tests/test_plan.py's World, with the operator's commands and the canary's weight."""

    def command(self, kind: str, full: bool = False) -> str | None:
        cmd = Command(kind, full)
        why = refusal(self.state, cmd)
        if why is None:
            self.state = replace(self.state, commands=(*self.state.commands, cmd))
        return why

    @property
    def weight(self) -> int:
        p = self.state.pending
        return p.canary.weight if p is not None and p.canary is not None else 0


def live(w: World, spec: ServiceSpec) -> str:
    w.push(spec)
    w.tick({})
    cid = w.state.pending.cluster if w.state.pending else ""
    w.tick({cid: ClusterObservation(Liveness.UP)})
    for _ in range(spec.upgrade.health.consecutive_successes):
        w.tick({cid: up()})
    assert w.state.active is not None and w.state.active.cluster == cid
    return cid


def into_canary(w: World, spec: ServiceSpec) -> tuple[str, str]:
    """Live on a blue-green cluster, then `spec` pushed and through its gates."""
    old = live(w, canary_spec(cpus=2, label="a", strategy="bluegreen"))
    w.push(spec)
    w.tick({old: up()})
    assert w.state.pending is not None
    new = w.state.pending.cluster
    w.tick({old: up(), new: ClusterObservation(Liveness.UP)})
    w.tick({old: up(), new: up()})
    w.tick({old: up(), new: up()})
    assert w.state.pending is not None and w.state.pending.step is Step.CANARY
    return old, new


def judged_good(w: World, old: str, new: str) -> None:
    """One analysis interval passes (here: the canary at its last step goes to 100%)."""
    w.tick({old: up(win(900)), new: up(win(100))}, dt=10)


def test_a_good_canary_walks_its_steps_on_real_traffic() -> None:
    w = World()
    old, new = into_canary(w, canary_spec())
    # The first weight step took effect in the decision that passed the gates.
    assert w.state.traffic() == {old: 90, new: 10}
    assert w.state.phase is Phase.UPGRADING
    good = {old: up(win(900)), new: up(win(100))}
    for _ in range(29):  # the 30 s pause: not over before its time, whatever the verdicts
        w.tick(good)
        assert w.weight == 10
    w.tick(good)
    assert w.state.traffic() == {old: 50, new: 50}
    assert w.state.analysis is not None and w.state.analysis.passes == 0
    for _ in range(60):  # `pause: {}` holds until promote
        w.tick(good)
    assert w.weight == 50 and w.state.pending is not None
    assert w.state.pending.message == "paused: waiting for `raygate promote`"
    assert w.command("promote") is None
    d = w.tick(good)
    assert w.state.active is not None and w.state.active.cluster == new
    assert w.state.traffic() == {new: 100, old: 0}
    assert d.finished[-1].result is Result.SUCCEEDED
    assert [r.cluster for r in w.state.retiring] == [old]


def test_a_timed_pause_never_ends_without_a_passed_interval() -> None:
    w = World()
    old, new = into_canary(w, canary_spec(inconclusive_limit=100))
    quiet = {old: up(win(900)), new: up(win(5))}  # 5 < min_requests: no verdict
    for _ in range(120):
        w.tick(quiet)
    assert w.weight == 10, "a pause ended on no data"
    assert w.state.pending is not None
    assert "enough traffic to pass" in w.state.pending.message
    w.tick({old: up(win(900)), new: up(win(100))}, dt=10)
    assert w.weight == 50


def test_no_traffic_pauses_the_canary_itself_and_it_waits_for_promote() -> None:
    w = World()
    steps = [{"weight": 10}, {"weight": 60}, {"pause": {"duration_s": 5}}]
    old, new = into_canary(w, canary_spec(steps=steps))
    # Two weight steps are taken at once; the timed pause then needs data.
    assert w.weight == 60
    d = None
    for _ in range(3):
        d = w.tick({old: up(win(40)), new: up(win(12))}, dt=10)
    assert d is not None and [v.result for v in d.verdicts] == [Outcome.INCONCLUSIVE]
    p = w.state.pending
    assert p is not None and p.canary is not None and p.canary.hold is Hold.NO_DATA
    assert p.message == "not enough traffic to judge: 12 requests in 10 s"
    for _ in range(5):  # traffic comes back: still held, it waits for a human
        w.tick({old: up(win(400)), new: up(win(600))}, dt=10)
    assert w.state.pending is not None and w.weight == 60
    assert w.command("promote") is None
    w.tick({old: up(win(400)), new: up(win(600))})
    assert w.state.active is not None and w.state.active.cluster == new


def test_a_failed_analysis_aborts_and_all_traffic_goes_back_at_once() -> None:
    w = World()
    old, new = into_canary(w, canary_spec())
    bad = {old: up(win(900)), new: up(win(212, errors=66), in_flight=3)}
    d = w.tick(bad, dt=10)
    assert w.weight == 10, "one failed interval of two allowed"
    d = w.tick(bad, dt=10)
    assert w.state.pending is None
    assert w.state.traffic() == {old: 100, new: 0}
    assert w.state.active is not None and w.state.active.cluster == old
    # The canary drains (requests in flight), it is not deleted under them.
    assert not any(isinstance(a, DeleteCluster) for a in d.actions)
    assert [r.cluster for r in w.state.retiring] == [new]
    record = d.finished[-1]
    assert record.result is Result.ABORTED
    assert "error rate 31.1% > 1.0% over 212 requests" in record.message
    d = w.tick({old: up(), new: up()})
    assert DeleteCluster(new, "drained") in d.actions
    d = w.tick({old: up()})
    assert w.state.pending is None, "an aborted revision is not tried again"


def test_latency_and_error_rate_over_stable_fail_too() -> None:
    w = World()
    limits = {"max_p99_latency_ms": 500, "max_error_rate": 0.5, "failure_limit": 1}
    old, new = into_canary(w, canary_spec(max_error_rate_over_stable=0.01, **limits))
    d = w.tick({old: up(win(1000, errors=1)), new: up(win(100, errors=5, slow=10))}, dt=10)
    assert d.finished[-1].result is Result.ABORTED
    assert "p99 latency" in d.finished[-1].message
    assert "points over stable" in d.finished[-1].message


def test_a_restart_mid_step_resumes_the_same_step_at_the_same_weight() -> None:
    w = World()
    old, new = into_canary(w, canary_spec())
    good = {old: up(win(900)), new: up(win(100))}
    for _ in range(5):  # restarted before any interval in the pause was judged
        w.tick(good)
    before = w.state
    w.state = _from_json(_to_json(w.state))  # what a restarted raygate loads
    assert w.state == before
    # Just restarted: no window yet (the sampler is empty) -> nothing is judged or jumps.
    for _ in range(25):
        d = w.tick({old: up(), new: up()})
        assert not d.verdicts
        assert w.state.traffic() == {old: 90, new: 10}
    w.tick(good)  # the pause was over, but it needs a pass in it first
    assert w.weight == 50


def test_pause_resume_and_abort_commands() -> None:
    w = World()
    old, new = into_canary(w, canary_spec())
    good = {old: up(win(900)), new: up(win(100))}
    assert w.command("resume") is not None
    assert w.command("pause") is None
    w.tick(good)
    assert w.command("pause") == "the canary is paused already (`raygate resume` goes on)"
    for _ in range(40):
        w.tick(good)
    assert w.weight == 10, "paused: the timed pause does not end"
    assert w.command("resume") is None
    w.tick(good)
    assert w.weight == 50
    assert w.command("abort") is None
    d = w.tick(good)
    assert w.state.traffic() == {old: 100, new: 0}
    assert d.finished[-1].result is Result.ABORTED and "raygate abort" in d.finished[-1].message
    assert w.command("promote") == "no rollout in progress"


def test_commands_refused_before_the_canary_steps() -> None:
    w = World()
    old = live(w, canary_spec(cpus=2, strategy="bluegreen"))
    w.push(canary_spec())
    w.tick({old: up()})
    for kind in ("promote", "pause", "resume"):
        why = w.command(kind)
        assert why is not None and "create_cluster step" in why
    assert w.command("abort") is None
    d = w.tick({old: up()})
    assert d.finished[-1].result is Result.ABORTED


def test_promote_full_skips_the_steps_but_not_the_bake() -> None:
    w = World()
    old, new = into_canary(w, canary_spec(bake=60))
    assert w.command("promote", full=True) is None
    w.tick({old: up(), new: up()})
    assert w.state.active is not None and w.state.active.cluster == new
    assert w.state.phase is Phase.LIVE and w.state.pending is None
    (baked,) = w.state.retiring
    assert baked.cluster == old and baked.bake_until == w.now + 60
    d = w.tick({old: up(), new: up()}, dt=59)
    assert not any(isinstance(a, DeleteCluster) for a in d.actions)
    d = w.tick({old: up(), new: up()}, dt=2)
    assert DeleteCluster(old, "drained") in d.actions


def test_a_failed_analysis_in_the_bake_window_rolls_back_at_once() -> None:
    w = World()
    old, new = into_canary(w, canary_spec(bake=300, steps=[{"weight": 100}]))
    judged_good(w, old, new)
    assert w.state.active is not None and w.state.active.cluster == new
    assert w.state.traffic() == {new: 100, old: 0}
    bad = {old: up(), new: up(win(300, errors=30))}
    w.tick(bad, dt=10)
    assert w.state.active.cluster == new
    d = w.tick(bad, dt=10)
    assert w.state.active is not None and w.state.active.cluster == old
    assert w.state.active.revision == 1
    assert w.state.traffic() == {old: 100, new: 0}
    assert not any(isinstance(a, CreateCluster) for a in d.actions)
    assert (2, Result.ROLLED_BACK) in [(r.revision, r.result) for r in d.finished]
    assert w.state.last_rollout is not None and "error rate 10.0%" in w.state.last_rollout.message
    for _ in range(5):  # the rolled back revision is not tried again
        d = w.tick({old: up(), new: up()})
        assert w.state.pending is None and not any(isinstance(a, CreateCluster) for a in d.actions)


def test_a_rollback_in_the_bake_window_is_one_weight_change() -> None:
    w = World()
    old, new = into_canary(w, canary_spec(bake=300, steps=[{"weight": 100}]))
    judged_good(w, old, new)
    w.push(canary_spec(cpus=2, label="a", strategy="bluegreen"), rollback_of=1)
    d = w.tick({old: up(), new: up()})
    assert w.state.active is not None and (w.state.active.cluster, w.state.active.revision) == (
        old, 3)  # fmt: skip
    assert w.state.traffic() == {old: 100, new: 0}
    assert not any(isinstance(a, CreateCluster | DeployServe) for a in d.actions)
    results = {r.revision: r.result for r in d.finished}
    assert results == {2: Result.ROLLED_BACK, 3: Result.SUCCEEDED}


def test_a_rollback_after_the_bake_is_a_rollout_without_canary_steps() -> None:
    w = World()
    old, new = into_canary(w, canary_spec(steps=[{"weight": 100}]))
    judged_good(w, old, new)
    w.tick({new: up(), old: up()})
    assert old not in w.state.clusters()
    # Back to the canary spec's own revision would be a canary; a rollback never is.
    w.push(canary_spec(cpus=2, label="a"), rollback_of=1)
    w.tick({new: up()})
    p = w.state.pending
    assert p is not None and p.kind is Kind.NEW_CLUSTER
    c = p.cluster
    w.tick({new: up(), c: ClusterObservation(Liveness.UP)})
    w.tick({new: up(), c: up()})
    d = w.tick({new: up(), c: up()})
    assert w.state.active is not None and w.state.active.cluster == c
    assert {r.revision: r.result for r in d.finished} == {
        2: Result.ROLLED_BACK, 3: Result.SUCCEEDED}  # fmt: skip


def test_a_serve_only_change_with_strategy_canary_gets_a_cluster_of_its_own() -> None:
    w = World()
    old = live(w, canary_spec(cpus=2, label="a", strategy="bluegreen"))
    w.push(canary_spec(cpus=2, label="b"))
    d = w.tick({old: up()})
    assert w.state.pending is not None and w.state.pending.kind is Kind.NEW_CLUSTER
    assert any(isinstance(a, CreateCluster) for a in d.actions)
    assert any("a canary needs a cluster of its own" in e for e in d.events)


def test_scale_with_traffic_raises_capacity_before_the_weight_moves() -> None:
    w = World()
    old = live(w, canary_spec(cpus=2, label="a", strategy="bluegreen"))
    w.push(canary_spec(scale=True, steps=[{"weight": 20}, {"weight": 60}]))
    w.tick({old: up()})
    assert w.state.pending is not None
    new = w.state.pending.cluster
    # Deployed at its first step's capacity from the start, health gates included.
    d = w.tick({old: up(), new: ClusterObservation(Liveness.UP)})
    assert d.actions == (DeployServe(new, 2, 20),)
    w.tick({old: up(), new: up()})
    w.tick({old: up(), new: up()})
    assert w.state.pending.step is Step.CANARY and w.weight == 0
    w.tick({old: up(), new: ClusterObservation(Liveness.UP, Health.PENDING)})
    assert w.weight == 0, "replicas not up yet"
    w.tick({old: up(), new: up()})
    d = w.tick({old: up(), new: up()})
    assert w.weight == 20 and DeployServe(old, 1, 80) in d.actions
    assert DeployServe(new, 2, 60) in d.actions, "the next step's replicas first"
    w.tick({old: up(), new: up()})
    d = w.tick({old: up(), new: up()})
    assert w.weight == 60 and DeployServe(old, 1, 40) in d.actions
    d = w.tick({old: up(win(900)), new: up(win(100))}, dt=10)  # passed: 100% next
    assert DeployServe(new, 2, 100) in d.actions and w.state.pending is not None
    w.tick({old: up(), new: up()})
    w.tick({old: up(), new: up()})
    assert w.state.active is not None and w.state.active.cluster == new


def test_a_push_during_a_canary_wins_and_the_canary_drains() -> None:
    w = World()
    old, new = into_canary(w, canary_spec())
    w.push(canary_spec(cpus=8))
    d = w.tick({old: up(), new: up(in_flight=4)})
    assert w.state.traffic().get(new) == 0 and w.state.traffic()[old] == 100
    assert new in [r.cluster for r in w.state.retiring]
    assert not any(isinstance(a, DeleteCluster) for a in d.actions)
    assert d.finished[-1].result is Result.SUPERSEDED


# ---- properties ------------------------------------------------------------------------
SPECS = [
    canary_spec(cpus=2, label="a", strategy="bluegreen"),
    canary_spec(cpus=4, label="b"),
    canary_spec(cpus=2, label="c", bake=30, steps=[{"weight": 30}, {"pause": {"duration_s": 15}}]),
    canary_spec(
        cpus=4, label="d", steps=[{"pause": {"duration_s": 5}}, {"weight": 70}, {"pause": {}}]
    ),
    canary_spec(cpus=2, label="e", scale=True, bake=10),
]

windows = st.one_of(
    st.none(),
    # Mostly clean windows, so histories get through their pauses into bakes and rollbacks.
    *[st.builds(lambda n, e: win(n, min(e, n)), st.integers(0, 300),
                st.sampled_from([0] * 6 + [1, 40]))] * 5,
)  # fmt: skip
observation = st.builds(
    ClusterObservation,
    liveness=st.sampled_from([Liveness.UP] * 40 + [Liveness.STARTING, Liveness.DEAD]),
    health=st.sampled_from([Health.OK] * 30 + [Health.PENDING, Health.FAILED]),
    message=st.just("m"),
    in_flight=st.integers(0, 2),
    window=windows,
)


def _allowed(spec: ServiceSpec) -> set[int]:
    canary = spec.upgrade.canary
    return {0, 100} | {s.weight for s in canary.steps if s.weight} if canary else {0, 100}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_canary_invariants_over_random_histories(data: st.DataObject) -> None:
    w = World()
    w.push(SPECS[0])
    for _ in range(data.draw(st.integers(5, 60), label="ticks")):
        choice = data.draw(st.integers(0, 19), label="what")
        if choice == 0:
            w.push(data.draw(st.sampled_from(SPECS), label="spec"))
        elif choice == 3 and w.state.active is not None:  # `raygate rollback`
            live = w.state.active.revision
            good = [n for n in w.revisions if n < live]
            if good:
                to = data.draw(st.sampled_from(good), label="to")
                w.push(w.revisions[to].spec, rollback_of=to)
        elif choice == 1:
            w.command(data.draw(st.sampled_from(["promote", "abort", "pause", "resume"])),
                      data.draw(st.booleans(), label="full"))  # fmt: skip
        elif choice == 2:  # a restart: the stored state, loaded again
            w.state = _from_json(_to_json(w.state))
        before = w.state
        obs = {c: data.draw(observation, label=c) for c in before.clusters()}
        dt = data.draw(st.floats(0.1, 20), label="dt")
        d = w.tick(obs, dt)
        after = d.state
        traffic = after.traffic()
        assert all(0 <= v <= 100 for v in traffic.values())
        assert sum(traffic.values()) in (0, 100)
        p, bp = after.pending, before.pending
        if p is not None and p.canary is not None:
            spec = w.revisions[p.revision].spec
            # The weight only moves along the declared steps.
            assert p.canary.weight in _allowed(spec)
            assert 0 <= p.canary.index <= len(spec.upgrade.canary.steps)  # type: ignore[union-attr]
            # A canary step never passes a timed pause without a passed interval in it.
            if bp is not None and bp.canary is not None and bp.cluster == p.cluster:
                if p.canary.index > bp.canary.index and before.commands == ():
                    steps = spec.upgrade.canary.steps  # type: ignore[union-attr]
                    for i in range(bp.canary.index, p.canary.index):
                        pause = steps[i].pause
                        if pause is not None and pause.duration_s is not None:
                            assert before.analysis is not None
                            assert before.analysis.passes >= 1 or any(
                                v.result is Outcome.PASS for v in d.verdicts
                            ), "a timed pause ended without a passed interval"
                        assert pause is None or pause.duration_s is not None, "pause {} passed"
        # A failed verdict that reached the limit leaves all traffic on stable.
        if any(r.result is Result.ABORTED for r in d.finished) and after.active is not None:
            assert traffic[after.active.cluster] == 100 or after.deleting
        # A restart resumes the same step at the same weight.
        assert _from_json(_to_json(after)) == after
        # Deleted clusters never held traffic in this decision's table.
        for a in d.actions:
            if isinstance(a, DeleteCluster):
                assert traffic.get(a.cluster, 0) == 0


def test_a_first_deploy_with_strategy_canary_goes_live_with_all_traffic() -> None:
    """Nothing live: no traffic to protect and nothing to compare against (found by review:
    it used to walk the steps at 20% of a table that held only it, waiting for promote)."""
    w = World()
    w.push(canary_spec())
    w.tick({})
    cid = w.state.pending.cluster if w.state.pending else ""
    w.tick({cid: ClusterObservation(Liveness.UP)})
    w.tick({cid: up()})
    w.tick({cid: up()})
    assert w.state.pending is None and w.state.active is not None
    assert w.state.traffic() == {cid: 100}


def test_a_push_that_changes_only_upgrade_is_no_canary() -> None:
    w = World()
    old = live(w, canary_spec(cpus=2, label="a", strategy="bluegreen"))
    w.push(canary_spec(cpus=2, label="a", bake=60))  # same cluster and Serve config
    d = w.tick({old: up()})
    assert w.state.pending is not None and w.state.pending.kind is Kind.IN_PLACE
    assert not any(isinstance(a, CreateCluster) for a in d.actions)


def test_scale_with_traffic_gives_full_capacity_back_when_the_canary_ends_early() -> None:
    # The stable cluster goes away while the canary is gated at 20%: it goes live at 100%.
    w = World()
    old = live(w, canary_spec(cpus=2, label="a", strategy="bluegreen"))
    w.push(canary_spec(scale=True, steps=[{"weight": 20}, {"weight": 60}]))
    w.tick({old: up()})
    assert w.state.pending is not None
    new = w.state.pending.cluster
    d = w.tick({old: up(), new: ClusterObservation(Liveness.UP)})
    assert DeployServe(new, 2, 20) in d.actions
    w.tick({new: up()})
    d = w.tick({new: up()})
    assert w.state.active is not None and w.state.active.cluster == new
    assert DeployServe(new, 2) in d.actions, "live at 20% capacity"
    # A push mid-canary wins: the stable cluster, scaled down for the canary, gets it all back.
    w = World()
    old, new = into_canary(w, canary_spec(scale=True, steps=[{"weight": 20}, {"pause": {}}]))
    for _ in range(3):
        w.tick({old: up(), new: up()})
    assert w.weight == 20
    w.push(canary_spec(cpus=8))
    d = w.tick({old: up(), new: up()})
    assert w.state.traffic()[old] == 100 and DeployServe(old, 1) in d.actions


