"""Webhook events of a superseded rollout come in the order things happened (review of
issue 12, part 4): the planner ends the superseded rollout, then starts the newer one, in one
tick. A receiver that keeps "which rollout is under way" from `rollout_started` and the
rollout-ended events must end up with the newer rollout under way, not with none.

Decisions come from the real planner (tests/test_plan.py's World), not built by hand.
"""

from __future__ import annotations

from rollout.events import EventKind, RolloutEvent, rollout_events
from rollout.plan import ClusterObservation, Liveness
from tests.test_plan import UP_OK, World, make_spec, start_upgrade

ENDED = {EventKind.SUCCEEDED, EventKind.ABORTED, EventKind.SUPERSEDED, EventKind.ROLLED_BACK}


def under_way(events: list[RolloutEvent]) -> int | None:
    """A receiver's view: the revision whose rollout is under way, from the events in order."""
    current: int | None = None
    for e in events:
        if e.kind is EventKind.STARTED:
            current = e.revision
        elif e.kind in ENDED and e.revision == current:
            current = None
    return current


def events_of_next_tick(w: World, obs: dict[str, ClusterObservation]) -> list[RolloutEvent]:
    before = w.state
    decision = w.tick(obs)
    return rollout_events(before, decision, w.now)


def test_a_superseded_rollout_ends_before_the_newer_one_starts() -> None:
    for cpus in (4, 8):  # the pending cluster reused (same cluster spec), or replaced
        w = World()
        old, pending = start_upgrade(w, make_spec(cpus=4, label="x"))
        w.push(make_spec(cpus=cpus, label="y"))
        events = events_of_next_tick(w, {old: UP_OK, pending: ClusterObservation(Liveness.UP)})
        kinds = [(e.kind, e.revision) for e in events]
        assert (EventKind.SUPERSEDED, 2) in kinds and (EventKind.STARTED, 3) in kinds, kinds
        assert kinds.index((EventKind.SUPERSEDED, 2)) < kinds.index((EventKind.STARTED, 3)), (
            f"revision 3 started before revision 2 ended: {kinds}"
        )
        tracked = [RolloutEvent("svc", EventKind.STARTED, 2, "", 0.0), *events]
        assert under_way(tracked) == 3, f"a receiver sees no rollout under way: {kinds}"
