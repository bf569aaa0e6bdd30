"""The route table: which upstream clusters serve a route prefix, and with what weight.

Immutable values, so an engine swaps a whole table in one assignment: that swap is the
traffic switch, and a request sees either the old table or the new one, never a mix.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Backend:
    """One upstream (a cluster's Serve proxy) behind a route."""

    cluster: str
    url: str  # scheme://host:port, no path
    weight: int  # relative share of new requests; 0 = receives none (draining)


@dataclass(frozen=True)
class Route:
    prefix: str  # a Serve route_prefix: "/", "/digits", ...
    service: str
    app: str
    backends: tuple[Backend, ...]
    timeout_s: float = 60.0

    def pick(self, exclude: Iterable[str] = (), rng: random.Random | None = None) -> Backend | None:
        """Weighted choice among backends with weight > 0, skipping `exclude`d clusters."""
        skip = set(exclude)
        candidates = [b for b in self.backends if b.weight > 0 and b.cluster not in skip]
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        chooser = rng or random
        return chooser.choices(candidates, weights=[b.weight for b in candidates])[0]


# What a segment of a route prefix may hold: RFC 3986's unreserved characters. Serve itself
# refuses only "{" and "}"; HAProxy matches the raw path while Serve matches the decoded one
# (so no "%"), and a prefix is written into haproxy.cfg, where a space, "#", a quote or a
# backslash would change what the line means.
_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+")
MAX_PREFIX_CHARS = 512


def route_prefix_problem(prefix: str) -> str | None:
    """None if `prefix` is a route prefix both engines handle safely, else why not. The one
    rule for pushes (spec validation), the route table and `raygate gateway --route`."""
    if prefix == "/":
        return None
    if not prefix.startswith("/"):
        return "must start with '/'"
    if prefix.endswith("/"):
        return "must not end with '/' (unless it is just '/')"
    if len(prefix) > MAX_PREFIX_CHARS:
        return f"must not be longer than {MAX_PREFIX_CHARS} characters"
    for segment in prefix[1:].split("/"):
        if not segment:
            return "must not hold an empty segment ('//')"
        if segment in (".", ".."):
            return "must not hold a '.' or '..' segment"
        if not _SEGMENT.fullmatch(segment):
            bad = sorted({c for c in segment if not _SEGMENT.fullmatch(c)})
            found = " ".join(repr(c) for c in bad)
            return f"may hold only letters, digits and . _ ~ - between slashes, not {found}"
    return None


def _normalise(prefix: str) -> str:
    return "/" if prefix in ("", "/") else "/" + prefix.strip("/")


def prefix_matches(prefix: str, path: str) -> bool:
    """Serve's rule: `/a` matches `/a`, `/a/` and `/a/b`, never `/ab`."""
    if prefix == "/":
        return True
    return path == prefix or path.startswith(prefix + "/")


@dataclass(frozen=True)
class RouteTable:
    routes: tuple[Route, ...] = ()
    # Longest prefix first, computed once per table so matching is a short scan.
    _ordered: tuple[Route, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        normalised = tuple(
            Route(_normalise(r.prefix), r.service, r.app, r.backends, r.timeout_s)
            for r in self.routes
        )
        seen: set[str] = set()
        for r in normalised:
            problem = route_prefix_problem(r.prefix)
            if problem is not None:
                raise ValueError(f"route prefix {r.prefix!r} {problem}")
            if r.prefix in seen:
                raise ValueError(f"route prefix {r.prefix!r} appears twice in the route table")
            seen.add(r.prefix)
        object.__setattr__(self, "routes", normalised)
        object.__setattr__(
            self, "_ordered", tuple(sorted(normalised, key=lambda r: len(r.prefix), reverse=True))
        )

    def match(self, path: str) -> Route | None:
        for route in self._ordered:
            if prefix_matches(route.prefix, path):
                return route
        return None

    def weights(self) -> dict[str, dict[str, int]]:
        """service -> cluster -> weight, for status and metrics."""
        out: dict[str, dict[str, int]] = {}
        for r in self.routes:
            per = out.setdefault(r.service, {})
            for b in r.backends:
                per[b.cluster] = max(per.get(b.cluster, 0), b.weight)
        return out

    def routed(self) -> set[str]:
        """Clusters that new requests may go to (weight > 0 on some route)."""
        return {b.cluster for r in self.routes for b in r.backends if b.weight > 0}

    def to_json(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.routes]

    @staticmethod
    def from_json(raw: list[dict[str, Any]]) -> RouteTable:
        return RouteTable(tuple(
            Route(r["prefix"], r["service"], r["app"],
                  tuple(Backend(**b) for b in r["backends"]), r["timeout_s"])
            for r in raw
        ))  # fmt: skip
