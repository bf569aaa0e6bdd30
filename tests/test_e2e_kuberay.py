"""End to end through the Kubernetes path: the real `raygate up --provider kuberay`, the real
`kubernetes` client, an emulated API server (kmock) and a KubeRay stand-in that backs each
RayCluster with a real local Ray head (tests/kube.py), the real digits model, load through
the HAProxy gateway.

One raygate runs the story in order (first deploy, in-place change, blue-green under load,
an aborted rollout, an API error, SIGKILL and restart with an orphan, SIGTERM that keeps the
clusters, delete), because every cluster start costs ~15 s here. Each test leaves the
service live for the next.

The stand-in shares one network namespace between its "pods", so each cluster spec gives its
head container a serve port of its own (on Kubernetes, 8000 for all would be right).
"""

from __future__ import annotations

import itertools
import re
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes import client

from tests.harness import EXAMPLES, Load, Raygate, live_cluster, no_failures, wait_for
from tests.kube import KubeApi
from tests.kuberay_standin import KubeRayStandIn, kuberay

pytestmark = pytest.mark.ray

NAMESPACE = "raygate"
APPS = EXAMPLES.parent / "apps"
FORBIDDEN = ('rayclusters.ray.io is forbidden: User "system:serviceaccount:raygate:raygate" '
             'cannot create resource "rayclusters" in API group "ray.io" in the namespace '
             '"raygate"')  # fmt: skip


_SERVE_PORTS = itertools.count(16000)  # below the ephemeral range: see serve_port()


def serve_port() -> int:
    """A serve port of its own for each cluster spec, below the ephemeral port range (and
    between the stand-in's and the local provider's port blocks). Not a free ephemeral
    port: Serve binds 0.0.0.0 on it, and when a head restarts, any outgoing connection on
    this machine may have taken that port number meanwhile (in a pod, 8000 never is)."""
    for port in _SERVE_PORTS:
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise AssertionError("unreachable")


def ray_cluster(env: dict[str, str] | None = None) -> dict[str, Any]:
    """A RayCluster spec for the digits app: the head container's environment carries the
    app's code path, and its serve port is its own (see the module docstring)."""
    variables = {"PYTHONPATH": str(APPS), "OMP_NUM_THREADS": "1", **(env or {})}
    return {
        "rayVersion": "2.60.0",
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "2"},
            "template": {"spec": {"containers": [{
                "name": "ray-head",
                "image": "rayproject/ray:2.60.0-py311",
                "env": [{"name": k, "value": v} for k, v in variables.items()],
                "ports": [{"name": "serve", "containerPort": serve_port()}],
            }]}},
        },
    }  # fmt: skip


def kuberay_spec(
    path: Path, cluster: dict[str, Any], *, label: str, model: str = "logreg",
    import_path: str = "digits:build",
) -> Path:  # fmt: skip
    """The digits spec (serve_configs/digits/v1.yaml) with `cluster.kuberay`."""
    raw: dict[str, Any] = yaml.safe_load((EXAMPLES / "v1.yaml").read_text())
    raw["cluster"] = {"kuberay": cluster}
    app = raw["serve"]["applications"][0]
    app["import_path"] = import_path
    app["args"] = {"model": model}
    app["deployments"][0]["user_config"] = {"label": label}
    path.write_text(yaml.safe_dump(raw))
    return path


class KubeEnv:
    """What the tests read and do on the emulated cluster, as an operator would with
    kubectl: its own credential, so faults injected for raygate's user never hit it."""

    def __init__(self, api: KubeApi, standin: KubeRayStandIn) -> None:
        self.api, self.standin = api, standin
        config = client.Configuration()
        config.host = api.url
        config.api_key = {"authorization": f"Bearer {api.operator_token}"}
        self.objects = client.CustomObjectsApi(client.ApiClient(config))

    def rayclusters(self) -> list[dict[str, Any]]:
        listed = self.objects.list_namespaced_custom_object("ray.io", "v1", NAMESPACE,
                                                            "rayclusters")  # fmt: skip
        return list(listed["items"])

    def raycluster(self, name: str) -> dict[str, Any]:
        found = self.api.stored(name)
        assert found is not None, f"no RayCluster {name}"
        return found

    def creates(self) -> int:
        """RayCluster create requests served so far (the operator never creates one)."""
        return sum(1 for method, path, _ in self.api.requests()
                   if method == "POST" and path.split("?")[0].endswith("/rayclusters"))  # fmt: skip

    def create(self, obj: dict[str, Any]) -> None:
        self.objects.create_namespaced_custom_object("ray.io", "v1", NAMESPACE, "rayclusters", obj)

    def delete(self, name: str) -> None:
        self.objects.delete_namespaced_custom_object("ray.io", "v1", NAMESPACE, "rayclusters",
                                                     name)  # fmt: skip

    def heads(self) -> set[str]:
        """RayClusters whose head has live processes."""
        return {name for name, (_ip, pids) in self.standin.heads().items() if pids}


@dataclass
class World:
    kube: KubeEnv
    rg: Raygate
    specs: Path
    v1: dict[str, Any]  # the first revision's cluster section
    started: float  # when `raygate up` was run


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("kuberay")
    specs = root / "specs"
    specs.mkdir()
    (root / "kube").mkdir()
    with kuberay(root / "kube", NAMESPACE) as (api, standin):
        kube = KubeEnv(api, standin)
        rg = Raygate(root / "state", engine="haproxy", up_args=(
            "--provider", "kuberay", "--kubeconfig", str(api.kubeconfig),
            "--namespace", NAMESPACE,
        ))  # fmt: skip
        v1 = ray_cluster()
        started = time.monotonic()
        rg.start(kuberay_spec(specs / "v1.yaml", v1, label="v1"))
        try:
            yield World(kube, rg, specs, v1, started)
        finally:
            if rg.proc is not None:
                rg.kill(signal.SIGTERM)


def names(kube: KubeEnv) -> set[str]:
    return {o["metadata"]["name"] for o in kube.rayclusters()}


def assert_kuberay_would_take(obj: dict[str, Any], service: str) -> None:
    """What KubeRay requires of a RayCluster, and what raygate promises about its own."""
    meta = obj["metadata"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", meta["name"]) and len(meta["name"]) <= 53
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "raygate"
    assert meta["labels"]["raygate.io/service"] == service
    assert obj["apiVersion"] == "ray.io/v1" and obj["kind"] == "RayCluster"
    ray = obj["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert ray["image"]
    ports = {p["name"]: p["containerPort"] for p in ray["ports"]}
    assert set(ports) >= {"dashboard", "serve"}


def test_first_deploy_goes_live_on_a_raycluster(world: World) -> None:
    cluster = live_cluster(world.rg, 1)
    took = time.monotonic() - world.started
    body = world.rg.predict()
    assert body["prediction"] == 0 and body["label"] == "v1" and body["cluster"] == cluster
    [obj] = world.kube.rayclusters()
    assert obj["metadata"]["name"] == cluster
    assert_kuberay_would_take(obj, "digits")
    # raygate dials the head Service's IP at the published port; Serve bound 0.0.0.0 there.
    head = obj["status"]["head"]
    active = world.rg.status("digits")["active"]
    assert (
        active["serve_url"] == f"http://{head['serviceIP']}:{obj['status']['endpoints']['serve']}"
    )
    print(f"\nfirst deploy through KubeRay: live {took:.1f}s after `raygate up`")


def test_a_serve_only_change_stays_on_the_same_raycluster(world: World) -> None:
    cluster = live_cluster(world.rg)
    spec = kuberay_spec(world.specs / "v1-relabel.yaml", world.v1, label="v1-relabelled")
    with Load(world.rg.url) as load:
        load.wait_for_requests(20)
        out = world.rg.cli("push", str(spec), "--wait")
        assert out.returncode == 0, out.stdout + out.stderr + world.rg.log_tail()
        n = len(load.outcomes)
        load.wait_for_requests(n + 20)
    no_failures(load)
    assert live_cluster(world.rg, 2) == cluster
    assert names(world.kube) == {cluster}, "a serve-only change must not create a RayCluster"
    assert world.kube.creates() == 1
    body = world.rg.predict()
    assert body["label"] == "v1-relabelled" and body["cluster"] == cluster


def test_blue_green_between_two_rayclusters_under_load_fails_nothing(world: World) -> None:
    old = live_cluster(world.rg)
    v2 = ray_cluster(env={"MKL_NUM_THREADS": "1"})
    spec = kuberay_spec(world.specs / "v2.yaml", v2, label="v2", model="svc")
    started = time.monotonic()
    with Load(world.rg.url, workers=3) as load:
        load.wait_for_requests(20)
        out = world.rg.cli("push", str(spec), "--wait")
        switched = time.monotonic() - started
        n = len(load.outcomes)
        load.wait_for_requests(n + 30)
    assert out.returncode == 0, out.stdout + out.stderr + world.rg.log_tail()
    no_failures(load)
    new = live_cluster(world.rg, 3)
    assert new != old
    for worker in load.per_worker:  # one atomic switch: once on v2, never back on v1
        models = [o.model for o in worker]
        assert models[0] == "logreg" and models[-1] == "svc"
        assert set(models[models.index("svc") :]) == {"svc"}
    # The old RayCluster is drained, then deleted: the object, and so its head "pod".
    wait_for("the old RayCluster to be deleted", lambda: names(world.kube) == {new}, 120)
    wait_for("the old head to stop", lambda: old not in world.kube.heads(), 60)
    deleted = time.monotonic() - started
    assert_kuberay_would_take(world.kube.raycluster(new), "digits")
    print(
        f"\nblue-green through KubeRay: live on the new RayCluster {switched:.1f}s after the "
        f"push, old one deleted at {deleted:.1f}s; {len(load.outcomes)} requests, 0 failed"
    )


def test_a_rollout_that_never_gets_healthy_is_aborted_and_its_raycluster_deleted(
    world: World,
) -> None:
    live = live_cluster(world.rg)
    broken = ray_cluster(env={"BROKEN": "1"})
    spec = kuberay_spec(world.specs / "broken.yaml", broken, label="v3",
                        import_path="digits:no_such_builder")  # fmt: skip
    with Load(world.rg.url) as load:
        load.wait_for_requests(10)
        out = world.rg.cli("push", str(spec), "--wait")
    assert out.returncode == 1, out.stdout + out.stderr
    no_failures(load)
    s = world.rg.status("digits")
    assert s["active"]["cluster"] == live and s["last_rollout"]["result"] == "aborted"
    assert "no_such_builder" in s["last_rollout"]["message"]
    wait_for("the failed RayCluster to be deleted", lambda: names(world.kube) == {live}, 120)


def test_an_api_error_reaches_the_status_and_aborts_the_rollout(world: World) -> None:
    live = live_cluster(world.rg)
    world.kube.api.fail("create", 403, FORBIDDEN, reason="Forbidden")
    try:
        spec = kuberay_spec(world.specs / "v4.yaml", ray_cluster(env={"V": "4"}), label="v4")
        out = world.rg.cli("push", str(spec), "--wait", within_s=120)
    finally:
        world.kube.api.clear_faults()
    assert out.returncode == 1, out.stdout + out.stderr
    s = world.rg.status("digits")
    assert s["last_rollout"]["result"] == "aborted"
    message = s["last_rollout"]["message"]
    assert "403 Forbidden" in message and FORBIDDEN in message, message
    assert s["active"]["cluster"] == live and world.rg.predict()["cluster"] == live
    assert names(world.kube) == {live} and world.kube.heads() == {live}


def test_raygate_killed_and_restarted_readopts_its_raycluster_and_deletes_an_orphan(
    world: World,
) -> None:
    live = live_cluster(world.rg)
    orphan = {
        "apiVersion": "ray.io/v1", "kind": "RayCluster",
        "metadata": {"name": "digits-0rphan", "namespace": NAMESPACE, "labels": {
            "app.kubernetes.io/managed-by": "raygate", "raygate.io/service": "digits",
            "raygate.io/instance": (world.rg.state_dir / "instance").read_text().strip()}},
        "spec": ray_cluster(),
    }  # fmt: skip
    foreign = {**orphan, "metadata": {"name": "someone-else", "namespace": NAMESPACE,
                                      "labels": {"team": "other"}}}  # fmt: skip
    with Load(world.rg.url) as load:
        load.wait_for_requests(10)
        assert world.rg.kill(signal.SIGKILL) == -signal.SIGKILL
        world.kube.create(orphan)
        world.kube.create(foreign)
        world.rg.start()  # HAProxy kept serving meanwhile; raygate adopts it and the cluster
        assert live_cluster(world.rg) == live
        wait_for("the orphan to be deleted", lambda: "digits-0rphan" not in names(world.kube), 60)
        n = len(load.outcomes)
        load.wait_for_requests(n + 20)
    no_failures(load)
    assert names(world.kube) == {live, "someone-else"}, "only its own orphans are raygate's"
    world.kube.delete("someone-else")
    assert world.rg.predict()["cluster"] == live


def test_a_head_container_restarted_in_place_gets_its_serve_apps_back(world: World) -> None:
    """The kubelet restarts a crashed head container in the same pod: a new, empty Ray
    cluster at the same address (no GCS fault tolerance). raygate sees the head not ready
    (degraded, not dead), then a cluster without its apps, and deploys them again: the
    same RayCluster serves again, nothing is replaced."""
    live = live_cluster(world.rg)
    revision = world.rg.status("digits")["active"]["revision"]
    world.kube.standin.kill_head(live)
    killed = time.monotonic()

    def answers() -> bool:
        try:
            return world.rg.predict()["cluster"] == live
        except (AssertionError, httpx.HTTPError):
            return False

    wait_for("the head to stop answering", lambda: not answers(), 30, 0.1)
    wait_for("digits to answer again from the same RayCluster", answers, 240, 0.5)
    outage = time.monotonic() - killed
    s = world.rg.status("digits")
    assert s["active"] == {**s["active"], "cluster": live, "revision": revision}
    assert names(world.kube) == {live}, "a restarted head is repaired, not replaced"
    assert any(f"sent to {live}" in e["text"] for e in s["events"][-5:]), s["events"]
    print(
        f"\nhead container killed: answering again after {outage:.1f}s (no second cluster "
        "held its traffic: Ray keeps no Serve state across a head restart without GCS FT)"
    )


def test_sigterm_leaves_the_rayclusters_and_delete_removes_them(world: World) -> None:
    live = live_cluster(world.rg)
    assert world.rg.kill(signal.SIGTERM) == 0
    assert names(world.kube) == {live} and live in world.kube.heads()
    world.rg.start()
    assert live_cluster(world.rg) == live
    assert world.rg.predict()["cluster"] == live
    out = world.rg.cli("delete", "digits")
    assert out.returncode == 0, out.stdout + out.stderr
    wait_for("the RayCluster to be deleted", lambda: not names(world.kube), 120)
    wait_for("its head to stop", lambda: not world.kube.heads(), 60)
