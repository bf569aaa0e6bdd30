"""What a push would do, without doing it (`POST /v1/services/{name}/plan`, `raygate diff`).

Pure, like the planner: the store's facts in, a JSON-able answer out. The decision itself is
not made here: whether a push is a no-op is `Store.identical` (the rule `Store.push` uses),
in place or a new cluster is `plan.rollout_kind` (the rule `plan._start` uses), a cluster
still baking that takes traffic back is `plan.baking_match`. This module only explains them:
which fields changed (`cluster.env.APP_VERSION changed`), which applications and deployments,
and a unified diff of the Serve config, against the live (active) revision.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import yaml

from rollout.plan import (
    MAX_CLUSTERS,
    Kind,
    Revision,
    ServiceState,
    baking_match,
    drains_when_dropped,
    reuses_pending,
    rollout_kind,
    walks_canary,
)
from rollout.spec import ServiceSpec

MAX_REASONS = 20  # a spec rewritten in full would list every field: the diff shows the rest


def preview(
    spec: ServiceSpec,
    state: ServiceState | None,
    revisions: Mapping[int, Revision],
    identical_to: int | None,
    results: Mapping[int, str],
    now: float,
) -> dict[str, Any]:
    """`revisions` holds the active, pending and retiring revisions; `identical_to` is the
    revision a push would be a no-op against (`Store.identical`); `results` each revision's
    result in the history."""
    live = revisions.get(state.active.revision) if state and state.active else None
    newest = max([*revisions, identical_to or 0], default=0)
    target = Revision.of(newest + 1, spec)
    out: dict[str, Any] = {
        "name": spec.name,
        "live_revision": live.number if live else None,
        "serve_diff": serve_diff(live, spec),
        "applications": app_changes(live.spec.serve if live else {}, spec.serve),
    }
    if identical_to is not None:
        result = results.get(identical_to)
        if live is not None and live.number == identical_to:
            why = f"identical to live revision {identical_to}"
        elif state is not None and state.pending and state.pending.revision == identical_to:
            why = f"identical to revision {identical_to}, rolling out now"
        elif result in ("aborted", "rolled_back"):  # not tried again (plan._failed)
            why = f"identical to revision {identical_to} ({result}): change the spec to try again"
        else:
            why = f"identical to revision {identical_to} ({result}), the newest pushed"
        return {**out, "change": "none", "reasons": [why], "strategy": None}
    how = rollout_kind(state.active if state else None, live, target)
    # A pending new cluster with this cluster spec takes the push, even one that would be
    # in place on the active cluster (the live spec again during a canary): `_supersede`.
    reuse = state is not None and reuses_pending(state.pending, target)
    reasons: list[str] = []
    if live is None:
        reasons.append("no live revision")
    elif how.kind is Kind.NEW_CLUSTER and live.cluster_hash != target.cluster_hash:
        reasons += changes(live.spec.cluster.identity(), spec.cluster.identity(), "cluster")
    elif how.kind is Kind.NEW_CLUSTER:
        reasons.append(how.why)
    else:
        reasons += changes(_rest(live.spec), _rest(spec), "")
    if len(reasons) > MAX_REASONS:
        reasons[MAX_REASONS:] = [f"... and {len(reasons) - MAX_REASONS} more"]
    change = Kind.NEW_CLUSTER.value if reuse else how.kind.value
    if not reasons:  # in place: the live spec again, while a newer one rolls out or failed
        reasons = ["the live revision's spec again"]
    if state is not None:
        reasons += _notes(state, target, revisions, now)
        # The clusters held once this push supersedes what is pending (`_supersede`): a
        # canary that carried traffic drains first, holding its slot.
        retiring = [r.cluster for r in state.retiring]
        p = state.pending
        if p is not None and not reuse and drains_when_dropped(p):
            retiring.append(p.cluster)
        held = len(retiring) + (1 if state.active else 0)
        if change == Kind.NEW_CLUSTER.value and not reuse and held >= MAX_CLUSTERS:
            names = ", ".join(retiring)
            # A baking cluster that takes the traffic back needs no slot (`_start`).
            unless = "if no baking cluster takes it: " if baking_match(
                state, target, revisions, now) else ""  # fmt: skip
            reasons.append(f"{unless}waits for retiring cluster {names} to be deleted first")
    new_cluster = change == Kind.NEW_CLUSTER.value
    active = state.active if state is not None else None
    canary = walks_canary(active, Kind(change), target)
    upgrade = spec.upgrade
    strategy = {
        "name": "canary" if canary else ("in_place" if change == "in_place" else "bluegreen"),
        "steps": [s.model_dump(mode="json", exclude_none=True) for s in upgrade.canary.steps]
        if canary and upgrade.canary is not None else None,
        "consecutive_successes": upgrade.health.consecutive_successes,
        "health_timeout_s": upgrade.health.timeout_s,
        "probes": len(upgrade.health.probes),
        # Only a switch away from a live cluster bakes it (`_promote`).
        "bake_s": upgrade.bake_s if new_cluster and active is not None else 0.0,
    }  # fmt: skip
    return {**out, "change": change, "reasons": reasons, "strategy": strategy}


def held_revisions(state: ServiceState | None) -> set[int]:
    """The revisions `preview` needs: what the service's clusters run or roll out."""
    if state is None:
        return set()
    held = {r.revision for r in state.retiring if r.revision is not None}
    held |= {state.active.revision} if state.active else set()
    return held | ({state.pending.revision} if state.pending else set())


def _notes(
    state: ServiceState, target: Revision, revisions: Mapping[int, Revision], now: float
) -> list[str]:
    """What else a push does to the service as it stands now."""
    notes = []
    if state.deleting:
        notes.append("the service is being deleted: a push takes the deletion back")
    p = state.pending
    if p is not None:
        notes.append(f"supersedes revision {p.revision}, rolling out now")
        if reuses_pending(p, target):
            notes.append(f"reuses revision {p.revision}'s pending cluster {p.cluster}")
    if reuses_pending(p, target):
        return notes  # the reused cluster rolls it out (`_start` waits for it)
    for r in baking_match(state, target, revisions, now):
        notes.append(f"cluster {r.cluster} still bakes revision {r.revision}: traffic goes "
                     "back to it at once if it is healthy (no new cluster)")  # fmt: skip
    return notes


def _rest(spec: ServiceSpec) -> dict[str, Any]:
    """What an in-place push can change: everything but the cluster."""
    dumped = spec.to_json()
    dumped.pop("cluster")
    dumped.pop("name")
    return dumped


def changes(old: Any, new: Any, path: str) -> list[str]:
    """Every field that differs, as `path changed|added|removed`. Lists of named mappings
    (Serve's applications, deployments) are matched by name: `serve.applications[digits]`."""
    if old == new:
        return []
    named = _named(old) and _named(new)
    if named:
        old, new = _by_name(old), _by_name(new)
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in [*old, *(k for k in new if k not in old)]:
            at = f"{path}[{key}]" if named else f"{path}.{key}" if path else str(key)
            if key not in new:
                out.append(f"{at} removed")
            elif key not in old:
                out.append(f"{at} added")
            else:
                out += changes(old[key], new[key], at)
        return out
    return [f"{path} changed"]


def _named(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value)


def _by_name(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {str(i["name"]): i for i in items}


def app_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The applications (and their deployments) a push adds, removes or changes."""
    before = _by_name(old.get("applications") or [])
    after = _by_name(new.get("applications") or [])
    out = []
    for name in [*before, *(n for n in after if n not in before)]:
        a, b = before.get(name), after.get(name)
        if a == b:
            continue
        kind = "added" if a is None else "removed" if b is None else "changed"
        deployments = app_deployments(a or {}, b or {})
        out.append({"name": name, "change": kind, "deployments": deployments})
    return out


def app_deployments(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[dict[str, Any]]:
    before = _by_name(old.get("deployments") or [])
    after = _by_name(new.get("deployments") or [])
    out = []
    for name in [*before, *(n for n in after if n not in before)]:
        a, b = before.get(name), after.get(name)
        if a != b:
            kind = "added" if a is None else "removed" if b is None else "changed"
            out.append({"name": name, "change": kind})
    return out


def serve_diff(live: Revision | None, spec: ServiceSpec) -> str:
    """The Serve config the live cluster runs against the pushed one, as a unified diff of
    their YAML (keys sorted, so only real changes show)."""
    before = _yaml(live.spec.serve) if live is not None else []
    label = f"live/revision-{live.number}/serve" if live is not None else "live/none"
    lines = difflib.unified_diff(before, _yaml(spec.serve), label, f"{spec.name}/serve")
    return "".join(lines)


def _yaml(value: Any) -> list[str]:
    text: str = yaml.safe_dump(value, sort_keys=True, default_flow_style=False)
    return text.splitlines(keepends=True)
