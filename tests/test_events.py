"""Rollout events derived from one decision (rollout/events.py): pure, no controller.

Each test builds the state a tick planned from and the decision it reached, as the planner
makes them, and checks which events a webhook receiver would get, in which order.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from rollout.events import (
    DEGRADED_GRACE_S,
    EventKind,
    RolloutEvent,
    degraded_told,
    rollout_events,
)
from rollout.plan import (
    Active,
    Canary,
    Decision,
    DeleteCluster,
    Kind,
    Pending,
    Result,
    RolloutRecord,
    ServiceState,
    Step,
    Unreachable,
)

NOW = 2000.0
LIVE = ServiceState("svc", active=Active("c1", 1, "h1"))


def kinds(before: ServiceState, decision: Decision) -> list[EventKind]:
    return [e.kind for e in rollout_events(before, decision, NOW)]


def pending(step: Step, **kw: object) -> Pending:
    fields: dict[str, object] = dict(revision=2, kind=Kind.NEW_CLUSTER, cluster="c2",
                                     cluster_hash="h2", step=step, started_at=1000.0)  # fmt: skip
    fields.update(kw)
    return Pending(**fields)  # type: ignore[arg-type]


def test_a_tick_that_changes_nothing_says_nothing() -> None:
    assert rollout_events(LIVE, Decision(LIVE), NOW) == []
    health = replace(LIVE, pending=pending(Step.HEALTH, ok_streak=1))
    streak = replace(health, pending=pending(Step.HEALTH, ok_streak=2))
    assert rollout_events(health, Decision(streak), NOW) == [], "a streak is no event"


def test_a_new_rollout_starts_with_its_cluster_and_how() -> None:
    after = replace(LIVE, pending=pending(Step.CREATE_CLUSTER))
    [event] = rollout_events(LIVE, Decision(after), NOW)
    assert (event.kind, event.revision, event.cluster) == (EventKind.STARTED, 2, "c2")
    assert event.message == "rollout of revision 2 started on a new cluster (c2)"
    in_place = replace(LIVE, pending=pending(Step.DEPLOY, kind=Kind.IN_PLACE, cluster="c1"))
    [event] = rollout_events(LIVE, Decision(in_place), NOW)
    assert "in place (c1)" in event.message


def test_a_push_that_supersedes_a_rollout_ends_it_and_starts_the_next() -> None:
    before = replace(LIVE, pending=pending(Step.HEALTH))
    after = replace(LIVE, pending=pending(Step.DEPLOY, revision=3))
    done = RolloutRecord(2, Result.SUPERSEDED, "superseded by revision 3")
    assert kinds(before, Decision(after, finished=(done,))) == [
        EventKind.SUPERSEDED, EventKind.STARTED]  # fmt: skip


def test_blue_green_passes_switches_and_succeeds_in_that_order() -> None:
    before = replace(LIVE, pending=pending(Step.HEALTH, ok_streak=1))
    after = ServiceState("svc", active=Active("c2", 2, "h2"))
    done = RolloutRecord(2, Result.SUCCEEDED, "revision 2 is live on c2")
    events = rollout_events(before, Decision(after, finished=(done,)), NOW)
    assert [e.kind for e in events] == [
        EventKind.HEALTH_PASSED, EventKind.TRAFFIC_SWITCHED, EventKind.SUCCEEDED]  # fmt: skip
    assert events[1].message == "all traffic on c2 (revision 2), was on c1"
    assert events[2].message == "revision 2 is live on c2" and events[2].revision == 2


def test_an_in_place_update_passes_and_succeeds_without_a_switch() -> None:
    before = replace(LIVE, pending=pending(Step.HEALTH, kind=Kind.IN_PLACE, cluster="c1"))
    after = ServiceState("svc", active=Active("c1", 2, "h1"))
    done = RolloutRecord(2, Result.SUCCEEDED, "revision 2 is live on c1 (in place)")
    assert kinds(before, Decision(after, finished=(done,))) == [
        EventKind.HEALTH_PASSED, EventKind.SUCCEEDED]  # fmt: skip


def test_a_first_deploy_switches_traffic_onto_its_cluster() -> None:
    before = ServiceState("svc", pending=pending(Step.HEALTH, revision=1, cluster="c1"))
    done = RolloutRecord(1, Result.SUCCEEDED, "")
    events = rollout_events(before, Decision(LIVE, finished=(done,)), NOW)
    assert [e.kind for e in events] == [
        EventKind.HEALTH_PASSED, EventKind.TRAFFIC_SWITCHED, EventKind.SUCCEEDED]  # fmt: skip
    assert events[1].message == "all traffic on c1 (revision 1)"
    assert events[2].message == "succeeded", "an empty message says the result"


def test_a_canary_passes_its_gates_then_says_each_step() -> None:
    before = replace(LIVE, pending=pending(Step.HEALTH, ok_streak=1))
    first = replace(LIVE, pending=pending(Step.CANARY, canary=Canary(index=1, weight=10)))
    events = rollout_events(before, Decision(first), NOW)
    assert [e.kind for e in events] == [EventKind.HEALTH_PASSED, EventKind.CANARY_STEP]
    assert events[1].message == "canary c2: 1 step(s) done, weight 0% -> 10%"
    second = replace(LIVE, pending=pending(Step.CANARY, canary=Canary(index=2, weight=50)))
    [step] = rollout_events(first, Decision(second), NOW)
    assert step.message == "canary c2: 2 step(s) done, weight 10% -> 50%"
    paused = replace(LIVE, pending=pending(Step.CANARY, canary=Canary(index=3, weight=50)))
    assert kinds(second, Decision(paused)) == [EventKind.CANARY_STEP], "a pause that passed"
    held = replace(paused, pending=pending(Step.CANARY, canary=Canary(3, 50, step_since=5.0),
                                           message="pause 3/60s"))  # fmt: skip
    assert kinds(paused, Decision(held)) == [], "a pause under way is no step"


def test_an_abort_says_why() -> None:
    before = replace(LIVE, pending=pending(Step.CANARY, canary=Canary(index=1, weight=10)))
    done = RolloutRecord(2, Result.ABORTED, "analysis failed 2 intervals in a row: 40% errors")
    [event] = rollout_events(before, Decision(LIVE, finished=(done,)), NOW)
    assert (event.kind, event.revision) == (EventKind.ABORTED, 2)
    assert event.message == done.message


def test_a_rollback_switches_traffic_back_and_says_so() -> None:
    baked = ServiceState("svc", active=Active("c2", 2, "h2"))
    back = ServiceState("svc", active=Active("c1", 1, "h1"))
    done = RolloutRecord(2, Result.ROLLED_BACK, "analysis failed while baking; traffic back")
    assert kinds(baked, Decision(back, finished=(done,))) == [
        EventKind.TRAFFIC_SWITCHED, EventKind.ROLLED_BACK]  # fmt: skip


def test_a_cluster_degrades_once_and_recovers_once() -> None:
    down = replace(LIVE, unreachable=(Unreachable("c1", NOW - 5),))
    [event] = rollout_events(LIVE, Decision(down), NOW)
    assert (event.kind, event.cluster, event.revision) == (EventKind.CLUSTER_DEGRADED, "c1", 1)
    assert rollout_events(down, Decision(down), NOW) == [], "said once, not every tick"
    [event] = rollout_events(down, Decision(LIVE), NOW)
    assert (event.kind, event.cluster) == (EventKind.CLUSTER_RECOVERED, "c1")
    assert event.message == "dashboard of cluster c1 answers again after 5s"


def test_a_degraded_cluster_that_is_deleted_did_not_recover() -> None:
    down = replace(LIVE, pending=pending(Step.HEALTH), unreachable=(Unreachable("c2", 1.0),))
    done = RolloutRecord(2, Result.ABORTED, "not healthy within 300s")
    assert kinds(down, Decision(LIVE, finished=(done,))) == [EventKind.ABORTED]


def test_an_active_cluster_that_is_gone_is_lost() -> None:
    after = ServiceState("svc", restore=1)
    decision = Decision(after, actions=(DeleteCluster("c1", "dead"),))
    [event] = rollout_events(LIVE, decision, NOW)
    assert (event.kind, event.cluster, event.revision) == (EventKind.CLUSTER_LOST, "c1", 1)
    retired = Decision(LIVE, actions=(DeleteCluster("c0", "drained"),))
    assert rollout_events(LIVE, retired, NOW) == [], "a retired cluster's deletion is routine"


def test_an_event_id_is_stable_for_one_event_and_differs_between_events() -> None:
    a = RolloutEvent("svc", EventKind.STARTED, 2, "m", NOW, "c2")
    assert a.id == RolloutEvent("svc", EventKind.STARTED, 2, "other text", NOW, "c2").id
    others = [
        replace(a, kind=EventKind.SUCCEEDED), replace(a, revision=3), replace(a, time=NOW + 1),
        replace(a, service="b"), replace(a, cluster="c3"),
    ]  # fmt: skip
    assert len({a.id, *(o.id for o in others)}) == 6
    body = a.to_json()
    assert body == {"id": a.id, "service": "svc", "event": "rollout_started", "revision": 2,
                    "cluster": "c2", "message": "m", "time": NOW}  # fmt: skip


def ticks(states: list[tuple[float, ServiceState]]) -> list[tuple[float, EventKind]]:
    """The cluster events of consecutive ticks, carrying `told` from tick to tick as the
    controller does."""
    told: frozenset[str] = frozenset()
    out = []
    for (_, before), (now, after) in itertools.pairwise(states):
        for e in rollout_events(before, Decision(after), now, told, DEGRADED_GRACE_S):
            out.append((now, e.kind))
        told = degraded_told(after, told, now, DEGRADED_GRACE_S)
    return out


def test_a_dashboard_that_misses_a_few_answers_is_no_news() -> None:
    """A GC pause or a busy head misses an answer or two: no webhook pair per hiccup."""
    down = replace(LIVE, unreachable=(Unreachable("c1", 100.0),))
    blip = [(98.0, LIVE), (100.0, down), (102.0, down), (104.0, LIVE), (106.0, LIVE)]
    assert ticks(blip) == []


def test_a_dashboard_silent_past_the_grace_is_degraded_once_then_recovered_once() -> None:
    down = replace(LIVE, unreachable=(Unreachable("c1", 100.0),))
    seq = [(98.0, LIVE)] + [(100.0 + 2 * i, down) for i in range(25)] + [(150.0, LIVE)]
    assert ticks(seq) == [
        (100.0 + DEGRADED_GRACE_S, EventKind.CLUSTER_DEGRADED),
        (150.0, EventKind.CLUSTER_RECOVERED),
    ]


def test_a_rollout_that_ends_names_the_cluster_it_ran_on() -> None:
    """The webhook body's `cluster` was null on every rollout_succeeded, rollout_aborted,
    rollout_superseded and rolled_back (seen on a real raygate: `"event":
    "rollout_succeeded", "cluster": null, "message": "revision 2 is live on digits-fce2e2"`):
    a receiver had to parse the message to learn where the revision went live or failed."""
    before = replace(LIVE, pending=pending(Step.HEALTH, ok_streak=1))
    live = Decision(
        ServiceState("svc", active=Active("c2", 2, "h2")),
        finished=(RolloutRecord(2, Result.SUCCEEDED, "revision 2 is live on c2"),),
    )
    assert rollout_events(before, live, NOW)[-1].cluster == "c2"
    aborted = Decision(LIVE, finished=(RolloutRecord(2, Result.ABORTED, "failed"),))
    assert rollout_events(before, aborted, NOW)[-1].cluster == "c2"
    superseded = Decision(replace(LIVE, pending=pending(Step.DEPLOY, revision=3, cluster="c3")),
                          finished=(RolloutRecord(2, Result.SUPERSEDED, "by 3"),))  # fmt: skip
    assert rollout_events(before, superseded, NOW)[0].cluster == "c2"
    baked = ServiceState("svc", active=Active("c2", 2, "h2"))
    back = Decision(
        ServiceState("svc", active=Active("c1", 1, "h1")),
        finished=(RolloutRecord(2, Result.ROLLED_BACK, "traffic back"),),
    )
    assert rollout_events(baked, back, NOW)[-1].cluster == "c2"
