"""The planner, on its own: scenarios for each path, then property tests over random
sequences of pushes and observations that check the invariants after every tick."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollout.plan import (
    MAX_CLUSTERS,
    ClusterObservation,
    CreateCluster,
    DeleteCluster,
    DeployServe,
    Health,
    Kind,
    Liveness,
    Observation,
    Phase,
    Result,
    Revision,
    ServiceState,
    Step,
    plan,
)
from rollout.spec import ServiceSpec


def make_spec(
    cpus: int = 2,
    label: str = "a",
    streak: int = 2,
    timeout: float = 100.0,
    delay: float = 0.0,
    dead_after: float = 300.0,
    gateway_timeout: float = 60.0,
) -> ServiceSpec:
    return ServiceSpec.model_validate(
        {
            "name": "svc",
            "cluster": {"num_cpus": cpus},
            "serve": {
                "applications": [
                    {
                        "name": "app",
                        "route_prefix": "/app",
                        "import_path": "m:app",
                        "deployments": [{"name": "D", "user_config": {"label": label}}],
                    }
                ]
            },
            "upgrade": {
                "health": {"timeout_s": timeout, "consecutive_successes": streak},
                "drain_timeout_s": 30,
                "deletion_delay_s": delay,
            },
            "liveness": {"dead_after_s": dead_after},
            "gateway": {"timeout_s": gateway_timeout},
        }
    )


UP_OK = ClusterObservation(Liveness.UP, Health.OK)
UP_PENDING = ClusterObservation(Liveness.UP, Health.PENDING, "deploying")
# A dashboard that does not answer, with the Serve proxy still answering, or not.
STALLED = ClusterObservation(Liveness.UNREACHABLE, proxy_ok=True)
SILENT = ClusterObservation(Liveness.UNREACHABLE, proxy_ok=False)


class World:
    """Drives the planner tick by tick, with the observations a test chooses."""

    def __init__(self) -> None:
        self.state = ServiceState("svc")
        self.revisions: dict[int, Revision] = {}
        self.now = 1000.0
        self.ids = 0
        self.log: list[Any] = []

    def push(self, spec: ServiceSpec, rollback_of: int | None = None) -> int:
        number = len(self.revisions) + 1
        self.revisions[number] = Revision.of(number, spec, rollback_of)
        return number

    def tick(self, obs: dict[str, ClusterObservation], dt: float = 1.0) -> Any:
        self.now += dt
        self.ids += 1
        desired = self.revisions[max(self.revisions)]
        d = plan(self.state, desired, self.revisions, Observation(obs), self.now, f"c{self.ids}")
        self.state = d.state
        self.log.append(d)
        return d


def test_first_deploy_creates_then_deploys_then_goes_live_after_streak() -> None:
    w = World()
    w.push(make_spec())
    d = w.tick({})
    assert d.actions == (CreateCluster("c1", 1),)
    assert w.state.phase is Phase.DEPLOYING and w.state.traffic() == {"c1": 0}
    d = w.tick({"c1": ClusterObservation(Liveness.UP)})
    assert d.actions == (DeployServe("c1", 1),)
    w.tick({"c1": UP_OK})
    assert w.state.active is None, "one OK is not enough with consecutive_successes=2"
    w.tick({"c1": UP_PENDING})
    assert w.state.pending is not None and w.state.pending.ok_streak == 0
    w.tick({"c1": UP_OK})
    d = w.tick({"c1": UP_OK})
    assert w.state.active is not None and w.state.active.cluster == "c1"
    assert w.state.phase is Phase.LIVE and w.state.traffic() == {"c1": 100}
    assert d.finished[0].result is Result.SUCCEEDED


def go_live(w: World, spec: ServiceSpec) -> str:
    w.push(spec)
    w.tick({})
    cid = w.state.pending.cluster if w.state.pending else ""
    w.tick({cid: ClusterObservation(Liveness.UP)})
    for _ in range(spec.upgrade.health.consecutive_successes):
        w.tick({cid: UP_OK})
    assert w.state.active is not None and w.state.active.cluster == cid
    return cid


def start_upgrade(w: World, spec: ServiceSpec) -> tuple[str, str]:
    """Service live on one cluster, then a cluster change pushed: (old, pending) clusters."""
    old = go_live(w, make_spec(cpus=2))
    w.push(spec)
    w.tick({old: UP_OK})
    return old, w.state.pending.cluster if w.state.pending else ""


def pass_gates(w: World, old: str, new: str) -> None:
    """The pending cluster comes up and passes its gates twice in a row: traffic switches."""
    w.tick({old: UP_OK, new: ClusterObservation(Liveness.UP)})
    w.tick({old: UP_OK, new: UP_OK})
    w.tick({old: UP_OK, new: UP_OK})


def test_serve_only_change_updates_in_place_and_keeps_cluster() -> None:
    w = World()
    c = go_live(w, make_spec(label="a"))
    w.push(make_spec(label="b"))
    d = w.tick({c: UP_OK})
    assert w.state.pending is not None and w.state.pending.kind is Kind.IN_PLACE
    assert DeployServe(c, 2) in d.actions
    assert not any(isinstance(a, CreateCluster) for a in d.actions)
    w.tick({c: UP_OK})
    w.tick({c: UP_OK})
    assert w.state.active is not None
    assert (w.state.active.cluster, w.state.active.revision) == (c, 2)


def test_cluster_change_is_blue_green_and_old_cluster_deleted_only_when_drained() -> None:
    w = World()
    old, new = start_upgrade(w, make_spec(cpus=4))
    assert new != old and w.state.traffic() == {old: 100, new: 0}
    pass_gates(w, old, new)
    assert w.state.traffic() == {old: 0, new: 100}
    busy = ClusterObservation(Liveness.UP, Health.OK, in_flight=3)
    d = w.tick({old: busy, new: UP_OK})
    assert not any(isinstance(a, DeleteCluster) for a in d.actions), "requests still in flight"
    d = w.tick({old: ClusterObservation(Liveness.UP, Health.OK, in_flight=0), new: UP_OK})
    assert DeleteCluster(old, "drained") in d.actions
    assert w.state.clusters() == [new]


def test_drain_timeout_deletes_even_with_requests_in_flight() -> None:
    w = World()
    old = go_live(w, make_spec(gateway_timeout=10))
    w.push(make_spec(cpus=4, gateway_timeout=10))
    w.tick({old: UP_OK})
    new = w.state.pending.cluster if w.state.pending else ""
    pass_gates(w, old, new)
    stuck = ClusterObservation(Liveness.UP, Health.OK, in_flight=1)
    d = w.tick({old: stuck, new: UP_OK}, dt=29)
    assert not any(isinstance(a, DeleteCluster) for a in d.actions)
    d = w.tick({old: stuck, new: UP_OK}, dt=2)
    assert [a.cluster for a in d.actions if isinstance(a, DeleteCluster)] == [old]


def test_the_drain_never_cuts_a_request_the_gateway_would_still_wait_for() -> None:
    """drain_timeout_s 30 s, gateway timeout 60 s (the defaults): a request in flight on the
    retiring cluster may take 60 s, so the cluster is kept that long (found by review: it was
    deleted at 30 s, failing such requests)."""
    w = World()
    old, new = start_upgrade(w, make_spec(cpus=4))
    pass_gates(w, old, new)
    stuck = ClusterObservation(Liveness.UP, Health.OK, in_flight=1)
    d = w.tick({old: stuck, new: UP_OK}, dt=45)
    assert not any(isinstance(a, DeleteCluster) for a in d.actions)
    d = w.tick({old: stuck, new: UP_OK}, dt=16)
    assert [a.cluster for a in d.actions if isinstance(a, DeleteCluster)] == [old]


def test_a_rollout_waiting_for_a_retiring_cluster_says_so_once() -> None:
    """It said so every tick (60 events in 60 ticks, found by review), pushing everything
    else out of the status's last events."""
    w = World()
    old, new = start_upgrade(w, make_spec(cpus=4, delay=120))
    pass_gates(w, old, new)
    w.push(make_spec(cpus=8))
    said = []
    for _ in range(60):
        d = w.tick({old: UP_OK, new: UP_OK})
        said += [e for e in d.events if "waits for a retiring cluster" in e]
    assert said == ["revision 3 waits for a retiring cluster to be deleted"]
    assert w.state.waiting == said[0]
    d = w.tick({old: UP_OK, new: UP_OK}, dt=120)  # the delay passes: deleted, then it starts
    w.tick({new: UP_OK})
    assert w.state.pending is not None and w.state.waiting == ""


def test_deletion_delay_is_respected() -> None:
    w = World()
    old, new = start_upgrade(w, make_spec(cpus=4, delay=60))
    pass_gates(w, old, new)
    d = w.tick({old: UP_OK, new: UP_OK}, dt=30)
    assert not any(isinstance(a, DeleteCluster) for a in d.actions)
    d = w.tick({old: UP_OK, new: UP_OK}, dt=31)
    assert any(isinstance(a, DeleteCluster) for a in d.actions)


def test_deploy_failed_aborts_at_once_and_traffic_never_moves() -> None:
    w = World()
    old, new = start_upgrade(w, make_spec(cpus=4))
    w.tick({old: UP_OK, new: ClusterObservation(Liveness.UP)})
    failed = ClusterObservation(Liveness.UP, Health.FAILED, "DEPLOY_FAILED: ImportError: nope")
    d = w.tick({old: UP_OK, new: failed})
    assert DeleteCluster(new, "rollout aborted") in d.actions
    assert w.state.traffic() == {old: 100}
    assert w.state.last_rollout is not None
    assert w.state.last_rollout.result is Result.ABORTED
    assert "ImportError: nope" in w.state.last_rollout.message
    assert w.state.phase is Phase.LIVE
    # The failed revision is not retried on its own.
    d = w.tick({old: UP_OK})
    assert d.actions == () and w.state.pending is None


def test_timeout_aborts_with_last_message() -> None:
    w = World()
    old, new = start_upgrade(w, make_spec(cpus=4, timeout=50))
    w.tick({old: UP_OK, new: ClusterObservation(Liveness.UP)})
    w.tick({old: UP_OK, new: UP_PENDING}, dt=30)
    w.tick({old: UP_OK, new: UP_PENDING}, dt=30)
    assert w.state.last_rollout is not None
    assert w.state.last_rollout.result is Result.ABORTED
    assert "not healthy within 50s" in w.state.last_rollout.message
    assert "deploying" in w.state.last_rollout.message


def test_in_place_failure_rolls_the_active_config_back() -> None:
    w = World()
    c = go_live(w, make_spec(label="a"))
    w.push(make_spec(label="broken"))
    w.tick({c: UP_OK})
    d = w.tick({c: ClusterObservation(Liveness.UP, Health.FAILED, "DEPLOY_FAILED")})
    assert DeployServe(c, 1) in d.actions
    assert w.state.active is not None and w.state.active.revision == 1


def test_newest_push_wins_and_reuses_pending_cluster_with_same_cluster_spec() -> None:
    w = World()
    old, pending = start_upgrade(w, make_spec(cpus=4, label="x"))
    w.push(make_spec(cpus=4, label="y"))
    d = w.tick({old: UP_OK, pending: ClusterObservation(Liveness.UP)})
    assert w.state.pending is not None
    assert (w.state.pending.cluster, w.state.pending.revision) == (pending, 3)
    assert DeployServe(pending, 3) in d.actions
    assert d.finished[0].result is Result.SUPERSEDED


def test_newest_push_with_other_cluster_spec_replaces_pending_cluster() -> None:
    w = World()
    old, first = start_upgrade(w, make_spec(cpus=4))
    w.push(make_spec(cpus=8))
    d = w.tick({old: UP_OK, first: ClusterObservation(Liveness.UP)})
    assert d.actions[0] == DeleteCluster(first, "superseded by revision 3")
    assert isinstance(d.actions[1], CreateCluster)
    assert w.state.active is not None and w.state.active.cluster == old


def test_revert_to_active_cluster_spec_drops_pending_and_goes_in_place() -> None:
    w = World()
    old = go_live(w, make_spec(cpus=2, label="a"))
    w.push(make_spec(cpus=4))
    w.tick({old: UP_OK})
    first = w.state.pending.cluster if w.state.pending else ""
    w.push(make_spec(cpus=2, label="b"))
    d = w.tick({old: UP_OK, first: ClusterObservation(Liveness.UP)})
    assert DeleteCluster(first, "superseded by revision 3") in d.actions
    assert w.state.pending is not None and w.state.pending.kind is Kind.IN_PLACE


def test_dead_active_cluster_is_replaced_with_its_revision() -> None:
    w = World()
    old = go_live(w, make_spec())
    d = w.tick({old: ClusterObservation(Liveness.DEAD)})
    assert DeleteCluster(old, "dead") in d.actions
    assert any(isinstance(a, CreateCluster) and a.revision == 1 for a in d.actions)
    assert w.state.phase is Phase.DEPLOYING


def test_stalled_dashboard_keeps_the_active_cluster_and_its_traffic() -> None:
    w = World()
    live = go_live(w, make_spec(dead_after=120))
    stalled_at = w.now + 25 / 3
    for obs in (STALLED, SILENT, STALLED):  # 25 s without an answer, well under the window
        d = w.tick({live: obs}, dt=25 / 3)
        assert d.actions == () and w.state.phase is Phase.LIVE
        assert w.state.traffic() == {live: 100}
    assert w.state.unreachable_since(live) == stalled_at, "the first miss is kept"
    d = w.tick({live: UP_OK})
    assert d.actions == () and w.state.unreachable == ()
    assert any("answers again" in e for e in d.events)


def test_a_stalled_dashboard_alone_never_condemns_a_cluster() -> None:
    w = World()
    live = go_live(w, make_spec(dead_after=60))
    for _ in range(10):  # ten minutes: the Serve proxy answers throughout
        d = w.tick({live: STALLED}, dt=60)
        assert d.actions == () and w.state.active is not None
    assert w.state.pending is None and w.state.traffic() == {live: 100}


def test_silent_cluster_is_replaced_after_the_window_and_keeps_traffic_until_then() -> None:
    w = World()
    old = go_live(w, make_spec(dead_after=60))
    w.tick({old: SILENT}, dt=1)
    d = w.tick({old: SILENT}, dt=59)
    assert d.actions == (), "not before the whole window has passed"
    d = w.tick({old: SILENT}, dt=1)
    (create,) = d.actions
    assert isinstance(create, CreateCluster) and create.revision == 1
    new = create.cluster
    # Never deleted before its replacement passed its gates: it keeps its traffic.
    assert w.state.traffic() == {old: 100, new: 0}
    assert w.state.phase is Phase.UPGRADING
    pass_gates(w, old, new)  # (the old one answers again meanwhile: the switch goes on)
    assert w.state.traffic() == {old: 0, new: 100}
    d = w.tick({old: UP_OK, new: UP_OK})
    assert DeleteCluster(old, "drained") in d.actions


def test_replacement_of_a_silent_cluster_is_not_superseded_by_a_failed_revision() -> None:
    w = World()
    old = go_live(w, make_spec(dead_after=60))
    w.push(make_spec(cpus=4))  # a cluster change that fails its gates
    w.tick({old: UP_OK})
    bad = w.state.pending.cluster if w.state.pending else ""
    w.tick({old: UP_OK, bad: ClusterObservation(Liveness.UP)})
    w.tick({old: UP_OK, bad: ClusterObservation(Liveness.UP, Health.FAILED, "boom")})
    assert w.state.pending is None and w.state.active is not None
    w.tick({old: SILENT}, dt=1)
    d = w.tick({old: SILENT}, dt=61)
    new = w.state.pending.cluster if w.state.pending else ""
    assert d.actions == (CreateCluster(new, 1),), "the last good revision, not the failed one"
    d = w.tick({old: SILENT, new: ClusterObservation(Liveness.UP)})
    assert w.state.pending is not None
    assert (w.state.pending.cluster, w.state.pending.revision) == (new, 1)
    assert d.actions == (DeployServe(new, 1),)


def test_gone_cluster_that_was_replaced_is_not_superseded_by_a_failed_revision() -> None:
    w = World()
    old = go_live(w, make_spec())
    w.push(make_spec(cpus=4))
    w.tick({old: UP_OK})
    bad = w.state.pending.cluster if w.state.pending else ""
    w.tick({old: UP_OK, bad: ClusterObservation(Liveness.UP)})
    w.tick({old: UP_OK, bad: ClusterObservation(Liveness.UP, Health.FAILED, "boom")})
    d = w.tick({old: ClusterObservation(Liveness.DEAD)})
    new = w.state.pending.cluster if w.state.pending else ""
    assert CreateCluster(new, 1) in d.actions
    w.tick({new: ClusterObservation(Liveness.UP)})
    w.tick({new: UP_OK})
    w.tick({new: UP_OK})
    assert w.state.active is not None and w.state.active.cluster == new


def test_a_gone_active_cluster_comes_back_after_the_rollout_under_way_aborts() -> None:
    """The active cluster is found gone while a cluster change is under way; that change
    then fails its gates. The last good revision must still come back (found by review: the
    service stayed down, 20 ticks later, until someone pushed again)."""
    w = World()
    old = go_live(w, make_spec())
    w.push(make_spec(cpus=4))
    w.tick({old: UP_OK})
    new = w.state.pending.cluster if w.state.pending else ""
    w.tick({old: ClusterObservation(Liveness.DEAD), new: ClusterObservation(Liveness.UP)})
    assert w.state.active is None and w.state.pending is not None
    w.tick({new: ClusterObservation(Liveness.UP, Health.FAILED, "400: bad config")})
    assert w.state.last_rollout is not None
    assert w.state.last_rollout.result is Result.ABORTED and w.state.pending is None
    d = w.tick({})
    back = w.state.pending.cluster if w.state.pending else ""
    assert d.actions == (CreateCluster(back, 1),), "the last good revision comes back"
    w.tick({back: ClusterObservation(Liveness.UP)})
    w.tick({back: UP_OK})
    w.tick({back: UP_OK})
    assert w.state.active is not None
    assert (w.state.active.cluster, w.state.active.revision) == (back, 1)
    assert w.state.restore is None


def fail_gates(w: World, cluster: str) -> None:
    w.tick({cluster: ClusterObservation(Liveness.UP)})
    w.tick({cluster: ClusterObservation(Liveness.UP, Health.FAILED, "boom")})


def creates(w: World) -> list[int]:
    return [a.revision for d in w.log for a in d.actions if isinstance(a, CreateCluster)]


def test_a_restore_that_fails_is_tried_once_not_in_a_loop() -> None:
    """Found by the second review: 13 clusters created in 40 ticks, without end."""
    w = World()
    old = go_live(w, make_spec())
    w.tick({old: ClusterObservation(Liveness.DEAD)})
    fail_gates(w, w.state.pending.cluster if w.state.pending else "")
    before = len(creates(w))
    for _ in range(40):
        w.tick({})
    assert len(creates(w)) == before and w.state.phase is Phase.FAILED
    assert w.state.restore is None


def test_an_aborted_revision_is_not_rolled_again_after_a_restore() -> None:
    """Revision 2 aborted while the active cluster (revision 1) was found gone: revision 1
    comes back once, and revision 2 is not tried again until something newer is pushed
    (it alternated 1, 2, 1, 2 ... and re-rolled 2 right after a successful restore)."""
    w = World()
    old = go_live(w, make_spec())
    w.push(make_spec(cpus=4))
    w.tick({old: UP_OK})
    new = w.state.pending.cluster if w.state.pending else ""
    w.tick({old: ClusterObservation(Liveness.DEAD), new: ClusterObservation(Liveness.UP)})
    w.tick({new: ClusterObservation(Liveness.UP, Health.FAILED, "boom")})
    w.tick({})
    back = w.state.pending.cluster if w.state.pending else ""
    w.tick({back: ClusterObservation(Liveness.UP)})
    w.tick({back: UP_OK})
    w.tick({back: UP_OK})
    assert w.state.active is not None and w.state.active.revision == 1
    n = len(creates(w))
    for _ in range(20):
        w.tick({back: UP_OK})
    assert len(creates(w)) == n, "the aborted revision 2 was rolled out again"
    w.push(make_spec(cpus=8))  # something newer: tried
    d = w.tick({back: UP_OK})
    assert any(isinstance(a, CreateCluster) and a.revision == 3 for a in d.actions)


def test_pending_cluster_whose_dashboard_stalls_keeps_waiting_until_its_timeout() -> None:
    w = World()
    old, new = start_upgrade(w, make_spec(cpus=4, timeout=100))
    w.tick({old: UP_OK, new: ClusterObservation(Liveness.UP)})
    for _ in range(4):
        d = w.tick({old: UP_OK, new: SILENT}, dt=20)
        assert w.state.pending is not None and not d.finished
        assert "unreachable" in w.state.pending.message
    w.tick({old: UP_OK, new: UP_OK})
    w.tick({old: UP_OK, new: UP_OK})
    assert w.state.active is not None and w.state.active.cluster == new


def test_no_free_slot_aborts_the_rollout_with_the_reason() -> None:
    w = World()
    w.push(make_spec())
    d = plan(w.state, w.revisions[1], w.revisions, Observation({}, cannot_create="no slot"),
             w.now, "c1")  # fmt: skip
    assert d.actions == () and d.state.pending is None
    assert d.state.last_rollout is not None
    assert d.state.last_rollout.result is Result.ABORTED
    assert d.state.last_rollout.message == "cannot create a cluster: no slot"


def test_interrupted_cluster_start_is_retried_with_a_fresh_cluster() -> None:
    w = World()
    w.push(make_spec())
    w.tick({})
    first = w.state.pending.cluster if w.state.pending else ""
    d = w.tick({first: ClusterObservation(Liveness.DEAD)})
    assert d.actions[0] == DeleteCluster(first, "start interrupted")
    assert isinstance(d.actions[1], CreateCluster)
    assert w.state.pending is not None and w.state.pending.step is Step.CREATE_CLUSTER


def test_permanent_start_error_aborts_first_deploy_as_failed() -> None:
    w = World()
    w.push(make_spec())
    w.tick({})
    c = w.state.pending.cluster if w.state.pending else ""
    w.tick({c: ClusterObservation(Liveness.DEAD, error="ray start exited with 1")})
    assert w.state.phase is Phase.FAILED
    assert w.state.last_rollout is not None and "exited with 1" in w.state.last_rollout.message


def test_delete_service_drains_then_is_gone() -> None:
    w = World()
    c = go_live(w, make_spec())
    w.state = ServiceState(
        w.state.name, w.state.active, w.state.pending, w.state.retiring, w.state.last_rollout, True
    )
    d = w.tick({c: ClusterObservation(Liveness.UP, Health.OK, in_flight=2)})
    assert w.state.traffic() == {c: 0} and not d.gone
    d = w.tick({c: ClusterObservation(Liveness.UP, Health.OK, in_flight=2)})
    assert not any(isinstance(a, DeleteCluster) for a in d.actions)
    d = w.tick({c: ClusterObservation(Liveness.UP, Health.OK)})
    assert DeleteCluster(c, "drained") in d.actions
    d = w.tick({})
    assert d.gone


# ---- properties over random histories --------------------------------------------------
SPECS = [make_spec(cpus=c, label=lb, dead_after=30) for c in (1, 2) for lb in ("a", "b")]

observation = st.builds(
    ClusterObservation,
    # Biased towards healthy clusters, so histories often get as far as a switch and a drain.
    liveness=st.sampled_from(
        [Liveness.UP] * 12 + [Liveness.STARTING, Liveness.DEAD] + [Liveness.UNREACHABLE] * 3
    ),
    health=st.sampled_from([Health.OK] * 10 + [Health.PENDING, Health.FAILED, Health.NOT_DEPLOYED]),
    message=st.just("m"),
    in_flight=st.integers(0, 2),
    proxy_ok=st.sampled_from([True, False, None]),
)


@dataclass
class Checker:
    """Tracks what the world saw, to check each decision against it."""

    ok_run: dict[str, int] = field(default_factory=dict)
    alive: set[str] = field(default_factory=set)
    held: set[str] = field(default_factory=set)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_invariants_hold_over_random_histories(data: st.DataObject) -> None:
    w = World()
    w.push(SPECS[0])
    chk = Checker()
    for _ in range(data.draw(st.integers(5, 40), label="ticks")):
        if data.draw(st.integers(0, 3), label="push?") == 0:
            w.push(data.draw(st.sampled_from(SPECS), label="spec"))
        before = w.state
        obs = {c: data.draw(observation, label=c) for c in before.clusters()}
        # The gateway can only have requests in flight to a cluster that once had traffic.
        chk.held.update(c for c, w in before.traffic().items() if w > 0)
        obs = {c: o if c in chk.held else replace(o, in_flight=0) for c, o in obs.items()}
        for c, o in obs.items():
            healthy = o.liveness is Liveness.UP and o.health is Health.OK
            chk.ok_run[c] = chk.ok_run.get(c, 0) + 1 if healthy else 0
        dt = data.draw(st.floats(0.1, 20), label="dt")
        d = w.tick(obs, dt)
        after = d.state
        need = max(r.spec.upgrade.health.consecutive_successes for r in w.revisions.values())
        # Traffic only goes to a cluster that passed its gates N times in a row.
        if after.active is not None and (
            before.active is None
            or (after.active.cluster, after.active.revision)
            != (before.active.cluster, before.active.revision)
        ):
            assert chk.ok_run.get(after.active.cluster, 0) >= min(need, 2)
        for a in d.actions:
            if isinstance(a, DeleteCluster):
                o = obs.get(a.cluster, ClusterObservation(Liveness.DEAD))
                # Never delete the cluster holding traffic, unless it is dead.
                if before.traffic().get(a.cluster, 0) > 0:
                    assert o.liveness is Liveness.DEAD
                assert after.active is None or after.active.cluster != a.cluster
                # Never delete with requests in flight unless the drain timed out.
                if o.in_flight > 0 and o.liveness is not Liveness.DEAD:
                    r = next(r for r in before.retiring if r.cluster == a.cluster)
                    assert w.now - r.since >= r.drain_timeout_s
                chk.alive.discard(a.cluster)
                chk.ok_run.pop(a.cluster, None)
            elif isinstance(a, CreateCluster):
                chk.alive.add(a.cluster)
                assert len(chk.alive) <= MAX_CLUSTERS, "more than two clusters"
            elif isinstance(a, DeployServe):
                chk.ok_run[a.cluster] = 0
                # The active cluster only ever gets its own revision or an in-place rollout's.
                if before.active is not None and a.cluster == before.active.cluster:
                    in_place = (
                        after.pending is not None
                        and after.pending.kind is Kind.IN_PLACE
                        and after.pending.revision == a.revision
                    )
                    assert a.revision == before.active.revision or in_place
        assert len(after.clusters()) <= MAX_CLUSTERS
        assert sum(after.traffic().values()) in (0, 100)

