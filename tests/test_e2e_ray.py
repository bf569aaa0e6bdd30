"""End to end on real Ray (ray[serve] from PyPI), on loopback: the real `raygate` CLI, real
local Ray clusters, the real digits model, load through the gateway.

One raygate instance runs through the whole story in order (first deploy, in-place update,
blue-green, two aborts, SIGKILL mid-rollout, graceful stop, restart, delete) because every
cluster start costs ~10-15 s on this machine. The tests are ordered and each leaves the
service live for the next.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import yaml

from tests.harness import (
    EXAMPLES,
    Load,
    Raygate,
    live_cluster,
    marked_processes,
    no_failures,
    running_raygate,
    wait_for,
)

pytestmark = pytest.mark.ray

SPECS = Path(__file__).resolve().parent / "specs"


class Hooks(BaseHTTPRequestHandler):
    """A webhook receiver on loopback: records every event raygate POSTs."""

    got: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        self.got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def hooks() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def rg(tmp_path_factory: pytest.TempPathFactory, hooks: str) -> Iterator[Raygate]:
    state = tmp_path_factory.mktemp("e2e") / "state"
    with running_raygate(state, "python", ("--webhook", hooks)) as gate:
        yield gate


def push_under_load(
    rg: Raygate, spec: Path, workers: int = 2
) -> tuple[subprocess.CompletedProcess[str], Load]:
    """`raygate push SPEC --wait` while load runs through the gateway, before and after."""
    with Load(rg.url, workers=workers) as load:
        load.wait_for_requests(10)
        out = rg.cli("push", str(spec), "--wait")
        n = len(load.outcomes)
        load.wait_for_requests(n + 10)
    return out, load


def assert_clean_switch(
    rg: Raygate, out: subprocess.CompletedProcess[str], load: Load, old: str, revision: int
) -> str:
    """A blue-green push went live with no failed request and one clean switch; the old
    cluster's processes are gone. Returns the new cluster."""
    assert out.returncode == 0, out.stdout + out.stderr + rg.log_tail()
    no_failures(load)
    new = live_cluster(rg, revision)
    assert new != old
    # Each worker sends one request after another, and the switch is atomic: once a worker
    # has seen v2 it never sees v1 again.
    for worker in load.per_worker:
        models = [o.model for o in worker]
        assert models[0] == "logreg" and models[-1] == "svc"
        first_svc = models.index("svc")
        assert set(models[first_svc:]) == {"svc"}, "traffic went back to the old cluster"
        assert {o.cluster for o in worker[first_svc:]} == {new}
    wait_for("the old cluster's processes to exit", lambda: rg.clusters_running() == {new}, 120)
    return new


def test_first_deploy_serves_predictions(rg: Raygate) -> None:
    cluster = live_cluster(rg, 1)
    body = rg.predict()
    assert body["prediction"] == 0 and body["model"] == "logreg" and body["label"] == "v1"
    assert body["cluster"] == cluster
    assert rg.clusters_running() == {cluster}
    s = rg.status("digits")
    assert s["traffic"] == {cluster: 100}
    assert s["last_rollout"]["result"] == "succeeded"
    r = httpx.get(rg.url + "/nowhere", trust_env=False)
    assert r.status_code == 404 and "request_id" in r.json()


def test_invalid_push_is_rejected_and_changes_nothing(rg: Raygate, tmp_path: Path) -> None:
    before = rg.status("digits")
    pids_before = set(marked_processes(rg.owner))
    bad = (EXAMPLES / "v2.yaml").read_text().replace("num_replicas:", "num_replica:")
    spec = EXAMPLES / "_typo_test.yaml"
    spec.write_text(bad)
    try:
        out = rg.cli("push", str(spec))
    finally:
        spec.unlink()
    assert out.returncode == 2
    assert "serve.applications[0].deployments[0].num_replica: unknown field" in out.stderr
    with rg.api() as api:
        raw = yaml.safe_load(bad)
        raw["cluster"]["code_dir"] = str(EXAMPLES.parent / "apps")
        r = api.put("/v1/services/digits", json=raw)
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "serve.applications[0].deployments[0].num_replica"
    after = rg.status("digits")
    assert after["desired_revision"] == before["desired_revision"]
    assert after["active"] == before["active"] and after["pending"] is None
    assert set(marked_processes(rg.owner)) == pids_before


def test_serve_only_change_updates_in_place_under_load(rg: Raygate) -> None:
    cluster = live_cluster(rg)
    with Load(rg.url) as load:
        load.wait_for_requests(20)
        out = rg.cli("push", str(EXAMPLES / "v1-relabel.yaml"), "--wait")
        assert out.returncode == 0, out.stdout + out.stderr
        n = len(load.outcomes)
        load.wait_for_requests(n + 20)
    no_failures(load)
    assert live_cluster(rg, 2) == cluster, "a serve-only change must keep the cluster"
    body = rg.predict()
    assert body["label"] == "v1-relabelled" and body["cluster"] == cluster
    assert rg.clusters_running() == {cluster}
    print(f"\nin-place under load: {len(load.outcomes)} requests, 0 failed")


def test_blue_green_under_load_switches_with_zero_failures(rg: Raygate) -> None:
    old = live_cluster(rg)
    started = time.monotonic()
    out, load = push_under_load(rg, EXAMPLES / "v2.yaml", workers=3)
    switched = time.monotonic() - started
    new = assert_clean_switch(rg, out, load, old, 3)
    with rg.api() as api:
        text = api.get("/metrics").text
    assert 'raygate_rollouts_total{result="succeeded",service="digits"} 3.0' in text
    assert f'raygate_traffic_weight{{cluster="{new}",service="digits"}} 100.0' in text
    assert 'raygate_rollout_phase{phase="live",service="digits"} 1.0' in text
    assert 'raygate_rollout_step_duration_seconds_count{step="create_cluster"}' in text
    assert (
        f'raygate_requests_total{{app="digits",cluster="{new}",code="200",service="digits"}}'
        in text
    )
    # The webhook heard the rollout, step by step, from the real controller on real Ray.
    steps = ["rollout_started", "health_passed", "traffic_switched", "rollout_succeeded"]
    wait_for("the rollout's webhooks", lambda: [e["event"] for e in Hooks.got
                                                 if e["revision"] == 3] == steps, 10)  # fmt: skip
    [switched_to] = [e for e in Hooks.got if e["event"] == "traffic_switched" and
                     e["revision"] == 3]  # fmt: skip
    assert switched_to["cluster"] == new and switched_to["service"] == "digits"
    print(
        f"\nblue-green under load: {len(load.outcomes)} requests, 0 failed; "
        f"push to live {switched:.1f}s"
    )


def test_broken_cluster_change_aborts_and_live_cluster_keeps_serving(rg: Raygate) -> None:
    live = live_cluster(rg, 3)
    out, load = push_under_load(rg, SPECS / "broken-cluster.yaml")
    assert out.returncode == 1, out.stdout + out.stderr
    no_failures(load)
    assert {o.model for o in load.outcomes} == {"svc"}
    s = rg.status("digits")
    assert s["phase"] == "live" and s["active"]["cluster"] == live and s["pending"] is None
    assert s["last_rollout"]["revision"] == 4 and s["last_rollout"]["result"] == "aborted"
    message = s["last_rollout"]["message"]
    assert "DEPLOY_FAILED" in message and "no_such_builder" in message, message
    assert "Traceback" in message, "Serve's own traceback is carried into the status"
    wait_for("the aborted cluster's processes to exit", lambda: rg.clusters_running() == {live}, 60)
    history = {h["revision"]: h["result"] for h in rg_history(rg)}
    assert history[4] == "aborted" and history[3] == "succeeded"
    key = ("rollout_aborted", 4)
    aborted = wait_for("the abort's webhook", lambda: [
        e for e in Hooks.got if (e["event"], e["revision"]) == key], 10)  # fmt: skip
    assert "DEPLOY_FAILED" in aborted[0]["message"]


def rg_history(rg: Raygate) -> list[dict[str, object]]:
    with rg.api() as api:
        body: list[dict[str, object]] = api.get("/v1/services/digits/history").json()
        return body


def test_broken_serve_change_rolls_back_in_place(rg: Raygate) -> None:
    live = live_cluster(rg, 3)
    out, load = push_under_load(rg, SPECS / "broken-in-place.yaml")
    assert out.returncode == 1, out.stdout + out.stderr
    no_failures(load)
    s = rg.status("digits")
    assert s["active"] == {"revision": 3, "cluster": live, "serve_url": s["active"]["serve_url"]}
    assert s["last_rollout"]["result"] == "aborted"
    assert "no_such_builder" in s["last_rollout"]["message"]
    # The running cluster is put back on revision 3's config and answers as before.
    wait_for("the rollback", lambda: rg.predict()["label"] == "v2", 60)
    assert rg.clusters_running() == {live}


def test_sigkill_mid_rollout_resumes_and_leaves_no_orphans(rg: Raygate) -> None:
    old = live_cluster(rg, 3)
    out = rg.cli("push", str(EXAMPLES / "v1.yaml"))
    assert out.returncode == 0, out.stderr
    revision = rg.status("digits")["desired_revision"]

    def pending_step(step: str) -> bool:
        p = rg.status("digits")["pending"]
        return bool(p and p["step"] == step)

    # First kill: while the new cluster is starting (`ray start` is still running).
    wait_for("the new cluster to be starting", lambda: pending_step("create_cluster"), 30, 0.1)
    assert rg.kill(signal.SIGKILL) == -signal.SIGKILL
    rg.start()
    # Second kill: once it is up and the health gates are running.
    wait_for("the health step", lambda: pending_step("health"), 180, 0.2)
    assert rg.kill(signal.SIGKILL) == -signal.SIGKILL
    rg.start()
    new = live_cluster(rg, revision)
    assert new != old
    assert rg.predict()["model"] == "logreg"
    wait_for("only the live cluster to run", lambda: rg.clusters_running() == {new}, 120)
    # Every cluster the store knows is the live one; nothing else runs under our marker.
    assert set(marked_processes(rg.owner).values()) == {new}


def test_sigterm_stops_cleanly_and_restart_brings_service_back(rg: Raygate) -> None:
    live_cluster(rg)
    assert rg.kill(signal.SIGTERM, within_s=120) == 0
    assert marked_processes(rg.owner) == {}, "every Ray cluster is stopped by PID"
    rg.start()
    cluster = live_cluster(rg)
    assert rg.predict()["model"] == "logreg"
    assert rg.clusters_running() == {cluster}


def test_delete_drains_then_tears_down(rg: Raygate) -> None:
    live_cluster(rg)
    out = rg.cli("delete", "digits")
    assert out.returncode == 0, out.stderr

    def gone() -> bool:
        with rg.api() as api:
            return api.get("/v1/services/digits").status_code == 404

    wait_for("the service to be gone", gone, 60)
    wait_for("its clusters to exit", lambda: rg.clusters_running() == set(), 60)
    r = httpx.post(rg.url + "/digits/", content=b"{}", trust_env=False)
    assert r.status_code == 404
