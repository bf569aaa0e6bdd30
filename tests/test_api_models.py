"""The admin API documents itself: its OpenAPI schema names a model for every route's answers,
and real answers hold to those models (strictly: no unknown key, no int where a string is
documented), in every state the status can show. No Ray; a real Store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry
from pydantic import TypeAdapter

from rollout.analysis import Outcome, Verdict
from rollout.api import create_admin_app
from rollout.plan import (
    Active,
    Canary,
    Command,
    Kind,
    Pending,
    Result,
    Retiring,
    RolloutRecord,
    ServiceState,
    Step,
    Unreachable,
)
from rollout.store import Store
from tests.test_api import TOKEN, canary_spec, canary_state, put_state, spec

# route -> (its success model, its error models), as the schema must name them.
OK = "200"
EXPECTED: dict[tuple[str, str], dict[str, str]] = {
    ("get", "/-/healthz"): {OK: "Health"},
    ("get", "/-/ready"): {OK: "Ready", "503": "Ready"},
    ("put", "/v1/services/{name}"): {OK: "PushResult", "202": "PushResult", "400": "Detail",
                                     "401": "Detail", "409": "Conflict", "413": "Detail",
                                     "422": "Invalid"},
    ("post", "/v1/services/{name}/plan"): {OK: "PlanResult", "400": "Detail", "401": "Detail",
                                           "409": "Conflict", "413": "Detail", "422": "Invalid"},
    ("get", "/v1/services"): {OK: "Status[]", "401": "Detail"},
    ("get", "/v1/services/{name}"): {OK: "Status", "401": "Detail", "404": "Detail"},
    ("get", "/v1/services/{name}/history"): {OK: "HistoryEntry[]", "401": "Detail",
                                             "404": "Detail"},
    ("delete", "/v1/services/{name}"): {"202": "Deleting", "401": "Detail", "404": "Detail"},
    **{("post", f"/v1/services/{{name}}/{kind}"): {
        "202": "CommandResult", "400": "Detail", "401": "Detail", "404": "Detail",
        "409": "Conflict", "413": "Detail", "422": "Invalid"}
       for kind in ("promote", "abort", "pause", "resume", "rollback")},
}  # fmt: skip


def _named(schema: dict[str, Any]) -> str:
    if "items" in schema:
        return _named(schema["items"]) + "[]"
    ref: str = schema["$ref"]
    return ref.rsplit("/", 1)[1]


def test_the_schema_names_the_model_of_every_route_and_answer(tmp_path: Path) -> None:
    app = admin_app(Store(tmp_path / "db"))
    paths = app.openapi()["paths"]
    seen = {(method, path) for path, ops in paths.items() for method in ops}
    assert seen == set(EXPECTED) | {("get", "/metrics")}
    for (method, path), answers in EXPECTED.items():
        responses = paths[path][method]["responses"]
        named = {code: _named(r["content"]["application/json"]["schema"])
                 for code, r in responses.items() if code in answers}  # fmt: skip
        assert named == answers, (method, path)
    metrics = paths["/metrics"]["get"]["responses"]
    assert "text/plain" in metrics["200"]["content"] and "401" in metrics


def admin_app(store: Store, why: list[str | None] | None = None) -> FastAPI:
    async def in_flight() -> dict[str, int]:
        return {"c1": 2, "c0": 1}

    async def ready() -> str | None:
        return why[0] if why else None

    return create_admin_app(store, TOKEN, lambda name: None, in_flight, CollectorRegistry(),
                            ready=ready)  # fmt: skip


class Checked:
    """Every answer the client receives is validated against the model its route documents
    for that status code; `seen` records which (method, route, status) were checked."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.seen: set[tuple[str, str, int]] = set()

    async def __call__(self, response: httpx.Response) -> None:
        await response.aread()
        request = response.request
        route = next(
            r
            for r in self.app.routes
            if isinstance(r, APIRoute)
            and request.method in r.methods
            and r.path_regex.match(request.url.path)
        )
        if route.path == "/metrics":
            return
        documented = route.responses.get(response.status_code)
        assert documented is not None, (request.method, route.path, response.status_code)
        TypeAdapter(documented["model"]).validate_python(response.json(), strict=True)
        self.seen.add((request.method.lower(), route.path, response.status_code))


@pytest.fixture
async def checked(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Store, Checked]]:
    store = Store(tmp_path / "raygate.db")
    why: list[str | None] = ["the controller is still starting"]
    app = admin_app(store, why)
    check = Checked(app)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://admin",
        headers={"Authorization": f"Bearer {TOKEN}"}, event_hooks={"response": [check]},
    ) as c:  # fmt: skip
        c.why = why  # type: ignore[attr-defined]
        yield c, store, check
    store.close()


async def test_real_answers_of_every_route_hold_to_their_models(
    checked: tuple[httpx.AsyncClient, Store, Checked],
) -> None:
    c, store, check = checked
    await c.get("/-/healthz")
    await c.get("/-/ready")
    c.why[0] = None  # type: ignore[attr-defined]
    await c.get("/-/ready")
    await c.get("/v1/services", headers={"Authorization": ""})
    await c.get("/v1/services/nope")
    await c.get("/v1/services/nope/history")
    await c.delete("/v1/services/nope")
    for kind in ("promote", "abort", "pause", "resume", "rollback"):
        await c.post(f"/v1/services/nope/{kind}")
    await c.post("/v1/services/digits/plan", json=spec())
    assert (await c.put("/v1/services/digits", json=spec())).status_code == 202
    assert (await c.put("/v1/services/digits", json=spec())).status_code == 200
    await c.get("/v1/services")  # deploying, nothing active
    await c.put("/v1/services/digits", json={"name": "digits", "serve": {}})
    await c.put("/v1/services/other", json=spec(name="other"))
    await c.put("/v1/services/digits", content=b"x" * (2 * 1024 * 1024))
    await c.put("/v1/services/digits", content=b"{}", headers={"Content-Length": "two"})
    await c.post("/v1/services/digits/promote", json={"full": 1})
    await c.post("/v1/services/digits/promote")  # nothing to promote: 409

    put_state(store, ServiceState("digits", Active("c1", 1, "h1"),
              unreachable=(Unreachable("c1", 5.0),)),
              RolloutRecord(1, Result.SUCCEEDED, "live"))  # fmt: skip
    await c.put("/v1/services/digits", json=canary_spec())
    await c.post("/v1/services/digits/plan", json=spec(label="c"))
    verdict = Verdict(Outcome.FAIL, "error rate 0.2 over 0.01", 40, 90, 0.2, 0.0, 80.0)
    put_state(store, canary_state(Canary(1, 20, 6.0), verdict=verdict))
    await c.get("/v1/services/digits")
    await c.post("/v1/services/digits/pause")
    put_state(store, canary_state(Canary(3, 50, 6.0)))
    await c.get("/v1/services/digits")
    put_state(store, ServiceState("digits", Active("c2", 2, "h2"), retiring=(
        Retiring("c1", 9.0, 30.0, 0.0, revision=1, bake_until=99e9),)),
        RolloutRecord(2, Result.SUCCEEDED, "live"))  # fmt: skip
    await c.get("/v1/services/digits")
    await c.post("/v1/services/digits/plan", json=spec())
    assert (await c.post("/v1/services/digits/rollback")).status_code == 202
    pending = Pending(3, Kind.NEW_CLUSTER, "c3", "h1", Step.HEALTH, 5.0)
    put_state(store, ServiceState("digits", Active("c2", 2, "h2"), pending, waiting="a reason"))
    await c.get("/v1/services/digits")
    await c.get("/v1/services/digits/history")
    await c.delete("/v1/services/digits")
    await c.get("/v1/services")

    documented = {(method, path, int(code)) for (method, path), answers in EXPECTED.items()
                  for code in answers}  # fmt: skip
    # Every route, and each error shape, was seen at least once for real.
    assert {(m, p) for m, p, _ in check.seen} == set(EXPECTED)
    assert {code for _, _, code in check.seen} == {code for _, _, code in documented}


async def test_a_command_takes_its_kind_from_its_path_never_from_a_query(
    checked: tuple[httpx.AsyncClient, Store, Checked],
) -> None:
    """`POST .../pause?kind=abort` pauses (it once aborted: the endpoint's bound `kind` was a
    query parameter too), and `?kind=nope` is no 500."""
    c, store, _ = checked
    await c.put("/v1/services/digits", json=spec())
    put_state(store, ServiceState("digits", Active("c1", 1, "h1")),
              RolloutRecord(1, Result.SUCCEEDED, "live"))  # fmt: skip
    await c.put("/v1/services/digits", json=canary_spec())
    put_state(store, canary_state(Canary(1, 20, 6.0)))
    r = await c.post("/v1/services/digits/pause", params={"kind": "abort"})
    assert r.status_code == 202, r.text
    state = store.load("digits")
    assert state is not None and state.commands == (Command("pause", False),)
    r = await c.post("/v1/services/digits/resume", params={"kind": "nope"})
    assert r.status_code == 409, r.text  # resume does not apply: not paused yet (queued)
