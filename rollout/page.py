"""The status page on the admin port: `/` shows every service, `/services/{name}` one
service with its full event log and the Serve config raygate deployed.

The HTML is a shell; the page's script polls `/ui/state` (or `/ui/state/{name}`) every two
seconds and draws from the JSON, so it updates without a reload and simply carries on
when raygate comes back after a restart. Buttons call the admin API's own routes. Nothing
with service data is served without the token or a session (rollout/sessions.py); the
static CSS and JS hold none. No CDN: everything comes from rollout/static/.
"""

from __future__ import annotations

import html
import secrets
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from rollout.controller import serve_config
from rollout.rates import RateHistory
from rollout.sessions import COOKIE, Sessions, same_site
from rollout.store import Store

STATIC = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {"page.css": "text/css", "page.js": "text/javascript"}
MAX_FORM_BYTES = 4096
# The revisions the page draws (page.js): polled every 2 s per tab, so never the whole
# history (`raygate history` has it).
HISTORY_SHOWN = 12
# The page runs only its own script and style: an injected `<script>` in a service's
# message could not run, and no frame of another site can hold the page.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>raygate: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,"><link rel="stylesheet" href="/static/page.css"></head>
<body class="login"><form method="post" action="/login" class="login-box">
<h1><span class="logo">raygate</span></h1>
<p>Paste the admin token (<code>.raygate/token</code>, or <code>RAYGATE_TOKEN</code>).</p>
{error}<label>Token <input type="password" name="token" autocomplete="current-password"
 autofocus required></label>
<button type="submit">Log in</button></form></body></html>
"""
SHELL = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="raygate-csrf" content="{csrf}">
<link rel="icon" href="data:,"><link rel="stylesheet" href="/static/page.css"></head>
<body data-service="{service}">
<header class="top"><a href="/" class="logo">raygate</a>
<span id="conn" class="conn">connecting…</span>
<form method="post" action="/logout" class="logout"><input type="hidden" name="csrf"
 value="{csrf}"><button type="submit" class="ghost">Log out</button></form></header>
<main id="main"><p class="muted">loading…</p></main>
<script src="/static/page.js"></script></body></html>
"""


StatusOf = Callable[[Store, str, Mapping[str, int]], dict[str, Any] | None]


def page_router(
    store: Store,
    status_of: StatusOf,
    token: bytes,
    sessions: Sessions,
    authorized: Callable[[Request], bool],
    in_flight: Callable[[], Awaitable[Mapping[str, int]]],
    rates: RateHistory | None,
) -> APIRouter:
    """`authorized` is the admin API's own check (bearer token or session cookie);
    `status_of` its status of one service (rollout/api.py, which mounts this router)."""
    router = APIRouter(include_in_schema=False)

    def guard(request: Request) -> None:
        if not authorized(request):
            raise HTTPException(401, "log in, or send the bearer token")

    def login_page(error: str = "", code: int = 401) -> HTMLResponse:
        err = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
        return HTMLResponse(LOGIN.format(error=err), code, headers=HEADERS)

    def shell(request: Request, service: str = "") -> HTMLResponse:
        session = sessions.of_request(request)
        if session is None and not authorized(request):
            return login_page()
        csrf = session.csrf if session is not None else ""
        title = f"{service}: raygate" if service else "raygate"
        body = SHELL.format(title=html.escape(title), csrf=html.escape(csrf),
                            service=html.escape(service))  # fmt: skip
        return HTMLResponse(body, headers=HEADERS)

    @router.get("/")
    async def index(request: Request) -> HTMLResponse:
        return shell(request)

    @router.get("/services/{name}")
    async def service_page(name: str, request: Request) -> HTMLResponse:
        return shell(request, name)

    @router.post("/login")
    async def login(request: Request) -> Response:
        if not same_site(request):
            return login_page("refused: the form was sent from another site", 403)
        form = await _form(request)
        given = form.get("token", "").strip().encode("utf-8", "surrogateescape")
        if not given or not secrets.compare_digest(given, token):
            return login_page("wrong token")
        sid, _ = sessions.create()
        out = RedirectResponse("/", 303, headers={"Cache-Control": "no-store"})
        # Secure when the page came over HTTPS (uvicorn reads X-Forwarded-Proto from a proxy
        # on loopback): the cookie then never travels in clear text.
        out.set_cookie(COOKIE, sid, max_age=int(sessions.ttl_s), path="/", httponly=True,
                       samesite="strict", secure=request.url.scheme == "https")  # fmt: skip
        return out

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        form = await _form(request)
        if not sessions.authorizes(request, form.get("csrf")):
            raise HTTPException(403, "not logged in, or the form did not come from the page")
        sessions.drop(request.cookies.get(COOKIE))
        out = RedirectResponse("/", 303, headers={"Cache-Control": "no-store"})
        out.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return out

    @router.get("/static/{file}")
    async def static(file: str) -> Response:
        kind = STATIC_TYPES.get(file)
        if kind is None:
            raise HTTPException(404, "no such file")
        return Response((STATIC / file).read_bytes(), media_type=kind,
                        headers={"X-Content-Type-Options": "nosniff",
                                 "Cache-Control": "no-cache"})  # fmt: skip

    @router.get("/ui/state")
    async def overview(request: Request) -> JSONResponse:
        guard(request)
        flights = await in_flight()
        services = [_service(store, status_of, n, flights, rates) for n in store.service_names()]
        return JSONResponse({"services": [s for s in services if s]}, headers=HEADERS)

    @router.get("/ui/state/{name}")
    async def one(name: str, request: Request) -> JSONResponse:
        guard(request)
        service = _service(store, status_of, name, await in_flight(), rates,
                           detail=True)
        if service is None:
            raise HTTPException(404, f"no service {name!r}")
        return JSONResponse({"services": [service]}, headers=HEADERS)

    return router


async def _form(request: Request) -> dict[str, str]:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, "form too large")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}


def _service(
    store: Store,
    status_of: StatusOf,
    name: str,
    flights: Mapping[str, int],
    rates: RateHistory | None,
    detail: bool = False,
) -> dict[str, Any] | None:
    """The API's status of one service, with what the page draws besides: the rollout's
    plan (health streak needed, canary steps), rates per cluster, the revision history, and
    for a service's own page every event and the Serve configs raygate deployed."""
    status = status_of(store, name, flights)
    if status is None:
        return None
    pending = status["pending"]
    plan: dict[str, Any] | None = None
    if pending is not None:
        spec = store.revision(name, pending["revision"]).spec
        canary = spec.upgrade.canary
        plan = {
            "healthy_needed": spec.upgrade.health.consecutive_successes,
            "canary_steps": [s.model_dump(mode="json", exclude_none=True) for s in canary.steps]
            if canary is not None and pending.get("strategy") == "canary" else [],
        }  # fmt: skip
    status["plan"] = plan
    status["rates"] = rates.series(name) if rates is not None else {}
    status["rates_every_s"] = rates.every_s if rates is not None else None
    status["history"] = store.history(name, HISTORY_SHOWN)
    if detail:
        status["events"] = store.events(name, 1000)
        clusters = {info.id: info for info, _ in store.clusters()}
        configs = []
        for role in ("active", "pending"):
            where = status[role]
            info = clusters.get(where["cluster"]) if where else None
            if where and info is not None:
                spec = store.revision(name, where["revision"]).spec
                configs.append({"role": role, "revision": where["revision"],
                                "cluster": where["cluster"],
                                "config": serve_config(spec, info)})  # fmt: skip
        status["serve_configs"] = configs
    return status
