"""raygate dies or restarts, the data plane does not (issue 9, point 3), without Ray: a real
`raygate up` with no service and the HAProxy engine, killed and started again on the same
state dir, and the `--on-exit keep` / `raygate down` pair."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.haproxy_procs import haproxy_masters
from tests.harness import Raygate, wait_for


def config_of(rg: Raygate) -> Path:
    return rg.state_dir.resolve() / "haproxy" / "haproxy.cfg"


def healthz_pid(rg: Raygate) -> int | None:
    """The pid of the HAProxy worker that answered, or None if nothing answered."""
    try:
        r = httpx.get(rg.url + "/-/healthz", timeout=2, trust_env=False)
    except httpx.HTTPError:
        return None
    return int(r.json()["pid"]) if r.status_code == 200 else None


@pytest.fixture
def rg(tmp_path: Path) -> Iterator[Raygate]:
    gate = Raygate(tmp_path / "state", engine="haproxy")
    yield gate
    if gate.proc is not None:
        gate.kill(signal.SIGTERM, within_s=60)
    for pid in haproxy_masters(config_of(gate)):  # never leave one behind, even on failure
        import os

        os.kill(pid, signal.SIGKILL)


def test_restarted_raygate_adopts_the_haproxy_a_killed_one_left(rg: Raygate) -> None:
    rg.start()
    wait_for("haproxy to answer", lambda: healthz_pid(rg), 15, 0.1)
    [master] = haproxy_masters(config_of(rg))
    assert rg.kill(signal.SIGKILL) == -signal.SIGKILL
    # raygate is gone; HAProxy is in its own session and keeps answering.
    assert [healthz_pid(rg) for _ in range(20)].count(None) == 0
    rg.start()
    # After the restart: one master, the same one, and it still answers.
    wait_for("the first route table to be in force", lambda: healthz_pid(rg), 15, 0.1)
    assert haproxy_masters(config_of(rg)) == [master]
    assert [healthz_pid(rg) for _ in range(20)].count(None) == 0
    assert rg.kill(signal.SIGTERM, within_s=60) == 0
    assert haproxy_masters(config_of(rg)) == []


def test_on_exit_keep_leaves_haproxy_serving_and_down_stops_it(rg: Raygate) -> None:
    rg.up_args = ("--on-exit", "keep")
    rg.start()
    wait_for("haproxy to answer", lambda: healthz_pid(rg), 15, 0.1)
    [master] = haproxy_masters(config_of(rg))
    refused = rg.down()
    assert refused.returncode == 1 and "in use by another raygate" in refused.stderr, refused.stderr
    assert haproxy_masters(config_of(rg)) == [master], "a refused down touches nothing"
    assert rg.kill(signal.SIGTERM, within_s=60) == 0
    # raygate exited cleanly and HAProxy serves on.
    assert [healthz_pid(rg) for _ in range(20)].count(None) == 0
    rg.start()  # adopts it, and keeps it again on SIGTERM
    assert haproxy_masters(config_of(rg)) == [master]
    assert rg.kill(signal.SIGTERM, within_s=60) == 0
    assert haproxy_masters(config_of(rg)) == [master]
    down = rg.down()
    assert down.returncode == 0, down.stderr
    assert haproxy_masters(config_of(rg)) == []
    assert healthz_pid(rg) is None
