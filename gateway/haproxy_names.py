"""Stable HAProxy names for routes and clusters, and the weight commands built from them.

A name depends on its route prefix or cluster alone, never on a position in the table: after
a reload that adds, removes or reorders routes and clusters, an old worker (still finishing
requests under its own config) and the new one call the same cluster by the same name. So
its `show stat` rows, its request-log lines and the weight commands sent to it all mean the
cluster they name.
"""

from __future__ import annotations

import hashlib
import re

from gateway.routes import RouteTable

# What HAProxy accepts in proxy and server names.
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.:-]+")
_MAX_SERVER_NAME = 48


def _escape_prefix(prefix: str) -> str:
    """A route prefix (see `route_prefix_problem`: "/" and [A-Za-z0-9._~-]) in HAProxy's name
    characters, one to one: "_" -> "__", "~" -> "_t", "/" -> ":"."""
    return prefix.replace("_", "__").replace("~", "_t").replace("/", ":")


def backend_name(prefix: str) -> str:
    """The route's own backend: "/" -> "rt:", "/digits" -> "rt:digits"."""
    return "rt" + _escape_prefix(prefix)


def chunked_backend_name(prefix: str) -> str:
    """The route's twin for chunked requests: same servers, plus the body_limit filter."""
    return "ck" + _escape_prefix(prefix)


def server_name(cluster: str) -> str:
    """The cluster's name itself when HAProxy accepts it (raygate's cluster ids, host:port of
    `raygate gateway`); otherwise its safe characters and a digest of the whole name."""
    if _NAME_CHARS.fullmatch(cluster) and len(cluster) <= _MAX_SERVER_NAME:
        return cluster
    safe = re.sub(r"[^A-Za-z0-9_.:-]", "_", cluster)[:32]
    return f"{safe}-{hashlib.sha256(cluster.encode()).hexdigest()[:12]}"


def weight_commands(table: RouteTable, since: RouteTable | None = None) -> list[str]:
    """`set server ... weight` commands that give a worker the weights of `table`: only the
    ones that changed `since` that table (all of them when None).

    HAProxy runs the commands of one `;`-separated CLI line in order, but yields to traffic
    between them (cli.c: "this forces us to yield between pipelined commands"). So raised
    weights go first and lowered ones last: at no moment has a route every server at 0.
    """
    before = {} if since is None else {
        (r.prefix, b.cluster): b.weight for r in since.routes for b in r.backends
    }  # fmt: skip
    raised: list[str] = []
    lowered: list[str] = []
    for route in sorted(table.routes, key=lambda r: r.prefix):
        for b in sorted(route.backends, key=lambda b: b.cluster):
            old = before.get((route.prefix, b.cluster))
            if old == b.weight:
                continue
            into = raised if b.weight > (old or 0) else lowered
            server = server_name(b.cluster)
            for backend in (backend_name(route.prefix), chunked_backend_name(route.prefix)):
                into.append(f"set server {backend}/{server} weight {b.weight}")
    return raised + lowered
