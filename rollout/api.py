"""The admin API (FastAPI): push specs (or preview one: `/plan`), read status and history,
delete services, and the operator's canary commands (promote, abort, pause, resume, rollback).

Every route but /-/healthz and /-/ready needs `Authorization: Bearer <token>` (or the status
page's session cookie with its CSRF header: rollout/page.py), /openapi.json included; the
Swagger and ReDoc pages are off (a browser cannot send the token, and they load scripts from
a CDN into a page that holds it). A push is validated in full before
anything is written: an invalid spec, one the running provider cannot run, or a route prefix
owned by another service changes nothing.

Every endpoint is `async def`: FastAPI would run plain `def` endpoints in a thread pool, and
the Store is used from the event loop's thread only (it opens a connection per thread, so
that is a choice of cost, not of safety).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any

import yaml
from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from rollout import api_models as m
from rollout.conflicts import route_conflicts
from rollout.page import page_router
from rollout.plan import (
    COMMANDS,
    Analysis,
    Command,
    Hold,
    Pending,
    ServiceState,
    Step,
    refusal,
    walks_canary,
)
from rollout.preview import held_revisions, preview
from rollout.rates import RateHistory
from rollout.sessions import Sessions
from rollout.spec import ServiceSpec, SpecError, parse_spec
from rollout.store import Store

log = logging.getLogger("raygate.api")

# A spec is a few KiB; this bounds what one request can make raygate buffer and parse.
MAX_BODY_BYTES = 1024 * 1024
MAX_BODY_VALUES = 100_000  # after YAML aliases are expanded; a real spec holds hundreds
# The smallest spec that pushes, as the schema's example (and the fuzzer's starting point).
EXAMPLE = {
    "name": "digits",
    "serve": {"applications": [
        {"name": "digits", "route_prefix": "/digits", "import_path": "digits:build"},
    ]},
}  # fmt: skip
# A command's body is `{}`, `{"full": true}` or `{"to": 3}`: a few bytes, never a spec.
MAX_COMMAND_BYTES = 4096
# Each command's body fields and their one JSON type (bool is not an int here: `{"to": true}`
# is a mistake, not revision 1).
COMMAND_FIELDS: dict[str, dict[str, type]] = {
    **{kind: {} for kind in COMMANDS},
    "promote": {"full": bool},
    "rollback": {"to": int},
}
MAX_REVISION = 2**62  # SQLite's INTEGER holds 64 bits: a bigger `to` would be a 500
_JSON_TYPES = {bool: "true or false", int: "an integer"}
NameParam = Annotated[str, Path(examples=["digits"])]  # documents, does not constrain
# libyaml's safe loader where PyYAML was built with it: ~5x faster than the pure-Python one.
_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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
            **_canary_status(store, state, p),
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
            {
                "cluster": r.cluster,
                "revision": r.revision,
                "since": r.since,
                "bake_until": r.bake_until,  # kept at weight 0 until then, ready to take back
                "in_flight": in_flight.get(r.cluster, 0),
            }
            for r in state.retiring
        ],
        # The new revision's verdicts while it bakes (the canary's are under `pending`).
        "analysis": _analysis(state.analysis) if state.pending is None else None,
        "last_rollout": last,
        "waiting": state.waiting or None,  # why the desired revision has not started yet
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


def _canary_status(store: Store, state: ServiceState, p: Pending) -> dict[str, Any]:
    """The pending rollout's canary: `canary_step.index` counts from 1 (as the CLI prints
    it, "step 2/4") and names the step under way; it is null before the steps begin (health
    gates) and once every step is done."""
    revision = store.revision(state.name, p.revision)
    canary = revision.spec.upgrade.canary
    steps = canary.steps if canary is not None and revision.canary else ()
    c = p.canary
    step = None
    paused = False
    if c is not None and c.index < len(steps):
        current = steps[c.index]
        step = {"index": c.index + 1, "of": len(steps),
                "step": current.model_dump(mode="json", exclude_none=True)}  # fmt: skip
        paused = current.pause is not None and current.pause.duration_s is None
    return {
        # What this rollout runs as: a rollback never walks canary steps, whatever its spec.
        # (and an in-place update, of a push that changed only `upgrade`, is none either)
        # A first deploy never walks steps (no stable cluster): `plan.walks_canary`; one
        # whose stable cluster went away mid-walk still shows the steps it walked.
        "strategy": (
            "canary" if walks_canary(state.active, p.kind, revision) or p.step is Step.CANARY
            else "bluegreen"
        ),
        "canary_step": step,
        "weight": c.weight if c is not None else 0,
        "paused": c is not None and (paused or c.hold is not Hold.NONE),
        "hold": c.hold.value if c is not None and c.hold is not Hold.NONE else None,
        "analysis": _analysis(state.analysis),
    }


def _analysis(a: Analysis | None) -> dict[str, Any] | None:
    """The last verdict and the values behind it (null fields before the first interval is
    judged), with the run of failed and inconclusive intervals that abort or pause."""
    if a is None:
        return None
    verdict: dict[str, Any] = (
        a.verdict.to_json() if a.verdict is not None else {
            "result": None, "message": "no interval judged yet", "canary_requests": 0,
            "stable_requests": None, "error_rate": None, "stable_error_rate": None,
            "p99_ms": None,
        }
    )  # fmt: skip
    return {
        **verdict,
        "cluster": a.cluster,
        "stable": a.stable,
        "judged_at": a.last_at,
        "failures": a.failures,
        "inconclusive": a.inconclusive,
    }


def create_admin_app(
    store: Store,
    token: str,
    wake: Callable[[str], None],
    in_flight: Callable[[], Awaitable[Mapping[str, int]]],
    metrics_registry: CollectorRegistry | None = None,
    check_spec: Callable[[ServiceSpec], list[tuple[str, str]]] = lambda spec: [],
    ready: Callable[[], Awaitable[str | None]] | None = None,
    sessions: Sessions | None = None,
    rates: RateHistory | None = None,
) -> FastAPI:
    """`check_spec` names what the running provider cannot run in a spec (a 422); `ready`
    says why raygate cannot take traffic yet, None once it can (/-/ready). `sessions` are
    the status page's logins (rollout/page.py), `rates` its charts' samples."""
    app = FastAPI(
        title="raygate admin API", version="1", openapi_url=None, docs_url=None, redoc_url=None
    )
    expected = token.encode()
    sessions = sessions if sessions is not None else Sessions()

    def authorized(request: Request) -> bool:
        # Compared as bytes: Starlette decodes headers as latin-1, so any header round-trips,
        # and compare_digest on a non-ASCII str would raise (a 500) instead of saying no.
        header = request.headers.get("authorization", "").encode("latin-1")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() == b"bearer" and secrets.compare_digest(given.strip(), expected):
            return True
        # The status page's session cookie (a CSRF header too for a change): not the token
        return sessions.authorizes(request)

    async def auth(request: Request) -> None:
        if not authorized(request):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    guarded = [Depends(auth)]
    SPEC_BODY = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": _inline_schema(ServiceSpec), "example": EXAMPLE},
        "application/yaml": {"schema": {"type": "string"}},
    }}}  # fmt: skip

    @app.get("/openapi.json", dependencies=guarded, include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/-/healthz", **_doc(200, m.Health, auth=False))
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/-/ready", **_doc(200, m.Ready, 503, auth=False))
    async def is_ready() -> JSONResponse:
        """Readiness (a Kubernetes readinessProbe): no token, and no service data."""
        why = await ready() if ready is not None else None
        if why is not None:
            return JSONResponse({"status": "not ready", "reason": why}, 503)
        return JSONResponse({"status": "ready"})

    async def pushed_spec(name: str, request: Request) -> ServiceSpec | JSONResponse:
        """The body of a push (or a plan) as a valid spec, or the 413/422/409 saying why not."""
        body = await read_limited(request, MAX_BODY_BYTES)
        if body is None:
            return JSONResponse(
                {"detail": f"request body larger than {MAX_BODY_BYTES} bytes"}, status_code=413
            )
        try:
            # Off the event loop: parsing a large YAML body takes a second; it touches nothing
            # shared (the Store is used below, on the loop's thread).
            spec = parse_spec(await asyncio.to_thread(decode_body, body))
        except SpecError as exc:
            return _invalid(exc.problems)
        problems = check_spec(spec)
        if problems:
            return _invalid(problems)
        if spec.name != name:
            return _invalid([("name", f"spec names {spec.name!r} but was pushed to {name!r}")])
        conflicts = route_conflicts(spec, store.latest_specs())
        if conflicts:
            return JSONResponse({"detail": "route conflict", "errors": conflicts}, 409)
        return spec

    @app.put(
        "/v1/services/{name}",
        dependencies=guarded,
        openapi_extra=SPEC_BODY,
        **_doc((200, 202), m.PushResult, 400, 409, 413, 422),
    )  # fmt: skip
    async def push(name: NameParam, request: Request) -> JSONResponse:
        spec = await pushed_spec(name, request)
        if isinstance(spec, JSONResponse):
            return spec
        revision, unchanged = store.push(spec, time.time())
        wake(name)
        state = store.load(name)
        phase = state.phase.value if state else "deploying"
        body_out = {"name": name, "revision": revision, "phase": phase, "unchanged": unchanged}
        if unchanged:
            body_out["message"] = f"identical to revision {revision}: nothing to do"
            result = next((h["result"] for h in store.history(name)
                           if h["revision"] == revision), None)  # fmt: skip
            if result in ("aborted", "rolled_back"):
                body_out["message"] = (
                    f"identical to revision {revision}, which was {result} and is not tried "
                    "again: change the spec to try again"
                )
        return JSONResponse(body_out, 200 if unchanged else 202)

    @app.post("/v1/services/{name}/plan", dependencies=guarded, openapi_extra=SPEC_BODY,
              **_doc(200, m.PlanResult, 400, 409, 413, 422))  # fmt: skip
    async def plan_push(name: NameParam, request: Request) -> JSONResponse:
        """What a push of this spec would do, compared with the live revision; stores
        nothing (`raygate diff`)."""
        spec = await pushed_spec(name, request)
        if isinstance(spec, JSONResponse):
            return spec
        state = store.load(name)
        revisions = {n: store.revision(name, n) for n in held_revisions(state)}
        results = {h["revision"]: h["result"] for h in store.history(name)}
        identical = store.identical(spec)
        return JSONResponse(preview(spec, state, revisions, identical, results, time.time()))

    async def flights_or_none() -> Mapping[str, int]:
        # Status must answer even when the engine cannot be asked (HAProxy restarting):
        # in-flight counts then read 0 here. The controller never decides on such a read.
        try:
            return await in_flight()
        except Exception as exc:
            log.warning("in-flight counts unavailable: %r", exc)
            return {}

    app.include_router(page_router(store, status_of, expected, sessions, authorized,
                                   flights_or_none, rates))  # fmt: skip

    @app.get("/v1/services", dependencies=guarded, **_doc(200, list[m.Status]))
    async def list_services() -> list[dict[str, Any]]:
        flights = await flights_or_none()
        return [s for n in store.service_names() if (s := status_of(store, n, flights))]

    @app.get("/v1/services/{name}", dependencies=guarded, **_doc(200, m.Status, 404))
    async def get_service(name: NameParam) -> dict[str, Any]:
        status = status_of(store, name, await flights_or_none())
        if status is None:
            raise HTTPException(404, f"no service {name!r}")
        return status

    @app.get("/v1/services/{name}/history", dependencies=guarded,
             **_doc(200, list[m.HistoryEntry], 404))  # fmt: skip
    async def history(name: NameParam) -> list[dict[str, Any]]:
        if store.load(name) is None:
            raise HTTPException(404, f"no service {name!r}")
        return store.history(name)

    @app.delete("/v1/services/{name}", dependencies=guarded, status_code=202,
                **_doc(202, m.Deleting, 404))  # fmt: skip
    async def delete(name: NameParam) -> dict[str, str]:
        if not store.mark_deleting(name):
            raise HTTPException(404, f"no service {name!r}")
        wake(name)
        return {"name": name, "phase": "deleting"}

    async def command_body(request: Request, kind: str) -> dict[str, Any] | JSONResponse:
        """The command's JSON body as its fields, or the 413/422 that says what is wrong."""
        body = await read_limited(request, MAX_COMMAND_BYTES)
        if body is None:
            return JSONResponse(
                {"detail": f"request body larger than {MAX_COMMAND_BYTES} bytes"}, 413
            )
        if not body.strip():
            return {}
        try:
            raw = json.loads(body)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return _invalid([("", "body must be a JSON object")], "invalid command")
        if not isinstance(raw, dict):
            return _invalid([("", "body must be a JSON object")], "invalid command")
        fields = COMMAND_FIELDS[kind]
        problems = []
        for key, value in raw.items():
            want = fields.get(key)
            if want is None:
                allowed = ", ".join(fields) or "none"
                problems.append((_ascii(key), f"unknown field for {kind} (allowed: {allowed})"))
            elif type(value) is not want:
                problems.append((key, f"must be {_JSON_TYPES[want]}"))
            elif isinstance(value, int) and not 1 <= value <= MAX_REVISION:
                problems.append((key, f"must be a revision number (1 to {MAX_REVISION})"))
        return _invalid(problems, "invalid command") if problems else raw

    async def command(name: str, request: Request, kind: str) -> JSONResponse:
        parsed = await command_body(request, kind)
        if isinstance(parsed, JSONResponse):
            return parsed
        revision = None
        if kind == "rollback":
            if store.load(name) is None:
                raise HTTPException(404, f"no service {name!r}")
            revision, why = store.rollback(name, parsed.get("to"), time.time())
        else:
            queued = Command(kind, bool(parsed.get("full", False)))
            exists, why = store.queue_command(name, queued, lambda s: refusal(s, queued))
            if not exists:
                raise HTTPException(404, f"no service {name!r}")
        if why is not None:
            return JSONResponse({"detail": why}, 409)
        wake(name)
        status = status_of(store, name, await flights_or_none())
        if status is None:  # deleted in between: the command went with it
            raise HTTPException(404, f"no service {name!r}")
        if revision is not None:
            status["revision"] = revision
            status["rollback_of"] = store.revision(name, revision).rollback_of
        return JSONResponse(status, 202)

    # One route per command (not `/{command}`): each is listed in the schema by name.
    # The kind is bound by a closure: an endpoint's default argument would be a query
    # parameter too (`/pause?kind=abort` aborted).
    def command_endpoint(kind: str) -> Callable[[str, Request], Awaitable[JSONResponse]]:
        async def endpoint(name: NameParam, request: Request) -> JSONResponse:
            return await command(name, request, kind)

        return endpoint

    for kind in (*COMMANDS, "rollback"):
        app.add_api_route(
            f"/v1/services/{{name}}/{kind}", command_endpoint(kind), methods=["POST"],
            dependencies=guarded, name=kind, status_code=202,
            **_doc(202, m.CommandResult, 400, 404, 409, 413, 422),
            openapi_extra=_command_body(kind),
        )  # fmt: skip

    if metrics_registry is not None:
        registry = metrics_registry

        @app.get("/metrics", dependencies=guarded, response_class=Response, responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                  "description": "Prometheus text format"},
            401: {"model": m.Detail, "description": _ERRORS[401][1]},
        })  # fmt: skip
        async def metrics() -> Response:
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


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The request body, or None when it is larger than `limit`: a declared Content-Length
    is refused before reading, and a chunked body is counted as it arrives."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPException(400, "Content-Length is not a number") from None
        if size > limit:
            return None
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def decode_body(body: bytes) -> Any:
    """A pushed body (JSON or YAML) as plain data, or SpecError. What parses but is not text
    fails here with a 422, not later with a 500 (or at cluster start): a YAML `!!binary`
    value, a lone UTF-16 surrogate from a JSON `\\ud800` escape (it cannot be encoded as
    UTF-8, not even in the 422 that names it), nesting deeper than the parser can follow, YAML
    aliases that expand without bound ("billion laughs") or contain themselves."""
    if not body.strip():
        return None
    try:
        try:
            raw = json.loads(body)  # C-fast; most pushes are JSON
        except ValueError:
            raw = yaml.load(body, Loader=_YamlLoader)
    except yaml.YAMLError as exc:
        raise SpecError([("", f"body is neither JSON nor YAML: {exc}")]) from None
    except RecursionError:
        raise SpecError([("", "body is nested too deeply")]) from None
    stack: list[tuple[Any, str]] = [(raw, "")]
    budget = MAX_BODY_VALUES  # YAML aliases can expand (or refer back to themselves)
    while stack:
        value, path = stack.pop()
        budget -= 1
        if budget < 0:
            raise SpecError([("", f"body holds more than {MAX_BODY_VALUES} values")])
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key!s}" if path else f"{key!s}"
                stack.append((key, where))
                stack.append((item, where))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))
        elif isinstance(value, bytes):
            raise SpecError([(_ascii(path), "binary data is not text")])
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise SpecError([(_ascii(path), "a lone UTF-16 surrogate is not text")]) from None
    return raw


def _ascii(path: str) -> str:
    return path.encode("ascii", "backslashreplace").decode()


def _inline_schema(model: type[ServiceSpec]) -> dict[str, Any]:
    """The model's JSON schema with its `$defs` inlined: the OpenAPI document has no place
    for them, and a precise schema lets a client (or a fuzzer) build real specs."""
    schema = model.model_json_schema(by_alias=True)
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    inlined: dict[str, Any] = inline(schema)
    return inlined


_ERRORS: dict[int, tuple[type[Any], str]] = {
    400: (m.Detail, "a Content-Length that is not a number"),
    401: (m.Detail, "missing or wrong bearer token"),
    404: (m.Detail, "no such service"),
    409: (m.Conflict, "a route prefix another service owns, or a command that does not apply"),
    413: (m.Detail, "request body too large"),
    422: (m.Invalid, "invalid spec or command: every problem, naming its field"),
    503: (m.Ready, "not ready, and why"),
}


def _command_body(kind: str) -> dict[str, Any]:
    """A command's optional JSON body for the schema, from COMMAND_FIELDS (what is checked)."""
    props: dict[str, Any] = {}
    for key, want in COMMAND_FIELDS[kind].items():
        props[key] = (
            {"type": "boolean"} if want is bool
            else {"type": "integer", "minimum": 1, "maximum": MAX_REVISION}
        )  # fmt: skip
    schema = {"type": "object", "properties": props, "additionalProperties": False}
    return {"requestBody": {"required": False, "content": {"application/json": {"schema": schema}}}}


def _doc(ok: int | tuple[int, ...], model: Any, *errors: int, auth: bool = True
         ) -> dict[str, Any]:  # fmt: skip
    """A route's answers for the schema. `response_model=None`: the endpoint's own JSON goes
    out as it is (a response_model would re-serialize it); the models only describe it
    (rollout.api_models says why, and a test holds real answers to them)."""
    codes = (*errors, 401) if auth else errors
    oks = ok if isinstance(ok, tuple) else (ok,)
    responses: dict[int | str, dict[str, Any]] = {code: {"model": model} for code in oks}
    for code in codes:
        error_model, text = _ERRORS[code]
        responses[code] = {"model": error_model, "description": text}
    return {"response_model": None, "responses": responses}


def _invalid(problems: list[tuple[str, str]], detail: str = "invalid spec") -> JSONResponse:
    return JSONResponse({"detail": detail, "errors": SpecError(problems).as_json()}, 422)
