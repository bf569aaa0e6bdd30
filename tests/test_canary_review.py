"""Canary, bake and scale_with_traffic faults a cold review found (each failed before its
fix): capacity given back on every path, the warm baked cluster used, no data no success."""

from __future__ import annotations

from rollout.plan import (
    ClusterObservation,
    DeployServe,
    Liveness,
)
from tests.test_canary_plan import World, canary_spec, into_canary, judged_good, live, up, win


def _capacity_sent(d: object, cluster: str) -> list[int | None]:
    return [a.capacity for a in d.actions if isinstance(a, DeployServe) and a.cluster == cluster]


def test_a_superseded_scaled_canary_gives_stable_its_full_capacity_back() -> None:
    """scale_with_traffic lowered stable to 40% capacity at weight 60; a push supersedes the
    canary and stable takes 100% of traffic: its target_capacity must go back to 100."""
    w = World()
    old = live(w, canary_spec(cpus=2, label="a", strategy="bluegreen"))
    w.push(canary_spec(scale=True, steps=[{"weight": 60}, {"pause": {}}]))
    w.tick({old: up()})
    new = w.state.pending.cluster  # type: ignore[union-attr]
    w.tick({old: up(), new: ClusterObservation(Liveness.UP)})
    for _ in range(6):
        w.tick({old: up(), new: up()})
    assert w.weight == 60
    w.push(canary_spec(cpus=8, label="c", strategy="bluegreen"))  # a fix, blue-green
    sent: list[int | None] = []
    d = w.tick({old: up(), new: up()})
    sent += _capacity_sent(d, old)
    assert w.state.traffic()[old] == 100
    for _ in range(3):
        d = w.tick({old: up(), new: up()})
        sent += _capacity_sent(d, old)
    assert None in sent or 100 in sent, (
        f"stable {old} carries 100% of traffic at the 40% capacity the canary left it "
        f"(DeployServe capacities sent to it: {sent})"
    )


def test_a_scaled_canary_whose_stable_vanished_is_promoted_at_full_capacity() -> None:
    w = World()
    old = live(w, canary_spec(cpus=2, label="a", strategy="bluegreen"))
    w.push(canary_spec(scale=True, steps=[{"weight": 20}, {"pause": {}}]))
    w.tick({old: up()})
    new = w.state.pending.cluster  # type: ignore[union-attr]
    w.tick({old: up(), new: ClusterObservation(Liveness.UP)})
    for _ in range(5):
        w.tick({old: up(), new: up()})
    assert w.weight == 20
    d = w.tick({new: up()})  # stable is gone: the canary takes all traffic
    assert w.state.active is not None and w.state.active.cluster == new
    assert None in _capacity_sent(d, new) or 100 in _capacity_sent(d, new), (
        f"{new} takes 100% of traffic at target_capacity 20; sent {_capacity_sent(d, new)}"
    )


def test_a_bake_rollback_restores_the_capacity_the_canary_took_from_the_baked_cluster() -> None:
    """Revision 1 (blue-green) is live; revision 2 is a scale_with_traffic canary with a
    bake. Its last weight step left revision 1's cluster at 1% capacity; the bake's failed
    analysis puts 100% of traffic back on it."""
    w = World()
    old = live(w, canary_spec(cpus=2, label="a", strategy="bluegreen"))
    w.push(canary_spec(scale=True, bake=300, steps=[{"weight": 100}]))
    w.tick({old: up()})
    new = w.state.pending.cluster  # type: ignore[union-attr]
    w.tick({old: up(), new: ClusterObservation(Liveness.UP)})
    lowered: list[int | None] = []
    for _ in range(8):  # (an interval at 100% passes before the switch: no data no success)
        d = w.tick({old: up(win(900)), new: up(win(100))}, dt=10)
        lowered += _capacity_sent(d, old)
        if w.state.active is not None and w.state.active.cluster == new:
            break
    assert w.state.active is not None and w.state.active.cluster == new
    # Lowered at the last step, then kept whole for its bake (a rollback is instant).
    assert lowered == [1, None], lowered
    bad = {old: up(), new: up(win(300, errors=30))}
    w.tick(bad, dt=10)
    d = w.tick(bad, dt=10)
    assert w.state.active is not None and w.state.active.cluster == old
    assert w.state.traffic()[old] == 100
    # It takes traffic back at the full capacity its bake began with, nothing to raise now.
    assert lowered[-1] is None and _capacity_sent(d, old) == [], _capacity_sent(d, old)


def test_a_rollback_revision_never_bakes_back_onto_the_revision_it_rolled_back() -> None:
    """r1 good (bake 300), r2 bad and live, r3 = `raygate rollback` (r1's spec) after r2's
    bake. r3 bakes with r2's cluster kept; a failed interval of r3 (say a dependency is
    down) must not put traffic back on r2, the revision the operator rolled back from."""
    w = World()
    r1 = canary_spec(cpus=2, label="a", strategy="bluegreen", bake=300)
    c1 = live(w, r1)
    w.push(canary_spec(cpus=4, label="b", strategy="bluegreen", bake=300))  # r2
    w.tick({c1: up()})
    c2 = w.state.pending.cluster  # type: ignore[union-attr]
    w.tick({c1: up(), c2: ClusterObservation(Liveness.UP)})
    w.tick({c1: up(), c2: up()})
    w.tick({c1: up(), c2: up()})
    assert w.state.active is not None and w.state.active.cluster == c2
    w.tick({c1: up(), c2: up()}, dt=301)  # r2's bake is over, c1 goes
    w.tick({c2: up()})
    assert c1 not in w.state.clusters()
    w.push(r1, rollback_of=1)  # r3
    w.tick({c2: up()})
    c3 = w.state.pending.cluster  # type: ignore[union-attr]
    w.tick({c2: up(), c3: ClusterObservation(Liveness.UP)})
    w.tick({c2: up(), c3: up()})
    w.tick({c2: up(), c3: up()})
    assert w.state.active is not None and (w.state.active.cluster, w.state.active.revision) == (
        c3,
        3,
    )
    bad = {c2: up(), c3: up(win(300, errors=30))}
    w.tick(bad, dt=10)
    w.tick(bad, dt=10)
    assert w.state.active is not None and w.state.active.revision != 2, (
        f"the rollback was undone: revision 2 (rolled back by the operator) is live again on "
        f"{w.state.active.cluster}; last rollout: {w.state.last_rollout}"
    )


def test_a_dead_active_in_the_bake_window_gives_traffic_to_the_warm_baked_cluster() -> None:
    w = World()
    old, new = into_canary(w, canary_spec(bake=300, steps=[{"weight": 100}]))
    judged_good(w, old, new)
    assert w.state.active is not None and w.state.active.cluster == new
    d = w.tick({old: up()})  # the new cluster is gone (DEAD): the baked one is up and warm
    assert w.state.traffic().get(old) == 100, (
        f"traffic {w.state.traffic()} while baked cluster {old} (revision 1) is up; actions "
        f"{d.actions}"
    )


def test_deleting_a_service_does_not_wait_for_its_bake_window() -> None:
    w = World()
    old, new = into_canary(w, canary_spec(bake=86400, steps=[{"weight": 100}]))
    w.state = __import__("dataclasses").replace(w.state, deleting=True)
    gone = False
    for _ in range(10):
        d = w.tick({old: up(), new: up()}, dt=5)
        gone = gone or d.gone
    assert gone, (
        f"service still holds {w.state.clusters()} 50 s after its deletion "
        f"(bake_until in {w.state.retiring[0].bake_until - w.now:.0f}s)"
    )


def test_scale_with_traffic_never_runs_the_canary_at_full_capacity_beside_stable() -> None:
    """README: "A canary then does not need twice the replicas". The new cluster's first
    deploy (its health gates) is at full capacity while stable is at 100%: the peak is
    blue-green's."""
    w = World()
    old = live(w, canary_spec(cpus=2, label="a", strategy="bluegreen"))
    w.push(canary_spec(scale=True, steps=[{"weight": 20}, {"pause": {}}]))
    w.tick({old: up()})
    new = w.state.pending.cluster  # type: ignore[union-attr]
    d = w.tick({old: up(), new: ClusterObservation(Liveness.UP)})
    first = _capacity_sent(d, new)
    assert first and first[0] is not None and first[0] <= 20, (
        f"the canary's first deploy asks for capacity {first}: all its replicas (None = "
        "100%) beside stable's 100%"
    )


def test_a_timed_pause_ends_only_on_an_interval_judged_inside_it() -> None:
    """steps 10% / pause 15 s / 50% / pause 5 s, interval 10 s. The 50% pause must not end
    on a window of which half ran at 10% (README: "a timed pause does not end before at
    least one analysis interval in it passed")."""
    w = World()
    steps = [
        {"weight": 10},
        {"pause": {"duration_s": 15}},
        {"weight": 50},
        {"pause": {"duration_s": 5}},
        {"pause": {}},
    ]
    old, new = into_canary(w, canary_spec(steps=steps))
    good = {old: up(win(900)), new: up(win(100))}
    moved_at = None
    for _ in range(40):
        w.tick(good, dt=5)
        if moved_at is None and w.weight == 50:
            moved_at = w.now
        p = w.state.pending
        if p is not None and p.canary is not None and p.canary.index == 4:
            break
    assert moved_at is not None
    a = w.state.analysis
    assert a is not None
    assert w.now - moved_at >= 10, (
        f"the 5 s pause at 50% ended {w.now - moved_at:.0f} s after the weight moved, on the "
        f"interval judged at {a.last_at - moved_at:+.0f} s: its window began "
        f"{moved_at - (a.last_at - 10):.0f} s before the move, at 10%"
    )


def test_a_canary_whose_last_step_is_a_weight_is_not_promoted_on_no_data() -> None:
    """steps 10% / 50%: both weights are taken in the tick the gates pass, and the canary is
    promoted to 100% in that same tick, on zero analysed requests."""
    w = World()
    _old, new = into_canary(w, canary_spec(steps=[{"weight": 10}, {"weight": 50}]))
    assert not (w.state.active is not None and w.state.active.cluster == new), (
        f"promoted to 100% with no analysis interval judged (analysis: {w.state.analysis})"
    )


def test_a_canary_that_lost_its_serve_config_is_deployed_again() -> None:
    """A canary at 10% whose Serve apps are gone (NOT_DEPLOYED, e.g. its Serve controller
    restarted) keeps its weight: its config must be sent again, as the active's is."""
    w = World()
    old, new = into_canary(w, canary_spec())
    assert w.weight == 10
    sent = []
    for _ in range(3):
        d = w.tick(
            {
                old: up(),
                new: ClusterObservation(
                    Liveness.UP,
                    __import__("rollout.plan").plan.Health.NOT_DEPLOYED,
                    "application 'app' is not deployed",
                ),
            }
        )
        sent += _capacity_sent(d, new)
    assert w.weight == 10
    assert sent, "10% of requests go to a cluster that runs no app, and nothing redeploys it"


def test_promote_out_of_a_no_data_hold_gives_the_next_step_its_full_inconclusive_limit() -> None:
    w = World()
    steps = [
        {"weight": 10},
        {"pause": {"duration_s": 5}},
        {"weight": 50},
        {"pause": {"duration_s": 5}},
        {"pause": {}},
    ]
    old, new = into_canary(w, canary_spec(steps=steps))
    quiet = {old: up(win(40)), new: up(win(3))}
    for _ in range(3):
        w.tick(quiet, dt=10)
    from rollout.plan import Hold

    assert w.state.pending.canary.hold is Hold.NO_DATA  # type: ignore[union-attr]
    assert w.command("promote") is None
    w.tick(quiet, dt=1)
    assert w.weight == 50
    w.tick(quiet, dt=10)  # one quiet interval at the new step (limit: 3)
    assert w.state.pending.canary.hold is Hold.NONE, (  # type: ignore[union-attr]
        f"held again after 1 interval: inconclusive={w.state.analysis.inconclusive}"
    )  # type: ignore[union-attr]


def test_a_bake_rollback_does_not_send_traffic_to_a_baked_cluster_that_is_not_healthy() -> None:
    """The baked cluster is only checked for liveness: a failed verdict puts 100% of traffic
    on it even when its apps are FAILED (and the controller never health-checks a retiring
    cluster at all: observe() sets expected=None for it)."""
    from rollout.plan import Health

    w = World()
    old, new = into_canary(w, canary_spec(bake=300, steps=[{"weight": 100}]))
    judged_good(w, old, new)
    sick = ClusterObservation(Liveness.UP, Health.FAILED, "deployment app/D DEPLOY_FAILED")
    bad = {old: sick, new: up(win(300, errors=30))}
    w.tick(bad, dt=10)
    w.tick(bad, dt=10)
    assert not (w.state.active is not None and w.state.active.cluster == old), (
        f"100% of traffic moved to {old}, whose apps are FAILED"
    )


def test_an_unresponsive_active_in_the_bake_window_is_not_kept_until_the_bake_ends() -> None:
    """The new cluster's dashboard and Serve proxy stop answering during a 1-hour bake, with
    too little traffic for a verdict. _replace_unresponsive_active counts the baking cluster
    as a slot taken and waits; the warm baked cluster stays at weight 0 for the whole hour."""
    w = World()
    old, new = into_canary(w, canary_spec(bake=3600, steps=[{"weight": 100}]))
    judged_good(w, old, new)
    assert w.state.active is not None and w.state.active.cluster == new  # baking
    window = w.revisions[2].spec.liveness.dead_after_s
    hung = ClusterObservation(Liveness.UNREACHABLE, proxy_ok=False, window=win(3))
    waited = 0.0
    while waited < window + 120:
        w.tick({old: up(), new: hung}, dt=10)
        waited += 10
    assert w.state.traffic().get(new, 0) == 0, (
        f"{waited:.0f} s after {new} stopped answering (dead_after_s {window:g}) it still holds "
        f"all traffic {w.state.traffic()}; nothing replaces it (waiting: {w.state.waiting!r})"
    )
