"""Capacity sequences under scale_with_traffic, over random histories (a cold review's).

Replays every DeployServe the planner sends (as the controller's `_act` does, in order) and
checks after each decision: a cluster that the table gives a share w > 0 was last sent a
Serve target_capacity >= w (None: 100). Pure planner, no Ray."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollout.plan import ClusterObservation, CreateCluster, DeployServe, Health, Liveness
from rollout.store import _from_json, _to_json
from tests.test_canary_plan import World, canary_spec, win

SKIP_SWAPS = False  # a baked cluster is kept whole now: a swap back needs no exemption

SPECS = [
    canary_spec(cpus=2, label="a", strategy="bluegreen"),
    canary_spec(cpus=4, label="b", scale=True, bake=30,
                steps=[{"weight": 20}, {"pause": {"duration_s": 5}}, {"weight": 60},
                       {"weight": 30}, {"pause": {}}]),
    canary_spec(cpus=2, label="c", scale=True, steps=[{"weight": 50}, {"weight": 100}]),
    canary_spec(cpus=4, label="d", scale=True, bake=40,
                steps=[{"weight": 70}, {"weight": 10}, {"weight": 90}]),
]  # fmt: skip

observation = st.builds(
    ClusterObservation,
    liveness=st.sampled_from([Liveness.UP] * 40 + [Liveness.UNREACHABLE, Liveness.DEAD]),
    health=st.sampled_from([Health.OK] * 30 + [Health.PENDING, Health.NOT_DEPLOYED]),
    message=st.just("m"),
    in_flight=st.integers(0, 2),
    window=st.one_of(st.none(), *[st.builds(lambda n: win(n), st.integers(0, 300))] * 6),
    proxy_ok=st.sampled_from([None, True, False]),
)


def operate(w: World, data: st.DataObject) -> None:
    """What may happen between two ticks: a push, a command, a restart, a rollback."""
    choice = data.draw(st.integers(0, 24), label="what")
    if choice == 0:
        w.push(data.draw(st.sampled_from(SPECS), label="spec"))
    elif choice == 1:
        kind = data.draw(st.sampled_from(["promote", "abort", "pause", "resume"]))
        w.command(kind, data.draw(st.booleans(), label="full"))
    elif choice == 2:
        w.state = _from_json(_to_json(w.state))
    elif choice == 3 and w.state.active is not None:
        good = [n for n in w.revisions if n < w.state.active.revision]
        if good:
            to = data.draw(st.sampled_from(good), label="to")
            w.push(w.revisions[to].spec, rollback_of=to)

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_cluster_with_a_share_was_last_sent_capacity_for_it(data: st.DataObject) -> None:
    w = World()
    w.push(SPECS[0])
    sent: dict[str, int] = {}  # cluster -> last target_capacity sent (100: full)
    history: list[str] = []
    for _ in range(data.draw(st.integers(5, 80), label="ticks")):
        operate(w, data)
        obs = {c: data.draw(observation, label=c) for c in w.state.clusters()}
        d = w.tick(obs, data.draw(st.floats(0.5, 12), label="dt"))
        for a in d.actions:
            if isinstance(a, CreateCluster):
                sent.pop(a.cluster, None)
            elif isinstance(a, DeployServe):
                sent[a.cluster] = 100 if a.capacity is None else a.capacity
        history.append(f"{d.events} {d.actions} traffic={d.state.traffic()}")
        for cluster, share in d.state.traffic().items():
            if share > 0:
                assert sent.get(cluster, 100) >= share, (
                    f"{cluster} has {share}% of traffic, last sent capacity "
                    f"{sent.get(cluster)}\n" + "\n".join(history[-8:])
                )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_share_rises_only_onto_capacity_sent_earlier(data: st.DataObject) -> None:
    """Replicas first, then traffic: a cluster whose share rises had that capacity sent in an
    earlier decision; exempt are decisions that end a rollout (abort, supersede: traffic
    back to stable at once) and a stable cluster that vanished."""
    from rollout.plan import Result

    w = World()
    w.push(SPECS[0])
    sent: dict[str, int] = {}
    history: list[str] = []
    for _ in range(data.draw(st.integers(5, 80), label="ticks")):
        operate(w, data)
        before = w.state.traffic()
        had_active = w.state.active is not None
        obs = {c: data.draw(observation, label=c) for c in w.state.clusters()}
        d = w.tick(obs, data.draw(st.floats(0.5, 12), label="dt"))
        history.append(
            f"{d.events} {d.actions} {[(r.revision, r.result.value) for r in d.finished]} "
            f"traffic={d.state.traffic()}"
        )
        ended = any(r.result in (Result.ABORTED, Result.SUPERSEDED) for r in d.finished)
        swapped = any(r.result is Result.ROLLED_BACK for r in d.finished)
        ended = ended or (SKIP_SWAPS and swapped)
        lost = any(obs[c].liveness is Liveness.DEAD for c in obs) or not had_active
        if not ended and not lost:
            for cluster, share in d.state.traffic().items():
                if share > before.get(cluster, 0) and before:
                    assert sent.get(cluster, 100) >= share, (
                        f"{cluster}: {before.get(cluster, 0)}% -> {share}% with capacity "
                        f"{sent.get(cluster)} sent before\n" + "\n".join(history[-8:])
                    )
        for a in d.actions:
            if isinstance(a, CreateCluster):
                sent.pop(a.cluster, None)
            elif isinstance(a, DeployServe):
                sent[a.cluster] = 100 if a.capacity is None else a.capacity
