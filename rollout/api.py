"""The admin API (FastAPI): push specs, read status and history, delete services.

Every route but /-/healthz needs `Authorization: Bearer <token>`. A push is validated in
full before anything is written: an invalid spec or a route prefix owned by another service
changes nothing.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import yaml
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from rollout.plan import ServiceState
from rollout.spec import ServiceSpec, SpecError, parse_spec
from rollout.store import Store

log = logging.getLogger("raygate.api")


def status_of(store: Store, name: str, in_flight: Mapping[str, int]) -> dict[str, Any] | None:
    state = store.load(name)
    if state is None:
        return None
    return _status(store, state, in_flight)


def _status(store: Store, state: ServiceState, in_flight: Mapping[str, int]) -> dict[str, Any]:
    clusters = {info.id: info for info, _ in store.clusters()}
    desired = store.latest(state.name)
    active = None
    if state.active is not None:
        info = clusters.get(state.active.cluster)
        active = {
            "revision": state.active.revision,
            "cluster": state.active.cluster,
            "serve_url": info.serve_url if info else None,
        }
    pending = None
    last: dict[str, Any] | None = None
    if state.pending is not None:
        p = state.pending
        pending = {
            "revision": p.revision,
            "cluster": p.cluster,
            "step": p.step.value,
            "kind": p.kind.value,
            "started_at": p.started_at,
            "healthy_streak": p.ok_streak,
            "message": p.message,
        }
        last = {"revision": p.revision, "result": "in_progress", "message": p.message}
    elif state.last_rollout is not None:
        lr = state.last_rollout
        last = {"revision": lr.revision, "result": lr.result.value, "message": lr.message}
    return {
        "name": state.name,
        "phase": state.phase.value,
        "desired_revision": desired.number,
        "active": active,
        "pending": pending,
        "retiring": [
            {"cluster": r.cluster, "since": r.since, "in_flight": in_flight.get(r.cluster, 0)}
            for r in state.retiring
        ],
        "last_rollout": last,
        # A cluster whose dashboard does not answer keeps its role (phase unchanged) until
        # the planner's window says it must be replaced: this says so meanwhile.
        "degraded": [
            {
                "cluster": u.cluster,
                "since": u.since,
                "message": f"dashboard unreachable for {max(0.0, time.time() - u.since):.0f}s",
            }
            for u in state.unreachable
        ],
        "traffic": state.traffic(),
        "in_flight": {c: in_flight.get(c, 0) for c in state.clusters()},
        "routes": desired.spec.app_routes(),
        "events": store.events(state.name, 20),
    }


def _conflicts(spec: ServiceSpec, others: Mapping[str, ServiceSpec]) -> list[str]:
    mine = set(spec.app_routes().values())
    found = []
    for name, other in others.items():
        if name == spec.name:
            continue
        for prefix in set(other.app_routes().values()) & mine:
            found.append(f"route_prefix {prefix!r} is owned by service {name!r}")
    return found


def create_admin_app(
    store: Store,
    token: str,
    wake: Callable[[str], None],
    in_flight: Callable[[], Awaitable[Mapping[str, int]]],
    metrics_registry: CollectorRegistry | None = None,
) -> FastAPI:
    app = FastAPI(title="raygate admin API", version="1")

    def auth(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip(), token):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    guarded = [Depends(auth)]

    @app.get("/-/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.put("/v1/services/{name}", dependencies=guarded)
    async def push(name: str, request: Request) -> JSONResponse:
        body = await request.body()
        try:
            raw = yaml.safe_load(body) if body.strip() else None
        except yaml.YAMLError as exc:
            return _invalid([("", f"body is neither JSON nor YAML: {exc}")])
        try:
            spec = parse_spec(raw)
        except SpecError as exc:
            return _invalid(exc.problems)
        if spec.name != name:
            return _invalid([("name", f"spec names {spec.name!r} but was pushed to {name!r}")])
        conflicts = _conflicts(spec, store.latest_specs())
        if conflicts:
            return JSONResponse({"detail": "route conflict", "errors": conflicts}, 409)
        revision, unchanged = store.push(spec, time.time())
        wake(name)
        state = store.load(name)
        phase = state.phase.value if state else "deploying"
        body_out = {"name": name, "revision": revision, "phase": phase, "unchanged": unchanged}
        if unchanged:
            body_out["message"] = f"identical to revision {revision}: nothing to do"
        return JSONResponse(body_out, 200 if unchanged else 202)

    async def flights_or_none() -> Mapping[str, int]:
        # Status must answer even when the engine cannot be asked (HAProxy restarting):
        # in-flight counts then read 0 here. The controller never decides on such a read.
        try:
            return await in_flight()
        except Exception as exc:
            log.warning("in-flight counts unavailable: %r", exc)
            return {}

    @app.get("/v1/services", dependencies=guarded)
    async def list_services() -> list[dict[str, Any]]:
        flights = await flights_or_none()
        return [s for n in store.service_names() if (s := status_of(store, n, flights))]

    @app.get("/v1/services/{name}", dependencies=guarded)
    async def get_service(name: str) -> dict[str, Any]:
        status = status_of(store, name, await flights_or_none())
        if status is None:
            raise HTTPException(404, f"no service {name!r}")
        return status

    @app.get("/v1/services/{name}/history", dependencies=guarded)
    def history(name: str) -> list[dict[str, Any]]:
        if store.load(name) is None:
            raise HTTPException(404, f"no service {name!r}")
        return store.history(name)

    @app.delete("/v1/services/{name}", dependencies=guarded, status_code=202)
    def delete(name: str) -> dict[str, str]:
        if not store.mark_deleting(name):
            raise HTTPException(404, f"no service {name!r}")
        wake(name)
        return {"name": name, "phase": "deleting"}

    if metrics_registry is not None:
        registry = metrics_registry

        @app.get("/metrics", dependencies=guarded)
        def metrics() -> Response:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def create_metrics_app(registry: CollectorRegistry) -> FastAPI:
    """The admin port of `raygate gateway`: read-only, so no token."""
    app = FastAPI(title="raygate gateway admin")

    @app.get("/-/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _invalid(problems: list[tuple[str, str]]) -> JSONResponse:
    return JSONResponse(
        {"detail": "invalid spec", "errors": SpecError(problems).as_json()}, status_code=422
    )
