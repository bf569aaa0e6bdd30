"""The rollout planner: pure decisions, no I/O.

`plan(state, desired, observed, now)` returns the next state and the actions that get there.
Every way a rollout moves from one step to the next is in this module, so a reader (and the
property tests) can check the invariants in one place:

- traffic only ever moves to a cluster that passed its health gates N times in a row;
- a cluster holding traffic or requests in flight is never deleted (unless drain timed out);
- a service never has more than two clusters;
- the active cluster is never touched by a rollout until a pending one has passed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from rollout.spec import ServiceSpec

MAX_CLUSTERS = 2


class Phase(StrEnum):
    DEPLOYING = "deploying"
    LIVE = "live"
    UPGRADING = "upgrading"
    FAILED = "failed"
    DELETING = "deleting"


class Step(StrEnum):
    CREATE_CLUSTER = "create_cluster"
    DEPLOY = "deploy"
    HEALTH = "health"


class Kind(StrEnum):
    NEW_CLUSTER = "new_cluster"
    IN_PLACE = "in_place"


class Result(StrEnum):
    IN_PROGRESS = "in_progress"
    SUCCEEDED = "succeeded"
    ABORTED = "aborted"
    SUPERSEDED = "superseded"


class Liveness(StrEnum):
    """What a provider can tell of a cluster without trusting any one of its processes.

    Only DEAD means gone (its processes, its Kubernetes object or head pod). A dashboard that
    does not answer is UNREACHABLE: a single Python process that stalls under load or GC
    while the Serve proxy and replicas keep serving. The planner decides, over a sustained
    window, when an unreachable cluster must be replaced (`_unresponsive`).
    """

    STARTING = "starting"  # created, not yet answering (a provider that can tell, e.g. a pod)
    UP = "up"
    UNREACHABLE = "unreachable"
    DEAD = "dead"


class Health(StrEnum):
    NOT_DEPLOYED = "not_deployed"  # the cluster does not run the expected Serve config
    PENDING = "pending"
    OK = "ok"
    FAILED = "failed"  # terminal: e.g. DEPLOY_FAILED


@dataclass(frozen=True)
class Revision:
    number: int
    spec: ServiceSpec
    cluster_hash: str

    @staticmethod
    def of(number: int, spec: ServiceSpec) -> Revision:
        return Revision(number, spec, spec.cluster_hash())


@dataclass(frozen=True)
class Active:
    cluster: str
    revision: int
    cluster_hash: str


@dataclass(frozen=True)
class Pending:
    revision: int
    kind: Kind
    cluster: str
    cluster_hash: str
    step: Step
    started_at: float
    ok_streak: int = 0
    message: str = ""


@dataclass(frozen=True)
class Retiring:
    cluster: str
    since: float
    drain_timeout_s: float
    deletion_delay_s: float


@dataclass(frozen=True)
class Unreachable:
    """A cluster whose dashboard stopped answering at `since` (kept, not rewritten, while it
    stays so: the window is measured from the first missed answer)."""

    cluster: str
    since: float


@dataclass(frozen=True)
class RolloutRecord:
    revision: int
    result: Result
    message: str = ""


@dataclass(frozen=True)
class ServiceState:
    name: str
    active: Active | None = None
    pending: Pending | None = None
    retiring: tuple[Retiring, ...] = ()
    last_rollout: RolloutRecord | None = None
    deleting: bool = False
    unreachable: tuple[Unreachable, ...] = ()
    # The revision an active cluster ran when it was found gone: brought back on a new
    # cluster unless a newer one goes live first. Cleared once a cluster is active again.
    restore: int | None = None
    waiting: str = ""  # why the desired revision has not started yet, if it waits
    failed_up_to: int = 0  # the newest revision whose rollout was aborted

    @property
    def phase(self) -> Phase:
        if self.deleting:
            return Phase.DELETING
        if self.pending is not None:
            return Phase.UPGRADING if self.active is not None else Phase.DEPLOYING
        if self.active is not None:
            return Phase.LIVE
        if self.last_rollout is not None and self.last_rollout.result is Result.ABORTED:
            return Phase.FAILED
        return Phase.DEPLOYING

    def clusters(self) -> list[str]:
        """Every cluster this service holds, without duplicates."""
        names = [r.cluster for r in self.retiring]
        if self.active is not None:
            names.append(self.active.cluster)
        if self.pending is not None and self.pending.cluster not in names:
            names.append(self.pending.cluster)
        return names

    def traffic(self) -> dict[str, int]:
        """cluster -> percent of new requests."""
        out = {c: 0 for c in self.clusters()}
        if self.active is not None and not self.deleting:
            out[self.active.cluster] = 100
        return out

    def expected_revision(self, cluster: str) -> int | None:
        """The revision whose Serve config `cluster` should be running."""
        if self.pending is not None and self.pending.cluster == cluster:
            return self.pending.revision
        if self.active is not None and self.active.cluster == cluster:
            return self.active.revision
        return None

    def unreachable_since(self, cluster: str) -> float | None:
        return next((u.since for u in self.unreachable if u.cluster == cluster), None)


@dataclass(frozen=True)
class ClusterObservation:
    liveness: Liveness
    health: Health | None = None  # None: not checked this tick
    message: str = ""
    in_flight: int = 0
    error: str | None = None  # a permanent error from the last action on this cluster
    proxy_ok: bool | None = None  # the Serve proxy answered (asked when UNREACHABLE)


@dataclass(frozen=True)
class Observation:
    clusters: Mapping[str, ClusterObservation] = field(default_factory=dict)
    # Why no cluster can be created now (no free slot, a provider refusing the spec): a
    # rollout that needs one ends with this message instead of creating it.
    cannot_create: str | None = None

    def of(self, cluster: str) -> ClusterObservation:
        # A cluster nobody reported on is treated as gone.
        return self.clusters.get(cluster, ClusterObservation(Liveness.DEAD))


# ---- actions ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CreateCluster:
    cluster: str
    revision: int


@dataclass(frozen=True)
class DeployServe:
    cluster: str
    revision: int


@dataclass(frozen=True)
class DeleteCluster:
    cluster: str
    reason: str


Action = CreateCluster | DeployServe | DeleteCluster


@dataclass(frozen=True)
class Decision:
    state: ServiceState
    actions: tuple[Action, ...] = ()
    events: tuple[str, ...] = ()
    # (revision, result, message) for every rollout that ended in this decision
    finished: tuple[RolloutRecord, ...] = ()
    gone: bool = False  # the service is deleted and holds nothing any more


class _Builder:
    """Accumulates one decision; keeps `plan` a flat list of small steps."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.actions: list[Action] = []
        self.events: list[str] = []
        self.finished: list[RolloutRecord] = []

    def set(self, **changes: object) -> None:
        self.state = replace(self.state, **changes)  # type: ignore[arg-type]

    def act(self, action: Action) -> None:
        self.actions.append(action)

    def event(self, text: str) -> None:
        self.events.append(text)

    def new_cluster(self, revision: int, cluster_hash: str, cluster: str, now: float) -> None:
        """A rollout of `revision` onto a new cluster, from its first step."""
        pending = Pending(revision, Kind.NEW_CLUSTER, cluster, cluster_hash,
                          Step.CREATE_CLUSTER, now)  # fmt: skip
        self.set(pending=pending)
        self.act(CreateCluster(cluster, revision))

    def end_rollout(self, revision: int, result: Result, message: str) -> None:
        record = RolloutRecord(revision, result, message)
        self.finished.append(record)
        self.set(last_rollout=record)
        if result is Result.ABORTED:
            self.set(failed_up_to=max(self.state.failed_up_to, revision))
            if self.state.restore == revision:  # a restore is tried once, not in a loop
                self.set(restore=None)

    def decision(self, gone: bool = False) -> Decision:
        return Decision(
            self.state, tuple(self.actions), tuple(self.events), tuple(self.finished), gone
        )


def plan(
    state: ServiceState,
    desired: Revision,
    revisions: Mapping[int, Revision],
    observed: Observation,
    now: float,
    new_cluster_id: str,
) -> Decision:
    """Decide the next state of one service.

    `desired` is the newest pushed revision, `revisions` holds at least the active and pending
    ones, `new_cluster_id` is the name to use if a cluster must be created this tick.
    """
    b = _Builder(state)
    _track_reachability(b, observed, now)
    _retire(b, observed, now)
    if b.state.deleting:
        return _delete_service(b, revisions, now)
    _handle_dead_active(b, observed)
    _replace_unresponsive_active(b, revisions, observed, now, new_cluster_id)
    _supersede(b, desired, observed, now, new_cluster_id)
    _start(b, desired, revisions, observed, now, new_cluster_id)
    _advance(b, revisions, observed, now, new_cluster_id)
    _keep_active_deployed(b, observed)
    return b.decision()


def _failed(state: ServiceState, revision: int) -> bool:
    """A rollout of `revision` (the newest push) was aborted: it is not tried again until
    something newer is pushed, whatever rollouts (a restore) ended since."""
    return revision <= state.failed_up_to


def _track_reachability(b: _Builder, observed: Observation, now: float) -> None:
    """Remember since when each cluster's dashboard has not answered; forget it once it does.

    The first missed answer's time is kept, never rewritten, so the window is measured from
    it (and survives a restart of raygate, as part of the state).
    """
    s = b.state
    tracked: list[Unreachable] = []
    for cluster in s.clusters():
        if observed.of(cluster).liveness is not Liveness.UNREACHABLE:
            since = s.unreachable_since(cluster)
            if since is not None:
                b.event(f"dashboard of cluster {cluster} answers again after {now - since:.0f}s")
            continue
        since = s.unreachable_since(cluster)
        if since is None:
            since = now
            b.event(f"dashboard of cluster {cluster} does not answer; the cluster keeps its role")
        tracked.append(Unreachable(cluster, since))
    if tuple(tracked) != s.unreachable:
        b.set(unreachable=tuple(tracked))


def _unresponsive(
    b: _Builder, cluster: str, obs: ClusterObservation, now: float, window_s: float
) -> bool:
    """Counts as dead without being gone: its dashboard has not answered for the whole window
    and its Serve proxy does not answer either. A dashboard alone stalling is not enough."""
    since = b.state.unreachable_since(cluster)
    return since is not None and now - since >= window_s and obs.proxy_ok is False


def _retire(b: _Builder, observed: Observation, now: float) -> None:
    """Delete retired clusters once drained (or drain timed out) and the delay passed."""
    keep: list[Retiring] = []
    for r in b.state.retiring:
        obs = observed.of(r.cluster)
        waited = now - r.since
        drained = obs.in_flight == 0 or waited >= r.drain_timeout_s or obs.liveness is Liveness.DEAD
        if drained and waited >= r.deletion_delay_s:
            why = "drained" if obs.in_flight == 0 else f"drain timeout, {obs.in_flight} in flight"
            b.act(DeleteCluster(r.cluster, why))
            b.event(f"deleting retired cluster {r.cluster} ({why})")
        else:
            keep.append(r)
    if len(keep) != len(b.state.retiring):
        b.set(retiring=tuple(keep))


def _delete_service(b: _Builder, revisions: Mapping[int, Revision], now: float) -> Decision:
    s = b.state
    if s.pending is not None:
        if s.pending.kind is Kind.NEW_CLUSTER:
            b.act(DeleteCluster(s.pending.cluster, "service deleted"))
        b.end_rollout(s.pending.revision, Result.ABORTED, "service deleted")
        b.set(pending=None)
    active = b.state.active
    if active is not None:
        # Retire rather than delete: its requests in flight finish first.
        drain = _drain_s(revisions.get(active.revision))
        b.set(active=None, retiring=(*b.state.retiring, Retiring(active.cluster, now, drain, 0.0)))
        b.event(f"service deleted: draining {active.cluster}")
        return b.decision()
    return b.decision(gone=not b.state.retiring)


def _handle_dead_active(b: _Builder, observed: Observation) -> None:
    """An active cluster that is really gone (DEAD: its processes or object are gone) holds
    nothing worth keeping: it is deleted and its revision brought back on a new cluster."""
    active = b.state.active
    if active is None or observed.of(active.cluster).liveness is not Liveness.DEAD:
        return
    b.event(f"active cluster {active.cluster} is gone; its traffic has nowhere to go")
    if b.state.pending is not None and b.state.pending.cluster == active.cluster:
        b.end_rollout(b.state.pending.revision, Result.ABORTED, "the cluster died")
        b.set(pending=None)
    b.act(DeleteCluster(active.cluster, "dead"))
    b.set(active=None, restore=active.revision)


def _replace_unresponsive_active(
    b: _Builder,
    revisions: Mapping[int, Revision],
    observed: Observation,
    now: float,
    new_id: str,
) -> None:
    """An active cluster that stopped answering altogether (not gone) is replaced the way any
    rollout is: a new cluster with its revision, gated, then switched. It keeps its traffic
    until then: it may still be serving, and nothing better exists yet."""
    active, p = b.state.active, b.state.pending
    if active is None or active.revision not in revisions:
        return
    window = revisions[active.revision].spec.liveness.dead_after_s
    if not _unresponsive(b, active.cluster, observed.of(active.cluster), now, window):
        return
    if p is not None and p.kind is Kind.NEW_CLUSTER:
        return  # a new cluster is on its way already; it replaces this one when it passes
    if observed.cannot_create is not None:
        return  # nothing to replace it with yet; the status shows the degradation
    if p is not None:  # an in-place update of the unresponsive cluster cannot pass
        b.end_rollout(p.revision, Result.ABORTED, f"cluster {active.cluster} stopped answering")
        b.set(pending=None)
    if len(b.state.retiring) + 1 >= MAX_CLUSTERS:
        return  # a retiring cluster is deleted first
    b.new_cluster(active.revision, active.cluster_hash, new_id, now)
    b.event(
        f"cluster {active.cluster} has not answered for {window:g}s (dashboard and Serve "
        f"proxy): replacing it with {new_id} (revision {active.revision})"
    )


def _supersede(
    b: _Builder, desired: Revision, observed: Observation, now: float, new_id: str
) -> None:
    """The newest push wins: redirect a rollout in progress to the desired revision (unless
    that revision failed already: it is not tried again, so it replaces nothing)."""
    p = b.state.pending
    if p is None or p.revision == desired.number or _failed(b.state, desired.number):
        return
    b.end_rollout(p.revision, Result.SUPERSEDED, f"superseded by revision {desired.number}")
    active = b.state.active
    if p.kind is Kind.NEW_CLUSTER and p.cluster_hash == desired.cluster_hash:
        # Same cluster spec: reuse the pending cluster, only its Serve config changes.
        up = observed.of(p.cluster).liveness is Liveness.UP
        step = Step.DEPLOY if up else Step.CREATE_CLUSTER
        b.set(pending=replace(p, revision=desired.number, step=step, started_at=now, ok_streak=0))
        b.event(f"revision {desired.number} reuses pending cluster {p.cluster}")
        return
    if p.kind is Kind.NEW_CLUSTER:
        b.act(DeleteCluster(p.cluster, f"superseded by revision {desired.number}"))
    elif active is not None:
        # An in-place update was under way on the active cluster: put its config back.
        b.act(DeployServe(active.cluster, active.revision))
    b.set(pending=None)


def _start(
    b: _Builder,
    desired: Revision,
    revisions: Mapping[int, Revision],
    observed: Observation,
    now: float,
    new_id: str,
) -> None:
    s = b.state
    if s.waiting:
        b.set(waiting="")  # set again below while it still waits
    if s.pending is not None:
        return
    target = desired
    if s.active is not None and s.active.revision == desired.number:
        return
    if _failed(s, desired.number):
        # Do not retry a revision that failed; but a service whose active cluster died
        # gets its last good revision back, however many rollouts ended meanwhile.
        if s.restore is None or s.restore not in revisions:
            return
        target = revisions[s.restore]
    if s.active is not None and s.active.cluster_hash == target.cluster_hash:
        b.set(
            pending=Pending(
                target.number,
                Kind.IN_PLACE,
                s.active.cluster,
                target.cluster_hash,
                Step.DEPLOY,
                now,
            )
        )
        b.event(
            f"revision {target.number}: serve-only change, updating {s.active.cluster} in place"
        )
        return
    held = len(s.retiring) + (1 if s.active is not None else 0)
    if held >= MAX_CLUSTERS:
        waiting = f"revision {target.number} waits for a retiring cluster to be deleted"
        if s.waiting != waiting:  # said once, not every tick
            b.event(waiting)
        b.set(waiting=waiting)
        return
    if observed.cannot_create is not None:
        message = f"cannot create a cluster: {observed.cannot_create}"
        b.end_rollout(target.number, Result.ABORTED, message)
        b.event(f"rollout of revision {target.number} aborted: {message}")
        return
    b.new_cluster(target.number, target.cluster_hash, new_id, now)
    why = "cluster spec changed" if s.active is not None else "no running cluster"
    b.event(f"revision {target.number}: {why}, creating cluster {new_id}")


def _advance(
    b: _Builder,
    revisions: Mapping[int, Revision],
    observed: Observation,
    now: float,
    new_id: str,
) -> None:
    p = b.state.pending
    if p is None or any(isinstance(a, CreateCluster) and a.cluster == p.cluster for a in b.actions):
        return
    obs = observed.of(p.cluster)
    health = revisions[p.revision].spec.upgrade.health
    if obs.error:
        _abort(b, p, obs.error)
        return
    if now - p.started_at > health.timeout_s:
        why = p.message or obs.message or "no health report"
        _abort(b, p, f"not healthy within {health.timeout_s:g}s: {why}")
        return
    if p.step is Step.CREATE_CLUSTER:
        if obs.liveness is Liveness.UP:
            b.set(pending=replace(p, step=Step.HEALTH))
            b.act(DeployServe(p.cluster, p.revision))
            b.event(f"cluster {p.cluster} is up; deploying revision {p.revision}")
        elif obs.liveness is Liveness.DEAD:
            # Its start was interrupted (e.g. raygate was killed): start a fresh one.
            if observed.cannot_create is not None:
                _abort(b, p, f"cannot create a cluster: {observed.cannot_create}")
                return
            b.act(DeleteCluster(p.cluster, "start interrupted"))
            b.act(CreateCluster(new_id, p.revision))
            b.set(pending=replace(p, cluster=new_id))
            b.event(f"cluster {p.cluster} did not come up; creating {new_id}")
        elif obs.message and obs.message != p.message:  # what it waits for (a pod, ...)
            b.set(pending=replace(p, message=obs.message))
        return
    if obs.liveness is Liveness.DEAD:
        _abort(b, p, f"cluster {p.cluster} died during the rollout")
        return
    if p.step is Step.DEPLOY:
        b.set(pending=replace(p, step=Step.HEALTH, ok_streak=0))
        b.act(DeployServe(p.cluster, p.revision))
        return
    # Step.HEALTH: only a cluster that is UP can pass a gate.
    if obs.liveness is not Liveness.UP:
        b.set(pending=replace(p, ok_streak=0, message=f"cluster is {obs.liveness.value}"))
    elif obs.health is Health.NOT_DEPLOYED:
        b.act(DeployServe(p.cluster, p.revision))
        b.set(pending=replace(p, ok_streak=0, message=obs.message))
    elif obs.health is Health.FAILED:
        _abort(b, p, obs.message)
    elif obs.health is Health.OK:
        streak = p.ok_streak + 1
        if streak >= health.consecutive_successes:
            _promote(b, p, revisions, now)
        else:
            b.set(pending=replace(p, ok_streak=streak, message=obs.message))
    elif obs.health is Health.PENDING:
        b.set(pending=replace(p, ok_streak=0, message=obs.message))


def _drain_s(*revisions: Revision | None) -> float:
    """How long a retiring cluster's requests in flight may take: the drain timeout, but never
    less than the gateway's own timeout on the routes those requests came through (a cluster
    stopped under a request fails it; the gateway would still have waited for it)."""
    known = [r.spec for r in revisions if r is not None]
    if not known:
        return 60.0  # the defaults' gateway timeout
    return max([known[0].upgrade.drain_timeout_s, *(s.gateway.timeout_s for s in known)])


def _promote(b: _Builder, p: Pending, revisions: Mapping[int, Revision], now: float) -> None:
    old = b.state.active
    retiring = b.state.retiring
    revision = revisions[p.revision]
    if p.kind is Kind.NEW_CLUSTER and old is not None:
        drain = _drain_s(revision, revisions.get(old.revision))
        delay = revision.spec.upgrade.deletion_delay_s
        retiring = (*retiring, Retiring(old.cluster, now, drain, delay))
    b.set(active=Active(p.cluster, p.revision, p.cluster_hash), pending=None, retiring=retiring,
          restore=None)  # fmt: skip
    b.end_rollout(p.revision, Result.SUCCEEDED, f"revision {p.revision} is live on {p.cluster}")
    if p.kind is Kind.NEW_CLUSTER:
        b.event(f"switched traffic to {p.cluster} (revision {p.revision})")
    else:
        b.event(f"revision {p.revision} is live on {p.cluster} (in place)")


def _abort(b: _Builder, p: Pending, message: str) -> None:
    if p.kind is Kind.NEW_CLUSTER:
        b.act(DeleteCluster(p.cluster, "rollout aborted"))
    elif b.state.active is not None:
        # Roll the active cluster back to the config that passed.
        b.act(DeployServe(b.state.active.cluster, b.state.active.revision))
    b.set(pending=None)
    b.end_rollout(p.revision, Result.ABORTED, message)
    b.event(f"rollout of revision {p.revision} aborted: {message.splitlines()[0][:200]}")


def _keep_active_deployed(b: _Builder, observed: Observation) -> None:
    """Level-triggered repair: the active cluster must run the active revision's config."""
    a = b.state.active
    if a is None or (b.state.pending is not None and b.state.pending.cluster == a.cluster):
        return
    if any(isinstance(x, DeployServe) and x.cluster == a.cluster for x in b.actions):
        return
    if observed.of(a.cluster).health is Health.NOT_DEPLOYED:
        b.act(DeployServe(a.cluster, a.revision))
