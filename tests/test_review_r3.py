"""Faults a user met on a real `raygate up` (review r3), each shown without Ray: the
controller with the real planner and store, the doubles of tests/test_controller.py."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics
from tests.test_controller import Rig, make_spec, rig  # noqa: F401 (the fixture)


def switches(registry: CollectorRegistry) -> float:
    value = registry.get_sample_value(
        "raygate_rollout_step_duration_seconds_count", {"step": "switch"}
    )
    return value or 0.0


async def test_the_switch_step_is_counted_once_per_traffic_move(rig: Rig) -> None:  # noqa: F811
    """`raygate_rollout_step_duration_seconds{step="switch"}` was observed on every route
    table the data plane took: an idle raygate with no service counted a switch at start,
    and a blue-green three (its pending cluster joining at weight 0, the switch, the old
    cluster leaving). A dashboard's "switch" then read three times the rollouts."""
    registry = CollectorRegistry()
    rig.controller.metrics = Metrics(registry)
    await rig.controller.publish_routes()  # raygate starts, no service yet
    assert switches(registry) == 0
    old = await rig.live()  # the first deploy: all traffic onto its cluster
    assert switches(registry) == 1
    rig.store.push(make_spec(cpus=3), rig.clock.now)  # a cluster change: blue-green
    await rig.tick(6)
    active, pending, result = rig.status()
    assert active != old and pending is None and result == "succeeded"
    assert old in rig.provider.deleted and len(rig.plane.tables) >= 4
    assert switches(registry) == 2
