"""Local provider: each cluster is a real `ray start --head` on this machine.

What FACTS.md measured shapes this module:
- every cluster gets its own loopback address (127.0.0.2, .3, ...), a block of ports and a
  short temp dir (Ray puts Unix sockets there: paths must stay under ~107 bytes);
- `RAY_ADDRESS` and raygate's own `RAYGATE_*` variables (the admin token) are removed from the
  environment Ray inherits;
- a cluster is stopped by its own PIDs in Ray's order (everything else, then gcs_server),
  SIGTERM then SIGKILL, never `ray stop`.
Every process of a cluster carries two environment markers (owner = this state dir, cluster
id), which is how its PIDs are found again after a restart, even for workers Ray spawned
later and whose command lines Ray rewrites.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from rollout.plan import Liveness
from rollout.providers.base import ClusterInfo, ProviderError, Seen
from rollout.serve_client import dashboard_answers
from rollout.spec import OUR_ENV_PREFIX, ClusterSpec, ServiceSpec

log = logging.getLogger("raygate.local")

OWNER_ENV = "RAYGATE_OWNER"
CLUSTER_ENV = "RAYGATE_CLUSTER"
MAX_SLOTS = 60
PORT_BASE = 20000
PORTS_PER_SLOT = 200
WORKER_PORTS = (50, 199)  # offsets within a slot's block
# Offsets of the fixed ports inside a slot's block.
PORTS = {
    "gcs": 0,
    "dashboard": 1,
    "client_server": 2,
    "agent_listen": 3,
    "agent_grpc": 4,
    "runtime_env_agent": 5,
    "metrics": 6,
    "node_manager": 7,
    "object_manager": 8,
    "serve": 9,
}


@dataclass(frozen=True)
class LocalSettings:
    state_dir: Path
    start_timeout_s: float = 180.0
    stop_grace_s: float = 10.0


def _owner(state_dir: Path) -> str:
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]


class LocalProvider:
    name = "local"
    keeps_clusters = False

    def __init__(self, settings: LocalSettings) -> None:
        self.settings = settings
        self.owner = _owner(settings.state_dir)
        self._http = httpx.AsyncClient(trust_env=False)

    async def close(self) -> None:
        await self._http.aclose()

    def check(self, spec: ServiceSpec) -> list[tuple[str, str]]:
        if spec.cluster.kuberay is not None:
            return [("cluster.kuberay", "this raygate runs the local provider; a RayCluster "
                     "spec needs `raygate up --provider kuberay`")]  # fmt: skip
        return []

    # ---- allocate -------------------------------------------------------------------
    def allocate(
        self, cluster_id: str, service: str, spec: ClusterSpec, taken: Sequence[ClusterInfo]
    ) -> ClusterInfo:
        used = {int(i.data["slot"]) for i in taken if i.provider == self.name}
        for slot in range(1, MAX_SLOTS + 1):
            if slot in used:
                continue
            address = f"127.0.0.{slot + 1}"
            base = PORT_BASE + slot * PORTS_PER_SLOT
            ports = {name: base + off for name, off in PORTS.items()}
            if not all(_port_free(address, p) for p in ports.values()):
                continue
            # Named, not created: allocating has no side effect (a decision whose commit
            # fails leaves nothing behind); `start` creates it. Short: Ray puts sockets there.
            tag = hashlib.sha256(cluster_id.encode()).hexdigest()[:8]
            temp_dir = str(Path(tempfile.gettempdir()) / f"rg-{self.owner[:6]}-{tag}")
            return ClusterInfo(
                id=cluster_id,
                service=service,
                provider=self.name,
                dashboard_url=f"http://127.0.0.1:{ports['dashboard']}",
                serve_host=address,
                serve_port=ports["serve"],
                created_at=time.time(),
                data={
                    "slot": slot,
                    "address": address,
                    "ports": ports,
                    "worker_ports": [base + WORKER_PORTS[0], base + WORKER_PORTS[1]],
                    "temp_dir": temp_dir,
                    "pids": [],
                },
            )
        raise ProviderError(f"no free loopback address/port block among {MAX_SLOTS} slots")

    # ---- start ----------------------------------------------------------------------
    def command(self, info: ClusterInfo, spec: ClusterSpec) -> list[str]:
        ports = info.data["ports"]
        lo, hi = info.data["worker_ports"]
        python = spec.python or sys.executable
        return [
            python,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            f"--node-ip-address={info.data['address']}",
            f"--port={ports['gcs']}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={ports['dashboard']}",
            "--include-dashboard=true",
            f"--ray-client-server-port={ports['client_server']}",
            f"--dashboard-agent-listen-port={ports['agent_listen']}",
            f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--runtime-env-agent-port={ports['runtime_env_agent']}",
            f"--metrics-export-port={ports['metrics']}",
            f"--node-manager-port={ports['node_manager']}",
            f"--object-manager-port={ports['object_manager']}",
            f"--min-worker-port={lo}",
            f"--max-worker-port={hi}",
            f"--temp-dir={info.data['temp_dir']}",
            f"--num-cpus={spec.num_cpus}",
            f"--object-store-memory={spec.object_store_memory_mb * 1024 * 1024}",
            "--disable-usage-stats",
        ]

    def environment(self, info: ClusterInfo, spec: ClusterSpec) -> dict[str, str]:
        # raygate's own variables stay out of Ray: RAYGATE_TOKEN grants the admin API (and so
        # code execution), and every Ray worker and replica would inherit it.
        env = {
            k: v
            for k, v in os.environ.items()
            if k != "RAY_ADDRESS" and not k.startswith(OUR_ENV_PREFIX)
        }
        env.update(spec.env)
        if spec.code_dir:
            current = env.get("PYTHONPATH")
            env["PYTHONPATH"] = spec.code_dir + (os.pathsep + current if current else "")
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env[OWNER_ENV] = self.owner
        env[CLUSTER_ENV] = info.id
        return env

    async def start(self, info: ClusterInfo, spec: ClusterSpec) -> ClusterInfo:
        os.makedirs(info.data["temp_dir"], mode=0o700, exist_ok=True)
        log_path = Path(info.data["temp_dir"]) / "ray-start.log"
        with log_path.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *self.command(info, spec),
                env=self.environment(info, spec),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C to raygate must not reach Ray directly
            )
            try:
                code = await asyncio.wait_for(proc.wait(), self.settings.start_timeout_s)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                code = -1
            except asyncio.CancelledError:  # superseded, or raygate stops: end it all now
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: what it spawned
                raise
        if code != 0:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise ProviderError(f"`ray start` for {info.id} exited with {code}:\n{tail}")
        deadline = time.monotonic() + self.settings.start_timeout_s
        while not await self._api_up(info):
            if time.monotonic() > deadline:
                raise ProviderError(f"Serve REST API of {info.id} did not answer in time", False)
            await asyncio.sleep(0.5)
        pids = sorted(self.pids(info.id))
        return replace(info, data={**info.data, "pids": pids})

    async def _api_up(self, info: ClusterInfo) -> bool:
        try:
            resp = await self._http.get(info.dashboard_url + "/api/serve/applications/", timeout=2)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    # ---- observe --------------------------------------------------------------------
    async def observe(self, info: ClusterInfo) -> Seen:
        return Seen(await self.liveness(info), info)

    async def liveness(self, info: ClusterInfo) -> Liveness:
        """DEAD only when the cluster is gone: its GCS server (the head of every Ray cluster)
        has no live process. A dashboard that does not answer is UNREACHABLE: its processes,
        Serve's proxy and replicas included, may well keep serving. Whether that lasts too
        long is the planner's call. (`start` returns once the dashboard answers, so a local
        cluster is never observed STARTING.)"""
        if await dashboard_answers(self._http, info.dashboard_url):
            return Liveness.UP
        if not any(_is_gcs(pid) for pid in self.pids(info.id)):
            return Liveness.DEAD
        return Liveness.UNREACHABLE

    def pids(self, cluster_id: str | None = None) -> dict[int, str]:
        """pid -> cluster id of every live process of our clusters.

        A process belongs to a cluster when its environment names it, or when an ancestor's
        does. The second rule matters: Ray rewrites the titles of workers and dashboard
        modules (setproctitle), which can overwrite the environment block /proc shows. A
        process with our owner marker whose cluster cannot be told is never claimed.
        """
        found = marked_processes(f"{OWNER_ENV}={self.owner}", CLUSTER_ENV)
        return {p: c for p, c in found.items() if cluster_id is None or c == cluster_id}

    # ---- delete ---------------------------------------------------------------------
    async def delete(self, info: ClusterInfo) -> None:
        await self._stop(info.id)
        temp_dir = info.data.get("temp_dir")
        if temp_dir:
            await asyncio.to_thread(shutil.rmtree, temp_dir, True)

    async def _stop(self, cluster_id: str) -> None:
        # Ray's order: raylet, dashboard, workers... first; gcs_server last.
        for last in (False, True):
            for _round in range(5):
                victims = [p for p in self.pids(cluster_id) if _is_gcs(p) == last]
                if not victims:
                    break
                await self._terminate(victims)

    async def _terminate(self, pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.stop_grace_s
        while time.monotonic() < deadline:
            if not [p for p in pids if _alive(p)]:
                return
            await asyncio.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        # Process exit has no event to await here (not our children): poll /proc.
        while [p for p in pids if _alive(p)] and time.monotonic() < deadline + 5:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    async def orphans(self, known: Sequence[ClusterInfo]) -> list[str]:
        ids = {i.id for i in known}
        strays = sorted({cid for cid in self.pids().values() if cid not in ids})
        for cid in strays:
            log.warning("stopping orphan Ray cluster %s", cid)
            await self._stop(cid)
        return strays


def marked_processes(owner_marker: str | None, name_var: str) -> dict[int, str]:
    """pid -> name of every live process whose environment, or an ancestor's, sets
    `name_var` (the nearest one's value), among those carrying `owner_marker` ("VAR=value";
    None: any). Read from /proc: the processes need not be our children."""
    owner = owner_marker.encode() if owner_marker is not None else None
    prefix = f"{name_var}=".encode()
    parents: dict[int, int] = {}
    claimed: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except (OSError, IndexError):
            continue
        if fields[0] == "Z":
            continue
        parents[pid] = int(fields[1])
        variables = environ.split(b"\0")
        if owner is None or owner in variables:
            raw = next((v[len(prefix) :] for v in variables if v.startswith(prefix)), b"")
            if raw:
                claimed[pid] = raw.decode()
    found: dict[int, str] = {}
    for pid in parents:
        name = _claimed_ancestor(pid, parents, claimed)
        if name is not None:
            found[pid] = name
    return found


def _claimed_ancestor(pid: int, parents: dict[int, int], claimed: dict[int, str]) -> str | None:
    """The cluster of `pid` or of its nearest claimed ancestor (bounded walk up the tree)."""
    for _ in range(64):
        if pid in claimed:
            return claimed[pid]
        parent = parents.get(pid)
        if parent is None or parent <= 1:
            return None
        pid = parent
    return None


def _is_gcs(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip().startswith("gcs_server")
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
