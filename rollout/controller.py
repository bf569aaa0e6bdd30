"""The controller: a level-triggered loop per service that observes, plans, commits, acts.

Order inside one tick (Ray Serve and argo-rollouts do the same):
1. observe  - liveness and health of each cluster the service holds, in-flight counts;
2. plan     - the pure planner decides (rollout.plan);
3. commit   - the decision is written to SQLite *before* any side effect, as a
              compare-and-swap on the version it was planned from: if a push or a DELETE
              landed meanwhile, nothing is written or done and the tick starts over;
4. route    - the gateway gets the route table derived from every service's state; then
              the decision's rollout events are queued for webhooks (rollout/notify.py),
              never awaited: a slow receiver cannot slow a tick;
5. act      - clusters are created and configs deployed, each action on its own (one that
              fails does not skip the others); then every cluster record marked for
              deletion is deleted, level-triggered: one whose deletion failed is tried again
              next tick, until it is gone. A cluster the gateway may still send new requests
              to is never deleted.
A failure inside a tick is logged and retried on the next one: the loop never dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

import httpx

from gateway.dataplane import ANY_CLUSTER, DataPlane
from gateway.metrics import Metrics
from gateway.routes import RouteTable
from rollout.analysis import Sampler, WindowStats
from rollout.events import DEGRADED_GRACE_S, degraded_told, rollout_events
from rollout.health import HealthChecker
from rollout.notify import Notifier
from rollout.plan import (
    ClusterObservation,
    CreateCluster,
    Decision,
    DeleteCluster,
    DeployServe,
    Health,
    Liveness,
    Observation,
    Phase,
    Result,
    Revision,
    ServiceState,
    Step,
    capacity_of,
    plan,
)
from rollout.providers.base import ClusterInfo, ClusterProvider, ProviderError
from rollout.routing import route_table
from rollout.serve_client import ServeApiError, ServeClient
from rollout.spec import ServiceSpec
from rollout.store import ClusterState, Conflict, Store

log = logging.getLogger("raygate.controller")

# Serve's proxy closes idle keep-alive connections after this; the gateway's own upstream
# keep-alive is shorter, so it never sends on a connection the proxy is closing.
SERVE_KEEP_ALIVE_S = 90


# Recovery never waits longer than this on a provider's orphan sweep (an API server that
# hangs); a sweep cut short is done again at the next start.
ORPHAN_SWEEP_S = 60.0


@dataclass(frozen=True)
class ControllerSettings:
    tick_s: float = 1.0
    create_wait_s: float = 1.0  # how long a tick waits for a cluster start before going on


def serve_config(
    spec: ServiceSpec, info: ClusterInfo, capacity: int | None = None
) -> dict[str, Any]:
    """The user's Serve config with the http_options raygate owns for this cluster, and
    Serve's `target_capacity` when a canary scales with its traffic."""
    config = dict(spec.serve)
    if capacity is not None:
        config["target_capacity"] = capacity
    http = dict(config.get("http_options") or {})
    http.update(host=info.bind_host or info.serve_host, port=info.serve_port)
    http.setdefault("keep_alive_timeout_s", SERVE_KEEP_ALIVE_S)
    config["http_options"] = http
    return config


class Controller:
    def __init__(
        self,
        store: Store,
        provider: ClusterProvider,
        dataplane: DataPlane,
        http: httpx.AsyncClient,
        settings: ControllerSettings | None = None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.store = store
        self.notifier = notifier
        # Per service, the clusters webhooks were told are degraded (events.degraded_told).
        self._degraded_told: dict[str, frozenset[str]] = {}
        self.provider = provider
        self.dataplane = dataplane
        self.settings = settings or ControllerSettings()
        self.clock = clock
        self.metrics = metrics or Metrics()
        self._health_since: dict[str, float] = {}  # service -> when its health step began
        self.health = HealthChecker(http)
        self.serve = ServeClient(http)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._errors: dict[tuple[str, int], str] = {}  # (cluster, revision) -> permanent error
        self._delete_failed: set[str] = set()  # clusters whose deletion failed at least once
        self._table: RouteTable | None = None  # the last table the data plane took
        self._publishing = asyncio.Lock()
        self._supervisor: asyncio.Task[None] | None = None
        self._spawn = asyncio.Event()
        self.started = False  # routes published and recovery done: raygate is ready
        # Cluster starts under way: each runs beside its service's loop, which observes the
        # cluster as STARTING meanwhile (a push or a delete is acted on while KubeRay
        # schedules pods).
        self._creating: dict[str, asyncio.Task[None]] = {}
        # The gateway's per-cluster counts, sampled every tick: analysis windows come from it.
        self.sampler = Sampler()

    # ---- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        # Routes first: the data plane (an adopted HAProxy, after a restart) must stop routing
        # to any cluster the stored state no longer holds before recovery deletes it.
        await self.publish_routes()
        await self.recover()
        self._supervisor = asyncio.create_task(self._supervise(), name="raygate-supervisor")
        self.started = True

    async def recover(self) -> None:
        """After a restart: finish deletions, remove clusters no state refers to, orphans."""
        referenced: set[str] = set()
        for name in self.store.service_names():
            state = self.store.load(name)
            if state is not None:
                referenced.update(state.clusters())
        for info, cstate in self.store.clusters():
            if cstate is not ClusterState.DELETING and info.id not in referenced:
                log.info("recover: cluster %s belongs to no service; deleting it", info.id)
                self.store.mark_cluster_deleting(info.id)
        await self._sweep_deletions(None)
        known = [info for info, _ in self.store.clusters()]
        try:
            stray = await asyncio.wait_for(self.provider.orphans(known), ORPHAN_SWEEP_S)
        except (ProviderError, TimeoutError) as exc:  # the Kubernetes API is down or hangs:
            # serve what is known; the next start sweeps again
            log.error("recover: cannot look for orphan clusters: %r", exc)
            return
        if stray:
            log.warning("recover: stopped orphan clusters %s", stray)

    async def stop(self, delete_clusters: bool = True) -> None:
        tasks = [*self._tasks.values(), *self._creating.values(),
                 *([self._supervisor] if self._supervisor else [])]  # fmt: skip
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._creating.clear()
        if delete_clusters:
            for info, _ in self.store.clusters():
                try:
                    await self._delete(info)
                except Exception:
                    log.exception("stopping cluster %s failed", info.id)
            await self.provider.orphans([])

    def wake(self, name: str | None = None) -> None:
        if name is not None and name in self._wake:
            self._wake[name].set()
        self._spawn.set()

    async def _supervise(self) -> None:
        while True:
            try:  # the supervisor never dies: every service loop is started from here
                names = self.store.service_names()
                for name in names:
                    task = self._tasks.get(name)
                    if task is None or task.done():
                        self._wake[name] = asyncio.Event()
                        self._tasks[name] = asyncio.create_task(self._service_loop(name))
                # Records of services that are gone: no service loop sweeps them.
                await self._sweep_deletions(None, skip=set(names))
            except Exception:
                log.exception("supervising the service loops failed; retrying next tick")
            self._spawn.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._spawn.wait(), self.settings.tick_s)

    async def _service_loop(self, name: str) -> None:
        wake = self._wake[name]
        while True:
            wake.clear()
            try:
                if not await self.reconcile(name):
                    return
            except asyncio.CancelledError:
                raise
            except Conflict:
                log.debug("%s changed during its reconcile; planning again", name)
                continue
            except Exception:
                log.exception("reconcile of %s failed; retrying next tick", name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.settings.tick_s)

    # ---- one tick -------------------------------------------------------------------
    async def reconcile(self, name: str) -> bool:
        """One observe-plan-commit-act pass. False once the service is gone. Raises
        Conflict, having done nothing, if the service changed while it was observed."""
        loaded = self.store.load_versioned(name)
        if loaded is None:
            return False
        state, version = loaded
        desired = self.store.latest(name)
        revisions = self._revisions(name, state, desired)
        observed = await self.observe(state, revisions)
        now = self.clock()
        new_id = self._new_cluster_id(name)
        decision = plan(state, desired, revisions, observed, now, new_id)
        try:
            new_infos = self._allocate(decision, revisions)
        except Exception as exc:  # no free slot, a spec the provider cannot place
            why = str(exc) if isinstance(exc, ProviderError) else repr(exc)
            log.error("%s: cannot create a cluster: %s", name, why)
            observed = Observation(observed.clusters, cannot_create=why)
            decision = plan(state, desired, revisions, observed, now, new_id)
            new_infos = {}
        self.store.commit(
            decision.state,
            decision.finished,
            decision.events,
            now,
            version=version,
            new_clusters=new_infos.values(),
            deleting=[a.cluster for a in decision.actions if isinstance(a, DeleteCluster)],
            gone=decision.gone,
        )
        for text in decision.events:
            log.info("%s: %s", name, text)
        self._record(state, decision, now)
        self._record_health(decision, observed)
        try:
            await self.publish_routes()
        except Exception:
            # Deletions wait for a table without the cluster (see _sweep_deletions); the
            # rest of the tick goes on, and the table is published again next tick.
            log.exception("publishing routes failed; retrying next tick")
        self._notify(state, decision, desired, now)  # (a switch is in the gateway by now)
        await self._act(decision, revisions, new_infos)
        await self._sweep_deletions(name)
        return not decision.gone

    def _record(self, before: ServiceState, decision: Decision, now: float) -> None:
        """Metrics of one decision: phase, rollouts ended, health and drain durations."""
        name, after = before.name, decision.state
        phases = tuple(p.value for p in Phase)
        if decision.gone:
            self.metrics.forget_service(name, phases)
            self.sampler.forget(name)
        else:
            self.metrics.set_phase(name, after.phase.value, phases)
        for record in decision.finished:
            self.metrics.rollout_ended(name, record.result.value)
        in_health = after.pending is not None and after.pending.step is Step.HEALTH
        if in_health and name not in self._health_since:
            self._health_since[name] = now
        elif not in_health and name in self._health_since:
            self.metrics.step_took("health", now - self._health_since.pop(name))
        for verdict in decision.verdicts:
            self.metrics.analysis_run(name, verdict.result.value)
        for step, seconds in decision.steps_took:
            self.metrics.step_took(step, seconds)
        p = after.pending
        canary = p is not None and p.canary is not None and not decision.gone
        self.metrics.set_canary_weight(
            name, {p.cluster: p.canary.weight} if canary and p and p.canary else {}
        )
        for action in decision.actions:
            if isinstance(action, DeleteCluster):
                for r in before.retiring:
                    if r.cluster == action.cluster:
                        self.metrics.step_took("drain", now - r.since)

    def _record_health(self, decision: Decision, observed: Observation) -> None:
        """Health metrics of one tick, for alerts (deploy/monitoring/): healthy is passing the
        health checks, or a dashboard that stalls while the Serve proxy answers (degraded:
        it keeps its traffic). A cluster nobody checked this tick (a draining one) has none."""
        after = decision.state
        if decision.gone:
            return  # _record forgot the service
        ended = tuple(r.value for r in Result if r is not Result.IN_PROGRESS)
        self.metrics.start_counting_rollouts(after.name, ended)
        healthy = {}
        for cid in after.clusters():
            o = observed.of(cid)
            if o.liveness is Liveness.UP and o.health is None:
                continue
            # Deployments that scale (autoscaling, a replica replaced) serve meanwhile.
            up_ok = o.health is Health.OK or (o.health is Health.PENDING and o.serving)
            healthy[cid] = (o.liveness is Liveness.UP and up_ok) or (
                o.liveness is Liveness.UNREACHABLE and o.proxy_ok is True
            )
        degraded = {u.cluster: u.since for u in after.unreachable}
        # Should serve: live, upgrading, restoring a lost active cluster (`restore`), or
        # failed (its rollout aborted with no cluster left to serve). A first deploy under
        # way and a deletion have nothing to serve yet or any more.
        serves = not after.deleting and (
            after.active is not None or after.restore is not None or after.phase is Phase.FAILED
        )
        self.metrics.set_cluster_health(after.name, healthy, after.traffic(), degraded, serves)
    def _notify(self, before: ServiceState, decision: Decision, desired: Revision, now: float
                ) -> None:  # fmt: skip
        """The decision's rollout events to the notifier, which only queues them: a slow
        receiver never slows a tick, and a failure here never fails one."""
        if self.notifier is None:
            return
        try:
            told = self._degraded_told.get(before.name, frozenset())
            events = rollout_events(before, decision, now, told, DEGRADED_GRACE_S)
            if decision.gone:
                self._degraded_told.pop(before.name, None)
            else:
                self._degraded_told[before.name] = degraded_told(
                    decision.state, told, now, DEGRADED_GRACE_S
                )
            if events:
                self.notifier.publish(events, desired.spec.notifications)
        except Exception:
            log.exception("%s: queuing rollout notifications failed", before.name)

    def _revisions(self, name: str, state: ServiceState, desired: Revision) -> dict[int, Revision]:
        numbers = {desired.number}
        if state.active is not None:
            numbers.add(state.active.revision)
        if state.pending is not None:
            numbers.add(state.pending.revision)
        if state.restore is not None:
            numbers.add(state.restore)
        numbers.update(r.revision for r in state.retiring if r.revision is not None)
        return {
            n: desired if n == desired.number else self.store.revision(name, n) for n in numbers
        }

    def _windows(
        self, state: ServiceState, revisions: Mapping[int, Revision]
    ) -> dict[str, WindowStats]:
        """Each cluster's counts over the analysis interval of the rollout being judged.
        Sampled last in `observe`, just before the plan reads its clock: a window that starts
        at a weight change holds (almost) nothing from before it."""
        now = self.clock()
        self.sampler.record(state.name, now, self.metrics.cluster_totals(state.name))
        if state.analysis is None:
            return {}
        judged = state.pending.revision if state.pending is not None else None
        if judged is None and state.active is not None:
            judged = state.active.revision
        if judged is None or judged not in revisions:
            return {}
        interval = revisions[judged].spec.upgrade.analysis.interval_s
        out = {}
        for cid in state.clusters():
            window = self.sampler.window(state.name, cid, interval, now)
            if window is not None:
                out[cid] = window
        return out

    async def observe(self, state: ServiceState, revisions: Mapping[int, Revision]) -> Observation:
        in_flight = await self.dataplane.in_flight()
        out: dict[str, ClusterObservation] = {}
        for cid in state.clusters():
            record = self.store.cluster(cid)
            if record is None:
                out[cid] = ClusterObservation(Liveness.DEAD, in_flight=in_flight.get(cid, 0))
                continue
            info, _ = record
            expected = state.expected_revision(cid)
            if any(r.cluster == cid and not r.baking(self.clock()) for r in state.retiring):
                expected = None  # a retiring cluster's health gates nothing (a baked one's
                # does: traffic may go back to it)
            creating = self._creating.get(cid)
            if creating is not None and not creating.done():  # its start is under way
                out[cid] = ClusterObservation(Liveness.STARTING, message="starting the cluster",
                                              in_flight=in_flight.get(cid, 0))  # fmt: skip
                continue
            seen = await self.provider.observe(info)
            if seen.info != info:  # learned its address, or the address moved
                self.store.update_cluster(seen.info, ClusterState.RUNNING)
                info = seen.info
            liveness = seen.liveness
            health = None
            message = seen.message
            proxy_ok = None
            serving = False
            if liveness is Liveness.UP and expected is not None and expected in revisions:
                p = state.pending
                # The smoke probes gate the switch; a canary is judged on real traffic.
                is_pending = p is not None and p.cluster == cid and p.step is not Step.CANARY
                report = await self.health.check(
                    info.dashboard_url, info.serve_url, revisions[expected].spec,
                    probes=is_pending, capacity=capacity_of(state, cid, revisions),
                )  # fmt: skip
                health, message, serving = report.health, report.message, report.serving
            elif liveness is Liveness.UNREACHABLE:
                proxy_ok = await self.health.proxy_alive(info.serve_url)
            out[cid] = ClusterObservation(
                liveness,
                health,
                message or "",
                in_flight.get(cid, 0),
                (self._errors.get((cid, expected)) if expected is not None else None) or seen.error,
                proxy_ok,
                serving=serving,
            )
        windows = self._windows(state, revisions)
        return Observation({c: replace(o, window=windows.get(c)) for c, o in out.items()})

    def _new_cluster_id(self, name: str) -> str:
        return f"{name}-{secrets.token_hex(3)}"

    def _allocate(
        self, decision: Decision, revisions: Mapping[int, Revision]
    ) -> dict[str, ClusterInfo]:
        infos: dict[str, ClusterInfo] = {}
        taken = [info for info, _ in self.store.clusters()]
        for action in decision.actions:
            if isinstance(action, CreateCluster):
                spec = revisions[action.revision].spec
                info = self.provider.allocate(action.cluster, spec.name, spec.cluster, taken)
                taken.append(info)
                infos[action.cluster] = info
        return infos

    async def publish_routes(self) -> None:
        async with self._publishing:  # service loops publish one at a time, newest state
            states = {n: s for n in self.store.service_names() if (s := self.store.load(n))}
            clusters = {info.id: info for info, _ in self.store.clusters()}
            table = route_table(states, lambda n, r: self.store.revision(n, r).spec, clusters)
            if table != self._table:
                started = time.perf_counter()
                await self.dataplane.apply(table)
                # A switch is traffic moving; a table that only adds a cluster at weight 0
                # (a pending one), drops one that took none, or starts raygate is not one.
                if _shares(table) != _shares(self._table):
                    self.metrics.step_took("switch", time.perf_counter() - started)
                self._table = table
            # Every tick, so a deleted cluster's weight disappears too.
            self.metrics.set_weights({n: s.traffic() for n, s in states.items()})

    # ---- act ------------------------------------------------------------------------
    async def _act(
        self,
        decision: Decision,
        revisions: Mapping[int, Revision],
        new_infos: Mapping[str, ClusterInfo],
    ) -> None:
        """Creates and deploys, each on its own: one failing does not skip the others.
        Deletions were committed as marks on the cluster records; _sweep_deletions does them."""
        for action in decision.actions:
            try:
                if isinstance(action, CreateCluster):
                    await self._start_creating(new_infos[action.cluster],
                                               revisions[action.revision])  # fmt: skip
                elif isinstance(action, DeployServe):
                    await self._deploy(action.cluster, revisions[action.revision],
                                       action.capacity)  # fmt: skip
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed; the next tick sees what is left to do", action)

    async def _sweep_deletions(self, service: str | None, skip: Collection[str] = ()) -> None:
        """Delete every cluster record marked for deletion (of `service`, or of any service
        not in `skip`), whatever tick marked it: level-triggered, so a failed deletion is
        tried again next tick until it is done."""
        marked = [
            info
            for info, cstate in self.store.clusters()
            if cstate is ClusterState.DELETING
            and (service is None or info.service == service)
            and info.service not in skip
        ]
        if not marked:
            return
        try:
            routed = await self.dataplane.routed()
        except Exception as exc:  # the engine cannot be asked now: delete nothing yet
            log.warning("the data plane cannot say where it routes (%r); deleting later", exc)
            return
        for info in marked:
            if info.id in routed or ANY_CLUSTER in routed:
                log.info("cluster %s waits for the gateway to stop routing to it", info.id)
                continue
            try:
                await self._delete(info)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("deleting cluster %s failed (%r); trying again next tick", info.id, exc)
                if info.id not in self._delete_failed:  # an event once, a log line each tick
                    self._delete_failed.add(info.id)
                    self._event(info.service, f"deleting cluster {info.id} failed: {exc!r}; "
                                              "trying again until it is gone")  # fmt: skip

    async def _start_creating(self, info: ClusterInfo, revision: Revision) -> None:
        """Starts the cluster in a task of its own, and waits a moment for it: a start that
        is quick is done within this tick, a long one goes on beside the service's loop."""
        task = asyncio.create_task(self._create(info, revision), name=f"create-{info.id}")
        self._creating[info.id] = task
        task.add_done_callback(lambda done: self._created(info, done))
        await asyncio.wait({task}, timeout=self.settings.create_wait_s)

    def _created(self, info: ClusterInfo, task: asyncio.Task[None]) -> None:
        if self._creating.get(info.id) is task:
            del self._creating[info.id]
        self.wake(info.service)

    async def _create(self, info: ClusterInfo, revision: Revision) -> None:
        started = time.monotonic()
        # The health gate's clock runs from the decision; a start that outlasts it has failed
        # (a RayCluster whose pods cannot be scheduled would otherwise block this service's
        # loop for the provider's own, longer, timeout).
        limit = revision.spec.upgrade.health.timeout_s
        try:
            async with asyncio.timeout(limit):
                info = await self.provider.start(info, revision.spec.cluster)
        except TimeoutError:
            log.error("creating %s: not started within %gs", info.id, limit)
            self._errors[(info.id, revision.number)] = (
                f"cluster start failed: not started within the health timeout ({limit:g}s)"
            )
            return
        except ProviderError as exc:
            log.error("creating %s failed: %s", info.id, exc)
            if exc.permanent:
                self._errors[(info.id, revision.number)] = f"cluster start failed: {exc}"
            return
        except Exception as exc:  # e.g. an environment the OS refuses: no retry can help
            log.exception("creating %s failed", info.id)
            self._errors[(info.id, revision.number)] = f"cluster start failed: {exc!r}"
            return
        self.store.update_cluster(info, ClusterState.RUNNING)
        took = time.monotonic() - started
        self.metrics.step_took("create_cluster", took)
        self._event(info.service, f"cluster {info.id} started in {took:.1f}s")

    async def _deploy(self, cluster: str, revision: Revision, capacity: int | None = None) -> None:
        record = self.store.cluster(cluster)
        if record is None:
            return
        info, _ = record
        started = time.monotonic()
        try:
            await self.serve.deploy(info.dashboard_url, serve_config(revision.spec, info, capacity))
        except ServeApiError as exc:
            log.error("deploying revision %s to %s failed: %s", revision.number, cluster, exc)
            if exc.permanent:
                self._errors[(cluster, revision.number)] = str(exc)
            return
        took = time.monotonic() - started
        self.metrics.step_took("deploy", took)
        at = f" at {capacity}% capacity" if capacity is not None else ""
        self._event(info.service,
                    f"revision {revision.number} sent to {cluster}{at} in {took:.1f}s")  # fmt: skip

    async def _delete(self, info: ClusterInfo) -> None:
        started = time.monotonic()
        creating = self._creating.pop(info.id, None)
        if creating is not None and not creating.done():  # superseded while it started
            creating.cancel()
            # asyncio.wait, not `await creating`: a cancel of *this* task (shutdown) must
            # not be taken for the start's own CancelledError and swallowed.
            await asyncio.wait({creating})
        await self.provider.delete(info)
        self.store.drop_cluster(info.id)
        self._errors = {k: v for k, v in self._errors.items() if k[0] != info.id}
        self._delete_failed.discard(info.id)
        took = time.monotonic() - started
        self.metrics.step_took("delete", took)
        self._event(info.service, f"cluster {info.id} deleted in {took:.1f}s")

    def _event(self, service: str, text: str) -> None:
        log.info("%s: %s", service, text)
        self.store.add_event(service, text, self.clock())


def _shares(table: RouteTable | None) -> set[tuple[str, str, int]]:
    """(route, cluster, weight) of every backend that takes requests in `table`."""
    if table is None:
        return set()
    return {(r.prefix, b.cluster, b.weight) for r in table.routes for b in r.backends
            if b.weight > 0}  # fmt: skip
