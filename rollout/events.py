"""Rollout events for notifications, derived from one decision: pure, no I/O.

The planner says what it decided in free text (`Decision.events`, for the event log); a
webhook receiver needs a small fixed vocabulary it can switch on. `rollout_events(before,
decision, now)` compares the state a tick planned from with the decision's state and names
what happened, so every transition is unit-testable without a controller, and the controller
only hands the result to a notifier.

The id of an event is a digest of its content (service, kind, revision, cluster, time): the
same event retried has the same id, and a receiver dedupes on it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from rollout.plan import (
    Decision,
    DeleteCluster,
    Kind,
    Result,
    RolloutRecord,
    ServiceState,
    Step,
)


class EventKind(StrEnum):
    STARTED = "rollout_started"  # a rollout of a revision began
    HEALTH_PASSED = "health_passed"  # its cluster passed its health gates
    TRAFFIC_SWITCHED = "traffic_switched"  # every new request goes to another cluster now
    CANARY_STEP = "canary_step"  # the canary's weight or step moved
    SUCCEEDED = "rollout_succeeded"
    ABORTED = "rollout_aborted"
    SUPERSEDED = "rollout_superseded"  # a newer push took its place
    ROLLED_BACK = "rolled_back"  # was live, traffic went back to what ran before
    CLUSTER_DEGRADED = "cluster_degraded"  # its dashboard stopped answering; keeps its role
    CLUSTER_RECOVERED = "cluster_recovered"  # answers again
    CLUSTER_LOST = "cluster_lost"  # the active cluster is gone


_ENDED = {
    Result.SUCCEEDED: EventKind.SUCCEEDED,
    Result.ABORTED: EventKind.ABORTED,
    Result.SUPERSEDED: EventKind.SUPERSEDED,
    Result.ROLLED_BACK: EventKind.ROLLED_BACK,
}


@dataclass(frozen=True)
class RolloutEvent:
    service: str
    kind: EventKind
    revision: int | None
    message: str
    time: float
    cluster: str | None = None

    @property
    def id(self) -> str:
        key = f"{self.service}|{self.kind.value}|{self.revision}|{self.cluster}|{self.time!r}"
        return hashlib.sha256(key.encode()).hexdigest()[:24]

    def to_json(self) -> dict[str, Any]:
        """The webhook body (README, "Notifications")."""
        return {
            "id": self.id,
            "service": self.service,
            "event": self.kind.value,
            "revision": self.revision,
            "cluster": self.cluster,
            "message": self.message,
            "time": self.time,
        }


# A dashboard that misses an answer or two (a GC pause, a busy head under load) is said to be
# degraded only once it has been silent this long: a webhook pair per hiccup is noise.
DEGRADED_GRACE_S = 30.0


def degraded_told(
    state: ServiceState, told: frozenset[str], now: float, grace_s: float
) -> frozenset[str]:
    """The clusters a receiver has been told are degraded, after this tick: those told
    before that are still unreachable, and those unreachable for `grace_s` or longer."""
    return frozenset(
        u.cluster for u in state.unreachable if u.cluster in told or now - u.since >= grace_s
    )


def rollout_events(
    before: ServiceState,
    decision: Decision,
    now: float,
    told: frozenset[str] | None = None,
    grace_s: float = 0.0,
) -> list[RolloutEvent]:
    """What `decision` did to the service, in the order it happened: a superseded rollout's
    end, a rollout's start and gates, then the traffic it moved, then how rollouts ended,
    then cluster health. `told` names the clusters already said to be degraded (None: those
    unreachable before this tick); one is said degraded once unreachable for `grace_s`."""
    after = decision.state
    out: list[RolloutEvent] = []

    def add(kind: EventKind, revision: int | None, message: str, cluster: str | None = None
            ) -> None:  # fmt: skip
        out.append(RolloutEvent(before.name, kind, revision, message, now, cluster))

    bp, ap = before.pending, after.pending
    # A push supersedes the rollout under way before the newer one starts (one tick): said
    # in that order, or a receiver that tracks the rollout under way would think none is.
    superseded = [r for r in decision.finished if r.result is Result.SUPERSEDED]
    ba, aa = before.active, after.active

    def ran_on(record: RolloutRecord) -> str | None:
        """The cluster a revision that ended ran on: where it is live now (succeeded), else
        where it rolled out, else where it was live (rolled back)."""
        first = (aa, bp, ba) if record.result is Result.SUCCEEDED else (bp, ba)
        return next((r.cluster for r in first if r and r.revision == record.revision), None)

    for record in superseded:
        add(EventKind.SUPERSEDED, record.revision, record.message or record.result.value,
            ran_on(record))  # fmt: skip
    if ap is not None and (bp is None or bp.revision != ap.revision):
        how = "in place" if ap.kind is Kind.IN_PLACE else "on a new cluster"
        add(EventKind.STARTED, ap.revision, f"rollout of revision {ap.revision} started {how} "
            f"({ap.cluster})", ap.cluster)  # fmt: skip
    ended = {r.revision: r for r in decision.finished}
    if bp is not None and bp.step is Step.HEALTH:
        went_canary = ap is not None and ap.revision == bp.revision and ap.step is Step.CANARY
        done = ended.get(bp.revision)
        went_live = done is not None and done.result is Result.SUCCEEDED
        if went_canary or went_live:
            add(EventKind.HEALTH_PASSED, bp.revision,
                f"revision {bp.revision} passed its health gates on {bp.cluster}",
                bp.cluster)  # fmt: skip
    ac = ap.canary if ap is not None else None
    if ap is not None and ac is not None:
        bc = bp.canary if bp is not None and bp.revision == ap.revision else None
        was = (bc.index, bc.weight) if bc is not None else (0, 0)
        if (ac.index, ac.weight) != was:
            add(EventKind.CANARY_STEP, ap.revision, f"canary {ap.cluster}: {ac.index} step(s) "
                f"done, weight {was[1]}% -> {ac.weight}%", ap.cluster)  # fmt: skip
    if aa is not None and (ba is None or ba.cluster != aa.cluster):
        add(EventKind.TRAFFIC_SWITCHED, aa.revision,
            f"all traffic on {aa.cluster} (revision {aa.revision})"
            + (f", was on {ba.cluster}" if ba is not None else ""), aa.cluster)  # fmt: skip
    for record in decision.finished:
        if record.result is not Result.SUPERSEDED:
            add(_ENDED[record.result], record.revision, record.message or record.result.value,
                ran_on(record))  # fmt: skip
    lost = {a.cluster for a in decision.actions if isinstance(a, DeleteCluster)
            and a.reason == "dead"}  # fmt: skip
    if ba is not None and ba.cluster in lost:
        add(EventKind.CLUSTER_LOST, ba.revision,
            f"active cluster {ba.cluster} is gone", ba.cluster)  # fmt: skip
    was_down = {u.cluster: u.since for u in before.unreachable}
    if told is None:
        told = frozenset(was_down)
    told_now = degraded_told(after, told, now, grace_s)
    held = set(after.clusters())
    for u in after.unreachable:
        if u.cluster in told_now and u.cluster not in told:
            add(EventKind.CLUSTER_DEGRADED, after.expected_revision(u.cluster),
                f"dashboard of cluster {u.cluster} does not answer "
                f"(for {now - u.since:.0f}s); it keeps its role", u.cluster)  # fmt: skip
    for cluster in sorted(told - told_now):
        if cluster in held and cluster in was_down:
            add(EventKind.CLUSTER_RECOVERED, after.expected_revision(cluster),
                f"dashboard of cluster {cluster} answers again after "
                f"{now - was_down[cluster]:.0f}s", cluster)  # fmt: skip
    return out
