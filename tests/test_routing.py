"""The route policy on its own: service states in, the gateway's route table out."""

from __future__ import annotations

from dataclasses import replace

from gateway.routes import Backend
from rollout.plan import Active, ServiceState
from rollout.providers.base import ClusterInfo
from rollout.routing import route_table
from rollout.spec import ServiceSpec
from tests.test_plan import World, go_live, make_spec, pass_gates, start_upgrade


def infos(*clusters: str) -> dict[str, ClusterInfo]:
    return {c: ClusterInfo(c, "svc", "local", "", f"127.0.0.{i + 2}", 9000, 0.0)
            for i, c in enumerate(clusters)}  # fmt: skip


def with_timeout(spec: ServiceSpec, timeout_s: float) -> ServiceSpec:
    return spec.model_copy(update={"gateway": spec.gateway.model_copy(
        update={"timeout_s": timeout_s})})  # fmt: skip


def test_route_table_carries_every_cluster_and_the_service_timeout() -> None:
    w = World()
    old, new = start_upgrade(w, make_spec(cpus=4))
    spec = with_timeout(make_spec(), 7.5)
    table = route_table({"svc": w.state}, lambda n, r: spec, infos(old, new))
    (route,) = table.routes
    assert route.prefix == "/app" and route.timeout_s == 7.5
    # The pending cluster is already known to the engine, at weight 0.
    assert set(route.backends) == {Backend(old, "http://127.0.0.2:9000", 100),
                                   Backend(new, "http://127.0.0.3:9000", 0)}  # fmt: skip


def test_after_the_switch_the_retiring_cluster_stays_at_weight_zero() -> None:
    w = World()
    old, new = start_upgrade(w, make_spec(cpus=4))
    pass_gates(w, old, new)
    table = route_table({"svc": w.state}, lambda n, r: make_spec(), infos(old, new))
    (route,) = table.routes
    assert {b.cluster: b.weight for b in route.backends} == {old: 0, new: 100}


def test_a_deleting_service_keeps_its_clusters_at_weight_zero() -> None:
    w = World()
    live = go_live(w, make_spec())
    state = replace(w.state, deleting=True)
    table = route_table({"svc": state}, lambda n, r: make_spec(), infos(live))
    assert [b.weight for r in table.routes for b in r.backends] == [0]


def test_a_cluster_without_a_record_is_left_out() -> None:
    w = World()
    old, _new = start_upgrade(w, make_spec(cpus=4))
    table = route_table({"svc": w.state}, lambda n, r: make_spec(), infos(old))
    assert [b.cluster for r in table.routes for b in r.backends] == [old]


def test_a_prefix_claimed_twice_stays_with_the_first_service_by_name() -> None:
    states = {"b": ServiceState("b", Active("cb", 1, "h")),
              "a": ServiceState("a", Active("ca", 1, "h"))}  # fmt: skip
    table = route_table(states, lambda n, r: make_spec(), infos("ca", "cb"))
    (route,) = table.routes
    assert route.service == "a" and [x.cluster for x in route.backends] == ["ca"]


def test_no_state_no_routes() -> None:
    assert route_table({}, lambda n, r: make_spec(), {}).routes == ()
    assert route_table({"svc": ServiceState("svc")}, lambda n, r: make_spec(), {}).routes == ()
