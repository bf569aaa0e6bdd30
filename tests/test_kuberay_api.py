"""The KubeRay provider against an emulated API server (tests/kube.py: kmock over HTTP,
reached through the real `kubernetes` client): create, wait for KubeRay, errors and
retries, liveness, delete, orphans. The test plays the KubeRay operator by writing the
status subresource the way KubeRay does (with the operator's own credential), and a small
HTTP server on loopback stands in for the Ray dashboard: no Ray runs here (the end-to-end
tests in test_e2e_kuberay.py run real Ray heads behind the KubeRay stand-in)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from kubernetes import client

from rollout.plan import Liveness
from rollout.providers.base import ClusterInfo, ProviderError, Seen
from rollout.providers.kuberay import KubeRayProvider, KubeRaySettings, load_api_client
from rollout.spec import ServiceSpec, parse_spec
from tests.kube import KubeApi, kube_api

NS = "raygate"


def spec_for(dashboard_port: int, serve_port: int = 18000) -> ServiceSpec:
    """A KubeRay spec whose head container lists the ports raygate dials: the stand-in
    dashboard's, and a serve port."""
    ray = {
        "rayVersion": "2.60.0",
        "headGroupSpec": {"template": {"spec": {"containers": [{
            "name": "ray-head", "image": "rayproject/ray:2.60.0",
            "ports": [{"name": "dashboard", "containerPort": dashboard_port},
                      {"name": "serve", "containerPort": serve_port}],
        }]}}},
    }  # fmt: skip
    return parse_spec({
        "name": "digits", "cluster": {"kuberay": ray},
        "serve": {"applications": [{"name": "a", "route_prefix": "/a", "import_path": "m:app"}]},
    })  # fmt: skip


SPEC = spec_for(8265)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[KubeApi]:
    with kube_api(tmp_path, NS) as emulated:
        yield emulated


@pytest.fixture
async def dashboard() -> AsyncIterator[int]:
    """Stands in for a Ray dashboard, on 127.0.0.1 and on 127.0.0.2 (where a replaced head
    pod comes back), same port: the two paths the provider asks."""

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"ray_version": "2.60.0"})

    async def applications(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/serve/applications/", applications)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = int(runner.addresses[0][1])
    await web.TCPSite(runner, "127.0.0.2", port).start()
    yield port
    await runner.cleanup()


def provider(api: KubeApi, **settings: Any) -> KubeRayProvider:
    options = {"instance": "rg-test", "backoff_s": 0.01, "replica_failure_s": 0.3, **settings}
    return KubeRayProvider(load_api_client(str(api.kubeconfig)), KubeRaySettings(NS, **options))


def operator(api: KubeApi) -> client.CustomObjectsApi:
    """The KubeRay operator's view of the API server (its own service account)."""
    config = client.Configuration()
    config.host = api.url
    config.api_key = {"authorization": f"Bearer {api.operator_token}"}
    return client.CustomObjectsApi(client.ApiClient(config))


def write_status(api: KubeApi, name: str, **status: Any) -> None:
    operator(api).patch_namespaced_custom_object_status(
        "ray.io", "v1", NS, "rayclusters", name, {"status": status}
    )


def ready_status(head_pod: str = "head-1", ip: str = "127.0.0.1") -> dict[str, Any]:
    return {
        "observedGeneration": 1,
        "state": "ready",
        "conditions": [
            {"type": "HeadPodReady", "status": "True", "reason": "HeadPodRunningAndReady"},
            {"type": "RayClusterProvisioned", "status": "True", "reason": "AllPodRunningAndReady"},
        ],
        "head": {"podIP": ip, "serviceIP": ip, "podName": head_pod, "serviceName": "x-head-svc"},
        # A NodePort head Service's: raygate dials the container's ports, not these.
        "endpoints": {"dashboard": "31265", "serve": "30800", "metrics": "8080"},
    }


async def observed_until_up(p: KubeRayProvider, info: ClusterInfo) -> tuple[Seen, list[Seen]]:
    """Observe as the controller does each tick, until UP; returns the last and every one."""
    seen: list[Seen] = []
    for _ in range(200):
        seen.append(await p.observe(info))
        if seen[-1].liveness is Liveness.UP:
            return seen[-1], seen
        await asyncio.sleep(0.02)
    raise AssertionError(f"not up: {seen[-1]}")


async def started(
    api: KubeApi, p: KubeRayProvider, dashboard: int
) -> tuple[ClusterInfo, list[Seen]]:
    """start() creates the RayCluster and returns at once; the test then plays KubeRay: not
    ready first, then ready, as KubeRay reports it. Returns the record once UP."""
    spec = spec_for(dashboard)
    info = await p.start(p.allocate("digits-a1b2c3", "digits", spec.cluster, []), spec.cluster)
    assert api.stored(info.id) is not None, "start() creates the object"
    assert info.serve_host == "" and (await p.observe(info)).liveness is Liveness.STARTING
    write_status(api, info.id, conditions=[
        {"type": "HeadPodReady", "status": "False", "reason": "ContainersNotReady",
         "message": "containers with unready status: [ray-head]"},
    ])  # fmt: skip
    waiting = await p.observe(info)
    assert waiting.liveness is Liveness.STARTING
    assert waiting.message == "HeadPodReady is not True: containers with unready status: [ray-head]"
    write_status(api, info.id, **ready_status())
    last, seen = await observed_until_up(p, info)
    return last.info, seen


async def test_start_creates_the_raycluster_and_observe_learns_its_address(
    api: KubeApi, dashboard: int
) -> None:
    p = provider(api)
    info, _ = await started(api, p, dashboard)
    stored = api.stored("digits-a1b2c3")
    assert stored is not None and stored["metadata"]["labels"]["raygate.io/service"] == "digits"
    # The head Service's IP, at the container's ports (not status.endpoints' node ports).
    assert info.dashboard_url == f"http://127.0.0.1:{dashboard}"
    assert (info.serve_host, info.serve_port, info.bind_host) == ("127.0.0.1", 18000, "0.0.0.0")
    assert info.data["uid"] == stored["metadata"]["uid"] and info.data["head_pod"] == "head-1"
    assert (await p.observe(info)) == Seen(Liveness.UP, info)
    await p.close()


async def test_transient_api_errors_are_retried(api: KubeApi, dashboard: int) -> None:
    api.fail("create", 503, "etcdserver: leader changed", times=2)
    p = provider(api)
    info, _ = await started(api, p, dashboard)
    assert info.serve_port == 18000
    creates = [r for r in api.requests() if r[0] == "POST" and "rayclusters" in r[1]]
    assert len(creates) == 3
    await p.close()


async def test_a_refusal_is_permanent_names_the_reason_and_creates_nothing(api: KubeApi) -> None:
    message = 'rayclusters.ray.io is forbidden: User "raygate" cannot create resource'
    api.fail("create", 403, message)
    p = provider(api)
    info = p.allocate("digits-a1b2c3", "digits", SPEC.cluster, [])
    with pytest.raises(ProviderError) as caught:
        await p.start(info, SPEC.cluster)
    assert caught.value.permanent
    assert str(caught.value) == (f"Kubernetes API refused to create RayCluster digits-a1b2c3 in "
                                 f"namespace {NS}: 403 Forbidden: {message}")  # fmt: skip
    assert api.stored("digits-a1b2c3") is None
    await p.close()


async def test_an_api_server_that_keeps_failing_is_a_retryable_start_failure(
    api: KubeApi,
) -> None:
    api.fail("create", 500, "internal error")
    p = provider(api, attempts=3)
    info = p.allocate("digits-a1b2c3", "digits", SPEC.cluster, [])
    with pytest.raises(ProviderError) as caught:
        await p.start(info, SPEC.cluster)
    assert not caught.value.permanent and "500" in str(caught.value)
    await p.close()


async def test_a_name_taken_by_our_own_earlier_create_is_adopted(
    api: KubeApi, dashboard: int
) -> None:
    """raygate created it, then died before recording that it did: the retry takes it."""
    p = provider(api)
    spec = spec_for(dashboard)
    info = p.allocate("digits-a1b2c3", "digits", spec.cluster, [])
    await asyncio.to_thread(p._objects.create_namespaced_custom_object, "ray.io", "v1", NS,
                            "rayclusters", p.body(info, spec.cluster))  # fmt: skip
    done, _ = await started(api, p, dashboard)
    assert done.serve_port == 18000
    await p.close()


async def test_a_name_taken_by_someone_else_is_not_adopted(api: KubeApi) -> None:
    p = provider(api)
    info = p.allocate("digits-a1b2c3", "digits", SPEC.cluster, [])
    foreign = p.body(info, SPEC.cluster)
    foreign["metadata"]["labels"] = {"team": "other"}
    await asyncio.to_thread(p._objects.create_namespaced_custom_object, "ray.io", "v1", NS,
                            "rayclusters", foreign)  # fmt: skip
    with pytest.raises(ProviderError, match="not this raygate's"):
        await p.start(info, SPEC.cluster)
    assert api.stored("digits-a1b2c3")["metadata"]["labels"] == {"team": "other"}  # type: ignore[index]
    await p.close()


async def test_observe_follows_the_object_and_its_head_pod(api: KubeApi, dashboard: int) -> None:
    p = provider(api)
    info, _ = await started(api, p, dashboard)
    # The kubelet turns the head pod's readiness False: unreachable, not dead.
    status = ready_status()
    status["conditions"][0] = {"type": "HeadPodReady", "status": "False", "reason": "x"}
    write_status(api, info.id, **status)
    assert (await p.observe(info)).liveness is Liveness.UNREACHABLE
    # The API server cannot be asked: the dashboard answers for the cluster.
    write_status(api, info.id, **ready_status())
    api.fail("get", 503, "unavailable")
    assert (await p.observe(info)).liveness is Liveness.UP
    api.clear_faults()
    # KubeRay replaced the head pod (a drain, an eviction): a new pod IP behind the headless
    # head Service. Not dead: raygate follows it there (with GCS fault tolerance it is the
    # same Ray cluster; without, an empty one the planner deploys to again).
    write_status(api, info.id, **ready_status(head_pod="head-2", ip="127.0.0.2"))
    moved = await p.observe(info)
    assert moved.liveness is Liveness.UP
    assert (moved.info.serve_host, moved.info.dashboard_url) == (
        "127.0.0.2", f"http://127.0.0.2:{dashboard}")  # fmt: skip
    assert moved.info.data["head_pod"] == "head-2"
    # Deleted, and made again by someone under the same name: not the cluster raygate made.
    await p.delete(info)
    assert (await p.observe(moved.info)).liveness is Liveness.DEAD
    await asyncio.to_thread(p._objects.create_namespaced_custom_object, "ray.io", "v1", NS,
                            "rayclusters", p.body(info, spec_for(dashboard).cluster))  # fmt: skip
    write_status(api, info.id, **ready_status())
    assert (await p.observe(moved.info)).liveness is Liveness.DEAD
    await p.close()


async def test_a_start_that_never_finished_is_dead_only_when_its_object_is_gone(
    api: KubeApi, dashboard: int
) -> None:
    """raygate was stopped while KubeRay brought the cluster up: the record has no address.
    The restarted raygate keeps waiting for the object it made; one that is gone is dead
    (the planner starts a fresh one)."""
    p = provider(api)
    spec = spec_for(dashboard)
    info = p.allocate("digits-a1b2c3", "digits", spec.cluster, [])
    assert (await p.observe(info)).liveness is Liveness.DEAD  # never created
    await p.start(info, spec.cluster)
    assert (await p.observe(info)).liveness is Liveness.STARTING
    await p.close()


async def test_a_missing_crd_is_an_error_not_a_deleted_cluster(
    api: KubeApi, dashboard: int
) -> None:
    """A 404 for the resource type (the CRD uninstalled, a proxy routing elsewhere) says
    nothing of the object: a live cluster must not be declared dead for it."""
    p = provider(api)
    info, _ = await started(api, p, dashboard)
    api.fail("get", 404, "the server could not find the requested resource", details={})
    seen = await p.observe(info)
    assert seen.liveness is Liveness.UP and "could not find" in seen.message
    await p.close()


async def test_replica_failure_held_fails_the_start_with_kuberays_message(
    api: KubeApi, dashboard: int
) -> None:
    p = provider(api)
    spec = spec_for(dashboard)
    info = await p.start(p.allocate("digits-a1b2c3", "digits", spec.cluster, []), spec.cluster)
    quota = 'pods "digits-a1b2c3-head-x" is forbidden: exceeded quota: compute, requested: cpu=2'
    write_status(api, info.id, conditions=[
        {"type": "HeadPodReady", "status": "False", "reason": "HeadPodNotFound"},
        {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreateHeadPod",
         "message": quota},
    ])  # fmt: skip
    first = await p.observe(info)
    assert first.liveness is Liveness.STARTING and first.error is None  # may be brief
    await asyncio.sleep(0.35)  # past replica_failure_s (0.3 s here)
    held = await p.observe(info)
    assert held.error == f"KubeRay cannot create the pods of RayCluster {info.id}: {quota}"
    await p.close()


async def test_delete_is_idempotent_and_a_refused_delete_raises(
    api: KubeApi, dashboard: int
) -> None:
    p = provider(api)
    info, _ = await started(api, p, dashboard)
    api.fail("delete", 403, "forbidden", times=1)
    with pytest.raises(ProviderError) as caught:
        await p.delete(info)
    assert caught.value.permanent and api.stored(info.id) is not None
    await p.delete(info)
    await p.delete(info)  # already gone: success
    assert api.stored(info.id) is None
    await p.close()


async def test_orphans_are_only_this_raygates_unknown_rayclusters(api: KubeApi) -> None:
    """Another raygate in the namespace (its own state dir: its own instance id) keeps its
    RayClusters, even when this one starts with an empty store."""
    p = provider(api)
    known = p.allocate("digits-000001", "digits", SPEC.cluster, [])
    mine = p.allocate("digits-000002", "digits", SPEC.cluster, [])
    other_instance = provider(api, instance="rg-other")
    theirs = other_instance.allocate("digits-000003", "digits", SPEC.cluster, [])
    create = p._objects.create_namespaced_custom_object
    for owner, info in ((p, known), (p, mine), (other_instance, theirs)):
        await asyncio.to_thread(create, "ray.io", "v1", NS, "rayclusters",
                                owner.body(info, SPEC.cluster))  # fmt: skip
    unlabelled = p.body(p.allocate("hand-made", "x", SPEC.cluster, []), SPEC.cluster)
    unlabelled["metadata"]["labels"] = {}
    await asyncio.to_thread(create, "ray.io", "v1", NS, "rayclusters", unlabelled)
    assert await p.orphans([known]) == ["digits-000002"]
    assert api.stored("digits-000002") is None
    for name in ("digits-000001", "digits-000003", "hand-made"):
        assert api.stored(name) is not None, name
    assert await other_instance.orphans([]) == ["digits-000003"]
    assert api.stored("digits-000001") is not None, "never another instance's"
    await p.close()
    await other_instance.close()


async def test_one_api_call_against_a_hung_api_server_stays_within_its_budget(
    tmp_path: Path,
) -> None:
    """urllib3 retries 3 times under the client by default: a hung API server would cost 4x
    each call's timeout. A socket that accepts and never answers stands in for it."""
    import socket
    import time

    import yaml

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{hung.getsockname()[1]}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }  # fmt: skip
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    settings = KubeRaySettings(NS, "rg-test", request_timeout_s=0.5, attempts=1)
    p = KubeRayProvider(load_api_client(str(tmp_path / "kubeconfig")), settings)
    began = time.monotonic()
    with pytest.raises(ProviderError):
        await p.orphans([])
    took = time.monotonic() - began
    hung.close()
    await p.close()
    assert took < 1.5, f"one call with a 0.5 s timeout took {took:.1f}s"
