"""Counts the Serve replicas each cluster of a raygate state dir really runs, sampled in a
thread: from every cluster's own Serve REST status (`GET /api/serve/applications/` on its
dashboard), not from raygate's idea of it. The clusters and their dashboards are read from
the state dir's SQLite store, read-only, so a cluster is counted from the moment raygate
records it until it deletes it.

Used by the scale_with_traffic test and by benchmarks/canary_replicas.py: the peak total of
RUNNING replicas over both clusters is what a canary with `scale_with_traffic` saves against
blue-green.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import httpx


def dashboards(state_dir: Path) -> dict[str, str]:
    """cluster id -> dashboard URL of every cluster raygate's store holds now."""
    db = sqlite3.connect(f"file:{state_dir / 'raygate.db'}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute("SELECT id, info FROM clusters").fetchall()
    finally:
        db.close()
    return {cid: str(json.loads(info)["dashboard_url"]) for cid, info in rows}


def running_replicas(client: httpx.Client, dashboard_url: str, app: str) -> int:
    """RUNNING replicas of every deployment of `app` (0 if the dashboard does not answer:
    a cluster still starting, or being deleted, runs none that serve)."""
    try:
        resp = client.get(dashboard_url + "/api/serve/applications/", timeout=3)
        apps = resp.json().get("applications") or {}
    except (httpx.HTTPError, ValueError):
        return 0
    deployments = (apps.get(app) or {}).get("deployments") or {}
    return sum(
        1
        for dep in deployments.values()
        for replica in dep.get("replicas") or []
        if replica.get("state") == "RUNNING"
    )


class ReplicaSampler:
    """Every `every_s`: (time.time(), {cluster: RUNNING replicas}) for each cluster in the
    store; stops by itself after `max_s`."""

    def __init__(self, state_dir: Path, app: str = "digits", every_s: float = 0.5,
                 max_s: float = 600) -> None:  # fmt: skip
        self.state_dir = state_dir
        self.app = app
        self.every_s = every_s
        self.max_s = max_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        with httpx.Client(trust_env=False) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                counts = {
                    cid: running_replicas(client, url, self.app)
                    for cid, url in dashboards(self.state_dir).items()
                }
                self.samples.append((time.time(), counts))
                self._stop.wait(self.every_s)

    def __enter__(self) -> ReplicaSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def peak(self) -> int:
        """The most replicas running at once over every cluster."""
        return max((sum(c.values()) for _, c in self.samples), default=0)

    def of(self, cluster: str, start: float, end: float) -> list[int]:
        """`cluster`'s counts sampled between `start` and `end`."""
        return [c.get(cluster, 0) for t, c in self.samples if start <= t <= end]
