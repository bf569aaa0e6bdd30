"""Fourth review: the health gate's target_capacity check against the plan's own memory of
what it sent. A test double of Serve at our own interface (the Observation): it keeps the
target_capacity each DeployServe set, and the real `evaluate_status` + `capacity_of` judge it,
as the controller's `observe` does."""

from __future__ import annotations

from typing import Any

from rollout.health import evaluate_status
from rollout.plan import (
    ClusterObservation,
    CreateCluster,
    DeleteCluster,
    DeployServe,
    Health,
    Liveness,
    Result,
    Step,
    capacity_of,
)
from tests.test_canary_plan import World, canary_spec, win

HEALTHY = {"status": "HEALTHY", "target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]}


class FakeServe:
    """Per cluster: the revision and target_capacity Serve runs (what the last deploy set)."""

    def __init__(self) -> None:
        self.running: dict[str, tuple[int, Any]] = {}
        self.up: set[str] = set()
        self.puts = 0

    def apply(self, w: World, actions: Any) -> None:
        for a in actions:
            if isinstance(a, CreateCluster):
                self.up.add(a.cluster)
            elif isinstance(a, DeployServe):
                self.puts += 1
                spec = w.revisions[a.revision].spec.serve
                cap = a.capacity if a.capacity is not None else spec.get("target_capacity")
                self.running[a.cluster] = (a.revision, None if cap is None else float(cap))
            elif isinstance(a, DeleteCluster):
                self.up.discard(a.cluster)
                self.running.pop(a.cluster, None)

    def observe(self, w: World, requests: dict[str, int]) -> dict[str, ClusterObservation]:
        s = w.state
        out = {}
        for cid in s.clusters():
            if cid not in self.up:
                out[cid] = ClusterObservation(Liveness.DEAD)
                continue
            expected = s.expected_revision(cid)
            if any(r.cluster == cid and not r.baking(w.now) for r in s.retiring):
                expected = None
            health, message = None, ""
            if expected is not None and cid in self.running:
                rev, cap = self.running[cid]
                apps = w.revisions[rev].spec.serve["applications"]
                doc = {
                    "target_capacity": cap,
                    "proxies": {"n": {"status": "HEALTHY"}},
                    "applications": {a["name"]: {"status": "RUNNING", "deployed_app_config": a,
                                                 "deployments": {"D": HEALTHY}} for a in apps},
                }  # fmt: skip
                want = w.revisions[expected].spec.serve
                r = evaluate_status(doc, want, capacity_of(s, cid, w.revisions))
                health, message = r.health, r.message
            elif expected is not None:
                health, message = Health.NOT_DEPLOYED, "nothing deployed"
            n = requests.get(cid, 0)
            out[cid] = ClusterObservation(Liveness.UP, health, message,
                                          window=win(n) if n else None)  # fmt: skip
        return out

    def tick(self, w: World, dt: float = 1.0, requests: dict[str, int] | None = None) -> Any:
        d = w.tick(self.observe(w, requests or {}), dt=dt)
        self.apply(w, d.actions)
        return d


def scaling_canary_at_50(w: World, serve: FakeServe) -> tuple[str, str]:
    w.push(canary_spec(cpus=2, label="a", strategy="bluegreen"))
    for _ in range(5):
        serve.tick(w)
    assert w.state.active is not None and w.state.pending is None
    old = w.state.active.cluster
    w.push(canary_spec(cpus=4, label="b", scale=True, steps=[{"weight": 50}, {"pause": {}}]))
    for _ in range(12):
        serve.tick(w)
    p = w.state.pending
    assert p is not None and p.step is Step.CANARY and p.canary is not None
    assert p.canary.weight == 50 and w.state.active_capacity == 50
    assert serve.running[old][1] == 50.0
    return old, p.cluster


def test_an_in_place_push_during_a_scaling_canary_goes_live() -> None:
    """The user gives up the canary by pushing the stable spec again (or any serve-only
    change of it, blue-green): an in-place update of the stable cluster, deployed at full
    capacity. It must pass its gate, not be judged against the canary-era 50%."""
    w, serve = World(), FakeServe()
    old, _ = scaling_canary_at_50(w, serve)
    rev = w.push(canary_spec(cpus=2, label="c", strategy="bluegreen"))
    before = serve.puts
    messages = set()
    for _ in range(120):
        d = serve.tick(w)
        if w.state.pending is not None:
            messages.add(w.state.pending.message)
        if any(r.revision == rev for r in d.finished):
            break
    results = [r for d in w.log for r in d.finished if r.revision == rev]
    assert results and results[-1].result is Result.SUCCEEDED, (
        f"{results}, {serve.puts - before} PUTs, messages {messages}"
    )
    assert w.state.active is not None and w.state.active.cluster == old


def test_a_scaling_canary_then_a_bluegreen_in_place_push_is_not_a_put_per_tick() -> None:
    w, serve = World(), FakeServe()
    scaling_canary_at_50(w, serve)
    w.push(canary_spec(cpus=2, label="c", strategy="bluegreen"))
    before = serve.puts
    for _ in range(20):
        serve.tick(w)
    assert serve.puts - before <= 3, f"{serve.puts - before} deploys in 20 ticks"


def test_a_promoted_scaling_canary_settles() -> None:
    """After a scaling canary is promoted the active cluster settles (no deploy per tick)."""
    w, serve = World(), FakeServe()
    old, new = scaling_canary_at_50(w, serve)
    assert w.command("promote") is None
    for _ in range(5):
        serve.tick(w, requests={old: 100, new: 100}, dt=10)
    assert w.state.active is not None and w.state.active.cluster == new
    before = serve.puts
    for _ in range(20):
        serve.tick(w)
    assert serve.puts == before


def test_a_new_cluster_dying_while_the_baked_one_scales_back_up_leaves_traffic_nowhere() -> None:
    """scale_with_traffic + bake_s: the bake now begins by raising the stable cluster from
    50% back to full. While its new replicas start, Serve reports it PENDING (replicas
    short of target), so it is not `_ready`. If the new cluster dies in that window, the
    baked cluster (healthy at 50%, serving the old revision) is not used: all traffic has
    nowhere to go and the dead revision is restored on a fresh cluster."""
    from rollout.plan import ClusterObservation as CO
    from tests.test_canary_plan import live, up

    spec = canary_spec(scale=True, bake=40, steps=[{"weight": 50}])
    w2 = World()
    old = live(w2, canary_spec(cpus=2, label="a", strategy="bluegreen"))
    w2.push(spec)
    for _ in range(40):
        o = {c: up(win(100)) for c in w2.state.clusters()}
        w2.tick(o, dt=10 if w2.state.pending and w2.state.pending.step is Step.CANARY else 1)
        if w2.state.active is not None and w2.state.active.cluster != old:
            break
    new = w2.state.active.cluster if w2.state.active else ""
    assert new and new != old
    last = w2.log[-1]
    assert DeployServe(old, 1) in last.actions, last.actions  # raised back to full
    scaling = CO(Liveness.UP, Health.PENDING, "deployment D has 1/2 replicas")
    w2.tick({old: scaling, new: CO(Liveness.DEAD)})
    assert w2.state.active is not None and w2.state.active.cluster == old, (
        f"traffic: {w2.state.traffic()}, events: {w2.log[-1].events}"
    )


def with_cap(spec: Any, cap: float) -> Any:
    from rollout.spec import ServiceSpec

    raw = spec.to_json()
    raw["serve"] = {**raw["serve"], "target_capacity": cap}
    return ServiceSpec.model_validate(raw)


def test_users_own_capacity_through_a_scaling_canary_and_bake_settles() -> None:
    w, serve = World(), FakeServe()
    w.push(with_cap(canary_spec(cpus=2, label="a", strategy="bluegreen"), 80))
    for _ in range(5):
        serve.tick(w)
    old = w.state.active.cluster if w.state.active else ""
    assert old and serve.running[old][1] == 80.0
    w.push(with_cap(canary_spec(cpus=4, label="b", scale=True, bake=40,
                                steps=[{"weight": 50}]), 80))  # fmt: skip
    for _ in range(40):
        serve.tick(w, dt=5, requests={c: 100 for c in w.state.clusters()})
        if w.state.active is not None and w.state.active.cluster != old:
            break
    new = w.state.active.cluster if w.state.active else ""
    assert new != old
    before = serve.puts
    for _ in range(6):  # inside the bake
        serve.tick(w, dt=1, requests={new: 100})
    assert serve.puts - before <= 2, serve.puts - before
    assert serve.running[new][1] == 80.0 and serve.running[old][1] == 80.0


def test_plain_bluegreen_with_users_capacity_passes_its_gate() -> None:
    w, serve = World(), FakeServe()
    w.push(with_cap(canary_spec(cpus=2, label="a", strategy="bluegreen"), 30))
    for _ in range(5):
        serve.tick(w)
    old = w.state.active.cluster if w.state.active else ""
    w.push(with_cap(canary_spec(cpus=4, label="b", strategy="bluegreen", bake=40), 30))
    for _ in range(6):
        serve.tick(w)
    assert w.state.active is not None and w.state.active.cluster != old
    w.push(with_cap(canary_spec(cpus=4, label="c", strategy="bluegreen"), 30))  # in place
    for _ in range(6):
        serve.tick(w)
    assert w.state.active.revision == 3 and w.state.pending is None


def test_a_failing_bake_rolls_back_while_the_baked_cluster_scales_back_up() -> None:
    """The bake begins by raising the stable cluster to full capacity; while its replicas
    start, a failing new revision (31% errors) must still go back onto it: the old cluster
    runs the old revision at 50% and serves; the new one fails a third of all requests."""
    from rollout.plan import ClusterObservation as CO
    from tests.test_canary_plan import live, up

    w = World()
    old = live(w, canary_spec(cpus=2, label="a", strategy="bluegreen"))
    w.push(canary_spec(scale=True, bake=40, steps=[{"weight": 50}]))
    for _ in range(40):
        o = {c: up(win(100)) for c in w.state.clusters()}
        w.tick(o, dt=10 if w.state.pending and w.state.pending.step is Step.CANARY else 1)
        if w.state.active is not None and w.state.active.cluster != old:
            break
    new = w.state.active.cluster if w.state.active else ""
    scaling = CO(Liveness.UP, Health.PENDING, "deployment D has 1/2 replicas")
    for _ in range(3):
        w.tick({old: scaling, new: up(win(212, errors=66))}, dt=10)
    assert w.state.active is not None and w.state.active.cluster == old, [
        e for d in w.log[-3:] for e in d.events
    ]
