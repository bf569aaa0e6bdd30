"""The controller itself, tick by tick, with the real planner and the real SQLite store.

Doubles sit at our own interfaces only, and are named as such:
- `ProviderDouble` is a `ClusterProvider` whose faults a test chooses (a start that fails or
  is held open, no free slot, a delete that fails, a cluster that dies or stops answering);
- `DataPlaneDouble` is a `DataPlane` that records every table it is given and can refuse one;
- `ServeDouble` answers the Serve REST API and the Serve proxy of each started cluster over
  httpx's MockTransport, so the real ServeClient and HealthChecker run against it.
Time is an injected clock; nothing sleeps to synchronise: a test holds an await open with an
event and waits for the controller to reach it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.routes import RouteTable
from rollout.controller import Controller, ControllerSettings
from rollout.plan import Liveness, ServiceState
from rollout.providers.base import ClusterInfo, ProviderError, Seen
from rollout.spec import ClusterSpec, ServiceSpec, parse_spec
from rollout.store import ClusterState, Conflict, Store


def make_spec(cpus: int = 2, label: str = "a", dead_after: float = 60.0) -> ServiceSpec:
    return parse_spec({
        "name": "svc",
        "cluster": {"num_cpus": cpus},
        "serve": {"applications": [{
            "name": "app", "route_prefix": "/app", "import_path": "m:app",
            "deployments": [{"name": "D", "user_config": {"label": label}}],
        }]},
        "upgrade": {"health": {"timeout_s": 100, "consecutive_successes": 2},
                    "drain_timeout_s": 30},
        "liveness": {"dead_after_s": dead_after},
    })  # fmt: skip


@dataclass
class FakeCluster:
    info: ClusterInfo
    config: dict[str, Any] | None = None  # the Serve config last PUT
    dashboard: bool = True  # answers its REST API
    proxy: bool = True  # its Serve proxy answers
    gone: bool = False


class ServeDouble:
    """Serve's REST API (dashboard) and proxy for every started cluster: whatever config is
    PUT runs at once, every app RUNNING and every deployment HEALTHY."""

    def __init__(self) -> None:
        self.by_dashboard: dict[str, FakeCluster] = {}
        self.by_serve: dict[str, FakeCluster] = {}
        self.reject: str | None = None  # a PUT answers 400 with this

    def add(self, cluster: FakeCluster) -> None:
        self.by_dashboard[cluster.info.dashboard_url.split("://")[1]] = cluster
        self.by_serve[f"{cluster.info.serve_host}:{cluster.info.serve_port}"] = cluster

    def handler(self, request: httpx.Request) -> httpx.Response:
        host = f"{request.url.host}:{request.url.port}"
        if host in self.by_dashboard:
            return self._dashboard(self.by_dashboard[host], request)
        if host in self.by_serve:
            return self._proxy(self.by_serve[host], request)
        raise httpx.ConnectError("connection refused", request=request)

    def _dashboard(self, c: FakeCluster, request: httpx.Request) -> httpx.Response:
        if c.gone or not c.dashboard:
            raise httpx.ReadTimeout("dashboard does not answer", request=request)
        if request.method == "PUT":
            if self.reject is not None:
                return httpx.Response(400, text=self.reject)
            c.config = json.loads(request.content)
            return httpx.Response(200)
        apps = {}
        for app in (c.config or {}).get("applications", []):
            deployments = {d["name"]: {"status": "HEALTHY", "target_num_replicas": 1,
                                       "replicas": [{"state": "RUNNING"}]}
                           for d in app.get("deployments", [])}  # fmt: skip
            apps[app["name"]] = {"status": "RUNNING", "deployed_app_config": app,
                                 "deployments": deployments}  # fmt: skip
        proxies = {"node": {"status": "HEALTHY"}} if c.config else {}
        return httpx.Response(200, json={"applications": apps, "proxies": proxies})

    def _proxy(self, c: FakeCluster, request: httpx.Request) -> httpx.Response:
        if c.gone or not c.proxy or c.config is None:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/-/healthz":
            return httpx.Response(200, text="success")
        if request.url.path == "/-/routes":
            return httpx.Response(200, json={a["route_prefix"]: a["name"]
                                             for a in c.config["applications"]})  # fmt: skip
        return httpx.Response(404)


@dataclass
class ProviderDouble:
    """A ClusterProvider whose faults the test chooses."""

    serve: ServeDouble
    slots: int = 4
    name: str = "double"
    clusters: dict[str, FakeCluster] = field(default_factory=dict)
    start_error: ProviderError | Exception | None = None
    hold_start: asyncio.Event | None = None  # start waits for it
    hold_liveness: asyncio.Event | None = None  # liveness waits for it
    reached: asyncio.Event = field(default_factory=asyncio.Event)  # a held call was reached
    delete_failures: int = 0  # the next N deletes raise
    started: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    keeps_clusters: bool = False

    def check(self, spec: ServiceSpec) -> list[tuple[str, str]]:
        return []

    def allocate(
        self, cluster_id: str, service: str, spec: ClusterSpec, taken: Sequence[ClusterInfo]
    ) -> ClusterInfo:
        used = {i.data["slot"] for i in taken}
        free = [s for s in range(self.slots) if s not in used]
        if not free:
            raise ProviderError(f"no free slot among {self.slots}")
        slot = free[0]
        return ClusterInfo(cluster_id, service, self.name, f"http://dash{slot}:8265",
                           f"serve{slot}", 8000, 0.0, {"slot": slot})  # fmt: skip

    async def start(self, info: ClusterInfo, spec: ClusterSpec) -> ClusterInfo:
        if self.hold_start is not None:
            self.reached.set()
            await self.hold_start.wait()
        if self.start_error is not None:
            raise self.start_error
        cluster = FakeCluster(info)
        self.clusters[info.id] = cluster
        self.serve.add(cluster)
        self.started.append(info.id)
        return replace(info, data={**info.data, "pids": [1]})

    async def observe(self, info: ClusterInfo) -> Seen:
        return Seen(await self.liveness(info), info)

    async def liveness(self, info: ClusterInfo) -> Liveness:
        if self.hold_liveness is not None:
            self.reached.set()
            await self.hold_liveness.wait()
        c = self.clusters.get(info.id)
        if c is None or c.gone:
            return Liveness.DEAD
        return Liveness.UP if c.dashboard else Liveness.UNREACHABLE

    async def delete(self, info: ClusterInfo) -> None:
        if self.delete_failures > 0:
            self.delete_failures -= 1
            raise ProviderError(f"deleting {info.id}: the API refused")
        if info.id in self.clusters:
            self.clusters.pop(info.id).gone = True
        self.deleted.append(info.id)

    async def orphans(self, known: Sequence[ClusterInfo]) -> list[str]:
        return []


class DataPlaneDouble:
    """A DataPlane that records the tables it takes, and refuses them while `broken`."""

    def __init__(self) -> None:
        self.tables: list[RouteTable] = []
        self.broken = False
        self.also_routed: set[str] = set()

    async def apply(self, table: RouteTable) -> None:
        if self.broken:
            raise OSError("engine refused the table")
        self.tables.append(table)

    async def in_flight(self) -> Mapping[str, int]:
        return {}

    async def routed(self) -> set[str]:
        """What the last table it took routes to (a refused table is not in force), and
        whatever a test says some older part of it still routes to."""
        return (self.tables[-1].routed() if self.tables else set()) | self.also_routed

    async def drain(self, timeout_s: float) -> None:
        return None

    def weights(self) -> dict[str, int]:
        if not self.tables:
            return {}
        return {b.cluster: b.weight for r in self.tables[-1].routes for b in r.backends}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    store: Store
    provider: ProviderDouble
    plane: DataPlaneDouble
    serve: ServeDouble
    clock: Clock
    controller: Controller

    async def tick(self, n: int = 1, dt: float = 1.0) -> None:
        for _ in range(n):
            self.clock.now += dt
            await self.controller.reconcile("svc")

    def status(self) -> tuple[str | None, str | None, str | None]:
        """(active cluster, pending cluster, last rollout result)"""
        state = self.store.load("svc")
        assert state is not None
        last = state.last_rollout
        return (state.active.cluster if state.active else None,
                state.pending.cluster if state.pending else None,
                last.result.value if last else None)  # fmt: skip

    def last_message(self) -> str:
        state = self.store.load("svc")
        assert state is not None and state.last_rollout is not None
        return state.last_rollout.message

    def records(self) -> dict[str, ClusterState]:
        return {info.id: s for info, s in self.store.clusters()}

    async def live(self, spec: ServiceSpec | None = None) -> str:
        self.store.push(spec or make_spec(), self.clock.now)
        await self.tick(4)  # create, deploy, two healthy checks in a row
        active, pending, result = self.status()
        assert active is not None and pending is None and result == "succeeded"
        return active


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    serve = ServeDouble()
    provider = ProviderDouble(serve)
    plane = DataPlaneDouble()
    store = Store(tmp_path / "raygate.db")
    clock = Clock()
    async with httpx.AsyncClient(transport=httpx.MockTransport(serve.handler)) as http:
        controller = Controller(store, provider, plane, http, clock=clock)
        yield Rig(store, provider, plane, serve, clock, controller)
    store.close()


async def test_first_deploy_goes_live_and_routes_to_the_new_cluster(rig: Rig) -> None:
    active = await rig.live()
    assert rig.provider.started == [active]
    assert rig.plane.weights() == {active: 100}


async def test_a_failed_cluster_start_aborts_with_its_reason(rig: Rig) -> None:
    rig.provider.start_error = ProviderError("`ray start` exited with 1: bad flag")
    rig.store.push(make_spec(), rig.clock.now)
    await rig.tick(2)
    assert rig.status() == (None, None, "aborted")
    assert "exited with 1: bad flag" in rig.last_message()
    assert rig.records() == {}, "the failed cluster's record is deleted"


async def test_an_unexpected_start_error_aborts_instead_of_retrying_forever(rig: Rig) -> None:
    # What the OS says of an environment variable named "A=B" when raygate spawns Ray.
    rig.provider.start_error = ValueError("illegal environment variable name")
    rig.store.push(make_spec(), rig.clock.now)
    await rig.tick(3)
    assert rig.status() == (None, None, "aborted")
    assert "illegal environment variable name" in rig.last_message()


async def test_a_start_that_outlasts_the_health_timeout_aborts_and_frees_the_loop(
    rig: Rig,
) -> None:
    """A RayCluster whose pods are never scheduled: the provider would wait its own, longer,
    timeout, blocking the service's loop; the health gate's timeout ends it."""
    rig.provider.hold_start = asyncio.Event()  # never set: the start never returns
    raw = make_spec().to_json()
    raw["upgrade"]["health"]["timeout_s"] = 0.3
    rig.store.push(parse_spec(raw), rig.clock.now)
    await asyncio.wait_for(rig.tick(2), 10)
    assert rig.status() == (None, None, "aborted")
    assert rig.last_message() == (
        "cluster start failed: not started within the health timeout (0.3s)"
    )


async def test_no_free_slot_reaches_the_status_as_a_clear_message(rig: Rig) -> None:
    rig.provider.slots = 0
    rig.store.push(make_spec(), rig.clock.now)
    await rig.tick()
    assert rig.status() == (None, None, "aborted")
    assert rig.last_message() == "cannot create a cluster: no free slot among 0"
    assert rig.records() == {} and rig.provider.started == []


async def test_a_serve_config_rejected_with_a_4xx_aborts_and_the_live_cluster_stays(
    rig: Rig,
) -> None:
    live = await rig.live()
    rig.serve.reject = "invalid import path"
    rig.store.push(make_spec(cpus=4), rig.clock.now)
    await rig.tick(3)
    assert rig.status() == (live, None, "aborted")
    assert "invalid import path" in rig.last_message()
    assert rig.plane.weights() == {live: 100}
    assert set(rig.records()) == {live}


async def test_a_failed_delete_is_retried_until_the_cluster_is_gone(rig: Rig) -> None:
    old = await rig.live()
    rig.store.push(make_spec(cpus=4), rig.clock.now)
    await rig.tick(4)
    new, pending, _ = rig.status()
    assert new != old and pending is None
    rig.provider.delete_failures = 2
    await rig.tick()  # drained (nothing in flight): deleting fails ...
    assert rig.records()[old] is ClusterState.DELETING and not rig.provider.deleted
    await rig.tick()  # ... and fails again ...
    assert old in rig.records()
    await rig.tick()  # ... and is tried again until done
    assert rig.provider.deleted == [old] and set(rig.records()) == {new}
    said = [e["text"] for e in rig.store.events("svc") if "failed" in e["text"]]
    assert len(said) == 1, "one event for a deletion that keeps failing, not one a tick"


async def test_a_failed_store_commit_does_nothing_and_the_next_tick_goes_on(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.store.push(make_spec(), rig.clock.now)
    real = rig.store.commit
    calls = []

    def failing(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        raise OSError("disk full")

    monkeypatch.setattr(rig.store, "commit", failing)
    with pytest.raises(OSError):
        await rig.tick()
    assert calls and rig.provider.started == [] and rig.records() == {}
    monkeypatch.setattr(rig.store, "commit", real)
    await rig.tick(4)
    assert rig.status()[0] is not None and len(rig.provider.started) == 1


async def test_a_delete_during_a_reconcile_is_honoured(rig: Rig) -> None:
    live = await rig.live()
    rig.provider.hold_liveness = hold = asyncio.Event()
    rig.provider.reached.clear()
    tick = asyncio.create_task(rig.tick())
    await asyncio.wait_for(rig.provider.reached.wait(), 5)  # the reconcile is observing
    assert rig.store.mark_deleting("svc")  # the admin API answered 202
    hold.set()
    rig.provider.hold_liveness = None
    with pytest.raises(Conflict):  # its stale decision is refused, nothing done
        await tick
    state = rig.store.load("svc")
    assert state is not None and state.deleting, "the DELETE was lost"
    await rig.tick(2)  # drained at once: nothing in flight
    assert rig.provider.deleted == [live]
    await rig.tick()
    assert rig.store.load("svc") is None and rig.records() == {}


async def test_a_push_during_a_reconcile_is_honoured(rig: Rig) -> None:
    live = await rig.live()
    rig.provider.hold_liveness = hold = asyncio.Event()
    rig.provider.reached.clear()
    tick = asyncio.create_task(rig.tick())
    await asyncio.wait_for(rig.provider.reached.wait(), 5)
    rig.store.push(make_spec(label="b"), rig.clock.now)
    hold.set()
    rig.provider.hold_liveness = None
    with pytest.raises(Conflict):  # the next tick plans again
        await tick
    await rig.tick(3)
    state = rig.store.load("svc")
    assert state is not None and state.active is not None
    assert (state.active.cluster, state.active.revision) == (live, 2)
    cluster = rig.provider.clusters[live]
    assert cluster.config is not None
    assert cluster.config["applications"][0]["deployments"][0]["user_config"] == {"label": "b"}


async def test_a_cluster_still_routed_is_never_deleted_while_routes_fail(rig: Rig) -> None:
    old = await rig.live()
    rig.store.push(make_spec(cpus=4), rig.clock.now)
    await rig.tick(3)  # the new cluster passes one gate
    rig.plane.broken = True  # the engine refuses every table from now on
    await rig.tick(1)  # the switch is decided and committed, but not in force
    new, _, _ = rig.status()
    assert new != old
    assert rig.plane.weights() == {old: 100, new: 0}
    await rig.tick(40)  # far past the drain timeout
    assert rig.provider.deleted == [], "deleted a cluster the gateway still routes to"
    rig.plane.broken = False
    await rig.tick()
    assert rig.plane.weights() == {new: 100}
    assert rig.provider.deleted == [old]


async def test_a_gone_active_cluster_is_replaced_with_its_revision(rig: Rig) -> None:
    old = await rig.live()
    rig.provider.clusters[old].gone = True
    await rig.tick()
    assert rig.provider.deleted == [old]
    await rig.tick(3)
    new, pending, _ = rig.status()
    assert new not in (None, old) and pending is None
    assert rig.plane.weights() == {new: 100}


async def test_a_stalled_dashboard_changes_nothing_and_shows_in_the_state(rig: Rig) -> None:
    live = await rig.live()
    rig.provider.clusters[live].dashboard = False  # the Serve proxy still answers
    await rig.tick(30, dt=10)  # five minutes, well past the 60 s window
    assert rig.status()[:2] == (live, None)
    assert rig.provider.started == [live] and rig.provider.deleted == []
    state = rig.store.load("svc")
    assert state is not None and state.unreachable_since(live) == 1000.0 + 4 + 10


async def test_a_silent_cluster_is_replaced_gated_then_switched(rig: Rig) -> None:
    old = await rig.live()
    fake = rig.provider.clusters[old]
    fake.dashboard = fake.proxy = False
    await rig.tick(6, dt=10)  # 50 s: inside the 60 s window
    assert rig.provider.started == [old]
    await rig.tick(1, dt=10)
    _, pending, _ = rig.status()
    assert pending is not None and rig.provider.started == [old, pending]
    assert rig.plane.weights() == {old: 100, pending: 0}, "traffic stays until it passes"
    await rig.tick(3)
    assert rig.status()[:2] == (pending, None)
    assert rig.plane.weights()[pending] == 100
    await rig.tick()
    assert rig.provider.deleted == [old]


async def test_no_cluster_is_deleted_while_the_data_plane_may_route_anywhere(rig: Rig) -> None:
    """An old HAProxy worker adopted without its table may route anywhere (ANY_CLUSTER)."""
    from gateway.dataplane import ANY_CLUSTER

    old = await rig.live()
    rig.store.push(make_spec(cpus=4), rig.clock.now)
    await rig.tick(4)
    new, _, _ = rig.status()
    assert new != old
    rig.plane.also_routed = {ANY_CLUSTER}
    await rig.tick(5, dt=60)
    assert rig.provider.deleted == [] and rig.records()[old] is ClusterState.DELETING
    rig.plane.also_routed = set()
    await rig.tick()
    assert rig.provider.deleted == [old]


async def test_a_push_supersedes_a_rollout_whose_cluster_is_still_starting(
    tmp_path: Path,
) -> None:
    """A RayCluster can take minutes to come up (pods pending, images pulling). Its start
    runs beside the service's loop, which goes on observing (STARTING) and planning: the
    user's corrected push is acted on at once, and the cluster being started is deleted."""
    serve = ServeDouble()
    provider = ProviderDouble(serve)
    store = Store(tmp_path / "raygate.db")
    async with httpx.AsyncClient(transport=httpx.MockTransport(serve.handler)) as http:
        controller = Controller(store, provider, DataPlaneDouble(), http,
                                ControllerSettings(tick_s=0.05))  # fmt: skip
        await controller.start()
        try:

            async def until(check: Callable[[], bool], within_s: float) -> bool:
                deadline = asyncio.get_running_loop().time() + within_s
                while asyncio.get_running_loop().time() < deadline:
                    if check():
                        return True
                    await asyncio.sleep(0.05)  # the store has no event to await
                return False

            def state() -> ServiceState:
                loaded = store.load("svc")
                assert loaded is not None
                return loaded

            store.push(make_spec(), 0.0)
            controller.wake("svc")
            assert await until(lambda: state().active is not None, 10)
            provider.hold_start = asyncio.Event()  # the next cluster never comes up
            provider.reached.clear()
            store.push(make_spec(cpus=4), 0.0)
            controller.wake("svc")
            await asyncio.wait_for(provider.reached.wait(), 10)
            stuck = state().pending
            assert stuck is not None and stuck.revision == 2
            store.push(make_spec(cpus=8), 0.0)  # the user's fix
            controller.wake("svc")
            assert await until(lambda: (p := state().pending) is not None and p.revision == 3, 5), (
                f"pending still {state().pending}"
            )
            assert await until(lambda: store.cluster(stuck.cluster) is None, 5), (
                "the cluster whose start was superseded is deleted"
            )
        finally:
            assert provider.hold_start is not None
            provider.hold_start.set()
            await controller.stop(delete_clusters=False)
            store.close()


async def test_recovery_does_not_wait_on_an_api_server_that_hangs(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The orphan sweep asks the Kubernetes API; one that accepts and never answers must
    not hold raygate's start (the kubelet would kill a pod that never gets ready)."""
    import rollout.controller

    monkeypatch.setattr(rollout.controller, "ORPHAN_SWEEP_S", 0.2, raising=False)
    hung = asyncio.Event()

    async def orphans(known: Sequence[ClusterInfo]) -> list[str]:
        await hung.wait()
        return []

    monkeypatch.setattr(rig.provider, "orphans", orphans)
    await asyncio.wait_for(rig.controller.recover(), 5)


class CleaningStartDouble(ProviderDouble):
    """A provider whose start, when cancelled, first stops what it began (as the local
    provider would have to: its `ray start` runs on in a session of its own), and that
    cleanup is itself an await."""

    def __init__(self, serve: ServeDouble) -> None:
        super().__init__(serve)
        self.cleaning = asyncio.Event()

    async def start(self, info: ClusterInfo, spec: ClusterSpec) -> ClusterInfo:
        try:
            return await super().start(info, spec)
        except asyncio.CancelledError:
            self.cleaning.set()
            await asyncio.sleep(0.5)  # the double's model of a cleanup's duration
            raise


async def test_stop_returns_while_a_superseded_start_is_being_cancelled(tmp_path: Path) -> None:
    """A push supersedes a cluster still starting: `_delete` cancels its start and waits for
    it. A shutdown (SIGTERM) arriving then cancels the service loop; that cancellation must
    end the loop, or `stop()` waits on it for ever and raygate never exits."""
    serve = ServeDouble()
    provider = CleaningStartDouble(serve)
    store = Store(tmp_path / "raygate.db")
    async with httpx.AsyncClient(transport=httpx.MockTransport(serve.handler)) as http:
        controller = Controller(store, provider, DataPlaneDouble(), http,
                                ControllerSettings(tick_s=0.05, create_wait_s=0.05))  # fmt: skip
        await controller.start()
        provider.hold_start = asyncio.Event()  # no cluster comes up
        store.push(make_spec(), 0.0)
        controller.wake("svc")
        await asyncio.wait_for(provider.reached.wait(), 10)
        store.push(make_spec(cpus=4), 0.0)  # supersedes the cluster being started
        controller.wake("svc")
        await asyncio.wait_for(provider.cleaning.wait(), 10)
        stopping = asyncio.create_task(controller.stop(delete_clusters=False))
        done, _ = await asyncio.wait({stopping}, timeout=5)
        if not done:  # free the stuck loop so the test itself ends
            for task in list(controller._tasks.values()):
                task.cancel()
            await stopping
        provider.hold_start.set()
        store.close()
        assert stopping in done, "stop() did not return: the service loop outlived its cancel"
