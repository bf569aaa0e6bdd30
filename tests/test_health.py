"""The health gate's pure part (`evaluate_status`), on Serve REST status documents shaped
as Ray 2.60's `ServeInstanceDetails` (GET /api/serve/applications/)."""

from __future__ import annotations

from typing import Any

from rollout.health import evaluate_status
from rollout.plan import Health

CONFIG: dict[str, Any] = {
    "applications": [{"name": "digits", "route_prefix": "/digits", "import_path": "d:build"}]
}


def status(target_capacity: float | None = None, replicas: int = 1) -> dict[str, Any]:
    deployment = {
        "status": "HEALTHY",
        "target_num_replicas": replicas,
        "replicas": [{"state": "RUNNING"}] * replicas,
    }
    return {
        "target_capacity": target_capacity,
        "proxies": {"node1": {"status": "HEALTHY"}},
        "applications": {
            "digits": {
                "status": "RUNNING",
                "deployed_app_config": CONFIG["applications"][0],
                "deployments": {"DigitsClassifier": deployment},
            }
        },
    }


def test_a_healthy_cluster_at_the_capacity_it_was_sent_passes() -> None:
    assert evaluate_status(status(), CONFIG).health is Health.OK
    assert evaluate_status(status(20.0), CONFIG, 20).health is Health.OK
    # Unset is all of it: a cluster sent 100 explicitly, then nothing, is at full capacity.
    assert evaluate_status(status(100.0), CONFIG, None).health is Health.OK
    assert evaluate_status(status(None), CONFIG, 100).health is Health.OK


def test_a_cluster_at_another_capacity_has_not_taken_its_deploy() -> None:
    """scale_with_traffic: a deploy of a new target_capacity that failed, or that a restart
    of raygate lost, leaves Serve at the old one; health OK there would let the weight move
    onto too few replicas. NOT_DEPLOYED makes the planner send it again."""
    report = evaluate_status(status(20.0), CONFIG, 60)
    assert report.health is Health.NOT_DEPLOYED
    assert report.message == "runs at target_capacity 20%, not 60%"
    # Given back after a canary: a cluster still at 40% is not at full capacity yet.
    assert evaluate_status(status(40.0), CONFIG, None).health is Health.NOT_DEPLOYED


def test_a_capacity_in_the_users_own_config_is_what_is_expected() -> None:
    config = {**CONFIG, "target_capacity": 50}
    assert evaluate_status(status(50.0), config).health is Health.OK
    assert evaluate_status(status(None), config).health is Health.NOT_DEPLOYED


def test_replicas_short_of_their_target_are_pending() -> None:
    doc = status(replicas=2)
    doc["applications"]["digits"]["deployments"]["DigitsClassifier"]["replicas"] = [
        {"state": "RUNNING"}, {"state": "STARTING"}]  # fmt: skip
    report = evaluate_status(doc, CONFIG)
    assert report.health is Health.PENDING and "1/2 replicas" in report.message
