"""The rollout planner: pure decisions, no I/O.

`plan(state, desired, observed, now)` returns the next state and the actions that get there.
Every way a rollout moves from one step to the next is in this module, so a reader (and the
property tests) can check the invariants in one place:

- traffic only ever moves to a cluster that passed its health gates N times in a row;
- a cluster holding traffic or requests in flight is never deleted (unless drain timed out);
- a service never has more than two clusters;
- the active cluster is never touched by a rollout until a pending one has passed;
- a canary's weight only moves along its declared steps, or back to 0 (all on stable);
- a canary step never ends on no data: a timed pause needs a passed analysis interval.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from rollout.analysis import Outcome, Verdict, WindowStats, judge
from rollout.spec import AnalysisSpec, CanaryStep, ServiceSpec

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
    CANARY = "canary"  # passed its gates; walks the canary steps on real traffic


class Kind(StrEnum):
    NEW_CLUSTER = "new_cluster"
    IN_PLACE = "in_place"


class Result(StrEnum):
    IN_PROGRESS = "in_progress"
    SUCCEEDED = "succeeded"
    ABORTED = "aborted"
    SUPERSEDED = "superseded"
    ROLLED_BACK = "rolled_back"  # was live, then replaced by a rollback (command or bake)


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
    rollback_of: int | None = None  # recorded by `raygate rollback`: K's spec again

    @staticmethod
    def of(number: int, spec: ServiceSpec, rollback_of: int | None = None) -> Revision:
        return Revision(number, spec, spec.cluster_hash(), rollback_of)

    @property
    def canary(self) -> bool:
        """Rolled out as a canary: a rollback never is (it brings back what ran before)."""
        return self.spec.upgrade.strategy == "canary" and self.rollback_of is None

    def same_as(self, other: Revision) -> bool:
        """Runs the same cluster and Serve config: one can stand in for the other."""
        return (self.cluster_hash, self.spec.serve_hash()) == (
            other.cluster_hash, other.spec.serve_hash())  # fmt: skip


@dataclass(frozen=True)
class Active:
    cluster: str
    revision: int
    cluster_hash: str


class Hold(StrEnum):
    """Why a canary holds where it is, besides a `pause: {}` step."""

    NONE = ""
    USER = "user"  # `raygate pause`
    NO_DATA = "no_data"  # inconclusive_limit intervals without enough traffic


@dataclass(frozen=True)
class Canary:
    """Where a canary stands. Planner state, stored with the rest: a restart resumes the
    same step at the same weight."""

    index: int = 0  # the step under way; len(steps) once every step is done
    weight: int = 0  # percent of new requests on the canary cluster now
    step_since: float = 0.0  # when the step under way began
    hold: Hold = Hold.NONE
    capacity: int | None = None  # scale_with_traffic: Serve target_capacity on the canary
    promoted: bool = False  # `raygate promote` took it past its last step: no pass needed
    unhealthy_since: float | None = None  # its health gate has not held since then


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
    canary: Canary | None = None  # set once the canary steps begin (step CANARY)


@dataclass(frozen=True)
class Retiring:
    cluster: str
    since: float
    drain_timeout_s: float
    deletion_delay_s: float
    revision: int | None = None  # what it runs (known for clusters retired since canaries)
    # Kept (weight 0, not drained) until then: a failed analysis or `raygate rollback` in
    # the bake window puts traffic back on it at once.
    bake_until: float | None = None
    capacity: int | None = None  # the Serve target_capacity it was left at (None: full)

    def baking(self, now: float) -> bool:
        return self.bake_until is not None and now < self.bake_until


@dataclass(frozen=True)
class Analysis:
    """The verdicts on one cluster's real traffic (a canary, or a new revision baking),
    counted over consecutive intervals."""

    cluster: str
    stable: str | None  # compared against in the same window (None while baking)
    last_at: float  # the end of the last judged interval
    failures: int = 0  # failed intervals in a row
    inconclusive: int = 0  # intervals in a row without enough traffic
    passes: int = 0  # passed intervals since the canary's current step began
    verdict: Verdict | None = None  # the last one
    unhealthy_since: float | None = None  # bake: the judged cluster stopped passing its gate


@dataclass(frozen=True)
class Command:
    """An operator's command, queued by the admin API, applied by the next plan."""

    kind: str  # promote | abort | pause | resume
    full: bool = False  # promote: every remaining step


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
    analysis: Analysis | None = None
    commands: tuple[Command, ...] = ()
    # scale_with_traffic: the Serve target_capacity last sent to the active cluster (None:
    # full). Level-triggered (`_keep_capacity`): whatever ends a canary gives it back.
    active_capacity: int | None = None

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
        if self.deleting:
            return out
        if self.active is not None:
            out[self.active.cluster] = 100
        p = self.pending
        if p is not None and p.canary is not None and p.canary.weight > 0:
            out[p.cluster] = p.canary.weight
            if self.active is not None:
                out[self.active.cluster] = 100 - p.canary.weight
        return out

    def expected_revision(self, cluster: str) -> int | None:
        """The revision whose Serve config `cluster` should be running."""
        if self.pending is not None and self.pending.cluster == cluster:
            return self.pending.revision
        if self.active is not None and self.active.cluster == cluster:
            return self.active.revision
        return next((r.revision for r in self.retiring if r.cluster == cluster), None)

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
    # PENDING only while deployments scale, serving meanwhile (health.Report.serving): the
    # gates wait; only the health metrics read it.
    serving: bool = False
    # The gateway's counts for this cluster over the last analysis interval (None: no
    # window that long yet, e.g. just after a restart of raygate).
    window: WindowStats | None = None


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
    capacity: int | None = None  # Serve target_capacity (scale_with_traffic); None: full


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
    verdicts: tuple[Verdict, ...] = ()  # analysis verdicts reached in this decision
    steps_took: tuple[tuple[str, float], ...] = ()  # (canary step kind, seconds) ended


class _Builder:
    """Accumulates one decision; keeps `plan` a flat list of small steps."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.actions: list[Action] = []
        self.events: list[str] = []
        self.finished: list[RolloutRecord] = []
        self.verdicts: list[Verdict] = []
        self.steps_took: list[tuple[str, float]] = []

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
        if result in (Result.ABORTED, Result.ROLLED_BACK):
            self.set(failed_up_to=max(self.state.failed_up_to, revision))
            if self.state.restore == revision:  # a restore is tried once, not in a loop
                self.set(restore=None)

    def decision(self, gone: bool = False) -> Decision:
        return Decision(
            self.state, tuple(self.actions), tuple(self.events), tuple(self.finished), gone,
            tuple(self.verdicts), tuple(self.steps_took),
        )  # fmt: skip


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
    _apply_commands(b, revisions, now)
    _handle_dead_active(b, revisions, observed, now)
    _replace_unresponsive_active(b, revisions, observed, now, new_cluster_id)
    _bake(b, revisions, observed, now)
    _supersede(b, desired, revisions, observed, now, new_cluster_id)
    _start(b, desired, revisions, observed, now, new_cluster_id)
    _advance(b, revisions, observed, now, new_cluster_id)
    _keep_capacity(b, revisions)
    _keep_active_deployed(b, observed)
    _keep_baked_deployed(b, observed, now)
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
        if r.baking(now) and obs.liveness is not Liveness.DEAD:
            keep.append(r)
            continue
        if r.bake_until is not None:  # the window is over: an ordinary retired cluster now
            b.event(f"bake window of cluster {r.cluster} is over; retiring it")
            r = replace(r, since=max(r.since, r.bake_until), bake_until=None)
        waited = now - r.since
        drained = obs.in_flight == 0 or waited >= r.drain_timeout_s or obs.liveness is Liveness.DEAD
        if drained and waited >= r.deletion_delay_s:
            why = "drained" if obs.in_flight == 0 else f"drain timeout, {obs.in_flight} in flight"
            b.act(DeleteCluster(r.cluster, why))
            b.event(f"deleting retired cluster {r.cluster} ({why})")
        else:
            keep.append(r)
    if tuple(keep) != b.state.retiring:
        b.set(retiring=tuple(keep))
    a = b.state.analysis
    if a is not None and b.state.pending is None and not any(r.baking(now) for r in keep):
        b.set(analysis=None)  # the bake it judged is over


def _delete_service(b: _Builder, revisions: Mapping[int, Revision], now: float) -> Decision:
    if any(r.bake_until is not None for r in b.state.retiring):  # nothing to roll back to
        b.set(retiring=tuple(replace(r, bake_until=None) for r in b.state.retiring))
    b.set(analysis=None)
    s = b.state
    if s.pending is not None:
        if s.pending.kind is Kind.NEW_CLUSTER:
            _drop_pending_cluster(b, s.pending, revisions, now, "service deleted")
        b.end_rollout(s.pending.revision, Result.ABORTED, "service deleted")
        b.set(pending=None, analysis=None)
    active = b.state.active
    if active is not None:
        # Retire rather than delete: its requests in flight finish first.
        drain = _drain_s(revisions.get(active.revision))
        b.set(active=None, retiring=(*b.state.retiring, Retiring(active.cluster, now, drain, 0.0)))
        b.event(f"service deleted: draining {active.cluster}")
        return b.decision()
    return b.decision(gone=not b.state.retiring)


def _handle_dead_active(
    b: _Builder, revisions: Mapping[int, Revision], observed: Observation, now: float
) -> None:
    """An active cluster that is really gone (DEAD: its processes or object are gone) holds
    nothing worth keeping: it is deleted and its revision brought back on a new cluster."""
    active = b.state.active
    if active is None or observed.of(active.cluster).liveness is not Liveness.DEAD:
        return
    if _to_baked(b, revisions, observed, now, f"active cluster {active.cluster} is gone"):
        return  # (and its revision is not tried again: it lost its cluster at 100%)
    b.event(f"active cluster {active.cluster} is gone; its traffic has nowhere to go")
    if b.state.pending is not None and b.state.pending.cluster == active.cluster:
        b.end_rollout(b.state.pending.revision, Result.ABORTED, "the cluster died")
        b.set(pending=None)
    b.act(DeleteCluster(active.cluster, "dead"))
    b.set(active=None, restore=active.revision, analysis=None, active_capacity=None)


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
    why = f"cluster {active.cluster} has not answered for {window:g}s"
    if p is None and _to_baked(b, revisions, observed, now, why):
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
    b: _Builder,
    desired: Revision,
    revisions: Mapping[int, Revision],
    observed: Observation,
    now: float,
    new_id: str,
) -> None:
    """The newest push wins: redirect a rollout in progress to the desired revision (unless
    that revision failed already: it is not tried again, so it replaces nothing)."""
    p = b.state.pending
    if p is None or p.revision == desired.number or _failed(b.state, desired.number):
        return
    b.end_rollout(p.revision, Result.SUPERSEDED, f"superseded by revision {desired.number}")
    active = b.state.active
    if reuses_pending(p, desired):
        # Same cluster spec: reuse the pending cluster, only its Serve config changes.
        # A canary's share goes back to stable at once (canary=None): the cluster holds
        # no traffic while the new config deploys on it.
        up = observed.of(p.cluster).liveness is Liveness.UP
        step = Step.DEPLOY if up else Step.CREATE_CLUSTER
        b.set(pending=replace(p, revision=desired.number, step=step, started_at=now, ok_streak=0,
                              canary=None), analysis=None)  # fmt: skip
        b.event(f"revision {desired.number} reuses pending cluster {p.cluster}")
        return
    if p.kind is Kind.NEW_CLUSTER:
        _drop_pending_cluster(b, p, revisions, now, f"superseded by revision {desired.number}")
        b.set(analysis=None)
    elif active is not None:
        # An in-place update was under way on the active cluster: put its config back.
        b.act(DeployServe(active.cluster, active.revision))
    b.set(pending=None)


def reuses_pending(pending: Pending | None, target: Revision) -> bool:
    """A push while a new cluster is pending for the same cluster spec rolls out on that
    cluster (`_supersede`), whatever `rollout_kind` says against the active one: the one
    rule, used by the plan preview (`rollout.preview`) too."""
    return (
        pending is not None and pending.kind is Kind.NEW_CLUSTER
        and pending.cluster_hash == target.cluster_hash
    )  # fmt: skip


def _start(
    b: _Builder,
    desired: Revision,
    revisions: Mapping[int, Revision],
    observed: Observation,
    now: float,
    new_id: str,
) -> None:
    s = b.state
    was_waiting = s.waiting
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
    if _back_to_baking(b, target, revisions, observed, now):
        return
    s = b.state
    how = rollout_kind(s.active, revisions.get(s.active.revision) if s.active else None, target)
    if how.kind is Kind.IN_PLACE and s.active is not None:
        _end_bake(b, target.number, now)
        b.set(
            pending=Pending(
                target.number,
                Kind.IN_PLACE,
                s.active.cluster,
                target.cluster_hash,
                Step.DEPLOY,
                now,
            ),
            # Deployed as the spec says (no capacity): whatever a canary lowered is whole again.
            active_capacity=None,
        )
        b.event(
            f"revision {target.number}: serve-only change, updating {s.active.cluster} in place"
        )
        return
    held = len(s.retiring) + (1 if s.active is not None else 0)
    if held >= MAX_CLUSTERS:
        _end_bake(b, target.number, now)
        waiting = f"revision {target.number} waits for a retiring cluster to be deleted"
        if was_waiting != waiting:  # said once, not every tick
            b.event(waiting)
        b.set(waiting=waiting)
        return
    if observed.cannot_create is not None:
        message = f"cannot create a cluster: {observed.cannot_create}"
        b.end_rollout(target.number, Result.ABORTED, message)
        b.event(f"rollout of revision {target.number} aborted: {message}")
        return
    b.new_cluster(target.number, target.cluster_hash, new_id, now)
    b.event(f"revision {target.number}: {how.why}, creating cluster {new_id}")


@dataclass(frozen=True)
class HowRolled:
    kind: Kind
    why: str  # for a new cluster: why the active one cannot be updated in place


def rollout_kind(active: Active | None, running: Revision | None, target: Revision) -> HowRolled:
    """How `target` rolls out over the active cluster (running revision `running`): the one
    rule, used by `_start` and by the plan preview (`rollout.preview`). Same cluster hash:
    in place, unless a canary, which needs a cluster of its own."""
    if active is None:
        return HowRolled(Kind.NEW_CLUSTER, "no running cluster")
    if active.cluster_hash != target.cluster_hash:
        return HowRolled(Kind.NEW_CLUSTER, "cluster spec changed")
    # A push that changes nothing the clusters run (only `upgrade`, say) is no canary.
    if target.canary and not (running is not None and running.same_as(target)):
        why = "serve-only change with strategy canary (a canary needs a cluster of its own)"
        return HowRolled(Kind.NEW_CLUSTER, why)
    return HowRolled(Kind.IN_PLACE, "serve-only change")


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
        _abort(b, p, obs.error, revisions, now)
        return
    if p.step is Step.CANARY:
        _canary(b, p, revisions, observed, now)
        return
    if now - p.started_at > health.timeout_s:
        why = p.message or obs.message or "no health report"
        _abort(b, p, f"not healthy within {health.timeout_s:g}s: {why}", revisions, now)
        return
    if p.step is Step.CREATE_CLUSTER:
        if obs.liveness is Liveness.UP:
            b.set(pending=replace(p, step=Step.HEALTH))
            b.act(DeployServe(p.cluster, p.revision, _pending_capacity(b.state, p, revisions)))
            b.event(f"cluster {p.cluster} is up; deploying revision {p.revision}")
        elif obs.liveness is Liveness.DEAD:
            # Its start was interrupted (e.g. raygate was killed): start a fresh one.
            if observed.cannot_create is not None:
                _abort(b, p, f"cannot create a cluster: {observed.cannot_create}", revisions, now)
                return
            b.act(DeleteCluster(p.cluster, "start interrupted"))
            b.act(CreateCluster(new_id, p.revision))
            b.set(pending=replace(p, cluster=new_id))
            b.event(f"cluster {p.cluster} did not come up; creating {new_id}")
        elif obs.message and obs.message != p.message:  # what it waits for (a pod, ...)
            b.set(pending=replace(p, message=obs.message))
        return
    if obs.liveness is Liveness.DEAD:
        _abort(b, p, f"cluster {p.cluster} died during the rollout", revisions, now)
        return
    if p.step is Step.DEPLOY:
        b.set(pending=replace(p, step=Step.HEALTH, ok_streak=0))
        b.act(DeployServe(p.cluster, p.revision, _pending_capacity(b.state, p, revisions)))
        return
    # Step.HEALTH: only a cluster that is UP can pass a gate.
    if obs.liveness is not Liveness.UP:
        b.set(pending=replace(p, ok_streak=0, message=f"cluster is {obs.liveness.value}"))
    elif obs.health is Health.NOT_DEPLOYED:
        b.act(DeployServe(p.cluster, p.revision, _pending_capacity(b.state, p, revisions)))
        b.set(pending=replace(p, ok_streak=0, message=obs.message))
    elif obs.health is Health.FAILED:
        _abort(b, p, obs.message, revisions, now)
    elif obs.health is Health.OK:
        streak = p.ok_streak + 1
        if streak < health.consecutive_successes:
            b.set(pending=replace(p, ok_streak=streak, message=obs.message))
        elif walks_canary(b.state.active, p.kind, revisions[p.revision]):
            _begin_canary(b, p, revisions, observed, now)
        else:
            _promote(b, p, revisions, now)
    elif obs.health is Health.PENDING:
        b.set(pending=replace(p, ok_streak=0, message=obs.message))


def walks_canary(active: Active | None, kind: Kind, revision: Revision) -> bool:
    """A rollout walks canary steps once its gates pass: a canary revision on a new cluster
    beside a stable one. A first deploy (or a restore) has no stable cluster to share
    traffic with: it goes live at once, and nothing bakes (`_promote`). The one rule, used
    by the status (`rollout.api`) and the plan preview (`rollout.preview`) too."""
    return kind is Kind.NEW_CLUSTER and revision.canary and active is not None


def _drain_s(*revisions: Revision | None) -> float:
    """How long a retiring cluster's requests in flight may take: the drain timeout, but never
    less than the gateway's own timeout on the routes those requests came through (a cluster
    stopped under a request fails it; the gateway would still have waited for it)."""
    known = [r.spec for r in revisions if r is not None]
    if not known:
        return 60.0  # the defaults' gateway timeout
    return max([known[0].upgrade.drain_timeout_s, *(s.gateway.timeout_s for s in known)])


def _promote(b: _Builder, p: Pending, revisions: Mapping[int, Revision], now: float) -> None:
    """All traffic to the pending cluster; the old one retires (or bakes, with bake_s)."""
    old = b.state.active
    retiring = b.state.retiring
    revision = revisions[p.revision]
    # A rollback does not bake: its fallback would be the revision it rolled back.
    bake = revision.spec.upgrade.bake_s if revision.rollback_of is None else 0.0
    analysis = None
    scaled = (
        revision.spec.upgrade.canary is not None and revision.spec.upgrade.canary.scale_with_traffic
    )
    capacity = p.canary.capacity if p.canary is not None else None
    if p.kind is Kind.NEW_CLUSTER and scaled and revision.canary and capacity != 100:
        # Live below full capacity (its stable cluster went away): all of it now.
        b.act(DeployServe(p.cluster, p.revision))
    if p.kind is Kind.NEW_CLUSTER and old is not None:
        drain = _drain_s(revision, revisions.get(old.revision))
        delay = revision.spec.upgrade.deletion_delay_s
        until = now + bake if bake > 0 else None
        left = b.state.active_capacity
        if until is not None and left is not None:
            # A baked cluster is kept whole: a rollback onto it is instant, not a scale-up.
            b.act(DeployServe(old.cluster, old.revision))
            left = None
        retiring = (*retiring, Retiring(old.cluster, now, drain, delay, old.revision, until, left))
        if until is not None:
            analysis = Analysis(p.cluster, None, now)
            b.event(f"baking revision {p.revision} for {bake:g}s: {old.cluster} stays ready "
                    "to take traffic back")  # fmt: skip
    if old is not None and revision.rollback_of is not None and old.revision != p.revision:
        b.finished.append(RolloutRecord(old.revision, Result.ROLLED_BACK,
                                        f"rolled back by revision {p.revision} (the spec of "
                                        f"revision {revision.rollback_of})"))  # fmt: skip
    keep = b.state.active_capacity if p.kind is Kind.IN_PLACE else None
    b.set(active=Active(p.cluster, p.revision, p.cluster_hash), pending=None, retiring=retiring,
          restore=None, analysis=analysis, active_capacity=keep)  # fmt: skip
    b.end_rollout(p.revision, Result.SUCCEEDED, f"revision {p.revision} is live on {p.cluster}")
    if p.kind is Kind.NEW_CLUSTER:
        b.event(f"switched traffic to {p.cluster} (revision {p.revision})")
    else:
        b.event(f"revision {p.revision} is live on {p.cluster} (in place)")


def _abort(
    b: _Builder, p: Pending, message: str, revisions: Mapping[int, Revision], now: float
) -> None:
    """Every request back to the stable cluster at once (this decision's table), the
    pending cluster drained (if it carried traffic) and deleted."""
    if p.kind is Kind.NEW_CLUSTER:
        _drop_pending_cluster(b, p, revisions, now, "rollout aborted")  # (capacity: the rule)
    elif b.state.active is not None:
        # Roll the active cluster back to the config that passed.
        b.act(DeployServe(b.state.active.cluster, b.state.active.revision))
    b.set(pending=None, analysis=None)
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
        b.act(DeployServe(a.cluster, a.revision, b.state.active_capacity))


def drains_when_dropped(p: Pending) -> bool:
    """A pending cluster given up (superseded, aborted) is kept, retiring, while requests
    finish: a canary that carried traffic. It then holds one of the MAX_CLUSTERS slots
    (the plan preview, `rollout.preview`, says so too)."""
    return p.kind is Kind.NEW_CLUSTER and p.canary is not None


def _drop_pending_cluster(
    b: _Builder, p: Pending, revisions: Mapping[int, Revision], now: float, why: str
) -> None:
    """A canary that carried traffic is retired (its requests in flight finish, then it is
    deleted); one that never did is deleted at once."""
    if not drains_when_dropped(p):
        b.act(DeleteCluster(p.cluster, why))
        return
    drain = _drain_s(revisions.get(p.revision))
    b.set(retiring=(*b.state.retiring, Retiring(p.cluster, now, drain, 0.0, p.revision)))
    b.event(f"draining canary cluster {p.cluster} ({why})")


# ---- canary ------------------------------------------------------------------------------
def _begin_canary(
    b: _Builder, p: Pending, revisions: Mapping[int, Revision], observed: Observation, now: float
) -> None:
    stable = b.state.active.cluster if b.state.active is not None else None
    canary = Canary(step_since=now, capacity=_pending_capacity(b.state, p, revisions))
    b.set(pending=replace(p, step=Step.CANARY, ok_streak=0, canary=canary, message=""),
          analysis=Analysis(p.cluster, stable, now))  # fmt: skip
    steps = len(_steps(revisions[p.revision]))
    b.event(f"revision {p.revision} passed its health gates on {p.cluster}: "
            f"canary of {steps} steps begins")  # fmt: skip
    _walk(b, revisions, observed, now)


def _steps(revision: Revision) -> tuple[CanaryStep, ...]:
    canary = revision.spec.upgrade.canary
    return canary.steps if canary is not None else ()


def _canary(
    b: _Builder, p: Pending, revisions: Mapping[int, Revision], observed: Observation, now: float
) -> None:
    """A canary on real traffic: judged every interval, aborted on a failed verdict or a
    cluster that dies or fails, walked along its steps otherwise."""
    obs = observed.of(p.cluster)
    if obs.liveness is Liveness.DEAD:
        _abort(b, p, f"canary cluster {p.cluster} died", revisions, now)
        return
    if obs.health is Health.FAILED:
        _abort(b, p, obs.message, revisions, now)
        return
    if obs.health is Health.NOT_DEPLOYED:  # lost its config (or a deploy failed): again
        capacity = p.canary.capacity if p.canary is not None else None
        b.act(DeployServe(p.cluster, p.revision, capacity))
    c = p.canary or Canary(step_since=now)
    timeout = revisions[p.revision].spec.upgrade.health.timeout_s
    if _sick(obs):
        since = c.unhealthy_since if c.unhealthy_since is not None else now
        if now - since > timeout:
            why = obs.message or "its dashboard and Serve proxy do not answer"
            _abort(b, p, f"canary not healthy for {timeout:g}s: {why}", revisions, now)
            return
        if since != c.unhealthy_since:
            p = replace(p, canary=replace(c, unhealthy_since=since))
            b.set(pending=p)
    elif c.unhealthy_since is not None and (_ready(obs) or obs.proxy_ok is True):
        p = replace(p, canary=replace(c, unhealthy_since=None))
        b.set(pending=p)
    if b.state.active is None:  # the stable cluster is gone: nothing else can serve
        b.event(f"stable cluster is gone: canary {p.cluster} takes all traffic")
        _promote(b, p, revisions, now)
        return
    spec = revisions[p.revision].spec.upgrade.analysis
    verdict = _analyse(b, spec, observed, now)
    if verdict is not None and verdict.result is Outcome.FAIL:
        a = b.state.analysis
        if a is not None and a.failures >= spec.failure_limit:
            _abort(b, p, f"analysis failed {a.failures} intervals in a row: {verdict.message}",
                   revisions, now)  # fmt: skip
            return
    a = b.state.analysis
    p = b.state.pending or p
    c = p.canary or Canary(step_since=now)
    if (a is not None and a.inconclusive >= spec.inconclusive_limit and c.hold is Hold.NONE
            and verdict is not None):  # fmt: skip
        b.set(pending=replace(p, canary=replace(c, hold=Hold.NO_DATA), message=verdict.message))
        b.event(f"canary paused itself: {verdict.message} "
                f"({a.inconclusive} intervals); waiting for promote or abort")  # fmt: skip
        return
    _walk(b, revisions, observed, now)


def _analyse(b: _Builder, spec: AnalysisSpec, observed: Observation, now: float) -> Verdict | None:
    """Judge the analysed cluster once per interval, from the gateway's window of counts."""
    a = b.state.analysis
    if a is None or now - a.last_at < spec.interval_s:
        return None
    window = observed.of(a.cluster).window
    if window is None:
        return None  # no window that long yet (just restarted): judged when there is
    stable = observed.of(a.stable).window if a.stable is not None else None
    verdict = judge(spec, window, stable)
    b.verdicts.append(verdict)
    if verdict.result is Outcome.PASS:
        a = replace(a, failures=0, inconclusive=0, passes=a.passes + 1)
    elif verdict.result is Outcome.FAIL:
        a = replace(a, failures=a.failures + 1, inconclusive=0)
    else:
        a = replace(a, inconclusive=a.inconclusive + 1)
    b.set(analysis=replace(a, last_at=now, verdict=verdict))
    return verdict


def _walk(b: _Builder, revisions: Mapping[int, Revision], observed: Observation, now: float
          ) -> None:  # fmt: skip
    """Take every step that can be taken now: a weight at once, a timed pause once its time
    is up and an analysis interval in it passed; then all traffic, once no step is left."""
    p = b.state.pending
    if p is None or p.canary is None:
        return
    revision = revisions[p.revision]
    steps = _steps(revision)
    scale = (
        revision.spec.upgrade.canary is not None and revision.spec.upgrade.canary.scale_with_traffic
    )
    c = p.canary
    a = b.state.analysis
    message = p.message
    while c.index < len(steps) and c.hold is Hold.NONE:
        step = steps[c.index]
        if step.weight is not None:
            # scale_with_traffic: replicas first, then the traffic (either way).
            if scale and step.weight != c.weight:
                b.set(pending=replace(p, canary=c, message=message), analysis=a)
                up_ = step.weight > c.weight
                if not (_scaled(b, step.weight, observed) if up_
                        else _stable_scaled(b, 100 - step.weight, observed)):  # fmt: skip
                    return
                p = b.state.pending
                assert p is not None and p.canary is not None
                c = p.canary
                if up_ and b.state.active is not None:  # the stable cluster gives some back
                    b.act(DeployServe(b.state.active.cluster, b.state.active.revision,
                                      max(1, 100 - step.weight)))  # fmt: skip
                    b.set(active_capacity=max(1, 100 - step.weight))
            b.event(f"canary {p.cluster}: step {c.index + 1}/{len(steps)}, weight "
                    f"{c.weight}% -> {step.weight}%")  # fmt: skip
            c = replace(c, index=c.index + 1, weight=step.weight, step_since=now)
            if a is not None:  # the next window lies wholly at the new weight
                a = replace(a, passes=0, last_at=now, failures=0, inconclusive=0)
            message = f"weight {step.weight}%"
            continue
        duration = step.pause.duration_s if step.pause is not None else None
        if duration is None:
            message = "paused: waiting for `raygate promote`"
            break
        if now - c.step_since < duration:
            message = f"pause {now - c.step_since:.0f}/{duration:g}s at weight {c.weight}%"
            break
        if a is None or a.passes < 1:
            message = (f"pause of {duration:g}s is over; waiting for an analysis interval "
                       "with enough traffic to pass")  # fmt: skip
            break
        b.steps_took.append(("canary_pause", now - c.step_since))
        b.event(f"canary {p.cluster}: pause of {duration:g}s at weight {c.weight}% passed")
        c = replace(c, index=c.index + 1, step_since=now)
    if c.index >= len(steps) and not c.promoted and (a is None or a.passes < 1):
        # No data is never success: 100% only after an interval at this weight passed.
        message = (f"every step done; waiting for an analysis interval at weight {c.weight}% "
                   "with enough traffic to pass")  # fmt: skip
        b.set(pending=replace(p, canary=c, message=message), analysis=a)
        return
    obs = observed.of(p.cluster)
    if c.index >= len(steps) and c.hold is Hold.NONE and not _ready(obs):
        # All traffic only to a cluster that passes its gate now, promoted or not.
        why = obs.message or f"cluster is {obs.liveness.value}"
        b.set(pending=replace(p, canary=c, message=f"every step done; waiting for its health "
                              f"gate before 100%: {why}"), analysis=a)  # fmt: skip
        return
    b.set(pending=replace(p, canary=c, message=message), analysis=a)
    if c.index >= len(steps) and c.hold is Hold.NONE:
        if scale and c.weight < 100 and not _scaled(b, 100, observed):
            return
        done = b.state.pending
        assert done is not None
        b.steps_took.append(("canary", now - p.started_at))
        _promote(b, done, revisions, now)


def _scaled(b: _Builder, capacity: int, observed: Observation) -> bool:
    """scale_with_traffic: the canary's Serve target_capacity is raised to `capacity`, and
    its replicas are up (health OK, twice), before it takes that share of traffic."""
    p = b.state.pending
    assert p is not None and p.canary is not None
    c = p.canary
    if c.capacity != capacity:
        b.act(DeployServe(p.cluster, p.revision, capacity))
        why = f"scaling to {capacity}% capacity before the weight moves"
        b.set(pending=replace(p, canary=replace(c, capacity=capacity), ok_streak=0, message=why))
        return False
    obs = observed.of(p.cluster)
    if obs.health is not Health.OK:
        why = f"scaling to {capacity}% capacity before the weight moves: {obs.message}"
        b.set(pending=replace(p, ok_streak=0, message=why))
        return False
    if p.ok_streak + 1 < 2:  # one OK may predate the new target: two in a row
        b.set(pending=replace(p, ok_streak=p.ok_streak + 1))
        return False
    b.set(pending=replace(p, ok_streak=0))
    return True


def _stable_scaled(b: _Builder, capacity: int, observed: Observation) -> bool:
    """scale_with_traffic, a step down: the stable cluster's capacity is raised to
    `capacity` and its replicas are up (health OK, twice) before it takes that share back."""
    p, a = b.state.pending, b.state.active
    assert p is not None
    if a is None:
        return True
    have = b.state.active_capacity
    if have is not None and have < capacity:
        b.act(DeployServe(a.cluster, a.revision, capacity))
        why = f"scaling stable {a.cluster} to {capacity}% capacity before the weight moves"
        b.set(pending=replace(p, ok_streak=0, message=why), active_capacity=capacity)
        return False
    obs = observed.of(a.cluster)
    if obs.health is not Health.OK:
        why = obs.message or f"cluster is {obs.liveness.value}"
        b.set(pending=replace(p, ok_streak=0, message=f"scaling stable: {why}"))
        return False
    if have is not None and p.ok_streak + 1 < 2:
        b.set(pending=replace(p, ok_streak=p.ok_streak + 1))
        return False
    b.set(pending=replace(p, ok_streak=0))
    return True


# ---- bake --------------------------------------------------------------------------------
def _bake(
    b: _Builder, revisions: Mapping[int, Revision], observed: Observation, now: float
) -> None:
    """While a new revision bakes, it is judged as a canary is; a failed verdict puts every
    request back on the baked cluster at once (an automatic rollback)."""
    s = b.state
    active, a = s.active, s.analysis
    if s.pending is not None or active is None or a is None or a.cluster != active.cluster:
        return
    baked = next((r for r in s.retiring if r.baking(now) and r.revision in revisions), None)
    if baked is None or baked.revision is None:
        return
    spec = revisions[active.revision].spec.upgrade.analysis
    verdict = _analyse(b, spec, observed, now)
    a = b.state.analysis
    if a is None:
        return
    # A new cluster that stops passing its gate may get no answers to judge at all (HAProxy
    # marks its proxy down: requests end in the gateway's own 503): judged as long as
    # `failure_limit` failed intervals would take.
    obs = observed.of(active.cluster)
    # Serve adding replicas (PENDING) while the answers pass is no reason to roll back.
    passing = a.verdict is not None and a.verdict.result is Outcome.PASS
    sick = _sick(obs) and not (passing and obs.health is Health.PENDING)
    since = (a.unhealthy_since if a.unhealthy_since is not None else now) if sick else None
    if since != a.unhealthy_since:
        a = replace(a, unhealthy_since=since)
        b.set(analysis=a)
    limit_s = spec.failure_limit * spec.interval_s
    if since is not None and now - since >= limit_s:
        why = f"not healthy for {now - since:.0f}s ({obs.message or obs.liveness.value})"
    elif (
        verdict is not None and verdict.result is Outcome.FAIL and a.failures >= spec.failure_limit
    ):
        why = f"analysis failed {a.failures} intervals in a row: {verdict.message}"
    else:
        return
    if not _can_take_back(observed.of(baked.cluster)):
        if verdict is not None:  # once an interval, not every tick
            b.event(f"{why}, but baked cluster {baked.cluster} is not healthy enough to "
                    "take traffic back")  # fmt: skip
        return
    _roll_back(b, baked, revisions, now, why)


def _roll_back(
    b: _Builder, baked: Retiring, revisions: Mapping[int, Revision], now: float, why: str
) -> None:
    """The revision that replaced `baked` failed while baking: every request goes back on
    the baked cluster at once, and that revision is rolled back, not tried again (a push or
    `raygate rollback` brings it back)."""
    active = b.state.active
    assert active is not None and baked.revision is not None
    message = f"{why} while baking; traffic back on {baked.cluster} (revision {baked.revision})"
    old = revisions[baked.revision]
    _swap_back(b, baked, old.number, old, revisions, now)
    b.end_rollout(active.revision, Result.ROLLED_BACK, message)
    b.event(f"rolled back revision {active.revision}: {message}")


def _swap_back(
    b: _Builder,
    baked: Retiring,
    as_revision: int,
    target: Revision,
    revisions: Mapping[int, Revision],
    now: float,
) -> None:
    """The baked cluster takes all traffic again (one table change); the active retires."""
    active = b.state.active
    assert active is not None
    drain = _drain_s(revisions.get(active.revision), target)
    gone = Retiring(active.cluster, now, drain, 0.0, active.revision,
                    capacity=b.state.active_capacity)  # fmt: skip
    others = tuple(r for r in b.state.retiring if r.cluster != baked.cluster)
    b.set(active=Active(baked.cluster, as_revision, target.cluster_hash),
          retiring=(*others, gone), analysis=None, active_capacity=None)  # fmt: skip
    if baked.capacity is not None:  # a canary scaled it down: its full capacity again
        b.act(DeployServe(baked.cluster, as_revision))


def _back_to_baking(
    b: _Builder,
    target: Revision,
    revisions: Mapping[int, Revision],
    observed: Observation,
    now: float,
) -> bool:
    """A revision whose cluster still runs (baking, weight 0) comes back by a weight change,
    no new cluster (`raygate rollback` in the bake window, or the old spec pushed again)."""
    s = b.state
    for r in baking_match(s, target, revisions, now):
        if not _can_take_back(observed.of(r.cluster)):
            return False
        assert s.active is not None  # baking_match: only beside an active cluster
        replaced = s.active.revision
        _swap_back(b, r, target.number, target, revisions, now)
        b.finished.append(RolloutRecord(replaced, Result.ROLLED_BACK,
                                        f"rolled back to revision {r.revision} by revision "
                                        f"{target.number}"))  # fmt: skip
        b.end_rollout(target.number, Result.SUCCEEDED, f"revision {target.number} is live on "
                      f"{r.cluster} again (its cluster was baking): one weight change")  # fmt: skip
        b.event(f"revision {target.number}: traffic back on {r.cluster} at once")
        return True
    return False


def baking_match(
    state: ServiceState, target: Revision, revisions: Mapping[int, Revision], now: float
) -> list[Retiring]:
    """The retiring clusters, still baking, that run what `target` runs: one of them takes
    the traffic back instead of a rollout (if it can, `_can_take_back`)."""
    if state.active is None:
        return []
    return [
        r for r in state.retiring
        if r.baking(now) and r.revision is not None and r.revision in revisions
        and revisions[r.revision].same_as(target)
    ]  # fmt: skip


# ---- commands ----------------------------------------------------------------------------
COMMANDS = ("promote", "abort", "pause", "resume")


def refusal(state: ServiceState, command: Command) -> str | None:
    """Why `command` does not apply to `state` now (the admin API's 409), or None."""
    p = state.pending
    if state.deleting:
        return "the service is being deleted"
    baking = any(r.bake_until is not None for r in state.retiring)
    if p is None:
        if baking:
            return ("no rollout in progress: the live revision is baking; `raygate rollback` "
                    "puts traffic back on the baked cluster")  # fmt: skip
        return "no rollout in progress"
    if command.kind == "abort":
        return None
    if p.step is not Step.CANARY or p.canary is None:
        if p.kind is Kind.IN_PLACE:
            return f"revision {p.revision} is an in-place update: it has no canary steps"
        return (f"revision {p.revision} is in its {p.step.value} step; canary commands apply "
                "once its canary steps run (a blue-green rollout has none: `raygate abort` "
                "stops it)")  # fmt: skip
    if command.kind == "pause" and p.canary.hold is Hold.USER:
        return "the canary is paused already (`raygate resume` goes on)"
    if command.kind == "resume" and p.canary.hold is Hold.NONE:
        return ("the canary is not paused by `raygate pause` or for lack of data; a "
                "`pause: {}` step waits for `raygate promote`")  # fmt: skip
    return None


def _apply_commands(b: _Builder, revisions: Mapping[int, Revision], now: float) -> None:
    commands = b.state.commands
    if not commands:
        return
    b.set(commands=())
    for command in commands:
        why = refusal(b.state, command)
        if why is not None:
            b.event(f"{command.kind} not applied: {why}")
            continue
        p = b.state.pending
        assert p is not None
        if command.kind == "abort":
            _abort(b, p, "aborted by `raygate abort`", revisions, now)
            continue
        c = p.canary
        assert c is not None
        steps = _steps(revisions[p.revision])
        if command.kind == "pause":
            c = replace(c, hold=Hold.USER)
            b.event(f"canary paused at step {c.index + 1}/{len(steps)}, weight {c.weight}%")
        elif command.kind == "resume":
            c = replace(c, hold=Hold.NONE)
            b.event("canary resumed")
        elif command.full:
            c = replace(c, hold=Hold.NONE, index=len(steps), step_since=now, promoted=True)
            b.event("promoted in full: every remaining step skipped")
        else:
            index = c.index
            if index < len(steps) and steps[index].pause is not None:
                index += 1  # the pause under way ends
            c = replace(c, hold=Hold.NONE, index=index, step_since=now,
                        promoted=index >= len(steps))  # fmt: skip
            b.event(f"promoted: on to step {min(index + 1, len(steps))}/{len(steps)}")
        if command.kind in ("resume", "promote") and b.state.analysis is not None:
            # A fresh run of intervals: the no-data count, and windows from now on.
            b.set(analysis=replace(b.state.analysis, inconclusive=0, last_at=now))
        b.set(pending=replace(p, canary=c))


def _end_bake(b: _Builder, revision: int, now: float) -> None:
    """A newer revision ends the bake of the one before: the baked cluster goes (it is at
    weight 0; a new rollout that needs a cluster starts once it is deleted)."""
    baking = [r for r in b.state.retiring if r.bake_until is not None]
    if not baking:
        return
    b.set(retiring=tuple(replace(r, bake_until=None, since=now) if r in baking else r
                         for r in b.state.retiring), analysis=None)  # fmt: skip
    b.event(f"revision {revision} ends the bake window early: retiring "
            f"{', '.join(r.cluster for r in baking)}")  # fmt: skip


# ---- capacity (scale_with_traffic) and the baked cluster -----------------------------------
def capacity_of(state: ServiceState, cluster: str, revisions: Mapping[int, Revision]
                ) -> int | None:  # fmt: skip
    """The Serve target_capacity the plan last sent to `cluster` (None: full), which the
    health check expects to find running there."""
    p = state.pending
    if p is not None and p.cluster == cluster and p.kind is Kind.NEW_CLUSTER:
        return _pending_capacity(state, p, revisions)
    if state.active is not None and state.active.cluster == cluster:
        return state.active_capacity
    return next((r.capacity for r in state.retiring if r.cluster == cluster), None)


def _pending_capacity(state: ServiceState, p: Pending, revisions: Mapping[int, Revision]
                      ) -> int | None:  # fmt: skip
    """The Serve target_capacity the pending cluster is deployed with: a scaling canary's
    own (from its first weight, health gates included: it never runs at full capacity beside
    a stable cluster at full capacity), else full (None)."""
    if p.canary is not None:
        return p.canary.capacity
    revision = revisions.get(p.revision)
    canary = revision.spec.upgrade.canary if revision is not None else None
    if canary is None or revision is None or not canary.scale_with_traffic:
        return None
    if not revision.canary or state.active is None or p.kind is not Kind.NEW_CLUSTER:
        return None
    return next((s.weight for s in canary.steps if s.weight is not None), None)


def _keep_capacity(b: _Builder, revisions: Mapping[int, Revision]) -> None:
    """Level-triggered: the active cluster runs at 100 - the canary's weight while a scaling
    canary holds traffic, else at full capacity. Whatever ends a canary (abort, supersede,
    delete, promote) gives the stable cluster its replicas back here."""
    s = b.state
    a, p = s.active, s.pending
    if a is None or (p is not None and p.kind is Kind.IN_PLACE):
        return
    want = None  # full
    if p is not None and p.canary is not None and p.canary.weight > 0:
        canary = revisions[p.revision].spec.upgrade.canary if p.revision in revisions else None
        if canary is not None and canary.scale_with_traffic:
            # Lowered by the walk once the weight moved; here only ever raised.
            want = max(s.active_capacity or 100, max(1, 100 - p.canary.weight))
            want = None if want >= 100 else want
    if want == s.active_capacity:
        return
    # One deploy to the active cluster, with the capacity it must run at now.
    b.actions = [
        x for x in b.actions if not (isinstance(x, DeployServe) and x.cluster == a.cluster)
    ]
    b.act(DeployServe(a.cluster, a.revision, want))
    b.set(active_capacity=want)


def _sick(obs: ClusterObservation) -> bool:
    """Fails its health gate (Serve's status, its proxy), as far as can be told now."""
    if obs.liveness is Liveness.UNREACHABLE:
        return obs.proxy_ok is False
    return obs.liveness is Liveness.UP and obs.health not in (Health.OK, None)


def _can_take_back(obs: ClusterObservation) -> bool:
    """A baked cluster that can take all traffic back now: up, its apps running, its
    replicas up or still starting (raised to full capacity when its bake began: requests
    queue in Serve until they are up, which beats a failing or vanished cluster)."""
    return obs.liveness is Liveness.UP and obs.health in (Health.OK, Health.PENDING)


def _ready(obs: ClusterObservation) -> bool:
    """A cluster that can take all traffic back this instant: up, and its apps healthy."""
    return obs.liveness is Liveness.UP and obs.health is Health.OK


def _to_baked(
    b: _Builder, revisions: Mapping[int, Revision], observed: Observation, now: float, why: str
) -> bool:
    """The active cluster is gone or silent during a bake window: the baked cluster, warm and
    healthy, takes all traffic back at once (the active's revision is rolled back)."""
    if b.state.active is None:
        return False
    for r in b.state.retiring:
        if r.baking(now) and r.revision in revisions and r.revision is not None:
            if _can_take_back(observed.of(r.cluster)):
                _roll_back(b, r, revisions, now, why)
                return True
    return False


def _keep_baked_deployed(b: _Builder, observed: Observation, now: float) -> None:
    """Level-triggered, as for the active cluster: a baked cluster must run its revision at
    the capacity it was last sent (the full-capacity deploy when its bake began may have
    failed), or it could not take traffic back."""
    for r in b.state.retiring:
        if r.baking(now) and r.revision is not None:
            if observed.of(r.cluster).health is Health.NOT_DEPLOYED:
                b.act(DeployServe(r.cluster, r.revision, r.capacity))
