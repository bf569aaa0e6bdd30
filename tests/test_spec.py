"""Spec validation: every bad field is named, typos never fall back to defaults, and change
detection tells cluster changes from serve-only ones."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from rollout.spec import PathPolicy, ServiceSpec, SpecError, load_spec_file, parse_spec

EXAMPLES = Path(__file__).resolve().parent.parent / "serve_configs" / "digits"


def base() -> dict[str, Any]:
    return {
        "name": "digits",
        "cluster": {"num_cpus": 2, "env": {"OMP_NUM_THREADS": "1"}},
        "serve": {
            "applications": [
                {
                    "name": "digits",
                    "route_prefix": "/digits",
                    "import_path": "digits:build",
                    "deployments": [{"name": "DigitsClassifier", "num_replicas": 1}],
                }
            ]
        },
        "upgrade": {"health": {"probes": [{"path": "/digits/", "method": "POST", "json": {}}]}},
    }


def problems(raw: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    return dict(info.value.problems)


def test_examples_are_valid() -> None:
    for name in ("v1.yaml", "v2.yaml", "v1-relabel.yaml"):
        spec = load_spec_file(EXAMPLES / name)
        assert spec.name == "digits"
        assert spec.cluster.code_dir == str((EXAMPLES.parent / "apps").resolve())
        assert spec.app_routes() == {"digits": "/digits"}


def test_the_canary_example_is_valid_and_walks_the_readme_steps() -> None:
    spec = load_spec_file(EXAMPLES / "canary.yaml")
    canary = spec.upgrade.canary
    assert spec.upgrade.strategy == "canary" and canary is not None
    steps = [s.model_dump(mode="json", exclude_none=True) for s in canary.steps]
    assert steps == [{"weight": 20}, {"pause": {"duration_s": 30.0}}, {"weight": 50},
                     {"pause": {}}]  # fmt: skip
    assert (canary.analysis.interval_s, canary.analysis.min_requests) == (5.0, 20)
    v2 = load_spec_file(EXAMPLES / "v2.yaml")  # the same revision, rolled out as a canary
    assert (spec.cluster_hash(), spec.serve_hash()) == (v2.cluster_hash(), v2.serve_hash())


def test_typo_in_serve_deployment_is_rejected_with_its_path() -> None:
    raw = base()
    raw["serve"]["applications"][0]["deployments"][0]["num_replica"] = 2
    assert problems(raw) == {
        "serve.applications[0].deployments[0].num_replica": "unknown field",
    }


def test_unknown_fields_in_raygate_sections_are_rejected() -> None:
    raw = base()
    raw["cluster"]["num_cpu"] = 4
    raw["upgrade"]["health"]["timeout"] = 5
    raw["upgrade"]["health"]["probes"][0]["expect"] = 200
    assert set(problems(raw)) == {
        "cluster.num_cpu",
        "upgrade.health.timeout",
        "upgrade.health.probes.0.expect",
    }


def test_unknown_top_level_and_app_fields() -> None:
    raw = base()
    raw["sevre"] = {}
    raw["serve"]["applications"][0]["improt_path"] = "x:y"
    found = problems(raw)
    assert "sevre" in found
    # raygate's own model fails first; the serve section is checked once that passes.
    del raw["sevre"]
    assert problems(raw) == {"serve.applications[0].improt_path": "unknown field"}


def test_free_form_sections_are_not_checked_for_keys() -> None:
    raw = base()
    app = raw["serve"]["applications"][0]
    app["args"] = {"anything": 1}
    app["deployments"][0]["user_config"] = {"whatever": True}
    assert parse_spec(raw).serve["applications"][0]["args"] == {"anything": 1}


def test_ray_schema_errors_are_reported_under_serve() -> None:
    raw = base()
    raw["serve"]["applications"][0]["deployments"][0]["num_replicas"] = -1
    assert any(k.startswith("serve.applications.0.deployments.0") for k in problems(raw))


def test_http_host_and_port_belong_to_raygate() -> None:
    raw = base()
    raw["serve"]["http_options"] = {"port": 8000}
    assert "serve.http_options.port" in problems(raw)


def test_bad_values_name_the_field() -> None:
    raw = base()
    raw["name"] = "Not A Name"
    raw["upgrade"]["health"]["consecutive_successes"] = 0
    assert {"name", "upgrade.health.consecutive_successes"} <= set(problems(raw))


def test_no_applications() -> None:
    raw = base()
    raw["serve"]["applications"] = []
    assert problems(raw) == {"serve.applications": "at least one application is required"}


def test_code_dir_relative_needs_a_base_and_must_exist(tmp_path: Path) -> None:
    raw = base()
    raw["cluster"]["code_dir"] = "apps"
    assert "cluster.code_dir" in problems(raw)
    (tmp_path / "apps").mkdir()
    spec = parse_spec(raw, PathPolicy(base_dir=tmp_path))
    assert spec.cluster.code_dir == str(tmp_path / "apps")
    raw["cluster"]["code_dir"] = str(tmp_path / "missing")
    assert "is not a directory" in problems(raw)["cluster.code_dir"]


def test_change_detection_separates_cluster_and_serve() -> None:
    a = parse_spec(base())
    serve_only = copy.deepcopy(base())
    serve_only["serve"]["applications"][0]["deployments"][0]["num_replicas"] = 3
    b = parse_spec(serve_only)
    cluster = copy.deepcopy(base())
    cluster["cluster"]["env"]["X"] = "1"
    c = parse_spec(cluster)
    assert a.cluster_hash() == b.cluster_hash() and a.serve_hash() != b.serve_hash()
    assert a.cluster_hash() != c.cluster_hash() and a.serve_hash() == c.serve_hash()
    assert a.spec_hash() == parse_spec(base()).spec_hash()


def test_gateway_timeout_is_per_service_and_not_a_cluster_change() -> None:
    raw = copy.deepcopy(base())
    raw["gateway"] = {"timeout_s": 120}
    spec = parse_spec(raw)
    assert spec.gateway.timeout_s == 120
    assert spec.cluster_hash() == parse_spec(base()).cluster_hash()
    raw["gateway"] = {"timeout": 5}
    assert problems(raw) == {"gateway.timeout": "unknown field"}


def test_cluster_env_is_checked_at_push_and_names_each_key() -> None:
    """Each would otherwise fail (or do silently wrong) only when the cluster starts."""
    raw = base()
    raw["cluster"]["env"] = {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": "/opt/lib",  # allowed: code_dir goes in front of it
        "A=B": "x",
        "": "empty name",
        "N\0UL": "x",
        "9LIVES": "x",
        "VALUE_NUL": "a\0b",
        "RAY_ADDRESS": "10.0.0.1:6379",
        "RAYGATE_OWNER": "x",
        "RAYGATE_TOKEN": "x",
        "RAY_USAGE_STATS_ENABLED": "1",
        "HUGE": "x" * (128 * 1024),
        "SURROGATE": "\udcff",
    }
    found = problems(raw)
    assert set(found) == {
        "cluster.env.A=B",
        "cluster.env.",
        "cluster.env.N\0UL",
        "cluster.env.9LIVES",
        "cluster.env.VALUE_NUL",
        "cluster.env.RAY_ADDRESS",
        "cluster.env.RAYGATE_OWNER",
        "cluster.env.RAYGATE_TOKEN",
        "cluster.env.RAY_USAGE_STATS_ENABLED",
        "cluster.env.HUGE",
        "cluster.env.SURROGATE",
    }, found
    assert "environment variable name" in found["cluster.env.A=B"]
    assert "NUL" in found["cluster.env.VALUE_NUL"]
    raw["cluster"]["env"] = {"OMP_NUM_THREADS": "1", "PYTHONPATH": "/opt/lib", "_X1": ""}
    assert parse_spec(raw).cluster.env["_X1"] == ""


def test_cluster_paths_with_nul_or_a_path_separator_are_named(tmp_path: Path) -> None:
    """A NUL made os.access raise (a 500 through the API); a ':' in code_dir would put a
    second entry on PYTHONPATH."""
    raw = base()
    raw["cluster"]["python"] = "/usr/bin/python3\0"
    assert problems(raw) == {"cluster.python": "a path cannot hold a NUL character"}
    del raw["cluster"]["python"]
    for bad in ("rel\0dir", "/srv/a\0"):
        raw["cluster"]["code_dir"] = bad
        assert problems(raw) == {"cluster.code_dir": "a path cannot hold a NUL character"}
    odd = tmp_path / "a:b"
    odd.mkdir()
    raw["cluster"]["code_dir"] = str(odd)
    assert "cannot hold ':'" in problems(raw)["cluster.code_dir"]


def test_infinite_or_nan_durations_are_rejected() -> None:
    raw = base()
    raw["upgrade"]["health"]["timeout_s"] = float("inf")
    raw["upgrade"]["deletion_delay_s"] = float("inf")
    assert set(problems(raw)) == {"upgrade.health.timeout_s", "upgrade.deletion_delay_s"}
    raw = base()
    raw["upgrade"]["drain_timeout_s"] = float("nan")
    assert set(problems(raw)) == {"upgrade.drain_timeout_s"}


def test_a_stored_revision_loads_even_if_todays_push_checks_refuse_it() -> None:
    """Checks added to pushes must not stop an upgraded raygate from loading what an older
    one stored: those live in parse_spec, not in the models the store loads with."""
    raw = base()
    raw["upgrade"]["health"]["probes"] = [{"path": "/a b", "timeout_s": 900,
                                           "headers": {"Bad Name": "x"}}]  # fmt: skip
    raw["upgrade"]["health"]["timeout_s"] = float("inf")
    assert len(problems(raw)) == 4
    stored = ServiceSpec.model_validate(raw)
    assert stored.upgrade.health.probes[0].timeout_s == 900


def test_probes_that_could_only_fail_when_sent_are_rejected_at_push() -> None:
    raw = base()
    raw["upgrade"]["health"]["probes"] = [
        {"path": "/a b"},
        {"path": "/ok", "headers": {"X-Ok": "fine", "Bad Name": "v"}},
        {"path": "/ok", "headers": {"X-Split": "a\r\nInjected: 1"}},
        {"path": "/ok", "headers": {"X-Wide": "caf\u00e9"}},
    ]
    found = problems(raw)
    assert set(found) == {f"upgrade.health.probes.{i}.{f}"
                          for i, f in ((0, "path"), (1, "headers"), (2, "headers"),
                                       (3, "headers"))}, found  # fmt: skip


def test_liveness_window_is_bounded_and_not_a_cluster_change() -> None:
    raw = base()
    raw["liveness"] = {"dead_after_s": 1}
    assert "liveness.dead_after_s" in problems(raw)
    a = parse_spec(base())
    raw["liveness"] = {"dead_after_s": 600}
    b = parse_spec(raw)
    assert a.liveness.dead_after_s == 300 and b.liveness.dead_after_s == 600
    assert a.cluster_hash() == b.cluster_hash() and a.spec_hash() != b.spec_hash()
