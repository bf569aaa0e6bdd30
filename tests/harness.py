"""Drives a real `raygate up` process for end-to-end tests: start, kill, push through the CLI,
read status through the admin API, and generate bounded load through the gateway."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.loopback import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "serve_configs" / "digits"
SAMPLE = (EXAMPLES / "sample.json").read_bytes()
T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None], within_s: float, every_s: float = 0.5) -> T:
    """Poll `check` until it returns something truthy; fail with `what` past the deadline."""
    deadline = time.monotonic() + within_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s:g}s waiting for {what}")
        time.sleep(every_s)


def marked_processes(owner: str | None = None) -> dict[int, str]:
    """pid -> cluster of every live process raygate started (read from /proc, written
    independently of the provider's own lookup). A process carrying the owner marker whose
    cluster cannot be told (Ray's setproctitle may overwrite the environment block) counts,
    as "?" unless an ancestor names its cluster, so nothing of ours is ever missed."""
    parents: dict[int, int] = {}
    named: dict[int, str] = {}
    ours: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] == "Z":
            continue
        parents[pid] = int(fields[1])
        values = dict(v.split(b"=", 1) for v in env if b"=" in v)
        if owner is None and b"RAYGATE_CLUSTER" not in values:
            continue
        if owner is not None and values.get(b"RAYGATE_OWNER", b"").decode() != owner:
            continue
        ours.add(pid)
        if values.get(b"RAYGATE_CLUSTER"):
            named[pid] = values[b"RAYGATE_CLUSTER"].decode()
    found: dict[int, str] = {}
    for pid in parents:
        walk, cluster = pid, None
        for _ in range(64):
            if walk in named:
                cluster = named[walk]
                break
            walk = parents.get(walk, 0)
            if walk <= 1:
                break
        if cluster is not None:
            found[pid] = cluster
        elif pid in ours:
            found[pid] = "?"
    return found


@dataclass
class Raygate:
    state_dir: Path
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    token: str = "e2e-token-of-at-least-24-characters"
    engine: str = "python"
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    up_args: tuple[str, ...] = ()  # more `raygate up` options, e.g. ("--on-exit", "keep")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def owner(self) -> str:
        import hashlib

        return hashlib.sha256(str(self.state_dir.resolve()).encode()).hexdigest()[:12]

    def env(self) -> dict[str, str]:
        return {**os.environ, "RAYGATE_TOKEN": self.token, "PYTHONUNBUFFERED": "1"}

    def start(self, *specs: Path) -> None:
        self.log_path = self.state_dir.with_suffix(f".{int(time.time() * 1000)}.log")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rollout.cli", "up", *map(str, specs),
             "--state-dir", str(self.state_dir), "--port", str(self.port),
             "--admin-port", str(self.admin_port), "--engine", self.engine, *self.up_args],
            cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for("the admin API", self._admin_up, 60)

    def _admin_up(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log_tail()
        try:
            return httpx.get(self.admin_url + "/-/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self, sig: int = signal.SIGKILL, within_s: float = 90) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(within_s)
        self.proc = None
        return code

    def log_tail(self, n: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def cli(self, *args: str, within_s: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rollout.cli", *args, "--admin-url", self.admin_url],
            cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=within_s,
        )  # fmt: skip

    def down(self) -> subprocess.CompletedProcess[str]:
        """`raygate down` on this state dir."""
        return subprocess.run(
            [sys.executable, "-m", "rollout.cli", "down", "--state-dir", str(self.state_dir)],
            cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.admin_url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
            trust_env=False,
        )

    def status(self, name: str) -> dict[str, Any]:
        with self.api() as c:
            r = c.get(f"/v1/services/{name}")
            r.raise_for_status()
            body: dict[str, Any] = r.json()
            return body

    def predict(self) -> dict[str, Any]:
        r = httpx.post(self.url + "/digits/", content=SAMPLE, timeout=30, trust_env=False)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def clusters_running(self) -> set[str]:
        return set(marked_processes(self.owner).values())


@dataclass
class Outcome:
    ok: bool
    status: int
    model: str
    cluster: str
    detail: str
    at: float = 0.0  # time.time() when the answer arrived (comparable with raygate events)
    label: str = ""


class Load:
    """Bounded load through the gateway: `workers` threads, each sending one request after
    another, for at most `max_s` seconds or until stopped."""

    def __init__(self, url: str, workers: int = 2, max_s: float = 300) -> None:
        self.url = url
        self.max_s = max_s
        self.stop_event = threading.Event()
        self.per_worker: list[list[Outcome]] = [[] for _ in range(workers)]
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)
        ]

    def _run(self, index: int) -> None:
        deadline = time.monotonic() + self.max_s
        out = self.per_worker[index]
        with httpx.Client(timeout=30, trust_env=False) as client:
            while not self.stop_event.is_set() and time.monotonic() < deadline:
                try:
                    r = client.post(self.url + "/digits/", content=SAMPLE)
                    try:  # an error from the app says which cluster answered it too
                        body = r.json()
                    except json.JSONDecodeError:
                        body = {}
                    body = body if isinstance(body, dict) else {}
                    ok = r.status_code == 200 and body.get("prediction") == 0
                    out.append(Outcome(ok, r.status_code, body.get("model", ""),
                                       body.get("cluster", ""), r.text[:300], time.time(),
                                       str(body.get("label", ""))))  # fmt: skip
                except httpx.HTTPError as exc:
                    out.append(Outcome(False, 0, "", "", repr(exc), time.time()))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(60)

    @property
    def outcomes(self) -> list[Outcome]:
        return [o for w in self.per_worker for o in w]

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def wait_for_requests(self, n: int, within_s: float = 60) -> None:
        wait_for(f"{n} requests", lambda: len(self.outcomes) >= n, within_s, 0.1)


def no_failures(load: Load) -> None:
    """Every request the load sent was answered right, and it sent some."""
    total = len(load.outcomes)
    assert total > 0, "the load generator sent nothing"
    assert not load.failures, f"{len(load.failures)}/{total} failed: {load.failures[:5]}"


def live_cluster(rg: Raygate, revision: int | None = None, within_s: float = 300) -> str:
    """The digits service's active cluster once it is live (at `revision`, if given)."""

    def check() -> str | None:
        s = rg.status("digits")
        active = s["active"]
        if s["phase"] == "live" and active and (revision is None or active["revision"] == revision):
            return str(active["cluster"])
        return None

    return wait_for(f"digits live at revision {revision}", check, within_s)


@contextlib.contextmanager
def running_raygate(
    state_dir: Path, engine: str = "python", up_args: tuple[str, ...] = ()
) -> Iterator[Raygate]:
    """`raygate up` with the digits v1 spec; stopped afterwards, and no Ray process of its may
    outlive it, even when a test failed."""
    gate = Raygate(state_dir, engine=engine, up_args=up_args)
    gate.start(EXAMPLES / "v1.yaml")
    try:
        yield gate
    finally:
        if gate.proc is not None:
            gate.kill(signal.SIGTERM)
        leftover = marked_processes(gate.owner)
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
        assert not leftover, f"raygate left Ray processes behind: {leftover}"
