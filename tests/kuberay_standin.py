"""A stand-in for the KubeRay operator (v1.7) for tests: it watches RayCluster objects through
the emulated API server (tests/kube.py) and, for each, runs a REAL local Ray head, then writes
the status real KubeRay writes. It is a test double at the Kubernetes API, not a mock of Ray.

What it does, as KubeRay's raycluster_controller.go does:
- validation (utils/validation.go): name <= 53 chars and DNS-1035; headGroupSpec has a
  container; worker groups have containers and min/max replicas; no num-cpus etc. in both
  rayStartParams and `resources`; no rayStartParams["labels"]. An invalid RayCluster gets a
  Warning Event (events.k8s.io/v1, reason InvalidRayClusterMetadata / InvalidRayClusterSpec,
  reportingController raycluster-controller) and NOTHING else: no status, no head. It is
  validated again when its generation changes.
- the "head pod" `<name>-head-<5 hex>` gets a loopback address of its own (127.0.0.100
  upward; 127.0.0.2-61 are raygate's local provider) as its pod IP. The head Service
  `<name>-head-svc` is headless, so `status.head.serviceIP` is the pod IP.
- `status.endpoints`: the ports the head container (containers[0]) lists (an unnamed one as
  `<port>-port`) plus `metrics` (8080), or KubeRay's defaults (client 10001, gcs-server 6379,
  dashboard 8265, metrics 8080, serve 8000) when it lists none.
- conditions `HeadPodReady` (False `ContainersNotReady` until the head answers, True
  `HeadPodRunningAndReady`), `RayClusterProvisioned` (False `RayClusterPodsProvisioning`, True
  `AllPodRunningAndReadyFirstTime` the first time and then never turned back),
  `RayClusterSuspended`/`RayClusterSuspending` False; `state: ready` once the head is ready and,
  as in KubeRay, never cleared afterwards (the conditions are what changes); `head.podIP`,
  `podName`, `serviceIP`, `serviceName`; `observedGeneration`; `lastUpdateTime`,
  `stateTransitionTimes`. Zero worker counts are omitted (`omitempty`, as KubeRay's JSON).
- readiness = what KubeRay's head probe checks: the agent's `/api/local_raylet_healthz` and
  the dashboard's `/api/gcs_healthz` both answer 200.
- a head whose processes all die (`kill_head`, or a crash) is restarted in place like a
  kubelet restarts a container of a `restartPolicy: Always` pod: same pod, same IP and ports,
  `HeadPodReady` False until the new head answers. The restarted Ray is a NEW, empty Ray
  cluster (no GCS fault tolerance): Serve apps are gone, as on Kubernetes.
- deleting the object stops every process of its head (by PID) and frees its address.

The head process: `python -m ray.scripts.scripts start --head` with `--node-ip-address` and
`--dashboard-host` = the pod IP, the dashboard on the head container's `dashboard` port
(8265 if it lists none: on its own IP that does not clash), `--num-cpus` from
rayStartParams["num-cpus"] (default 2), `--object-store-memory` from rayStartParams (default
200 MiB); every Ray-internal port (GCS, client server, agent, metrics, node/object manager,
worker range) from a block of its own per pod. Environment: this process's minus
`RAY_ADDRESS` and every `RAYGATE_*` variable, plus the container's `env` entries with a
`value` (valueFrom is ignored), what KubeRay adds to a head container (`RAY_CLUSTER_NAME`,
`RAY_CLUSTER_NAMESPACE`, `RAY_CLOUD_INSTANCE_ID` = pod name, `RAY_NODE_TYPE_NAME=headgroup`,
`RAY_PORT`/`RAY_ADDRESS` = this head's GCS unless the container sets them,
`RAY_USAGE_STATS_KUBERAY_IN_USE=1`), `RAY_USAGE_STATS_ENABLED=0`, and two markers:
`KUBERAY_STANDIN_OWNER=<this stand-in's owner id>` and `KUBERAY_STANDIN_POD=<pod name>`.
Processes are found by those markers (on the process or an ancestor, as
rollout.providers.local does for its own) and stopped by PID in Ray's order, SIGTERM then
SIGKILL; never `ray stop`. They carry no `RAYGATE_*` variable, so tests/harness.py's
`marked_processes` never counts them; `standin_processes()` finds them.

Emulation limits (what differs from a real cluster):
- every pod shares this machine's network namespace. Ray Serve binds 0.0.0.0 on the serve
  port (right on Kubernetes, one netns per pod) with SO_REUSEPORT, so two heads listing the
  same serve port would silently SHARE it. The stand-in does not start a head whose `serve`
  containerPort (default 8000) another of its live heads uses: that RayCluster stays not
  ready, `HeadPodReady` False, reason `StandInServePortInUse`, a message naming the limit,
  until the other head is gone. Give each cluster spec its own serve containerPort, below
  the ephemeral port range (an outgoing connection may hold a port number there). Serve's
  own socket options are left as they are in a pod: `SERVE_SOCKET_REUSE_PORT_ENABLED=0`
  would also drop SO_REUSEADDR, and a head restarted in place could then not bind its serve
  port for a minute (the old proxy's connections in TIME_WAIT), which no pod sees.
- the Ray-internal ports are not the ones `rayStartParams`/the container list (they come from
  the pod's block), only `dashboard` and `serve` are; `client`/`gcs-server`/`metrics` in
  `status.endpoints` name ports nothing listens on.
- one head per cluster: workerGroupSpecs are validated but no worker is started (one machine);
  worker counts stay 0. The container image, resources, probes, volumes, rayVersion and other
  rayStartParams are ignored; the head runs this venv's Ray.
- no Pod or Service objects are written to the API (lists of pods/services are empty); no
  ReplicaFailure condition, no suspend, no autoscaler, no GCS fault tolerance, no
  CrashLoopBackOff delay (a restart is immediate); a `ray start` that fails is not retried
  (HeadPodReady False, reason `StandInHeadStartFailed`, the log tail as message).
- status is written with a merge patch on `/status` (KubeRay updates it with a PUT, which the
  emulator does not serve); kmock has no status subresource of its own, tests/kube.py adds one.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from rollout.providers.local import _alive, _is_gcs, marked_processes
from tests.kube import KubeApi

log = logging.getLogger("tests.kuberay_standin")

OWNER_ENV = "KUBERAY_STANDIN_OWNER"
POD_ENV = "KUBERAY_STANDIN_POD"
FIRST_IP = 100  # 127.0.0.100 upward
MAX_PODS = 20
PORT_BASE = 12000  # 12000..15999: below the ephemeral range and raygate's local 20000+ blocks
PORTS_PER_POD = 200
INTERNAL = {
    "gcs": 0,
    "client_server": 1,
    "agent_listen": 2,
    "agent_grpc": 3,
    "runtime_env_agent": 4,
    "metrics": 5,
    "node_manager": 6,
    "object_manager": 7,
}
WORKER_PORTS = (50, 199)
DEFAULT_PORTS = {
    "client": 10001,
    "gcs-server": 6379,
    "dashboard": 8265,
    "metrics": 8080,
    "serve": 8000,
}
MAX_NAME = 53
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- KubeRay's rules, as pure functions ---------------------------------------------------
def validate(obj: dict[str, Any]) -> tuple[str, str] | None:
    """(event reason, message) when KubeRay v1.7 would refuse this RayCluster, else None."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name", ""))
    where = f"{meta.get('namespace')}/{name}"
    if len(name) > MAX_NAME:
        err = f"RayCluster name should be no more than {MAX_NAME} characters"
        return "InvalidRayClusterMetadata", f"The RayCluster metadata is invalid {where}: {err}"
    if len(name) > 63 or not DNS1035.fullmatch(name):
        err = "RayCluster name should be a valid DNS1035 label: [a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character]"  # noqa: E501
        return "InvalidRayClusterMetadata", f"The RayCluster metadata is invalid {where}: {err}"
    spec = obj.get("spec") or {}
    if spec_err := _spec_error(spec):
        return "InvalidRayClusterSpec", f"The RayCluster spec is invalid {where}: {spec_err}"
    return None


def _spec_error(spec: dict[str, Any]) -> str | None:
    head = spec.get("headGroupSpec") or {}
    if not ((head.get("template") or {}).get("spec") or {}).get("containers"):
        return "headGroupSpec should have at least one container"
    if err := _group_error("Head", head):
        return err
    for group in spec.get("workerGroupSpecs") or []:
        gname = group.get("groupName", "")
        if not ((group.get("template") or {}).get("spec") or {}).get("containers"):
            return "workerGroupSpec should have at least one container"
        # The API server prunes nulls and applies the CRD's defaults (0, 2147483647) before
        # KubeRay reads the object: KubeRay's "must set both" rule never meets a group that
        # leaves them out, so it is not here.
        lo = group.get("minReplicas")
        hi = group.get("maxReplicas")
        lo = 0 if lo is None else lo
        hi = 2147483647 if hi is None else hi
        if lo is not None and lo < 0:
            return f"worker group {gname} has negative minReplicas {lo}"
        if hi is not None and hi < 0:
            return f"worker group {gname} has negative maxReplicas {hi}"
        if lo is not None and hi is not None and lo > hi:
            return f"worker group {gname} has minReplicas {lo} greater than maxReplicas {hi}"
        if err := _group_error(gname, group):
            return err
    return None


def _group_error(name: str, group: dict[str, Any]) -> str | None:
    params = group.get("rayStartParams") or {}
    if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get(
        "resources"
    ):
        return (
            "resource fields should not be set in both rayStartParams and Resources"
            f" for {name} group; please use only one"
        )
    if "labels" in params:
        return (
            f"rayStartParams['labels'] is not supported for {name} group;"
            " please use the top-level Labels field instead"
        )
    return None


def head_container(obj: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = obj["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    return container


def service_ports(obj: dict[str, Any]) -> dict[str, int]:
    """KubeRay's getServicePorts: the head container's ports, else the defaults; plus metrics."""
    ports = {
        (p.get("name") or f"{p['containerPort']}-port"): int(p["containerPort"])
        for p in head_container(obj).get("ports") or []
    }
    if not ports:
        ports = dict(DEFAULT_PORTS)
    ports.setdefault("metrics", DEFAULT_PORTS["metrics"])
    return ports


def _condition(
    ctype: str, ok: bool, reason: str, message: str, old: dict[str, Any] | None
) -> dict[str, Any]:
    status = "True" if ok else "False"
    # meta.SetStatusCondition keeps lastTransitionTime unless the status flips.
    since = old["lastTransitionTime"] if old and old.get("status") == status else _now()
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
    }


# ---- one head pod -------------------------------------------------------------------------
@dataclass
class Head:
    namespace: str
    name: str
    uid: str
    pod: str
    ip: str
    base: int
    dashboard_port: int
    serve_port: int
    temp_dir: str
    obj: dict[str, Any]
    phase: str = "starting"  # starting, running, failed, stopping
    error: str = ""
    ready_override: bool | None = None
    probed: bool = False  # the readiness probe's last answer
    restarts: int = 0
    created_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    starter: threading.Thread | None = None

    def port(self, name: str) -> int:
        return self.base + INTERNAL[name]


class KubeRayStandIn:
    """KubeRay stand-in over `api`. `start()` runs its reconcile loop in a thread (every
    `poll_s`); `close()` stops every head and the loop (idempotent)."""

    def __init__(self, api: KubeApi, poll_s: float = 0.2, stop_grace_s: float = 10.0) -> None:
        self.api = api
        self.poll_s = poll_s
        self.stop_grace_s = stop_grace_s
        self.owner = secrets.token_hex(6)
        config = client.Configuration()
        config.host = api.url
        config.api_key = {"authorization": "Bearer " + api.operator_token}
        self._client = client.ApiClient(config)
        self._crd = client.CustomObjectsApi(self._client)
        self._http = httpx.Client(trust_env=False, timeout=1.0)
        self._lock = threading.RLock()
        self._heads: dict[tuple[str, str], Head] = {}
        self._rejected: dict[tuple[str, str], tuple[str, int]] = {}  # -> (uid, generation)
        self._stoppers: list[threading.Thread] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kuberay-standin", daemon=True)
        self._closed = False
        self.errors: list[str] = []  # reconcile errors, for debugging a failed test

    def start(self) -> KubeRayStandIn:
        self._thread.start()
        return self

    # ---- test hooks -----------------------------------------------------------------------
    def heads(self) -> dict[str, tuple[str, list[int]]]:
        """RayCluster name -> (pod IP, live PIDs) of every head it runs (an invalid RayCluster
        or one refused for its serve port has none)."""
        with self._lock:
            heads = list(self._heads.values())
        return {h.name: (h.ip, sorted(self.pids(h.pod))) for h in heads}

    def set_head_ready(self, name: str, ready: bool) -> None:
        """Emulates the kubelet's readiness turning False/True: only HeadPodReady changes.
        `True` hands readiness back to the real probe."""
        with self._lock:
            self._head(name).ready_override = None if ready else False

    def kill_head(self, name: str) -> list[int]:
        """SIGKILL every process of the head (a crash of the container); the kubelet restarts
        it in place, see the module docstring. Returns the PIDs killed."""
        with self._lock:
            head = self._head(name)
        return _kill_all(lambda: self.pids(head.pod))

    def time_to_ready(self, name: str) -> float | None:
        """Seconds from the head pod's creation to its first HeadPodReady True."""
        with self._lock:
            head = self._head(name)
            return None if head.ready_at is None else head.ready_at - head.created_at

    def _head(self, name: str) -> Head:
        found = [h for h in self._heads.values() if h.name == name]
        if not found:
            raise KeyError(f"the stand-in runs no head for RayCluster {name!r}")
        return found[0]

    # ---- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._reconcile()
            except Exception as exc:  # the loop never dies; the error is kept for the test
                log.exception("stand-in reconcile failed")
                self.errors.append(repr(exc))

    def _reconcile(self) -> None:
        try:
            items = self._crd.list_cluster_custom_object("ray.io", "v1", "rayclusters")["items"]
        except client.ApiException as exc:
            self.errors.append(f"list: {exc.status}")
            return
        live: dict[tuple[str, str], dict[str, Any]] = {}
        for obj in items:
            meta = obj["metadata"]
            live[(meta["namespace"], meta["name"])] = obj
        with self._lock:
            for key, head in list(self._heads.items()):
                obj_now = live.get(key)
                if obj_now is None or obj_now["metadata"]["uid"] != head.uid:
                    self._begin_stop(key, head)
        for key, obj in live.items():
            if self._stop.is_set():
                return
            self._reconcile_one(key, obj)

    def _reconcile_one(self, key: tuple[str, str], obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        with self._lock:
            head = self._heads.get(key)
        if head is None:
            stamp = (meta["uid"], int(meta.get("generation", 1)))
            if self._rejected.get(key) == stamp:
                return
            invalid = validate(obj)
            if invalid is not None:
                self._rejected[key] = stamp
                self._event(obj, *invalid)
                return
            self._rejected.pop(key, None)
            head = self._admit(key, obj)
            if head is None:
                return
        head.obj = obj
        self._probe(head)
        self._write_status(key, obj, head)

    def _admit(self, key: tuple[str, str], obj: dict[str, Any]) -> Head | None:
        ports = service_ports(obj)
        serve_port = ports.get("serve", DEFAULT_PORTS["serve"])
        with self._lock:
            users = [h.name for h in self._heads.values() if h.serve_port == serve_port]
            if users:
                self._write_blocked(key, obj, serve_port, users[0])
                return None
            taken = {h.ip for h in self._heads.values()}
            dashboard = ports.get("dashboard", DEFAULT_PORTS["dashboard"])
            free = (
                i
                for i in range(MAX_PODS)
                if f"127.0.0.{FIRST_IP + i}" not in taken and _slot_free(i, dashboard)
            )
            slot = next(free, None)
            if slot is None:
                self.errors.append(f"no free pod address for {key}")
                return None
            pod = f"{key[1]}-head-{secrets.token_hex(3)[:5]}"
            head = Head(
                namespace=key[0],
                name=key[1],
                uid=obj["metadata"]["uid"],
                pod=pod,
                ip=f"127.0.0.{FIRST_IP + slot}",
                base=PORT_BASE + slot * PORTS_PER_POD,
                dashboard_port=ports.get("dashboard", DEFAULT_PORTS["dashboard"]),
                serve_port=serve_port,
                temp_dir=str(Path(tempfile.gettempdir()) / f"krs-{self.owner[:6]}-{slot}"),
                obj=obj,
            )
            self._heads[key] = head
            self._launch(head)
        return head

    # ---- the head's processes --------------------------------------------------------------
    def command(self, head: Head) -> list[str]:
        params = head.obj["spec"]["headGroupSpec"].get("rayStartParams") or {}
        lo, hi = head.base + WORKER_PORTS[0], head.base + WORKER_PORTS[1]
        return [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            f"--node-ip-address={head.ip}",
            f"--port={head.port('gcs')}",
            f"--dashboard-host={head.ip}",
            f"--dashboard-port={head.dashboard_port}",
            "--include-dashboard=true",
            f"--ray-client-server-port={head.port('client_server')}",
            f"--dashboard-agent-listen-port={head.port('agent_listen')}",
            f"--dashboard-agent-grpc-port={head.port('agent_grpc')}",
            f"--runtime-env-agent-port={head.port('runtime_env_agent')}",
            f"--metrics-export-port={head.port('metrics')}",
            f"--node-manager-port={head.port('node_manager')}",
            f"--object-manager-port={head.port('object_manager')}",
            f"--min-worker-port={lo}",
            f"--max-worker-port={hi}",
            f"--temp-dir={head.temp_dir}",
            f"--num-cpus={params.get('num-cpus', '2')}",
            f"--object-store-memory={params.get('object-store-memory', str(200 * 1024 * 1024))}",
            "--disable-usage-stats",
        ]

    def environment(self, head: Head) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k != "RAY_ADDRESS" and not k.startswith("RAYGATE_")
        }
        # What KubeRay's setContainerEnvVars gives a head container, the user's env first.
        env["RAY_PORT"] = str(head.port("gcs"))
        env["RAY_ADDRESS"] = f"{head.ip}:{head.port('gcs')}"
        env["RAY_USAGE_STATS_KUBERAY_IN_USE"] = "1"
        for entry in head_container(head.obj).get("env") or []:
            if "value" in entry:
                env[entry["name"]] = str(entry["value"])
        env["RAY_CLUSTER_NAME"] = head.name
        env["RAY_CLUSTER_NAMESPACE"] = head.namespace
        env["RAY_CLOUD_INSTANCE_ID"] = head.pod
        env["RAY_NODE_TYPE_NAME"] = "headgroup"
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env[OWNER_ENV] = self.owner
        env[POD_ENV] = head.pod
        return env

    def _launch(self, head: Head) -> None:
        head.phase = "starting"
        head.starter = threading.Thread(target=self._start_head, args=(head,), daemon=True)
        head.starter.start()

    def _start_head(self, head: Head) -> None:
        os.makedirs(head.temp_dir, mode=0o700, exist_ok=True)
        log_path = Path(head.temp_dir) / "ray-start.log"
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                self.command(head),
                env=self.environment(head),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code = proc.wait(180)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        with self._lock:
            if head.phase != "starting":
                return
            if code == 0:
                head.phase = "running"
            else:
                head.phase = "failed"
                head.error = (
                    f"`ray start` exited with {code}: "
                    + log_path.read_text(errors="replace")[-1500:]
                )

    def pids(self, pod: str | None = None) -> set[int]:
        """Live PIDs of this stand-in's heads (of one pod when named)."""
        return {pid for pid, p in standin_processes(self.owner).items() if pod is None or p == pod}

    def _probe(self, head: Head) -> None:
        with self._lock:
            phase = head.phase
        if phase == "running" and not any(_is_gcs(p) for p in self.pids(head.pod)):
            # The container died: the kubelet kills what is left and restarts it in place.
            self._stop_pod(head.pod, grace_s=0)
            with self._lock:
                head.restarts += 1
                head.probed = False
                self._launch(head)
            return
        if phase != "running":
            return
        ready = self._answers(
            f"http://{head.ip}:{head.port('agent_listen')}/api/local_raylet_healthz"
        ) and self._answers(f"http://{head.ip}:{head.dashboard_port}/api/gcs_healthz")
        with self._lock:
            if ready and head.ready_at is None:
                head.ready_at = time.monotonic()
            head.probed = ready

    def _answers(self, url: str) -> bool:
        try:
            return self._http.get(url).status_code == 200
        except httpx.HTTPError:
            return False

    # ---- status --------------------------------------------------------------------------
    def _status(self, obj: dict[str, Any], head: Head, old: dict[str, Any]) -> dict[str, Any]:
        conds = {c["type"]: c for c in old.get("conditions") or []}
        with self._lock:
            ready = head.probed and head.phase == "running" and head.ready_override is not False
            container = head_container(obj).get("name", "ray-head")
            if ready:
                hp = _condition(
                    "HeadPodReady", True, "HeadPodRunningAndReady", "", conds.get("HeadPodReady")
                )
            elif head.phase == "failed":
                hp = _condition(
                    "HeadPodReady",
                    False,
                    "StandInHeadStartFailed",
                    head.error,
                    conds.get("HeadPodReady"),
                )
            else:
                msg = f"containers with unready status: [{container}]"
                hp = _condition(
                    "HeadPodReady", False, "ContainersNotReady", msg, conds.get("HeadPodReady")
                )
            provisioned = conds.get("RayClusterProvisioned")
            if not (provisioned and provisioned.get("status") == "True"):
                if ready:
                    provisioned = _condition(
                        "RayClusterProvisioned",
                        True,
                        "AllPodRunningAndReadyFirstTime",
                        "All Ray Pods are ready for the first time",
                        provisioned,
                    )
                else:
                    provisioned = _condition(
                        "RayClusterProvisioned",
                        False,
                        "RayClusterPodsProvisioning",
                        "RayCluster Pods are being provisioned for first time",
                        provisioned,
                    )
        status = self._base_status(obj, old, [provisioned, hp], conds)
        status["head"] = {
            "podIP": head.ip,
            "podName": head.pod,
            "serviceIP": head.ip,  # headless head Service: the pod IP
            "serviceName": f"{head.name}-head-svc",
        }
        if ready or old.get("state") == "ready":
            status["state"] = "ready"  # KubeRay never clears it once ready
        return status

    def _base_status(
        self,
        obj: dict[str, Any],
        old: dict[str, Any],
        conditions: list[dict[str, Any]],
        conds: dict[str, Any],
    ) -> dict[str, Any]:
        for ctype in ("RayClusterSuspended", "RayClusterSuspending"):
            conditions.append(_condition(ctype, False, ctype, "", conds.get(ctype)))
        status: dict[str, Any] = {
            "observedGeneration": int(obj["metadata"].get("generation", 1)),
            "endpoints": {k: str(v) for k, v in service_ports(obj).items()},
            "conditions": conditions,
            "desiredCPU": "0",
            "desiredMemory": "0",
            "desiredGPU": "0",
            "desiredTPU": "0",
        }
        for field_name in ("state", "stateTransitionTimes", "lastUpdateTime"):
            if field_name in old:
                status[field_name] = old[field_name]
        return status

    def _write_status(self, key: tuple[str, str], obj: dict[str, Any], head: Head) -> None:
        old = obj.get("status") or {}
        status = self._status(obj, head, old)
        self._patch_status(key, obj, old, status)

    def _write_blocked(
        self, key: tuple[str, str], obj: dict[str, Any], port: int, other: str
    ) -> None:
        old = obj.get("status") or {}
        conds = {c["type"]: c for c in old.get("conditions") or []}
        message = (
            f"emulation limit: all stand-in pods share one network namespace and serve port {port} "
            f"is already used by the head of RayCluster {other};"
            " give each RayCluster its own serve containerPort"
        )
        hp = _condition(
            "HeadPodReady", False, "StandInServePortInUse", message, conds.get("HeadPodReady")
        )
        prov = _condition(
            "RayClusterProvisioned",
            False,
            "RayClusterPodsProvisioning",
            "RayCluster Pods are being provisioned for first time",
            conds.get("RayClusterProvisioned"),
        )
        status = self._base_status(obj, old, [prov, hp], conds)
        status["reason"] = message
        self._patch_status(key, obj, old, status)

    def _patch_status(
        self, key: tuple[str, str], obj: dict[str, Any], old: dict[str, Any], status: dict[str, Any]
    ) -> None:
        comparable = {k: v for k, v in old.items() if k != "lastUpdateTime"}
        if {k: v for k, v in status.items() if k != "lastUpdateTime"} == comparable:
            return  # write status only when it changed
        now = _now()
        status["lastUpdateTime"] = now
        if status.get("state") != old.get("state") and status.get("state"):
            status["stateTransitionTimes"] = {
                **(old.get("stateTransitionTimes") or {}),
                status["state"]: now,
            }
        patch = copy.deepcopy(status)
        for gone in set(old) - set(status):
            patch[gone] = None  # merge patch: null removes the field
        try:
            self._crd.patch_namespaced_custom_object_status(
                "ray.io", "v1", key[0], "rayclusters", key[1], {"status": patch}
            )
        except client.ApiException as exc:
            if exc.status != 404:
                self.errors.append(f"status of {key}: {exc.status}")

    def _event(self, obj: dict[str, Any], reason: str, message: str) -> None:
        meta = obj["metadata"]
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta['name']}.{secrets.token_hex(8)}",
                "namespace": meta["namespace"],
            },
            "eventTime": datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "reportingController": "raycluster-controller",
            "reportingInstance": "raycluster-controller-standin",
            "action": "Validate",
            "reason": reason,
            "type": "Warning",
            "note": message,
            "regarding": {
                "apiVersion": "ray.io/v1",
                "kind": "RayCluster",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
        }
        try:
            self._crd.create_namespaced_custom_object(
                "events.k8s.io", "v1", meta["namespace"], "events", body
            )
        except client.ApiException as exc:
            self.errors.append(f"event for {meta['name']}: {exc.status}")

    # ---- stopping ------------------------------------------------------------------------
    def _begin_stop(self, key: tuple[str, str], head: Head) -> None:
        del self._heads[key]
        head.phase = "stopping"
        thread = threading.Thread(target=self._stop_head, args=(head,), daemon=True)
        self._stoppers.append(thread)
        thread.start()

    def _stop_head(self, head: Head) -> None:
        if head.starter is not None:
            head.starter.join(200)  # a head being started is stopped once `ray start` returns
        self._stop_pod(head.pod, self.stop_grace_s)
        shutil.rmtree(head.temp_dir, ignore_errors=True)

    def _stop_pod(self, pod: str | None, grace_s: float) -> None:
        # Ray's order: raylet, dashboard, workers... first; gcs_server last.
        for last in (False, True):
            for _round in range(5):
                victims = [p for p in self.pids(pod) if _is_gcs(p) == last]
                if not victims:
                    break
                _terminate(victims, grace_s)

    def close(self) -> None:
        """Stop the loop and every head (idempotent); safe after a failed test."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        with self._lock:
            for key, head in list(self._heads.items()):
                self._begin_stop(key, head)
            stoppers = list(self._stoppers)
        for thread in stoppers:
            thread.join(240)
        self._stop_pod(None, self.stop_grace_s)  # anything left with our owner marker
        self._http.close()
        self._client.close()


def _slot_free(slot: int, dashboard_port: int) -> bool:
    """Nothing else (another stand-in, a leftover) holds this pod address or port block."""
    ip = f"127.0.0.{FIRST_IP + slot}"
    base = PORT_BASE + slot * PORTS_PER_POD
    ports = [dashboard_port, *(base + off for off in INTERNAL.values())]
    return all(_port_free(ip, port) for port in ports)


def _port_free(host: str, port: int) -> bool:
    # SO_REUSEADDR, as Ray's servers bind: a connection of an earlier head left in TIME_WAIT
    # does not hold the port, a listener does.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _kill_all(find: Callable[[], set[int]]) -> list[int]:
    """SIGKILL a whole process tree at once, as a container's end takes every process in it.
    Frozen first (SIGSTOP) until a scan finds nothing new: a process killed while others
    run lets its children be reparented to init (then only their environment, which Ray's
    setproctitle may overwrite, says whose they are), and a running raylet forks workers."""
    frozen: set[int] = set()
    for _ in range(20):
        found = find() - frozen
        if not found:
            break
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        frozen |= found
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return sorted(frozen)


def _terminate(pids: list[int], grace_s: float) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and [p for p in pids if _alive(p)]:
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 5
    while [p for p in pids if _alive(p)] and time.monotonic() < end:
        time.sleep(0.05)


def standin_processes(owner: str | None = None) -> dict[int, str]:
    """pid -> pod name of every live process of a stand-in head (of one stand-in, when
    `owner` is given), by the markers on the process or on an ancestor."""
    return marked_processes(None if owner is None else f"{OWNER_ENV}={owner}", POD_ENV)


@contextlib.contextmanager
def kuberay(
    directory: Path, namespace: str = "raygate", poll_s: float = 0.2
) -> Iterator[tuple[KubeApi, KubeRayStandIn]]:
    """The emulated API server and a KubeRay stand-in over it; both stopped on exit, also
    when the test fails."""
    with contextlib.ExitStack() as stack:
        api = KubeApi(directory, namespace).start()
        stack.callback(api.close)
        standin = KubeRayStandIn(api, poll_s).start()
        stack.callback(standin.close)
        yield api, standin


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeApi]:
    """The emulated API server alone (no operator)."""
    api = KubeApi(tmp_path).start()
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def kuberay_env(tmp_path: Path) -> Iterator[tuple[KubeApi, KubeRayStandIn]]:
    """The emulated API server with the KubeRay stand-in over it."""
    with kuberay(tmp_path) as env:
        yield env
