"""Peak replicas of a rollout: blue-green, a canary, and a canary with `scale_with_traffic`,
same model, same steps, one raygate, one run (so the ratios compare like with like).

Run it from the repo root: `python -m benchmarks.canary_replicas` (part of `./dev bench`).
It starts real local Ray clusters (about 4 minutes on 2 cores): run it alone.

digits runs 4 replicas of 0.25 CPU each. Every rollout is a new-cluster rollout (a cluster
env change), under 2 workers of load through the gateway; the canaries walk weight 25,
pause 5 s, weight 50, pause 5 s. The RUNNING replicas of both clusters are counted from each
cluster's own Serve status every 0.5 s (tests/replicas.py) from the push until the old
cluster is deleted; the peak is the most at once.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.harness import EXAMPLES, Load, Raygate, live_cluster, running_raygate, wait_for
from tests.replicas import ReplicaSampler

REPLICAS = 4
STEPS = [{"weight": 25}, {"pause": {"duration_s": 5}}, {"weight": 50},
         {"pause": {"duration_s": 5}}]  # fmt: skip


def spec(where: Path, revision: int, upgrade: dict[str, Any], new_cluster: bool = True) -> Path:
    """digits v1 at 4 replicas; the revision number in the cluster env (a new cluster)."""
    raw = yaml.safe_load((EXAMPLES / "v1.yaml").read_text())
    raw["cluster"]["code_dir"] = str(EXAMPLES.parent / "apps")
    if new_cluster:
        raw["cluster"]["env"]["BENCH_REV"] = str(revision)
    deployment = raw["serve"]["applications"][0]["deployments"][0]
    deployment.update(num_replicas=REPLICAS, ray_actor_options={"num_cpus": 0.25},
                      user_config={"label": f"v{revision}"})  # fmt: skip
    raw["upgrade"]["health"]["consecutive_successes"] = 2
    raw["upgrade"].update(upgrade)
    path = where / f"v{revision}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def canary(scale: bool) -> dict[str, Any]:
    return {"strategy": "canary", "canary": {
        "steps": STEPS, "scale_with_traffic": scale,
        "analysis": {"interval_s": 2, "min_requests": 5, "failure_limit": 2,
                     "inconclusive_limit": 20, "max_error_rate": 0.01}}}  # fmt: skip


@dataclass
class Row:
    name: str
    peak: int
    seconds: float
    requests: int
    failed: int


def rollout(rg: Raygate, where: Path, revision: int, name: str, upgrade: dict[str, Any]) -> Row:
    path = spec(where, revision, upgrade)
    with ReplicaSampler(rg.state_dir) as replicas, Load(rg.url, workers=2) as load:
        load.wait_for_requests(10)
        started = time.monotonic()
        out = rg.cli("push", str(path), "--wait")
        if out.returncode != 0:
            raise RuntimeError(f"{name}: push failed: {out.stdout}{out.stderr}{rg.log_tail()}")
        new = live_cluster(rg, revision)
        wait_for("the old cluster to go", lambda: rg.clusters_running() == {new}, 120)
        took = time.monotonic() - started
    return Row(name, replicas.peak(), took, len(load.outcomes), len(load.failures))


def main() -> None:
    argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0]).parse_args()
    with tempfile.TemporaryDirectory(prefix="raygate-bench-") as tmp:
        where = Path(tmp)
        with running_raygate(where / "state", "haproxy") as rg:
            live_cluster(rg, 1)
            # In place (serve-only): the live cluster goes to 4 replicas before measuring.
            four = spec(where, 2, {"strategy": "bluegreen"}, new_cluster=False)
            out = rg.cli("push", str(four), "--wait")
            if out.returncode != 0:
                raise RuntimeError(f"push failed: {out.stdout}{out.stderr}{rg.log_tail()}")
            rows = [
                rollout(rg, where, 3, "blue-green", {"strategy": "bluegreen"}),
                rollout(rg, where, 4, "canary", canary(scale=False)),
                rollout(rg, where, 5, "canary, scale_with_traffic", canary(scale=True)),
            ]
    base = rows[0].peak
    print(f"\npeak RUNNING replicas over both clusters, digits at {REPLICAS} replicas, "
          f"canary steps {STEPS}")  # fmt: skip
    print(f"{'rollout':<28} {'peak':>5} {'vs blue-green':>14} {'push→old gone':>14} "
          f"{'requests':>9} {'failed':>7}")  # fmt: skip
    for r in rows:
        print(f"{r.name:<28} {r.peak:>5} {r.peak / base:>13.2f}x {r.seconds:>13.1f}s "
              f"{r.requests:>9} {r.failed:>7}")  # fmt: skip


if __name__ == "__main__":
    main()
