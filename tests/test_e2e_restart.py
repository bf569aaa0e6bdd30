"""raygate restarts, the services do not (issue 9, point 3), on real Ray with the HAProxy
engine and load on: raygate SIGKILLed and started again adopts the cluster and HAProxy, and
a blue-green then succeeds; `--on-exit keep` lets an operator restart it with every request
answered, and `raygate down` then leaves nothing. Never two HAProxy masters."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.haproxy_procs import haproxy_masters
from tests.harness import (
    EXAMPLES,
    Load,
    Raygate,
    live_cluster,
    marked_processes,
    no_failures,
    running_raygate,
)
from tests.test_e2e_ray import assert_clean_switch
from tests.test_up import exit_of, up

pytestmark = pytest.mark.ray


def config_of(rg: Raygate) -> Path:
    return rg.state_dir.resolve() / "haproxy" / "haproxy.cfg"


@pytest.fixture(scope="module")
def rg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Raygate]:
    with running_raygate(tmp_path_factory.mktemp("e2e-restart") / "state", "haproxy") as gate:
        try:
            yield gate
        finally:
            for pid in haproxy_masters(config_of(gate)):  # even when a test failed
                os.kill(pid, signal.SIGKILL)


def test_sigkilled_raygate_restarts_adopts_and_blue_green_succeeds_under_load(
    rg: Raygate,
) -> None:
    old = live_cluster(rg, 1)
    [master] = haproxy_masters(config_of(rg))
    with Load(rg.url, workers=3) as load:
        load.wait_for_requests(20)
        assert rg.kill(signal.SIGKILL) == -signal.SIGKILL
        down_from = len(load.outcomes)
        load.wait_for_requests(down_from + 50)  # raygate is dead: HAProxy answers alone
        answered_while_down = len(load.outcomes) - down_from
        rg.start()  # the store holds the service: no spec needed
        assert live_cluster(rg, 1) == old, "the running cluster is adopted, not replaced"
        assert haproxy_masters(config_of(rg)) == [master], "HAProxy adopted, not doubled"
        # A second `raygate up` on the same state dir, as an operator might start by
        # mistake: it must leave at once and touch nothing (it used to stop the first's
        # clusters as orphans).
        code, said = exit_of(up(rg.state_dir, extra=("--engine", "haproxy")), within_s=20)
        assert code != 0 and "in use by another raygate" in said, said
        assert rg.clusters_running() == {old}
        assert haproxy_masters(config_of(rg)) == [master]
        out = rg.cli("push", str(EXAMPLES / "v2.yaml"), "--wait")
        n = len(load.outcomes)
        load.wait_for_requests(n + 10)
    assert_clean_switch(rg, out, load, old, 2)
    assert haproxy_masters(config_of(rg)) == [master]
    print(f"\nSIGKILL, restart, blue-green: {len(load.outcomes)} requests, 0 failed, "
          f"{answered_while_down} answered while raygate was down")  # fmt: skip


def test_sigterm_after_adoption_stops_every_process_of_ours(rg: Raygate) -> None:
    """The adopted HAProxy is not raygate's child: it is stopped all the same."""
    live_cluster(rg, 2)
    assert rg.kill(signal.SIGTERM, within_s=120) == 0
    assert marked_processes(rg.owner) == {}
    assert haproxy_masters(config_of(rg)) == []


def test_on_exit_keep_restarts_raygate_with_every_request_answered_then_down(
    tmp_path: Path,
) -> None:
    gate = Raygate(tmp_path / "state", engine="haproxy", up_args=("--on-exit", "keep"))
    gate.start(EXAMPLES / "v1.yaml")
    try:
        cluster = live_cluster(gate, 1)
        [master] = haproxy_masters(config_of(gate))
        with Load(gate.url, workers=3) as load:
            load.wait_for_requests(20)
            for _ in range(2):  # stop raygate, start it again: an upgrade, twice
                assert gate.kill(signal.SIGTERM, within_s=120) == 0
                n = len(load.outcomes)
                load.wait_for_requests(n + 30)
                assert gate.clusters_running() == {cluster}
                gate.start()
                assert live_cluster(gate, 1) == cluster
                assert haproxy_masters(config_of(gate)) == [master]
            n = len(load.outcomes)
            load.wait_for_requests(n + 20)
            assert gate.kill(signal.SIGTERM, within_s=120) == 0
        no_failures(load)
        print(f"\n--on-exit keep, two restarts: {len(load.outcomes)} requests, 0 failed")
        out = gate.down()
        assert out.returncode == 0, out.stdout + out.stderr
        assert marked_processes(gate.owner) == {}
        assert haproxy_masters(config_of(gate)) == []
    finally:
        if gate.proc is not None:
            gate.kill(signal.SIGKILL)
        for pid in [*marked_processes(gate.owner), *haproxy_masters(config_of(gate))]:
            os.kill(pid, signal.SIGKILL)
