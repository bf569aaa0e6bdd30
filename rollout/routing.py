"""The route policy: every service's state -> the gateway's route table. A pure function,
beside the planner whose states it reads; the controller hands its result to the DataPlane.

Every cluster a service holds is in the table, weight 0 included: a pending cluster is
already known to the engine when traffic switches (for HAProxy, a runtime weight change,
no reload), and a retiring one stays visible while its in-flight requests drain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from gateway.routes import Backend, Route, RouteTable
from rollout.plan import ServiceState
from rollout.providers.base import ClusterInfo
from rollout.spec import ServiceSpec

log = logging.getLogger("raygate.routing")


def route_table(
    states: Mapping[str, ServiceState],
    specs_of: Callable[[str, int], ServiceSpec],
    clusters: Mapping[str, ClusterInfo],
) -> RouteTable:
    """`specs_of(service, revision)` gives the spec a cluster runs; `clusters` the records of
    every cluster (a cluster without one, or without an address, is left out).

    A prefix claimed by two services (the admin API refuses such a push, so only state
    written before that check can hold one) stays with the first service by name."""
    by_prefix: dict[str, Route] = {}
    for name, state in sorted(states.items()):
        fallback = state.active.revision if state.active else None
        if fallback is None and state.pending is not None:
            fallback = state.pending.revision
        for cluster, weight in state.traffic().items():
            info = clusters.get(cluster)
            revision = state.expected_revision(cluster) or fallback
            if info is None or not info.serve_host or revision is None:
                continue  # no address yet (a RayCluster KubeRay has not reported on)
            spec = specs_of(name, revision)
            backend = Backend(cluster, info.serve_url, weight)
            for app, prefix in spec.app_routes().items():
                key = "/" + prefix.strip("/") if prefix.strip("/") else "/"
                existing = by_prefix.get(key)
                if existing is None:
                    by_prefix[key] = Route(key, name, app, (backend,), spec.gateway.timeout_s)
                elif existing.service == name:
                    by_prefix[key] = Route(
                        key, name, app, (*existing.backends, backend), spec.gateway.timeout_s
                    )
                else:
                    log.error("route %s claimed by %s and %s; keeping %s",
                              key, existing.service, name, existing.service)  # fmt: skip
    return RouteTable(tuple(by_prefix.values()))
