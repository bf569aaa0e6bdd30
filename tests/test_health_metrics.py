"""The health series the alerts in deploy/monitoring/ read, as the controller sets them.

The real controller, planner, store and HealthChecker, with the doubles of
tests/test_controller.py at our own interfaces (a ClusterProvider, a DataPlane, Serve's REST
API and proxy over httpx's MockTransport) and an injected clock; values are read from the
controller's own registry, as a scrape would see them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from rollout.controller import Controller
from rollout.store import Store
from tests.test_controller import (
    Clock,
    DataPlaneDouble,
    ProviderDouble,
    Rig,
    ServeDouble,
    make_spec,
)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    serve = ServeDouble()
    provider = ProviderDouble(serve)
    plane = DataPlaneDouble()
    store = Store(tmp_path / "raygate.db")
    clock = Clock()
    async with httpx.AsyncClient(transport=httpx.MockTransport(serve.handler)) as http:
        controller = Controller(store, provider, plane, http, clock=clock)
        yield Rig(store, provider, plane, serve, clock, controller)
    store.close()


def value(rig: Rig, name: str, **labels: str) -> float | None:
    return rig.controller.metrics.registry.get_sample_value(name, {"service": "svc", **labels})


def healthy_clusters(rig: Rig) -> float | None:
    return value(rig, "raygate_service_healthy_clusters")


async def test_a_first_deploy_has_no_count_until_live_then_one_healthy_cluster(rig: Rig) -> None:
    rig.store.push(make_spec(), rig.clock.now)
    await rig.tick()
    assert rig.status()[0] is None
    assert healthy_clusters(rig) is None, "a first deploy under way would fire the alert"
    await rig.tick(3)
    live = rig.status()[0]
    assert live is not None
    assert value(rig, "raygate_cluster_healthy", cluster=live) == 1
    assert healthy_clusters(rig) == 1
    assert value(rig, "raygate_cluster_degraded_since_timestamp_seconds", cluster=live) is None
    # Every result counts from 0, so increase() sees the first abort.
    assert value(rig, "raygate_rollouts_total", result="aborted") == 0
    assert value(rig, "raygate_rollouts_total", result="succeeded") == 1
    assert value(rig, "raygate_rollouts_total", result="in_progress") is None, "never ends so"


async def test_a_first_deploy_that_fails_serves_nothing_and_counts_zero(rig: Rig) -> None:
    rig.serve.reject = "invalid import path"
    rig.store.push(make_spec(), rig.clock.now)
    await rig.tick(3)
    assert rig.status() == (None, None, "aborted")
    assert value(rig, "raygate_rollout_phase", phase="failed") == 1
    assert healthy_clusters(rig) == 0
    assert value(rig, "raygate_rollouts_total", result="aborted") == 1


async def test_a_stalled_dashboard_is_degraded_but_still_serving(rig: Rig) -> None:
    live = await rig.live()
    rig.provider.clusters[live].dashboard = False  # its Serve proxy still answers
    await rig.tick(3, dt=10)
    since = value(rig, "raygate_cluster_degraded_since_timestamp_seconds", cluster=live)
    assert since == 1000.0 + 4 + 10
    assert value(rig, "raygate_cluster_healthy", cluster=live) == 1
    assert healthy_clusters(rig) == 1
    rig.provider.clusters[live].dashboard = True
    await rig.tick()
    assert value(rig, "raygate_cluster_degraded_since_timestamp_seconds", cluster=live) is None


async def test_a_live_cluster_failing_its_checks_leaves_no_healthy_cluster(rig: Rig) -> None:
    live = await rig.live()
    rig.provider.clusters[live].proxy = False  # the dashboard answers, the Serve proxy not
    await rig.tick()
    assert rig.status()[:2] == (live, None), "it keeps its role"
    assert value(rig, "raygate_cluster_healthy", cluster=live) == 0
    assert healthy_clusters(rig) == 0
    rig.provider.clusters[live].proxy = True
    await rig.tick()
    assert healthy_clusters(rig) == 1


async def test_a_lost_cluster_counts_zero_while_its_revision_is_restored(rig: Rig) -> None:
    old = await rig.live()
    rig.provider.clusters[old].gone = True
    await rig.tick(2)
    assert rig.status()[0] is None and rig.status()[1] is not None
    assert healthy_clusters(rig) == 0, "the service should serve and cannot"
    assert value(rig, "raygate_cluster_healthy", cluster=old) is None, "its series went"
    await rig.tick(3)
    assert healthy_clusters(rig) == 1


async def test_a_deleted_service_leaves_no_health_series(rig: Rig) -> None:
    live = await rig.live()
    assert rig.store.mark_deleting("svc")
    await rig.tick()
    assert healthy_clusters(rig) is None, "a deletion is not an outage"
    await rig.tick(3)
    assert rig.store.load("svc") is None
    assert value(rig, "raygate_cluster_healthy", cluster=live) is None
    assert value(rig, "raygate_rollout_phase", phase="live") is None
