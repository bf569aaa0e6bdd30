"""raygate's Prometheus metrics, all of them, in one module with an injectable registry.

The data plane records requests; the controller (which may import this module; the reverse
never happens) records traffic weights and rollouts. Labels are names and route prefixes,
never raw paths, so cardinality stays bounded by the number of services and clusters.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Inference latency: a few ms for a small model up to a minute for a large one.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
STEP_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# The request histogram's `le` bounds, +Inf last, as `Totals.buckets` carries them.
TOTALS_BUCKETS = (*LATENCY_BUCKETS, math.inf)
_BUCKET_INDEX = {bound: i for i, bound in enumerate(TOTALS_BUCKETS)}


@dataclass(frozen=True)
class Totals:
    """One cluster's answers for one service since the counters started (process start).

    `requests` counts every answer recorded with the cluster's label, `errors` those with a
    5xx code (the 502/503/504 the gateway gives for a failed upstream carry the cluster too).
    `counts[i]` is the number of answers that took at most `buckets[i]` seconds (Prometheus
    `le` buckets: cumulative, +Inf last), summed over the service's apps. Canary analysis
    subtracts two of these taken `interval_s` apart (rollout/analysis.py).
    """

    requests: int
    errors: int
    buckets: tuple[float, ...]
    counts: tuple[int, ...]


@dataclass
class _RouteMetrics:
    """Children bound to one (service, app, cluster), so the hot path skips label lookups."""

    duration: object
    ttfb: object
    codes: dict[int, object] = field(default_factory=dict)


def _observe(child: object, value: float, times: int) -> None:
    """`Histogram.observe`, `times` times in one step. prometheus-client has no public call
    for that; this does what its `observe` does (sum, then the first bucket that holds the
    value) on the pinned version. tests/test_gateway_ops.py checks counts and buckets."""
    if times == 1:
        child.observe(value)  # type: ignore[attr-defined]
        return
    child._sum.inc(value * times)  # type: ignore[attr-defined]
    for bucket, bound in zip(child._buckets, child._upper_bounds, strict=True):  # type: ignore[attr-defined]
        if value <= bound:
            bucket.inc(times)
            return


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "raygate_requests", "Requests answered, by status code.",
            ["service", "app", "cluster", "code"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "raygate_request_duration_seconds", "Time from request to the last response byte.",
            ["service", "app", "cluster"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttfb = Histogram(
            "raygate_time_to_first_byte_seconds",
            "Time from request to the upstream's response headers.",
            ["service", "app", "cluster"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        # multiprocess_mode only matters with several gateway workers (PROMETHEUS_MULTIPROC_DIR).
        self.in_flight = Gauge(
            "raygate_in_flight_requests", "Requests in flight to a cluster.",
            ["service", "cluster"], registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.upstream_errors = Counter(
            "raygate_upstream_errors", "Upstream failures seen by the gateway.",
            ["service", "cluster", "kind"], registry=r,
        )  # fmt: skip
        self.traffic_weight = Gauge(
            "raygate_traffic_weight", "Percent of a service's new requests sent to a cluster.",
            ["service", "cluster"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.rollout_phase = Gauge(
            "raygate_rollout_phase", "1 for the phase a service is in, 0 for the others.",
            ["service", "phase"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.rollouts = Counter(
            "raygate_rollouts", "Rollouts that ended, by result.", ["service", "result"],
            registry=r,
        )  # fmt: skip
        self.step_duration = Histogram(
            "raygate_rollout_step_duration_seconds", "Duration of each rollout step.",
            ["step"], buckets=STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.canary_weight = Gauge(
            "raygate_canary_weight", "Percent of a service's new requests on its canary.",
            ["service", "cluster"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.analysis_runs = Counter(
            "raygate_analysis_runs", "Analysis verdicts on canaries and bake windows.",
            ["service", "result"], registry=r,
        )  # fmt: skip
        # Alerts and dashboards (deploy/monitoring/): what a cluster's health checks say.
        self.cluster_healthy = Gauge(
            "raygate_cluster_healthy",
            "1 while a cluster passes its health checks (or only its dashboard stalls while "
            "its Serve proxy answers), 0 otherwise; absent for clusters not checked.",
            ["service", "cluster"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.healthy_clusters = Gauge(
            "raygate_service_healthy_clusters",
            "Clusters of a service that take a share of its traffic and are healthy; absent "
            "while its first deploy is under way and while it is being deleted (0 once a "
            "first deploy failed: the service serves nothing).",
            ["service"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.degraded_since = Gauge(
            "raygate_cluster_degraded_since_timestamp_seconds",
            "Unix time a cluster's dashboard stopped answering; absent while it answers.",
            ["service", "cluster"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self._health_labels: dict[str, set[str]] = {}
        self._degraded_labels: dict[str, set[str]] = {}
        self.webhook_deliveries = Counter(
            "raygate_webhook_deliveries",
            "Webhook events by outcome: delivered, failed (every retry spent, or refused), "
            "dropped (queue full, or unsent at shutdown).",
            ["service", "result"], registry=r,
        )  # fmt: skip
        self.webhook_attempt_failures = Counter(
            "raygate_webhook_attempt_failures",
            "Webhook POSTs that failed (each retry counts), by reason.", ["reason"], registry=r,
        )  # fmt: skip
        self._canary_labels: dict[str, set[str]] = {}
        self._routes: dict[tuple[str, str, str], _RouteMetrics] = {}
        self._weight_labels: set[tuple[str, str]] = set()

    # ---- data plane -------------------------------------------------------------------
    def observe_request(
        self, service: str, app: str, cluster: str, code: int, ttfb_s: float | None,
        total_s: float, times: int = 1,
    ) -> None:  # fmt: skip
        """One request, or `times` requests with the same labels and times (the HAProxy
        engine's log lines repeat: its times have ms resolution)."""
        key = (service, app, cluster)
        rm = self._routes.get(key)
        if rm is None:
            rm = _RouteMetrics(self.duration.labels(*key), self.ttfb.labels(*key))
            self._routes[key] = rm
        counter = rm.codes.get(code)
        if counter is None:
            counter = self.requests.labels(service, app, cluster, str(code))
            rm.codes[code] = counter
        counter.inc(times)  # type: ignore[attr-defined]
        _observe(rm.duration, total_s, times)
        if ttfb_s is not None:
            _observe(rm.ttfb, ttfb_s, times)

    def gateway_answer(self, service: str, app: str, code: int, times: int = 1) -> None:
        """A request the gateway answered itself (no cluster): cluster label is empty."""
        self.requests.labels(service, app, "", str(code)).inc(times)

    def set_in_flight(self, service: str, cluster: str, value: int) -> None:
        self.in_flight.labels(service, cluster).set(value)

    def upstream_error(self, service: str, cluster: str, kind: str) -> None:
        self.upstream_errors.labels(service, cluster, kind).inc()

    def cluster_totals(self, service: str) -> dict[str, Totals]:
        """`Totals` per cluster of `service` (see `all_cluster_totals`, which costs the same:
        for several services, call that once)."""
        return self.all_cluster_totals().get(service, {})

    def all_cluster_totals(self) -> dict[str, dict[str, Totals]]:
        """`Totals` per service and cluster, from the collectors' public `collect()` (what a
        scrape sees). Answers without a cluster (the empty label: no route, no cluster up)
        belong to no cluster and are left out. prometheus-client builds every sample of
        every series on each collect (~45 µs per histogram series here), so read all
        services in one call rather than one call per service."""
        requests: dict[tuple[str, str], int] = {}
        errors: dict[tuple[str, str], int] = {}
        for family in self.requests.collect():
            for s in family.samples:
                labels = s.labels
                if not labels["cluster"] or not s.name.endswith("_total"):
                    continue  # no cluster, or a `_created` timestamp
                key, n = (labels["service"], labels["cluster"]), round(s.value)
                requests[key] = requests.get(key, 0) + n
                if int(labels["code"]) >= 500:
                    errors[key] = errors.get(key, 0) + n
        counts: dict[tuple[str, str], list[int]] = {}
        for family in self.duration.collect():
            for s in family.samples:
                labels = s.labels
                if not labels["cluster"] or not s.name.endswith("_bucket"):
                    continue  # `_count`, `_sum`, `_created`
                key = (labels["service"], labels["cluster"])
                per = counts.get(key)
                if per is None:
                    per = counts[key] = [0] * len(TOTALS_BUCKETS)
                per[_BUCKET_INDEX[float(labels["le"])]] += round(s.value)
        out: dict[str, dict[str, Totals]] = {}
        for (service, cluster), n in requests.items():
            out.setdefault(service, {})[cluster] = Totals(
                requests=n,
                errors=errors.get((service, cluster), 0),
                buckets=TOTALS_BUCKETS,
                counts=tuple(counts.get((service, cluster), [0] * len(TOTALS_BUCKETS))),
            )
        return out

    # ---- control plane ----------------------------------------------------------------
    def set_weights(self, weights: dict[str, dict[str, int]]) -> None:
        current = {(s, c) for s, per in weights.items() for c in per}
        for gone in self._weight_labels - current:
            # Several workers (multiprocess mode) cannot remove a series: it reads 0 instead.
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                self.traffic_weight.labels(*gone).set(0)
            else:
                self.traffic_weight.remove(*gone)
        for service, per in weights.items():
            for cluster, weight in per.items():
                self.traffic_weight.labels(service, cluster).set(weight)
        self._weight_labels = current

    def set_phase(self, service: str, phase: str, phases: tuple[str, ...]) -> None:
        for p in phases:
            self.rollout_phase.labels(service, p).set(1 if p == phase else 0)

    def forget_service(self, service: str, phases: tuple[str, ...]) -> None:
        for p in phases:
            self.rollout_phase.remove(service, p)
        self.set_cluster_health(service, {}, {}, {}, serves=False)  # removes its series
        self._health_labels.pop(service, None)
        self._degraded_labels.pop(service, None)

    def start_counting_rollouts(self, service: str, results: tuple[str, ...]) -> None:
        """Every result's counter at 0 from a service's first tick: Prometheus' `increase()`
        sees no rise in a series whose first sample is already 1, so a rollout-aborted alert
        would miss the first abort after raygate starts."""
        for result in results:
            self.rollouts.labels(service, result)

    def set_cluster_health(
        self, service: str, healthy: Mapping[str, bool], weights: Mapping[str, int],
        degraded_since: Mapping[str, float], serves: bool = True,
    ) -> None:  # fmt: skip
        """One tick's health of a service's clusters: `healthy` for those checked,
        `weights` the traffic shares, `degraded_since` the clusters whose dashboard does not
        answer (since when). Series of clusters no longer listed go. `serves`: the service
        should be serving (it went live once and is not being deleted); if not, its count
        of healthy clusters is absent, so that no alert fires on a first deploy."""
        for gone in self._health_labels.get(service, set()) - set(healthy):
            self.cluster_healthy.remove(service, gone)
        for cluster, ok in healthy.items():
            self.cluster_healthy.labels(service, cluster).set(1 if ok else 0)
        self._health_labels[service] = set(healthy)
        for gone in self._degraded_labels.get(service, set()) - set(degraded_since):
            self.degraded_since.remove(service, gone)
        for cluster, since in degraded_since.items():
            self.degraded_since.labels(service, cluster).set(since)
        self._degraded_labels[service] = set(degraded_since)
        if not serves:
            with contextlib.suppress(KeyError):  # not there
                self.healthy_clusters.remove(service)
            return
        serving = sum(1 for c, ok in healthy.items() if ok and weights.get(c, 0) > 0)
        self.healthy_clusters.labels(service).set(serving)

    def rollout_ended(self, service: str, result: str) -> None:
        self.rollouts.labels(service, result).inc()

    def step_took(self, step: str, seconds: float) -> None:
        self.step_duration.labels(step).observe(seconds)

    def set_canary_weight(self, service: str, weights: dict[str, int]) -> None:
        """The canary's weight while one runs; its series goes once the canary ends."""
        for gone in self._canary_labels.get(service, set()) - set(weights):
            self.canary_weight.remove(service, gone)
        for cluster, weight in weights.items():
            self.canary_weight.labels(service, cluster).set(weight)
        self._canary_labels[service] = set(weights)

    def analysis_run(self, service: str, result: str) -> None:
        self.analysis_runs.labels(service, result).inc()

    def webhook_delivery(self, service: str, result: str) -> None:
        self.webhook_deliveries.labels(service, result).inc()

    def webhook_attempt_failed(self, reason: str) -> None:
        self.webhook_attempt_failures.labels(reason).inc()
