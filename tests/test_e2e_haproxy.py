"""The same rollout on real Ray with the HAProxy engine in front (`raygate up --engine
haproxy`): first deploy, blue-green under load, an aborted cluster change under load, and a
clean stop. The full story runs on the Python engine in test_e2e_ray.py."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import EXAMPLES, Raygate, marked_processes, running_raygate, wait_for
from tests.test_e2e_ray import assert_clean_switch, live_cluster, no_failures, push_under_load

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
