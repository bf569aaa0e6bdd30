"""The same rollout on real Ray with the HAProxy engine in front (`raygate up --engine
haproxy`): first deploy, blue-green under load, an aborted cluster change under load, and a
clean stop. The full story runs on the Python engine in test_e2e_ray.py."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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
from tests.test_e2e_ray import assert_clean_switch, push_under_load

pytestmark = pytest.mark.ray

SPECS = Path(__file__).resolve().parent / "specs"


@pytest.fixture(scope="module")
def rg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Raygate]:
    with running_raygate(tmp_path_factory.mktemp("e2e-haproxy") / "state", "haproxy") as gate:
        yield gate


def test_first_deploy_through_haproxy(rg: Raygate) -> None:
    cluster = live_cluster(rg, 1)
    body = rg.predict()
    assert body["model"] == "logreg" and body["cluster"] == cluster


def test_blue_green_through_haproxy_with_zero_failures(rg: Raygate) -> None:
    old = live_cluster(rg)
    out, load = push_under_load(rg, EXAMPLES / "v2.yaml", workers=3)
    assert_clean_switch(rg, out, load, old, 2)
    print(f"\nhaproxy blue-green under load: {len(load.outcomes)} requests, 0 failed")


def test_broken_cluster_change_aborts_through_haproxy(rg: Raygate) -> None:
    live = live_cluster(rg, 2)
    out, load = push_under_load(rg, SPECS / "broken-cluster.yaml")
    assert out.returncode == 1, out.stdout + out.stderr
    no_failures(load)
    s = rg.status("digits")
    assert s["active"]["cluster"] == live and s["last_rollout"]["result"] == "aborted"
    assert "no_such_builder" in s["last_rollout"]["message"]
    wait_for("the aborted cluster to exit", lambda: rg.clusters_running() == {live}, 60)


# The old rule: a cluster older than this whose dashboard missed one 2 s answer was DEAD.
OLD_GRACE_S = 180


def test_a_frozen_dashboard_under_load_costs_nothing(rg: Raygate) -> None:
    """The active cluster's Ray dashboard stopped (SIGSTOP) under load for at least 25 s and
    until the cluster is past the 180 s start-up grace after which one missed 2 s answer
    used to get it declared dead, deleted and cold-started again (a 27 s outage): no request
    fails, the status shows the degradation without changing the phase, and once it answers
    again the same cluster is live and no other was started."""
    live = live_cluster(rg)
    dashboard = _dashboard_pid(rg, live)
    freeze_s = max(25.0, OLD_GRACE_S + 10 - _age_s(dashboard))
    with Load(rg.url, workers=3, max_s=600) as load:
        load.wait_for_requests(10)
        os.kill(dashboard, signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            degraded = wait_for("the status to show the degraded dashboard",
                                lambda: _degraded(rg, live), 30)  # fmt: skip
            wait_for(f"{freeze_s:.0f} s of a frozen dashboard",
                     lambda: time.monotonic() - stopped > freeze_s, freeze_s + 15)  # fmt: skip
            s = rg.status("digits")
            assert s["phase"] == "live" and s["active"]["cluster"] == live
            assert s["pending"] is None, "a frozen dashboard started a replacement"
            assert rg.clusters_running() == {live}
        finally:
            os.kill(dashboard, signal.SIGCONT)
        wait_for("the dashboard to answer again", lambda: not _degraded(rg, live), 30)
        n = len(load.outcomes)
        load.wait_for_requests(n + 10)
    no_failures(load)
    assert degraded.startswith("dashboard unreachable for ")
    assert live_cluster(rg) == live and rg.clusters_running() == {live}
    print(f"\ndashboard frozen {freeze_s:.0f}s under load: {len(load.outcomes)} requests, "
          "0 failed")  # fmt: skip


def _age_s(pid: int) -> float:
    """How long ago the process started (from /proc: clock ticks since boot)."""
    start_ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def _dashboard_pid(rg: Raygate, cluster: str) -> int:
    for pid, owner in marked_processes(rg.owner).items():
        if owner != cluster:
            continue
        with contextlib.suppress(OSError):
            if b"dashboard/dashboard.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    raise AssertionError(f"no dashboard process for {cluster}")


def _degraded(rg: Raygate, cluster: str) -> str | None:
    for d in rg.status("digits").get("degraded") or []:
        if d["cluster"] == cluster:
            return str(d["message"])
    return None


def test_sigterm_stops_haproxy_and_every_cluster(rg: Raygate) -> None:
    assert rg.kill(signal.SIGTERM, within_s=120) == 0
    assert marked_processes(rg.owner) == {}
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _is_our_haproxy(int(p), rg)]


def _is_our_haproxy(pid: int, rg: Raygate) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"haproxy" in cmd and str(rg.state_dir.resolve()).encode() in cmd
