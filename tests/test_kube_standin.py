"""Tests of the test doubles for the KubeRay work: the emulated API server (tests/kube.py)
through the real `kubernetes` client, and the KubeRay stand-in (tests/kuberay_standin.py).
The Ray-free parts are fast and unmarked; the ones that start a real Ray head are `ray`."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from kubernetes import client, config, watch

from rollout.providers.local import _alive, _is_gcs
from tests.kube import KubeApi, parse_label_selector
from tests.kuberay_standin import (
    KubeRayStandIn,
    kube,
    kuberay_env,
    service_ports,
    standin_processes,
    validate,
)

__all__ = ["kube", "kuberay_env"]  # fixtures

NS = "raygate"
RC = ("ray.io", "v1")


def crd(api: KubeApi) -> client.CustomObjectsApi:
    config.load_kube_config(config_file=str(api.kubeconfig))  # as `raygate up --kubeconfig`
    return client.CustomObjectsApi()


def raycluster(
    name: str, serve_port: int = 8000, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    head = {
        "name": "ray-head",
        "image": "rayproject/ray:2.60.0",
        "ports": [
            {"name": "dashboard", "containerPort": 8265},
            {"name": "serve", "containerPort": serve_port},
        ],
        "env": [{"name": "STANDIN_TEST", "value": "1"}],
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "rayVersion": "2.60.0",
            "headGroupSpec": {
                "rayStartParams": {"num-cpus": "1"},
                "template": {"spec": {"containers": [head]}},
            },
        },
    }


def create(co: client.CustomObjectsApi, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    obj, status, _headers = co.create_namespaced_custom_object_with_http_info(
        *RC, NS, "rayclusters", body
    )
    return obj, status


def names(co: client.CustomObjectsApi, **kwargs: Any) -> list[str]:
    items = co.list_namespaced_custom_object(*RC, NS, "rayclusters", **kwargs)["items"]
    return sorted(i["metadata"]["name"] for i in items)


def until(check: Callable[[], Any], within_s: float, what: str) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not in {within_s} s: {what}"
        time.sleep(0.1)


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next(
        (c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == ctype), None
    )


# ---- the API server -----------------------------------------------------------------------
def test_kubeconfig_loads_with_the_namespace_and_crud_works(kube: KubeApi) -> None:
    _contexts, current = config.list_kube_config_contexts(config_file=str(kube.kubeconfig))
    assert current["context"]["namespace"] == NS
    co = crd(kube)
    assert names(co) == []  # declared resource: an empty list, not a 404

    obj, status = create(
        co, raycluster("alpha-000001", labels={"app.kubernetes.io/managed-by": "raygate"})
    )
    assert status == 201
    create(co, raycluster("beta-000002"))
    assert (
        co.get_namespaced_custom_object(*RC, NS, "rayclusters", "alpha-000001")["spec"]
        == obj["spec"]
    )
    assert names(co) == ["alpha-000001", "beta-000002"]
    assert names(co, label_selector="app.kubernetes.io/managed-by=raygate") == ["alpha-000001"]

    patched = co.patch_namespaced_custom_object(
        *RC,
        NS,
        "rayclusters",
        "beta-000002",
        {"metadata": {"labels": {"app.kubernetes.io/managed-by": "raygate"}}},
    )
    assert patched["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "raygate"}
    assert names(co, label_selector="app.kubernetes.io/managed-by=raygate") == [
        "alpha-000001",
        "beta-000002",
    ]

    co.delete_namespaced_custom_object(*RC, NS, "rayclusters", "alpha-000001")
    with pytest.raises(client.ApiException) as gone:
        co.get_namespaced_custom_object(*RC, NS, "rayclusters", "alpha-000001")
    assert gone.value.status == 404
    assert json.loads(gone.value.body)["reason"] == "NotFound"
    with pytest.raises(client.ApiException) as again:
        co.delete_namespaced_custom_object(*RC, NS, "rayclusters", "alpha-000001")
    assert again.value.status == 404
    with pytest.raises(client.ApiException) as taken:
        create(co, raycluster("beta-000002"))
    assert taken.value.status == 409 and json.loads(taken.value.body)["reason"] == "AlreadyExists"
    assert client.CoreV1Api().list_namespaced_pod(NS).items == []
    posts = [path for method, path, _agent in kube.requests() if method == "POST"]
    assert posts[0] == f"/apis/ray.io/v1/namespaces/{NS}/rayclusters"


def test_the_server_fills_in_metadata_like_a_real_api_server(kube: KubeApi) -> None:
    co = crd(kube)
    forged = raycluster("alpha-000001")
    forged["metadata"].update(uid="mine", generation=7, resourceVersion="99")
    obj, _ = create(co, forged)
    meta = obj["metadata"]
    assert meta["uid"] != "mine" and len(meta["uid"]) == 36
    assert meta["generation"] == 1
    assert meta["namespace"] == NS
    assert meta["creationTimestamp"].endswith("Z")
    rv = int(meta["resourceVersion"])

    labelled = co.patch_namespaced_custom_object(
        *RC, NS, "rayclusters", "alpha-000001", {"metadata": {"labels": {"a": "b"}}}
    )
    assert labelled["metadata"]["generation"] == 1  # metadata only: no new generation
    assert int(labelled["metadata"]["resourceVersion"]) > rv
    respec = co.patch_namespaced_custom_object(
        *RC, NS, "rayclusters", "alpha-000001", {"spec": {"suspend": False}}
    )
    assert respec["metadata"]["generation"] == 2
    assert respec["metadata"]["uid"] == meta["uid"]
    assert respec["spec"]["headGroupSpec"] == forged["spec"]["headGroupSpec"]  # merge patch
    stored = kube.stored("alpha-000001")
    assert stored is not None and stored["metadata"] == respec["metadata"]
    assert kube.stored("nothing-here") is None


def test_status_is_a_subresource(kube: KubeApi) -> None:
    co = crd(kube)
    create(co, raycluster("alpha-000001"))
    main = co.patch_namespaced_custom_object(
        *RC, NS, "rayclusters", "alpha-000001", {"status": {"state": "ready"}}
    )
    assert "status" not in main
    status = co.patch_namespaced_custom_object_status(
        *RC,
        NS,
        "rayclusters",
        "alpha-000001",
        {"status": {"state": "ready"}, "spec": {"suspend": True}},
    )
    assert status["status"] == {"state": "ready"}
    assert "suspend" not in status["spec"]
    assert status["metadata"]["generation"] == 1


def test_label_selectors() -> None:
    assert parse_label_selector("a=b,c!=d,e,!f,g in (x, y),h notin (z)") == [
        ("a", "=", {"b"}),
        ("c", "!=", {"d"}),
        ("e", "exists", set()),
        ("f", "!exists", set()),
        ("g", "in", {"x", "y"}),
        ("h", "notin", {"z"}),
    ]


def test_list_by_selector_forms_and_a_bad_selector_is_400(kube: KubeApi) -> None:
    co = crd(kube)
    create(co, raycluster("alpha-000001", labels={"tier": "a", "app": "x"}))
    create(co, raycluster("beta-000002", labels={"tier": "b"}))
    assert names(co, label_selector="tier!=a") == ["beta-000002"]
    assert names(co, label_selector="tier in (a,b),!app") == ["beta-000002"]
    assert names(co, label_selector="app") == ["alpha-000001"]
    assert names(co, field_selector="metadata.name=beta-000002") == ["beta-000002"]
    with pytest.raises(client.ApiException) as bad:
        names(co, label_selector="tier in (a")
    assert bad.value.status == 400


def test_a_watch_from_the_python_client_filters_resumes_and_times_out(kube: KubeApi) -> None:
    co = crd(kube)
    create(co, raycluster("alpha-000001", labels={"app.kubernetes.io/managed-by": "raygate"}))
    create(co, raycluster("beta-000002"))
    listed = co.list_namespaced_custom_object(*RC, NS, "rayclusters")["metadata"]["resourceVersion"]

    def watch_once(**kwargs: Any) -> list[tuple[str, str]]:
        stream = watch.Watch().stream(
            co.list_namespaced_custom_object,
            *RC,
            NS,
            "rayclusters",
            label_selector="app.kubernetes.io/managed-by=raygate",
            timeout_seconds=1,
            **kwargs,
        )
        return [(e["type"], e["object"]["metadata"]["name"]) for e in stream]

    started = time.monotonic()
    assert watch_once() == [("ADDED", "alpha-000001")]  # existing objects, selector applied
    assert 0.9 < time.monotonic() - started < 5  # timeoutSeconds ends it
    assert watch_once(resource_version=listed) == []  # nothing newer than the list


def test_a_watch_sees_changes_as_they_happen(kube: KubeApi) -> None:
    co = crd(kube)
    create(co, raycluster("alpha-000001"))
    watcher = watch.Watch()
    seen: list[tuple[str, str]] = []
    stream = watcher.stream(
        co.list_namespaced_custom_object, *RC, NS, "rayclusters", timeout_seconds=3
    )
    first = next(stream)
    seen.append((first["type"], first["object"]["metadata"]["name"]))
    create(co, raycluster("beta-000002"))
    co.delete_namespaced_custom_object(*RC, NS, "rayclusters", "alpha-000001")
    for event in stream:
        seen.append((event["type"], event["object"]["metadata"]["name"]))
        if len(seen) == 3:
            watcher.stop()
    assert seen == [
        ("ADDED", "alpha-000001"),
        ("ADDED", "beta-000002"),
        ("DELETED", "alpha-000001"),
    ]


def test_a_request_without_the_token_is_401(kube: KubeApi) -> None:
    assert (
        httpx.get(
            kube.url + "/apis/ray.io/v1/namespaces/raygate/rayclusters", trust_env=False
        ).status_code
        == 401
    )
    assert (
        httpx.put(kube.url + "/api/v1/namespaces/raygate/pods/x", trust_env=False).status_code
        == 401
    )


@pytest.mark.parametrize(
    ("verb", "status", "reason"),
    [
        ("create", 403, "Forbidden"),
        ("create", 422, "Invalid"),
        ("list", 429, "TooManyRequests"),
        ("get", 500, "InternalError"),
        ("patch", 503, "ServiceUnavailable"),
        ("delete", 403, "Forbidden"),
    ],
)
def test_injected_faults_answer_a_status_object(
    kube: KubeApi, verb: str, status: int, reason: str
) -> None:
    co = crd(kube)
    create(co, raycluster("alpha-000001"))
    calls: dict[str, Callable[[], Any]] = {
        "create": lambda: create(co, raycluster("beta-000002")),
        "list": lambda: names(co),
        "get": lambda: co.get_namespaced_custom_object(*RC, NS, "rayclusters", "alpha-000001"),
        "patch": lambda: co.patch_namespaced_custom_object(
            *RC, NS, "rayclusters", "alpha-000001", {"spec": {"a": 1}}
        ),
        "delete": lambda: co.delete_namespaced_custom_object(
            *RC, NS, "rayclusters", "alpha-000001"
        ),
    }
    message = f'rayclusters.ray.io is forbidden: User "raygate" cannot {verb}'
    # A 429 carries Retry-After, which urllib3 under the kubernetes client honours by itself
    # (3 retries of a GET): only a standing 429 reaches the caller.
    fault = kube.fail(verb, status, message, times=None if status == 429 else 1)
    with pytest.raises(client.ApiException) as failed:
        calls[verb]()
    assert failed.value.status == status
    body = json.loads(failed.value.body)
    assert body["kind"] == "Status" and body["apiVersion"] == "v1" and body["status"] == "Failure"
    assert body["code"] == status and body["reason"] == reason and verb in body["message"]
    if status == 429:
        assert failed.value.headers["Retry-After"] == "1"
        assert fault.served == 4
        kube.clear_faults()
    calls[verb]()  # times=1: the next one goes through


def test_a_standing_fault_lasts_until_cleared_and_spares_the_operator(kube: KubeApi) -> None:
    co = crd(kube)
    fault = kube.fail("list", 503, "etcd unavailable")
    for _ in range(3):
        with pytest.raises(client.ApiException):
            names(co)
    operator = client.Configuration()
    operator.host = kube.url
    operator.api_key = {"authorization": "Bearer " + kube.operator_token}
    as_operator = client.CustomObjectsApi(client.ApiClient(operator))
    assert as_operator.list_namespaced_custom_object(*RC, NS, "rayclusters")["items"] == []
    assert fault.served == 3
    kube.clear_faults()
    assert names(co) == []


# ---- KubeRay's rules ------------------------------------------------------------------------
def test_kuberay_validation_rules() -> None:
    def err(obj: dict[str, Any]) -> str:
        found = validate(obj)
        assert found is not None
        return found[1]

    ok = raycluster("a" * 53)
    ok["metadata"]["namespace"] = NS
    assert validate(ok) is None
    too_long = raycluster("a" * 54)
    assert "no more than 53 characters" in err(too_long)
    assert "DNS1035" in err(raycluster("1abc"))
    assert "DNS1035" in err(raycluster("Abc"))
    no_containers = raycluster("abc")
    no_containers["spec"]["headGroupSpec"]["template"]["spec"]["containers"] = []
    assert validate(no_containers) == (
        "InvalidRayClusterSpec",
        "The RayCluster spec is invalid None/abc: headGroupSpec should have at least one container",
    )
    workers = raycluster("abc")
    workers["spec"]["workerGroupSpecs"] = [
        {"groupName": "w", "template": {"spec": {"containers": [{"name": "w"}]}}}
    ]
    assert validate(workers) is None  # the CRD defaults minReplicas and maxReplicas
    workers["spec"]["workerGroupSpecs"][0].update(minReplicas=2, maxReplicas=1)
    assert "greater than maxReplicas" in err(workers)
    both = raycluster("abc")
    both["spec"]["headGroupSpec"]["resources"] = {"CPU": "1"}
    assert "both rayStartParams and Resources" in err(both)


def test_endpoints_follow_kuberay_service_ports() -> None:
    listed = raycluster("abc", serve_port=8101)
    assert service_ports(listed) == {"dashboard": 8265, "serve": 8101, "metrics": 8080}
    bare = raycluster("abc")
    bare["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"] = []
    assert service_ports(bare) == {
        "client": 10001,
        "gcs-server": 6379,
        "dashboard": 8265,
        "metrics": 8080,
        "serve": 8000,
    }
    unnamed = raycluster("abc")
    unnamed["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"] = [
        {"containerPort": 9000}
    ]
    assert service_ports(unnamed) == {"9000-port": 9000, "metrics": 8080}


def test_an_invalid_raycluster_gets_a_warning_event_and_no_status_or_head(
    kuberay_env: tuple[KubeApi, KubeRayStandIn],
) -> None:
    api, standin = kuberay_env
    co = crd(api)
    create(co, raycluster("x" * 54))
    events = until(
        lambda: co.list_namespaced_custom_object("events.k8s.io", "v1", NS, "events")["items"],
        5,
        "an Event",
    )
    assert [(e["type"], e["reason"], e["regarding"]["name"]) for e in events] == [
        ("Warning", "InvalidRayClusterMetadata", "x" * 54)
    ]
    assert "no more than 53 characters" in events[0]["note"]

    def rounds() -> int:  # the stand-in lists cluster-wide, raygate per namespace
        return sum(path == "/apis/ray.io/v1/rayclusters" for _m, path, _a in api.requests())

    seen = rounds()
    until(lambda: rounds() >= seen + 3, 5, "three more reconcile rounds")
    assert "status" not in co.get_namespaced_custom_object(*RC, NS, "rayclusters", "x" * 54)
    assert standin.heads() == {}
    assert len(co.list_namespaced_custom_object("events.k8s.io", "v1", NS, "events")["items"]) == 1
    assert standin.errors == []


# ---- with real Ray ----------------------------------------------------------------------------
@pytest.mark.ray
def test_a_raycluster_gets_a_real_head_and_loses_it_on_delete(
    kuberay_env: tuple[KubeApi, KubeRayStandIn],
) -> None:
    api, standin = kuberay_env
    co = crd(api)
    started = time.monotonic()
    create(co, raycluster("alpha-000001", serve_port=8101))
    create(co, raycluster("clash-000002", serve_port=8101))  # same serve port: refused here

    def get(name: str) -> dict[str, Any]:
        obj: dict[str, Any] = co.get_namespaced_custom_object(*RC, NS, "rayclusters", name)
        return obj

    early = until(lambda: condition(get("alpha-000001"), "HeadPodReady"), 5, "a first status")
    assert early["status"] == "False" and early["reason"] == "ContainersNotReady"
    assert "state" not in get("alpha-000001")["status"]
    ready = until(
        lambda: (c := condition(get("alpha-000001"), "HeadPodReady")) and c["status"] == "True",
        120,
        "ready",
    )
    took = time.monotonic() - started
    own = standin.time_to_ready("alpha-000001")
    print(f"create -> HeadPodReady True: {took:.1f} s (stand-in's pod: {own:.1f} s)")
    assert ready
    status = get("alpha-000001")["status"]
    assert status["state"] == "ready"
    assert condition(get("alpha-000001"), "RayClusterProvisioned")["status"] == "True"  # type: ignore[index]
    assert status["observedGeneration"] == 1
    assert status["endpoints"] == {"dashboard": "8265", "serve": "8101", "metrics": "8080"}
    head = status["head"]
    assert head["serviceIP"] == head["podIP"]
    assert head["podIP"].startswith("127.0.0.") and int(head["podIP"].rsplit(".", 1)[1]) >= 100
    assert head["serviceName"] == "alpha-000001-head-svc" and head["podName"].startswith(
        "alpha-000001-head-"
    )
    version = httpx.get(
        f"http://{head['serviceIP']}:{status['endpoints']['dashboard']}/api/version",
        trust_env=False,
    )
    assert version.status_code == 200 and version.json()["ray_version"] == "2.60.0"

    clash = condition(get("clash-000002"), "HeadPodReady")
    assert (
        clash is not None
        and clash["status"] == "False"
        and clash["reason"] == "StandInServePortInUse"
    )
    assert "network namespace" in clash["message"] and "8101" in clash["message"]
    assert set(standin.heads()) == {"alpha-000001"}

    _ip, pids = standin.heads()["alpha-000001"]
    gcs = next(p for p in pids if _is_gcs(p))
    environ = open(f"/proc/{gcs}/environ", "rb").read().split(b"\0")
    assert b"STANDIN_TEST=1" in environ
    assert not [v for v in environ if v.startswith(b"SERVE_SOCKET_REUSE_PORT_ENABLED")]
    assert b"RAY_CLUSTER_NAME=alpha-000001" in environ
    assert not [v for v in environ if v.startswith(b"RAYGATE_")]

    def head_pod_ready() -> str:
        found = condition(get("alpha-000001"), "HeadPodReady")
        return "" if found is None else str(found["status"])

    standin.set_head_ready("alpha-000001", False)
    until(lambda: head_pod_ready() == "False", 5, "not ready")
    assert get("alpha-000001")["status"]["state"] == "ready"  # KubeRay keeps it
    standin.set_head_ready("alpha-000001", True)
    until(lambda: head_pod_ready() == "True", 5, "ready again")

    co.delete_namespaced_custom_object(*RC, NS, "rayclusters", "clash-000002")
    _ip, pids = standin.heads()["alpha-000001"]
    session = os.getsid(gcs)  # `ray start` ran in a new session: every process of the head
    members = session_members(session)
    assert members and members <= set(pids)
    deleted = time.monotonic()
    co.delete_namespaced_custom_object(*RC, NS, "rayclusters", "alpha-000001")
    until(lambda: not standin_processes(standin.owner), 60, "every head process gone")
    print(
        f"delete -> every process gone: {time.monotonic() - deleted:.1f} s ({len(pids)} processes)"
    )
    assert standin.heads() == {}
    assert not [p for p in pids if _alive(p)]
    assert not session_members(session)  # also what the markers might have missed
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{head['serviceIP']}:8265/api/version", trust_env=False)


def session_members(sid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry)) == sid and _alive(int(entry)):
                    found.add(int(entry))
    return found


@pytest.mark.ray
def test_a_killed_head_is_restarted_in_place_like_a_container(
    kuberay_env: tuple[KubeApi, KubeRayStandIn],
) -> None:
    api, standin = kuberay_env
    co = crd(api)
    create(co, raycluster("alpha-000001", serve_port=8102))

    def head_ready() -> dict[str, Any] | None:
        obj = co.get_namespaced_custom_object(*RC, NS, "rayclusters", "alpha-000001")
        return condition(obj, "HeadPodReady")

    until(lambda: (c := head_ready()) and c["status"] == "True", 120, "ready")
    ip, before = standin.heads()["alpha-000001"]
    session = httpx.get(f"http://{ip}:8265/api/version", trust_env=False).json()["session_name"]
    killed_at = time.monotonic()
    killed = standin.kill_head("alpha-000001")
    assert killed == before
    until(lambda: (c := head_ready()) and c["status"] == "False", 10, "not ready after the kill")
    down = time.monotonic() - killed_at
    until(lambda: (c := head_ready()) and c["status"] == "True", 120, "ready after the restart")
    back = time.monotonic() - killed_at
    print(f"kill -> HeadPodReady False: {down:.1f} s, True again: {back:.1f} s")
    assert not [p for p in before if _alive(p)]
    ip_after, after = standin.heads()["alpha-000001"]
    assert ip_after == ip and not set(after) & set(before)
    assert (
        httpx.get(f"http://{ip}:8265/api/version", trust_env=False).json()["session_name"]
        != session
    )
