"""The plan preview (`POST /v1/services/{name}/plan`) over a real Store, no Ray: what a push
would do against the live revision, validated like a push, storing nothing; and, for each
kind of change, the preview says what the real planner then does after the real push."""

from __future__ import annotations

import copy
import time
from typing import Any

import httpx
import pytest
import yaml

from rollout.plan import (
    Active,
    ClusterObservation,
    Health,
    Kind,
    Liveness,
    Observation,
    Pending,
    Result,
    Retiring,
    RolloutRecord,
    ServiceState,
    Step,
    plan,
)
from rollout.spec import parse_spec
from rollout.store import Store
from tests import test_api
from tests.test_api import CANARY, put_state, spec

store, client = test_api.store, test_api.client  # the admin API over a real Store (fixtures)


def with_env(raw: dict[str, Any], **env: str) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    out["cluster"]["env"].update(env)
    return out


def live(store: Store, raw: dict[str, Any], cluster: str = "c1") -> int:
    """Push `raw` and commit it live on `cluster` (the cluster hash the controller records)."""
    number, _ = store.push(parse_spec(raw), 1.0)
    active = Active(cluster, number, parse_spec(raw).cluster_hash())
    put_state(store, ServiceState("digits", active),
              RolloutRecord(number, Result.SUCCEEDED, "live"))  # fmt: skip
    return number


def unchanged_store(store: Store) -> tuple[list[str], list[dict[str, Any]]]:
    names = store.service_names()
    return names, [h for n in names for h in store.history(n)]


async def test_a_first_push_creates_a_cluster_and_nothing_is_stored(
    client: httpx.AsyncClient, store: Store
) -> None:
    r = await client.post("/v1/services/digits/plan", json=spec())
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["change"], body["live_revision"]) == ("new_cluster", None)
    assert body["reasons"] == ["no live revision"]
    assert body["applications"] == [{"name": "digits", "change": "added", "deployments": [
        {"name": "DigitsClassifier", "change": "added"}]}]  # fmt: skip
    assert body["serve_diff"].startswith("--- live/none\n+++ digits/serve\n")
    assert "+  route_prefix: /digits\n" in body["serve_diff"]
    assert body["strategy"]["name"] == "bluegreen"
    assert store.service_names() == [] and client.woken == []  # type: ignore[attr-defined]


async def test_the_live_spec_again_changes_nothing(client: httpx.AsyncClient, store: Store) -> None:
    live(store, spec())
    body = (await client.post("/v1/services/digits/plan", json=spec())).json()
    assert (body["change"], body["reasons"]) == ("none", ["identical to live revision 1"])
    assert (body["serve_diff"], body["applications"], body["strategy"]) == ("", [], None)


async def test_a_serve_only_change_is_in_place_naming_the_field_and_deployment(
    client: httpx.AsyncClient, store: Store
) -> None:
    live(store, spec(label="a"))
    before = unchanged_store(store)
    body = (await client.post("/v1/services/digits/plan", json=spec(label="b"))).json()
    assert body["change"] == "in_place" and body["live_revision"] == 1
    field = "serve.applications[digits].deployments[DigitsClassifier].user_config.label"
    assert body["reasons"] == [f"{field} changed"]
    assert body["applications"] == [{"name": "digits", "change": "changed", "deployments": [
        {"name": "DigitsClassifier", "change": "changed"}]}]  # fmt: skip
    assert "-      label: a\n+      label: b\n" in body["serve_diff"]
    assert body["serve_diff"].startswith("--- live/revision-1/serve\n")
    assert body["strategy"]["name"] == "in_place"
    assert unchanged_store(store) == before


async def test_a_cluster_change_is_a_new_cluster_naming_the_field(
    client: httpx.AsyncClient, store: Store
) -> None:
    live(store, with_env(spec(), APP_VERSION="1", OLD="x"))
    pushed = with_env(spec(), APP_VERSION="2")
    pushed["cluster"]["env"]["NEW"] = "y"
    body = (await client.post("/v1/services/digits/plan", json=pushed)).json()
    assert body["change"] == "new_cluster"
    assert body["reasons"] == ["cluster.env.APP_VERSION changed", "cluster.env.OLD removed",
                               "cluster.env.NEW added"]  # fmt: skip
    assert (body["serve_diff"], body["applications"]) == ("", [])
    assert body["strategy"]["name"] == "bluegreen"


async def test_a_canary_needs_its_own_cluster_even_for_a_serve_only_change(
    client: httpx.AsyncClient, store: Store
) -> None:
    live(store, spec(label="a"))
    raw = spec(label="b")
    raw["upgrade"].update(CANARY)
    body = (await client.post("/v1/services/digits/plan", json=raw)).json()
    assert body["change"] == "new_cluster"
    assert body["reasons"] == [
        "serve-only change with strategy canary (a canary needs a cluster of its own)"
    ]
    assert body["strategy"]["name"] == "canary"
    assert body["strategy"]["steps"] == CANARY["canary"]["steps"]  # type: ignore[index]


async def test_a_rollout_in_progress_is_named(client: httpx.AsyncClient, store: Store) -> None:
    live(store, spec(label="a"))
    store.push(parse_spec(spec(label="b")), 2.0)
    active = Active("c1", 1, parse_spec(spec()).cluster_hash())
    pending = Pending(2, Kind.IN_PLACE, "c1", active.cluster_hash, Step.DEPLOY, 2.0)
    put_state(store, ServiceState("digits", active, pending))
    same = (await client.post("/v1/services/digits/plan", json=spec(label="b"))).json()
    assert (same["change"], same["reasons"]) == (
        "none", ["identical to revision 2, rolling out now"])  # fmt: skip
    other = (await client.post("/v1/services/digits/plan", json=spec(label="c"))).json()
    assert other["change"] == "in_place"
    assert other["reasons"][-1] == "supersedes revision 2, rolling out now"


async def test_an_aborted_revision_pushed_again_changes_nothing(
    client: httpx.AsyncClient, store: Store
) -> None:
    live(store, spec(label="a"))
    store.push(parse_spec(spec(label="b")), 2.0)
    put_state(store, ServiceState("digits", Active("c1", 1, "h"), failed_up_to=2),
              RolloutRecord(2, Result.ABORTED, "health timed out"))  # fmt: skip
    body = (await client.post("/v1/services/digits/plan", json=spec(label="b"))).json()
    assert body["change"] == "none"
    assert body["reasons"] == ["identical to revision 2 (aborted): change the spec to try again"]


async def test_yaml_body_invalid_spec_conflict_and_name_are_refused_like_a_push(
    client: httpx.AsyncClient, store: Store
) -> None:
    r = await client.post("/v1/services/digits/plan", content=yaml.safe_dump(spec()),
                          headers={"Content-Type": "application/yaml"})  # fmt: skip
    assert r.status_code == 200 and r.json()["change"] == "new_cluster"
    bad = spec()
    bad["cluster"]["num_cpu"] = 3
    bad["serve"]["applications"][0]["deployments"][0]["num_replica"] = 2
    r = await client.post("/v1/services/digits/plan", json=bad)
    assert r.status_code == 422
    fields = {e["field"] for e in r.json()["errors"]}
    assert "cluster.num_cpu" in fields
    r = await client.post("/v1/services/other/plan", json=spec())
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "name"
    live(store, spec())
    r = await client.post("/v1/services/other/plan", json=spec(name="other"))
    assert r.status_code == 409 and "owned by service 'digits'" in r.json()["errors"][0]
    r = await client.post("/v1/services/digits/plan", json=spec(), headers={"Authorization": ""})
    assert r.status_code == 401
    assert store.service_names() == ["digits"] and len(store.history("digits")) == 1


def _upgrade_only(raw: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    out["upgrade"]["drain_timeout_s"] = 5
    return out


def _canary(raw: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    out["upgrade"].update(CANARY)
    return out


CASES = {
    "identical": (spec(), spec()),
    "serve only": (spec(label="a"), spec(label="b")),
    "cluster env": (spec(), with_env(spec(), APP_VERSION="2")),
    "upgrade only": (spec(), _upgrade_only(spec())),
    "canary, serve only": (spec(label="a"), _canary(spec(label="b"))),
    "canary, upgrade only": (_canary(spec()), _upgrade_only(_canary(spec()))),
    "canary, cluster env": (_canary(spec()), _canary(with_env(spec(), APP_VERSION="2"))),
}


@pytest.mark.parametrize("case", CASES)
async def test_the_preview_is_what_the_planner_then_does(
    client: httpx.AsyncClient, store: Store, case: str
) -> None:
    """Preview, then the real push and one tick of the real planner: a preview of `none`
    starts no rollout; otherwise the rollout it starts is of the previewed kind."""
    before, after = CASES[case]
    live(store, before)
    preview = (await client.post("/v1/services/digits/plan", json=after)).json()
    assert (await client.put("/v1/services/digits", json=after)).status_code in (200, 202)
    state = store.load("digits")
    assert state is not None and state.active is not None
    latest = store.latest("digits")
    revisions = {n: store.revision("digits", n) for n in {state.active.revision, latest.number}}
    seen = Observation({"c1": ClusterObservation(Liveness.UP, Health.OK)})
    decision = plan(state, latest, revisions, seen, 10.0, "c2")
    pending = decision.state.pending
    if preview["change"] == "none":
        assert pending is None, case
    else:
        assert pending is not None and pending.kind.value == preview["change"], case
    expected = {
        "identical": "none",
        "serve only": "in_place",
        "cluster env": "new_cluster",
        "upgrade only": "in_place",
        "canary, serve only": "new_cluster",
        "canary, upgrade only": "in_place",
        "canary, cluster env": "new_cluster",
    }
    assert preview["change"] == expected[case]  # fmt: skip


async def test_a_baking_cluster_and_a_full_slot_are_named(
    client: httpx.AsyncClient, store: Store
) -> None:
    """Revision 2 live on c2 while c1 (revision 1) bakes: revision 1's spec again goes back
    to c1; a cluster change waits for c1 to go (two clusters at most)."""
    live(store, spec(label="a"))
    store.push(parse_spec(spec(label="b")), 2.0)
    baking = Retiring("c1", 5.0, 30.0, 0.0, revision=1, bake_until=time.time() + 3600)
    active = Active("c2", 2, parse_spec(spec()).cluster_hash())
    put_state(store, ServiceState("digits", active, retiring=(baking,)),
              RolloutRecord(2, Result.SUCCEEDED, "live"))  # fmt: skip
    back = (await client.post("/v1/services/digits/plan", json=spec(label="a"))).json()
    assert back["reasons"][-1] == ("cluster c1 still bakes revision 1: traffic goes back to it "
                                   "at once if it is healthy (no new cluster)")  # fmt: skip
    moved = (await client.post("/v1/services/digits/plan", json=with_env(spec(), V="2"))).json()
    assert moved["change"] == "new_cluster"
    assert moved["reasons"] == ["cluster.env.V added",
                                "waits for retiring cluster c1 to be deleted first"]  # fmt: skip


async def test_the_live_spec_after_a_failed_push_is_in_place_as_the_planner_does(
    client: httpx.AsyncClient, store: Store
) -> None:
    live(store, spec(label="a"))
    store.push(parse_spec(spec(label="b")), 2.0)
    active = Active("c1", 1, parse_spec(spec()).cluster_hash())
    put_state(store, ServiceState("digits", active, failed_up_to=2),
              RolloutRecord(2, Result.ABORTED, "health timed out"))  # fmt: skip
    body = (await client.post("/v1/services/digits/plan", json=spec(label="a"))).json()
    assert (body["change"], body["reasons"]) == ("in_place", ["the live revision's spec again"])
    assert (await client.put("/v1/services/digits", json=spec(label="a"))).status_code == 202
    state = store.load("digits")
    assert state is not None
    revisions = {n: store.revision("digits", n) for n in (1, 3)}
    seen = Observation({"c1": ClusterObservation(Liveness.UP, Health.OK)})
    pending = plan(state, revisions[3], revisions, seen, 10.0, "c2").state.pending
    assert pending is not None and pending.kind is Kind.IN_PLACE
