"""The KubeRay provider's pure parts: the RayCluster it creates, how it reads KubeRay's
status, the errors it reports, and what a push under each provider is refused for. The
parts that talk to an API server run against kmock in tests/test_e2e_kuberay.py."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException

from rollout.controller import serve_config
from rollout.providers.base import ClusterInfo
from rollout.providers.kuberay import (
    KubeRayProvider,
    KubeRaySettings,
    address,
    api_error,
    identity,
    readiness,
)
from rollout.providers.local import LocalProvider, LocalSettings
from rollout.spec import SpecError, head_ports, parse_spec

HEAD = {
    "rayStartParams": {"num-cpus": "2"},
    "template": {"spec": {"containers": [{"name": "ray-head", "image": "rayproject/ray:2.60.0"}]}},
}
RAY = {"rayVersion": "2.60.0", "headGroupSpec": HEAD}
SERVE = {"applications": [{"name": "a", "route_prefix": "/a", "import_path": "m:app"}]}


def spec(**cluster: Any) -> dict[str, Any]:
    return {"name": "digits", "cluster": cluster, "serve": SERVE}


def provider() -> KubeRayProvider:
    from kubernetes import client

    return KubeRayProvider(client.ApiClient(), KubeRaySettings("ml", instance="blue"))


def test_the_rayclusters_body_lists_the_ports_raygate_dials_and_labels_it_as_ours() -> None:
    p = provider()
    parsed = parse_spec(spec(kuberay=RAY))
    info = p.allocate("digits-a1b2c3", "digits", parsed.cluster, [])
    body = p.body(info, parsed.cluster)
    assert body["apiVersion"] == "ray.io/v1" and body["kind"] == "RayCluster"
    assert body["metadata"] == {
        "name": "digits-a1b2c3",
        "namespace": "ml",
        "labels": {"app.kubernetes.io/managed-by": "raygate", "raygate.io/service": "digits",
                   "raygate.io/instance": "blue"},
    }  # fmt: skip
    # KubeRay's head Service carries only listed ports, its five defaults when none is
    # listed: with none listed, raygate lists those five (workers join at gcs-server).
    ray = body["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in ray["ports"]} == {
        "client": 10001, "gcs-server": 6379, "dashboard": 8265, "metrics": 8080, "serve": 8000,
    }  # fmt: skip
    assert info.data["ports"] == {"dashboard": 8265, "serve": 8000}
    assert parsed.cluster.kuberay == RAY  # the user's spec is not changed in place
    # What KubeRay requires of the object: a DNS-1035 name of at most 53 characters.
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", body["metadata"]["name"])
    assert len(body["metadata"]["name"]) <= 53


def test_ports_the_user_listed_are_kept() -> None:
    ray = copy.deepcopy(RAY)
    ports = [
        {"name": "serve", "containerPort": 9000},
        {"name": "gcs-server", "containerPort": 6379},
    ]
    ray["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"] = ports
    parsed = parse_spec(spec(kuberay=ray))
    p = provider()
    body = p.body(p.allocate("digits-000001", "digits", parsed.cluster, []), parsed.cluster)
    listed = body["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    assert {p["name"]: p["containerPort"] for p in listed} == {
        "serve": 9000, "gcs-server": 6379, "dashboard": 8265,
    }  # fmt: skip


def ready_object(**status: Any) -> dict[str, Any]:
    base = {
        "metadata": {"name": "digits-a1b2c3", "generation": 1, "uid": "u1"},
        "status": {
            "observedGeneration": 1,
            "conditions": [
                {"type": "HeadPodReady", "status": "True"},
                {"type": "RayClusterProvisioned", "status": "True"},
            ],
            "head": {"podIP": "10.0.0.7", "serviceIP": "10.0.0.7", "podName": "digits-head-x"},
            "endpoints": {"dashboard": "8265", "serve": "8000", "metrics": "8080"},
        },
    }
    base["status"].update(status)
    return base


def test_ready_needs_both_conditions_and_the_current_generation() -> None:
    assert readiness(ready_object()) == (True, "")
    not_head = ready_object(conditions=[
        {"type": "HeadPodReady", "status": "False", "message": "containers not ready"},
        {"type": "RayClusterProvisioned", "status": "True"},
    ])  # fmt: skip
    assert readiness(not_head) == (False, "HeadPodReady is not True: containers not ready")
    only_head = ready_object(conditions=[{"type": "HeadPodReady", "status": "True"}])
    assert readiness(only_head)[0] is False
    stale = ready_object(observedGeneration=0)
    assert readiness(stale)[0] is False and "generation 1" in readiness(stale)[1]
    # Older operators write only the state.
    old = ready_object(conditions=[], state="ready")
    assert readiness(old) == (True, "")
    failed = ready_object(conditions=[], state="failed", reason="pods forbidden: exceeded quota")
    assert readiness(failed) == (False, "state failed: pods forbidden: exceeded quota")
    # Where the API server fills in no generation (kmock), the conditions decide.
    assert readiness({"metadata": {}, "status": ready_object()["status"]}) == (True, "")


def test_raygate_dials_the_head_service_ip_while_serve_binds_every_interface() -> None:
    # A NodePort head Service: status.endpoints hold node ports, serviceIP the ClusterIP,
    # whose Service ports are the container's. raygate dials the container's ports.
    obj = ready_object(endpoints={"dashboard": "31265", "serve": "30800"})
    obj["status"]["head"]["serviceIP"] = "10.96.0.9"
    found = address(obj, {"dashboard": 18265, "serve": 18000})
    assert found == {"dashboard_url": "http://10.96.0.9:18265", "serve_host": "10.96.0.9",
                     "serve_port": 18000, "bind_host": "0.0.0.0"}  # fmt: skip
    info = ClusterInfo("digits-a1b2c3", "digits", "kuberay", created_at=0,
                       **address(obj, {"dashboard": 8265, "serve": 8000}))  # fmt: skip
    config = serve_config(parse_spec(spec(kuberay=RAY)), info)
    assert config["http_options"]["host"] == "0.0.0.0"
    assert config["http_options"]["port"] == 8000
    assert info.serve_url == "http://10.96.0.9:8000"
    assert identity(obj) == {"uid": "u1", "head_pod": "digits-head-x"}


def status_error(code: int, reason: str, message: str) -> ApiException:
    exc = ApiException(status=code, reason=reason)
    exc.body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "message": message, "reason": reason, "code": code})  # fmt: skip
    return exc


def test_an_api_refusal_carries_the_servers_own_message_and_is_permanent() -> None:
    forbidden = 'rayclusters.ray.io is forbidden: User "system:serviceaccount:ml:raygate" cannot'
    error = api_error(status_error(403, "Forbidden", forbidden), "create", "RayCluster x", "ml")
    assert error.permanent and error.status == 403
    assert str(error) == (f"Kubernetes API refused to create RayCluster x in namespace ml: "
                          f"403 Forbidden: {forbidden}")  # fmt: skip
    invalid = api_error(status_error(422, "Invalid", "spec.headGroupSpec: Required value"),
                        "create", "RayCluster x", "ml")  # fmt: skip
    assert invalid.permanent and "spec.headGroupSpec: Required value" in str(invalid)
    missing = api_error(
        ApiException(status=404, reason="Not Found"), "create", "RayCluster x", "ml"
    )
    assert missing.permanent and "KubeRay operator installed" in str(missing)


@pytest.mark.parametrize("code", [429, 500, 502, 503, 504])
def test_throttling_and_server_errors_are_transient(code: int) -> None:
    assert not api_error(
        ApiException(status=code, reason="x"), "get", "RayCluster x", "ml"
    ).permanent


def test_no_answer_at_all_is_transient() -> None:
    exc = urllib3.exceptions.MaxRetryError(None, "/apis", "Connection refused")  # type: ignore[arg-type]
    error = api_error(exc, "get", "RayCluster x", "ml")
    assert not error.permanent and "unreachable" in str(error)


def test_the_ports_raygate_dials_follow_the_head_container_and_ray_start_params() -> None:
    def ports(ray: dict[str, Any]) -> dict[str, int]:
        return head_ports(parse_spec(spec(kuberay=ray)).cluster.kuberay or {})

    listed = copy.deepcopy(RAY)
    listed["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"] = [
        {"name": "serve", "containerPort": 9000}]  # fmt: skip
    assert ports(listed) == {"dashboard": 8265, "serve": 9000}
    moved = copy.deepcopy(RAY)
    moved["headGroupSpec"]["rayStartParams"]["dashboard-port"] = "9265"
    assert ports(moved) == {"dashboard": 9265, "serve": 8000}
    p = provider()
    parsed = parse_spec(spec(kuberay=moved))
    body = p.body(p.allocate("digits-a1b2c3", "digits", parsed.cluster, []), parsed.cluster)
    container = body["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {x["name"]: x["containerPort"] for x in container["ports"]}["dashboard"] == 9265


# ---- push-time checks ------------------------------------------------------------------
def problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as caught:
        parse_spec(raw)
    return caught.value.problems


def test_local_fields_and_kuberay_are_mutually_exclusive() -> None:
    found = problems(spec(kuberay=RAY, num_cpus=4, env={"A": "1"}))
    assert [f for f, _ in found] == ["cluster.num_cpus", "cluster.env"]
    assert "local-provider field" in found[0][1]
    # A spec read back from raygate's status (defaults written out) pushes again.
    parse_spec(spec(kuberay=RAY, num_cpus=2, env={}, object_store_memory_mb=200))


@pytest.mark.parametrize(
    ("ray", "field"),
    [
        ({"rayVersion": "2.60.0"}, "cluster.kuberay.headGroupSpec"),
        ({"headGroupSpec": {"template": {"spec": {"containers": []}}}},
         "cluster.kuberay.headGroupSpec.template.spec.containers"),
        ({"headGroupSpec": {"template": {"spec": {"containers": [{"name": "ray"}]}}}},
         "cluster.kuberay.headGroupSpec.template.spec.containers[0].image"),
        ({**RAY, "metadata": {"name": "x"}}, "cluster.kuberay.metadata"),
        ({"headGroupSpec": {**HEAD, "rayStartParams": {"num-cpus": 2}}},
         "cluster.kuberay.headGroupSpec.rayStartParams"),
        ({"headGroupSpec": {"template": {"spec": {"containers": [
            {"image": "ray", "ports": [{"name": "serve", "containerPort": "8000"}]}]}}}},
         "cluster.kuberay.headGroupSpec.template.spec.containers[0].ports"),
    ],
)  # fmt: skip
def test_a_kuberay_spec_missing_what_kuberay_needs_is_refused_by_field(
    ray: dict[str, Any], field: str
) -> None:
    assert field in [f for f, _ in problems(spec(kuberay=ray))]


def test_each_provider_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    kuberay = parse_spec(spec(kuberay=RAY))
    local = parse_spec(spec())
    assert provider().check(kuberay) == []
    assert [f for f, _ in provider().check(local)] == ["cluster.kuberay"]
    digit_first = parse_spec({**spec(kuberay=RAY), "name": "9digits"})
    assert [f for f, _ in provider().check(digit_first)] == ["name"]
    on_this_machine = LocalProvider(LocalSettings(tmp_path))
    assert on_this_machine.check(local) == []
    assert [f for f, _ in on_this_machine.check(kuberay)] == ["cluster.kuberay"]


def test_a_revision_stored_before_the_kuberay_field_keeps_its_hashes() -> None:
    """The hashes of a spec without `kuberay` are what raygate computed before the field
    existed: an upgraded raygate must not see every service as changed."""
    import hashlib

    parsed = parse_spec(spec(num_cpus=2))
    before = {"num_cpus": 2, "object_store_memory_mb": 200, "env": {}, "code_dir": None,
              "python": None}  # fmt: skip
    text = json.dumps(before, sort_keys=True, separators=(",", ":"))
    assert parsed.cluster_hash() == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert parse_spec(spec(kuberay=RAY)).cluster_hash() != parsed.cluster_hash()


def test_the_namespace_defaults_as_kubectls_does(tmp_path: Path) -> None:
    import yaml

    from rollout.providers.kuberay import default_namespace

    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "b",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "a", "context": {"cluster": "c", "user": "u", "namespace": "x"}},
                     {"name": "b", "context": {"cluster": "c", "user": "u", "namespace": "ml"}}],
    }  # fmt: skip
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    assert default_namespace(str(path)) == "ml"
    del config["contexts"][1]["context"]["namespace"]
    path.write_text(yaml.safe_dump(config))
    assert default_namespace(str(path)) == "default"
    assert default_namespace(str(tmp_path / "missing")) == "default"


WORKER = {"groupName": "cpu", "minReplicas": 1, "maxReplicas": 2,
          "template": {"spec": {"containers": [{"name": "w", "image": "ray"}]}}}  # fmt: skip


def with_head(**extra: Any) -> dict[str, Any]:
    ray = copy.deepcopy(RAY)
    ray["headGroupSpec"].update(extra)
    return ray


def with_ports(*ports: dict[str, Any]) -> dict[str, Any]:
    ray = copy.deepcopy(RAY)
    ray["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"] = list(ports)
    return ray


@pytest.mark.parametrize(
    ("ray", "field", "words"),
    [
        # What KubeRay v1.7's ValidateRayClusterSpec refuses with a Warning Event only.
        ({**RAY, "workerGroupSpecs": [{**WORKER, "minReplicas": 3, "maxReplicas": 1}]},
         "cluster.kuberay.workerGroupSpecs[0].minReplicas", "greater than maxReplicas"),
        ({**RAY, "workerGroupSpecs": [{**WORKER, "groupName": ""}]},
         "cluster.kuberay.workerGroupSpecs[0].groupName", "required"),
        (with_head(rayStartParams={"num-cpus": "0"}, resources={"CPU": "0"}),
         "cluster.kuberay.headGroupSpec.resources", "both here and in rayStartParams"),
        (with_head(rayStartParams={"labels": "a=b"}),
         "cluster.kuberay.headGroupSpec.rayStartParams.labels", "top-level labels"),
        # The head Service would hold port 8000 twice: the API server refuses that.
        (with_ports({"name": "http", "containerPort": 8000}),
         "cluster.kuberay.headGroupSpec.template.spec.containers[0].ports", "name it 'serve'"),
        (with_head(rayStartParams={"dashboard-port": "9265"}, template={"spec": {"containers": [
            {"name": "ray", "image": "ray", "ports": [{"name": "dashboard",
                                                      "containerPort": 8265}]}]}}),
         "cluster.kuberay.headGroupSpec.template.spec.containers[0].ports", "dashboard-port"),
        ({**RAY, "authOptions": {"mode": "token"}}, "cluster.kuberay.authOptions",
         "cannot yet authenticate"),
    ],
    ids=["min-over-max", "no-group-name", "cpus-twice", "labels-param",
         "port-named-otherwise", "dashboard-port-mismatch", "token-auth"],
)  # fmt: skip
def test_what_kuberay_would_refuse_is_refused_at_push(
    ray: dict[str, Any], field: str, words: str
) -> None:
    found = dict(problems(spec(kuberay=ray)))
    assert field in found and words in found[field], found


def test_autoscaled_worker_groups_need_no_bounds() -> None:
    ray = {**RAY, "enableInTreeAutoscaling": True,
           "workerGroupSpecs": [{**WORKER, "minReplicas": None, "maxReplicas": None}]}  # fmt: skip
    parse_spec(spec(kuberay=ray))


def test_a_worker_group_without_bounds_is_accepted_the_crd_defaults_them() -> None:
    """KubeRay's CRD defaults minReplicas to 0 and maxReplicas to 2147483647
    (`+kubebuilder:default` on WorkerGroupSpec), and the API server applies schema defaults
    (pruning a null first) before the operator ever validates: the operator's "must set both"
    rule never meets an object that omits them. Refusing such a spec at push refuses one that
    KubeRay runs (e.g. a group with `replicas: 1` only)."""
    group = {k: v for k, v in WORKER.items() if k not in ("minReplicas", "maxReplicas")}
    parse_spec(spec(kuberay={**RAY, "workerGroupSpecs": [{**group, "replicas": 1}]}))


class SlowCreateObjectsDouble:
    """A double of the client's CustomObjectsApi (the blocking calls run in a worker
    thread): its create is in flight until `release` is set, as over a slow API server."""

    def __init__(self) -> None:
        import threading

        self.release = threading.Event()
        self.in_flight = threading.Event()
        self.created = threading.Event()
        self.objects: dict[str, dict[str, Any]] = {}

    def create_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        body = args[4]
        self.in_flight.set()
        self.release.wait(10)
        self.objects[body["metadata"]["name"]] = body
        self.created.set()
        return body

    def delete_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        name = args[4]
        if name not in self.objects:
            exc = ApiException(status=404, reason="Not Found")
            exc.body = json.dumps({"reason": "NotFound", "message": f"{name} not found",
                                   "details": {"name": name}})  # fmt: skip
            raise exc
        return self.objects.pop(name)


async def test_a_start_cancelled_mid_create_leaves_no_raycluster_after_its_delete() -> None:
    """The controller cancels a start that is superseded (or outlasts the health timeout)
    and then deletes the cluster. The create already sent goes on in its worker thread: a
    delete that reaches the API first answers 404 ("gone"), the record is dropped, and the
    RayCluster created a moment later runs on, pods and all, known to no record."""
    import asyncio

    p = provider()
    objects = SlowCreateObjectsDouble()
    p._objects = objects
    raw = spec(kuberay=RAY)
    parsed = parse_spec(raw)
    info = p.allocate("digits-abc123", "digits", parsed.cluster, [])
    starting = asyncio.create_task(p.start(info, parsed.cluster))
    assert await asyncio.to_thread(objects.in_flight.wait, 5)
    starting.cancel()  # what Controller._delete does to a start under way
    asyncio.get_running_loop().call_later(0.3, objects.release.set)  # the answer comes late
    await asyncio.wait({starting})
    await p.delete(info)  # ... and then this
    assert await asyncio.to_thread(objects.created.wait, 5)
    assert not objects.objects, f"left running after its delete: {list(objects.objects)}"
