"""Second review of the canary work: each test states what a user needs and fails on the
code under review (7bf8284). No Ray, no network beyond loopback."""

from __future__ import annotations

import httpx
import pytest

from rollout.cli import _wait
from rollout.plan import (
    Canary,
    ClusterObservation,
    DeleteCluster,
    DeployServe,
    Health,
    Liveness,
    Result,
)
from rollout.spec import SpecError, parse_spec
from tests.test_api import TOKEN
from tests.test_canary_plan import World, canary_spec, into_canary, up, win
from tests.test_cli_commands import Admin, admin, in_canary  # noqa: F401  (admin: a fixture)


def test_promote_does_not_send_all_traffic_to_a_canary_that_fails_its_health_gate() -> None:
    """HAProxy's own check marks a canary whose Serve proxy is down as DOWN: it gets no
    requests, so analysis is inconclusive and the canary pauses itself 'for lack of traffic'.
    The operator, told only that, promotes: every request then goes to the broken cluster."""
    w = World()
    old, new = into_canary(w, canary_spec(steps=[{"weight": 10}, {"pause": {}}]))
    broken = ClusterObservation(Liveness.UP, Health.PENDING,
                                "Serve proxy at http://127.0.0.2:8000 unreachable",
                                window=win(0))  # fmt: skip
    for _ in range(4):
        w.tick({old: up(win(900)), new: broken}, dt=10)
    p = w.state.pending
    assert p is not None and p.canary is not None
    print("status message the operator sees:", p.message)
    assert w.command("promote", full=True) is None
    w.tick({old: up(win(900)), new: broken})
    assert w.state.active is not None
    assert w.state.active.cluster == old, (
        f"promoted onto {w.state.active.cluster}, whose health is PENDING "
        "(blue-green would never switch to it)"
    )


def test_push_wait_says_a_canary_waits_for_promote(
    admin: Admin,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`push --wait` on a spec with `pause: {}` waits for a live state that needs a human."""
    in_canary(admin.store, Canary(3, 50, 6.0))  # at its `pause: {}` step
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=admin.url, trust_env=False, headers=auth) as client:
        rc = _wait(client, "digits", 2, timeout=2.5)
    captured = capsys.readouterr()
    print(captured.out, captured.err)
    assert rc == 3, "3: held for a person (not 1, an abort, after a timeout)"
    assert "promote" in captured.err, "no word of `raygate promote`"


def test_resume_at_a_pause_step_points_to_promote(
    admin: Admin,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`raygate status` says PAUSED at a `pause: {}` step; `raygate resume` then answers that
    the canary is not paused, without saying which command goes on."""
    in_canary(admin.store, Canary(3, 50, 6.0))
    assert admin.run("status", "digits") == 0
    assert "PAUSED" in capsys.readouterr().out
    assert admin.run("resume", "digits") == 1
    err = capsys.readouterr().err
    print(err)
    assert "promote" in err


def test_a_bake_window_rolls_back_when_the_new_cluster_stops_serving() -> None:
    """Baking r2 (r1 warm at weight 0). r2's Serve proxy stops answering /-/healthz; HAProxy
    marks its server DOWN and answers every request 503 <NOSRV>, which the gateway's counters
    attribute to no cluster (gateway/haproxy_engine.py `_count`): the window on r2 is empty.
    Its dashboard still answers (liveness UP), so `_to_baked` never fires either. The
    bake window ends on time, r1 is deleted, and the outage stays."""
    w = World()
    old, new = into_canary(w, canary_spec(bake=300, steps=[{"weight": 100}]))
    w.tick({old: up(win(900)), new: up(win(100))}, dt=10)  # passed: r2 live, r1 baking
    assert w.state.active is not None and w.state.active.cluster == new
    broken = ClusterObservation(Liveness.UP, Health.PENDING,
                                "Serve proxy /-/healthz answered 503", window=None)  # fmt: skip
    deleted = False
    for _ in range(32):
        d = w.tick({old: up(), new: broken}, dt=10)
        deleted |= DeleteCluster(old, "drained") in d.actions
        if w.state.active is not None and w.state.active.cluster == old:
            break
    assert w.state.active is not None and w.state.active.cluster == old, (
        f"still on {w.state.active.cluster} after 320 s of a health-failing active; "
        f"baked cluster deleted: {deleted}"
    )


def test_scale_with_traffic_a_step_down_raises_stable_replicas_before_its_traffic() -> None:
    """Steps need not rise (README). 60% -> 20% with scale_with_traffic: the stable cluster,
    at 40% capacity, gets 80% of the traffic in the same decision that asks Serve for its
    replicas: the 'replicas first, then the traffic' rule holds only for rising steps."""
    w = World()
    old, new = into_canary(w, canary_spec(scale=True, steps=[
        {"weight": 60}, {"pause": {"duration_s": 5}}, {"weight": 20}, {"pause": {}}]))  # fmt: skip
    for _ in range(3):
        w.tick({old: up(), new: up()})
    assert w.weight == 60 and w.state.active_capacity == 40
    d = None
    for _ in range(5):
        d = w.tick({old: up(win(900)), new: up(win(100))}, dt=10)
        if w.weight == 20:
            break
    assert d is not None and w.weight == 20
    moved_with = [a for a in d.actions if isinstance(a, DeployServe) and a.cluster == old]
    assert not moved_with, (
        f"stable takes 80% in the decision that sends {moved_with}: its replicas come later"
    )


def test_a_bake_shorter_than_failure_limit_intervals_can_never_roll_back() -> None:
    """bake_s 15 with the default analysis (interval 10 s, failure_limit 2): the earliest
    rollback is at 20 s, after the window. The push is accepted without a word."""
    raw = canary_spec(bake=15).model_dump(mode="json", by_alias=True)
    raw["upgrade"]["canary"]["analysis"].update(interval_s=10, failure_limit=2)
    with pytest.raises(SpecError):
        parse_spec(raw)


def test_a_scale_up_that_never_completes_says_why_and_ends() -> None:
    """scale_with_traffic: the canary asks Serve for the next step's replicas, and the
    cluster has no room for them (Serve: UPSCALING, replicas PENDING_ALLOCATION). The canary
    waits with no deadline and the status never says what Serve reports."""
    w = World()
    old, new = into_canary(w, canary_spec(scale=True, steps=[
        {"weight": 20}, {"pause": {"duration_s": 5}}, {"weight": 60}, {"pause": {}}]))  # fmt: skip
    for _ in range(3):
        w.tick({old: up(), new: up()})
    assert w.weight == 20
    w.tick({old: up(win(400)), new: up(win(100))}, dt=10)  # the pause passes; 60% asked for
    assert w.weight == 20 and w.state.pending is not None
    assert w.state.pending.message.startswith("scaling to 60%")
    stuck = ClusterObservation(Liveness.UP, Health.PENDING,
                               "deployment digits/D has 1/3 replicas", window=win(100))  # fmt: skip
    for _ in range(200):  # 2000 s, health timeout_s is 100
        w.tick({old: up(win(400)), new: stuck}, dt=10)
    # It ends past the health timeout, saying what Serve reported.
    assert w.state.pending is None and w.state.last_rollout is not None
    assert w.state.last_rollout.result is Result.ABORTED
    assert "1/3 replicas" in w.state.last_rollout.message
    assert w.state.traffic()[old] == 100
