"""What HAProxy's health checks say of each cluster, in raygate's words.

HAProxy checks every cluster's Serve proxy (`option httpchk`) and says so on stderr, in its
names: `Server rt:digits/rg-1a2b is DOWN, reason: Layer4 connection problem ...`, then the
same for the chunked twin (`ck:digits`), for every other route of the service on that
cluster, and again from each new worker after a reload. Those lines go to HAProxy's log file
(`Master.spawn`); a user is told once per change, per service and cluster, from the state
itself: the current worker's `show stat` rows, mapped back through the names the gateway
gave them (`haproxy_names`). The state, not the lines: it is the worker that routes, it is
there for a master adopted from a previous raygate, and it does not repeat per backend or
per reload.

Only a cluster with weight is told DOWN: its failing check costs requests (see `changes`).
Pure functions: the engine polls the rows and logs what `changes` returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from gateway.routes import Route

Key = tuple[str, str]  # (service, cluster)


@dataclass(frozen=True)
class ClusterHealth:
    up: bool
    reason: str  # HAProxy's words for the last check: "Layer4 connection problem: ..."
    alone: tuple[str, ...] = ()  # route prefixes left without a healthy cluster with weight
    serving: bool = True  # has weight on some route: its failing check costs requests


@dataclass(frozen=True)
class HealthChange:
    service: str
    cluster: str
    health: ClusterHealth

    @property
    def message(self) -> str:
        h = self.health
        if h.up:
            return (f"{self.service}: cluster {self.cluster}'s Serve proxy passes HAProxy's "
                    "health check again: it takes its share of requests")  # fmt: skip
        text = (f"{self.service}: cluster {self.cluster}'s Serve proxy fails HAProxy's health "
                f"check ({h.reason}): it gets no requests until it passes")  # fmt: skip
        if h.alone:
            have = "has" if len(h.alone) == 1 else "have"
            text += f"; {', '.join(h.alone)} {have} no other healthy cluster: requests get 503"
        return text


def _reason(row: Mapping[str, str]) -> str:
    desc = row.get("check_desc") or row.get("check_status", "").lstrip("* ")
    code = row.get("check_code") or ""
    detail = row.get("last_chk") or ""
    return desc + (f", HTTP {code}" if code else "") + (f": {detail}" if detail else "")


def _checked(row: Mapping[str, str]) -> bool | None:
    """True (UP) or False (DOWN) once this server's own check has a result; None for a
    server without a check of its own (a chunked twin tracks its route's server), one whose
    first check has not finished (a new worker), or one in maintenance."""
    check = (row.get("check_status") or "").lstrip("* ")
    if not check or check.startswith("INI"):
        return None
    status = (row.get("status") or "").split(" ")[0]
    return {"UP": True, "DOWN": False}.get(status)


def cluster_health(
    rows: Iterable[Mapping[str, str]], routes: Mapping[str, Route], clusters: Mapping[str, str]
) -> dict[Key, ClusterHealth]:
    """(service, cluster) -> its health from the current worker's server rows: DOWN when
    any of its routes' checks fails (they all probe the same Serve proxy), UP when every
    check that has a result passes. `routes` and `clusters` map HAProxy's backend and server
    names back (`backends_of`, `server_names`); rows they do not know are skipped."""
    seen: dict[Key, list[tuple[bool, str, str, bool]]] = {}
    healthy_with_weight: dict[str, bool] = {}  # route prefix -> some cluster takes requests
    for row in rows:
        route, cluster = routes.get(row.get("pxname", "")), clusters.get(row.get("svname", ""))
        up = _checked(row)
        if route is None or cluster is None or up is None:
            continue
        weighted = int(row.get("weight") or 0) > 0
        seen.setdefault((route.service, cluster), []).append(
            (up, _reason(row), route.prefix, weighted)
        )
        healthy_with_weight[route.prefix] = healthy_with_weight.get(route.prefix, False) or (
            up and weighted
        )  # fmt: skip
    out: dict[Key, ClusterHealth] = {}
    for key, checks in seen.items():
        serving = any(weighted for *_rest, weighted in checks)
        down = [(reason, prefix) for up, reason, prefix, _w in checks if not up]
        if not down:
            out[key] = ClusterHealth(True, checks[0][1], serving=serving)
            continue
        alone = sorted({p for _r, p in down if not healthy_with_weight.get(p, False)})
        # A check under way shows no detail (`last_chk` empty): the most told reason wins.
        reason = max((r for r, _p in down), key=len)
        out[key] = ClusterHealth(False, reason, tuple(alone), serving)
    return out


def in_table(
    rows: Iterable[Mapping[str, str]], routes: Mapping[str, Route], clusters: Mapping[str, str]
) -> set[Key]:
    """(service, cluster) of every server row the names map back, checked or not yet."""
    out = set()
    for row in rows:
        route, cluster = routes.get(row.get("pxname", "")), clusters.get(row.get("svname", ""))
        if route is not None and cluster is not None:
            out.add((route.service, cluster))
    return out


def changes(
    told_down: AbstractSet[Key],
    now: Mapping[Key, ClusterHealth],
    unchecked: AbstractSet[Key] = frozenset(),
) -> tuple[list[HealthChange], set[Key]]:
    """What to tell, and the clusters told DOWN since. A cluster is told DOWN once, when its
    check fails while it has weight: a pending cluster at weight 0 whose Serve proxy is
    still starting (it is in the table before it takes traffic) or a retiring one going
    away is raygate's own business, which it reports in its own steps. It is told UP once,
    when it passes again after it was told DOWN. A cluster that left the table is forgotten
    without a word; one still in it whose checks have no result yet (`unchecked`: the new
    worker of a reload starts every check over) stays told, or every reload would tell its
    DOWN again and an UP in between would never be told."""
    out = []
    down = {key for key in told_down if key in unchecked and key not in now}
    for key, health in sorted(now.items()):
        if health.up:
            if key in told_down:
                out.append(HealthChange(*key, health))
            continue
        if key not in told_down and health.serving:
            out.append(HealthChange(*key, health))
        if key in told_down or health.serving:
            down.add(key)
    return out, down
