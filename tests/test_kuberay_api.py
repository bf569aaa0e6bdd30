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
from rollout.providers.base import ClusterInfo, ProviderError
from rollout.providers.kuberay import KubeRayProvider, KubeRaySettings, load_api_client
from rollout.spec import parse_spec
from tests.kube import KubeApi, kube_api

NS = "raygate"
RAY = {
    "rayVersion": "2.60.0",
    "headGroupSpec": {"template": {"spec": {"containers": [
        {"name": "ray-head", "image": "rayproject/ray:2.60.0"}]}}},
}  # fmt: skip
SPEC = parse_spec({
    "name": "digits", "cluster": {"kuberay": RAY},
    "serve": {"applications": [{"name": "a", "route_prefix": "/a", "import_path": "m:app"}]},
})  # fmt: skip


@pytest.fixture
def api(tmp_path: Path) -> Iterator[KubeApi]:
    with kube_api(tmp_path, NS) as emulated:
        yield emulated


@pytest.fixture
async def dashboard() -> AsyncIterator[int]:
    """Stands in for a Ray dashboard on 127.0.0.1: the two paths the provider asks."""

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"ray_version": "2.60.0"})

    async def applications(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/serve/applications/", applications)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield int(runner.addresses[0][1])
    await runner.cleanup()


def provider(api: KubeApi, **settings: Any) -> KubeRayProvider:
    options = {"poll_s": 0.05, "backoff_s": 0.01, "start_timeout_s": 20.0, **settings}
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


def ready_status(dashboard_port: int, head_pod: str = "head-1") -> dict[str, Any]:
    return {
        "observedGeneration": 1,
        "state": "ready",
        "conditions": [
            {"type": "HeadPodReady", "status": "True", "reason": "HeadPodRunningAndReady"},
            {"type": "RayClusterProvisioned", "status": "True", "reason": "AllPodRunningAndReady"},
        ],
        "head": {
            "podIP": "127.0.0.1",
            "serviceIP": "127.0.0.1",
            "podName": head_pod,
            "serviceName": "x-head-svc",
        },
        "endpoints": {"dashboard": str(dashboard_port), "serve": "18000", "metrics": "8080"},
    }


async def play_kuberay(api: KubeApi, name: str, dashboard_port: int) -> None:
    """Once the object exists: not ready first, then ready, as KubeRay reports it."""
    # The object lives in the API server's thread; nothing there to await on: poll.
    while api.stored(name) is None:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    await asyncio.to_thread(write_status, api, name, conditions=[
        {"type": "HeadPodReady", "status": "False", "reason": "HeadPodNotFound"},
    ])  # fmt: skip
    await asyncio.sleep(0.2)
    await asyncio.to_thread(write_status, api, name, **ready_status(dashboard_port))


async def started(api: KubeApi, p: KubeRayProvider, dashboard: int) -> ClusterInfo:
    info = p.allocate("digits-a1b2c3", "digits", SPEC.cluster, [])
    kuberay = asyncio.create_task(play_kuberay(api, info.id, dashboard))
    done = await p.start(info, SPEC.cluster)
    await kuberay
    return done


async def test_start_creates_the_raycluster_and_waits_for_kuberay(
    api: KubeApi, dashboard: int
) -> None:
    p = provider(api)
    info = await started(api, p, dashboard)
    stored = api.stored("digits-a1b2c3")
    assert stored is not None and stored["metadata"]["labels"]["raygate.io/service"] == "digits"
    assert info.dashboard_url == f"http://127.0.0.1:{dashboard}"
    assert (info.serve_host, info.serve_port, info.bind_host) == ("127.0.0.1", 18000, "0.0.0.0")
    assert info.data["uid"] == stored["metadata"]["uid"] and info.data["head_pod"] == "head-1"
    assert await p.liveness(info) is Liveness.UP
    await p.close()


async def test_transient_api_errors_are_retried(api: KubeApi, dashboard: int) -> None:
    api.fail("create", 503, "etcdserver: leader changed", times=2)
    api.fail("get", 429, "too many requests", times=2)
    p = provider(api)
    info = await started(api, p, dashboard)
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
    info = p.allocate("digits-a1b2c3", "digits", SPEC.cluster, [])
    await asyncio.to_thread(p._objects.create_namespaced_custom_object, "ray.io", "v1", NS,
                            "rayclusters", p.body(info, SPEC.cluster))  # fmt: skip
    done = await started(api, p, dashboard)
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


async def test_liveness_follows_the_object_and_its_head_pod(api: KubeApi, dashboard: int) -> None:
    p = provider(api)
    info = await started(api, p, dashboard)
    # The kubelet turns the head pod's readiness False: unreachable, not dead.
    status = ready_status(dashboard)
    status["conditions"][0] = {"type": "HeadPodReady", "status": "False", "reason": "x"}
    write_status(api, info.id, **status)
    assert await p.liveness(info) is Liveness.UNREACHABLE
    # The API server cannot be asked: the dashboard answers for the cluster.
    write_status(api, info.id, **ready_status(dashboard))
    fault = api.fail("get", 503, "unavailable")
    assert await p.liveness(info) is Liveness.UP
    api.clear_faults()
    del fault
    # KubeRay replaced the head pod: a new Ray cluster, without what raygate deployed.
    write_status(api, info.id, **ready_status(dashboard, head_pod="head-2"))
    assert await p.liveness(info) is Liveness.DEAD
    # The object is gone.
    await p.delete(info)
    assert api.stored(info.id) is None
    assert await p.liveness(info) is Liveness.DEAD
    await p.close()


async def test_delete_is_idempotent_and_a_refused_delete_raises(
    api: KubeApi, dashboard: int
) -> None:
    p = provider(api)
    info = await started(api, p, dashboard)
    api.fail("delete", 403, "forbidden", times=1)
    with pytest.raises(ProviderError) as caught:
        await p.delete(info)
    assert caught.value.permanent and api.stored(info.id) is not None
    await p.delete(info)
    await p.delete(info)  # already gone: success
    assert api.stored(info.id) is None
    await p.close()


async def test_orphans_are_only_this_raygates_unknown_rayclusters(api: KubeApi) -> None:
    p = provider(api)
    known = p.allocate("digits-000001", "digits", SPEC.cluster, [])
    mine = p.allocate("digits-000002", "digits", SPEC.cluster, [])
    other_instance = provider(api, instance="green")
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
    await p.close()
    await other_instance.close()
