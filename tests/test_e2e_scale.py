"""A canary with `scale_with_traffic` on real Ray, under load: Serve's `target_capacity` on
each cluster follows its share of the traffic, so the canary never needs the replicas of two
whole revisions at once (blue-green does: 4 + 4 here).

The replicas are counted from each cluster's own Serve status (tests/replicas.py), not from
raygate's status. digits runs 4 replicas of a quarter CPU each, so two clusters of 2 CPUs
hold them all and the counts say what target_capacity did, not what the CPUs allowed.
"""

from __future__ import annotations

import time
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import Load, live_cluster, no_failures, running_raygate, wait_for
from tests.replicas import ReplicaSampler
from tests.test_e2e_canary import Watch, canary, spec_file

pytestmark = pytest.mark.ray

REPLICAS = 4


def digits(where: Path, name: str, upgrade: dict[str, Any], env: dict[str, str] | None = None
           ) -> Path:  # fmt: skip
    """The digits spec at 4 replicas of 0.25 CPU each (label = name)."""
    path = spec_file(where, name, name, upgrade, env=env)
    raw = yaml.safe_load(path.read_text())
    deployment = raw["serve"]["applications"][0]["deployments"][0]
    deployment.update(num_replicas=REPLICAS, ray_actor_options={"num_cpus": 0.25})
    path.write_text(yaml.safe_dump(raw))
    return path


def at_capacity(percent: int) -> int:
    """Serve's own rounding of num_replicas at a target_capacity (half up, at least 1)."""
    scaled = Decimal(REPLICAS * percent) / Decimal(100)
    return max(1, int(scaled.to_integral_value(rounding=ROUND_HALF_UP)))


def test_scale_with_traffic_keeps_replicas_near_one_revision(tmp_path: Path) -> None:
    began = time.monotonic()
    state = tmp_path / "state"
    with running_raygate(state, "haproxy") as rg:
        live_cluster(rg, 1)
        # Serve-only change: the live cluster goes to 4 replicas in place.
        out = rg.cli("push", str(digits(tmp_path, "four", {"strategy": "bluegreen"})), "--wait")
        assert out.returncode == 0, out.stdout + out.stderr + rg.log_tail()
        stable = live_cluster(rg, 2)
        upgrade = canary(
            [
                {"weight": 25},
                {"pause": {"duration_s": 5}},
                {"weight": 50},
                {"pause": {"duration_s": 5}},
            ],
            interval_s=2,
            min_requests=5,
        )
        upgrade["canary"]["scale_with_traffic"] = True  # fmt: skip
        spec = digits(tmp_path, "scaled", upgrade)
        with ReplicaSampler(state) as replicas, Load(rg.url, workers=2) as load, \
                Watch(rg) as watch:  # fmt: skip
            load.wait_for_requests(10)
            assert replicas.samples and replicas.samples[-1][1] == {stable: REPLICAS}
            out = rg.cli("push", str(spec), "--wait")
            assert out.returncode == 0, out.stdout + out.stderr + rg.log_tail()
            new = live_cluster(rg, 3)
            wait_for("the old cluster to go", lambda: rg.clusters_running() == {new}, 120)
            n = len(load.outcomes)
            load.wait_for_requests(n + 10)
        no_failures(load)
        assert new != stable
        peak = replicas.peak()
        trace = [(round(t - replicas.samples[0][0], 1), c.get(stable, 0), c.get(new, 0))
                 for t, c in replicas.samples]  # fmt: skip
        print(f"\n(s, stable, canary) replicas: {trace}\nshares: {watch.periods()}")
        periods = [(w, start, end) for w, start, end in watch.periods() if w > 0]
        assert [w for w, _, _ in periods] == [25, 50], watch.periods()
        for weight, start, end in periods:
            ours = replicas.of(new, start, end)
            theirs = replicas.of(stable, start, end)
            assert ours, f"no replica sample at weight {weight}%"
            # Replicas first, then the traffic: never fewer than the share needs.
            assert min(ours) >= at_capacity(weight), (weight, ours)
            assert min(theirs) >= at_capacity(100 - weight), (weight, theirs)
            settled = (at_capacity(weight), at_capacity(100 - weight))
            assert settled in zip(ours, theirs, strict=True), (weight, ours, theirs)
        last = replicas.samples[-1][1]
        assert {c: n for c, n in last.items() if n} == {new: REPLICAS}, last
        assert peak < 2 * REPLICAS, f"peak {peak} replicas: no better than blue-green"
    took = time.monotonic() - began
    print(f"\nscale_with_traffic: peak {peak} replicas (blue-green: {2 * REPLICAS}); "
          f"per step (weight, canary, stable) settled at "
          f"{[(w, at_capacity(w), at_capacity(100 - w)) for w, _, _ in periods]}; "
          f"{len(load.outcomes)} requests, 0 failed; test took {took:.0f}s")  # fmt: skip
