"""Canary analysis from the gateway's own counters: windows over sampled totals, and verdicts.

The gateway counts every answer per cluster (`gateway.metrics.Metrics.cluster_totals`), as
cumulative totals since it started. The controller samples those totals (`Sampler.record`,
about once a second); a window is the difference between the newest sample and the one taken
`interval_s` earlier, the same as Prometheus' `increase()` over a range, and `judge` turns
the canary's window (and the stable cluster's, same span) into a verdict. All of it is pure
apart from the Sampler's own memory: no clock, no I/O, so the planner's tests drive it with
made-up times.

No data is never success: `judge` returns INCONCLUSIVE, never PASS, below `min_requests`.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, replace
from enum import StrEnum
from fractions import Fraction
from typing import Any

from gateway.metrics import Totals
from rollout.spec import AnalysisSpec

# How far a limit may be from its rounding and still print with that many decimals.
_EPSILON = 1e-9


@dataclass(frozen=True)
class WindowStats:
    """One cluster's answers within a window: counts as `Totals`, `seconds` its real span
    (the two samples' distance, which may be a little over the interval asked for)."""

    requests: int
    errors: int
    buckets: tuple[float, ...]
    counts: tuple[int, ...]
    seconds: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float | None:
        """The q-quantile of latency in seconds, as Prometheus' `histogram_quantile` computes
        it: linear interpolation inside the bucket that holds the rank (the first bucket
        starts at 0), the highest finite bound when the rank falls in the +Inf bucket. So
        it is exact only to the bucket's resolution. None without observations."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q} outside [0, 1]")
        if len(self.buckets) < 2 or not math.isinf(self.buckets[-1]) or not self.counts:
            return None
        counts = list(self.counts)
        for i in range(1, len(counts)):  # Prometheus' ensureMonotonic: a reset mid-window
            counts[i] = max(counts[i], counts[i - 1])
        total = counts[-1]
        if total <= 0:
            return None
        rank = q * total
        b = bisect.bisect_left(counts, rank)
        if b >= len(counts) - 1:
            return self.buckets[-2]
        start, end, count = 0.0, self.buckets[b], float(counts[b])
        if b > 0:
            start = self.buckets[b - 1]
            count -= counts[b - 1]
            rank -= counts[b - 1]
        if count <= 0:  # q == 0 with an empty first bucket
            return start
        return start + (end - start) * (rank / count)


_Sample = tuple[float, dict[str, Totals]]


class Sampler:
    """Per service, a time-ordered deque of `(t, {cluster: Totals})` samples, bounded in age
    (`max_age_s`: the longest window ever asked for, plus slack) and in number: while the
    newest sample is less than about `max_age_s / max_samples` after the one before it, a
    new sample replaces it instead of being added. So recording faster than that keeps the
    count under `max_samples`, and the newest sample always holds the latest totals."""

    def __init__(self, max_age_s: float = 3700.0, max_samples: int = 4000) -> None:
        if max_age_s <= 0 or max_samples < 8:
            raise ValueError("max_age_s must be > 0 and max_samples >= 8")
        self.max_age_s = max_age_s
        self.max_samples = max_samples
        self._gap = max_age_s / (max_samples - 4)
        self._samples: dict[str, deque[_Sample]] = {}

    def record(self, service: str, now: float, totals: dict[str, Totals]) -> None:
        dq = self._samples.setdefault(service, deque())
        while dq and dq[-1][0] > now:  # the clock went back: what lies ahead is unusable
            dq.pop()
        if len(dq) >= 2 and dq[-1][0] - dq[-2][0] < self._gap:
            dq[-1] = (now, dict(totals))
        else:
            dq.append((now, dict(totals)))
        # Keep the newest sample at or before the age limit: a window of exactly max_age_s
        # still finds its start.
        cutoff = now - self.max_age_s
        while len(dq) >= 2 and dq[1][0] <= cutoff:
            dq.popleft()

    def forget(self, service: str) -> None:
        self._samples.pop(service, None)

    def samples(self, service: str) -> int:
        """How many samples are kept for `service` (for tests and the status)."""
        return len(self._samples.get(service, ()))

    def window(
        self, service: str, cluster: str, interval_s: float, now: float
    ) -> WindowStats | None:
        """`cluster`'s answers between the newest sample and the newest one taken at or
        before `now - interval_s`. None when no sample is that old (just started or
        restarted: totals from before are unknown, so no window can be claimed), when the two
        are one and the same sample (nothing recorded since), or when the newest sample has
        no such cluster. A cluster absent from the older sample counts from zero; so does
        one whose counters went down (the gateway or HAProxy restarted in between)."""
        dq = self._samples.get(service)
        if not dq:
            return None
        i = bisect.bisect_right(dq, now - interval_s, key=lambda s: s[0]) - 1
        if i < 0 or i == len(dq) - 1:
            return None
        old_t, old_totals = dq[i]
        new_t, new_totals = dq[-1]
        new = new_totals.get(cluster)
        if new is None:
            return None
        old = old_totals.get(cluster)
        if old is None or _was_reset(old, new):
            return WindowStats(new.requests, new.errors, new.buckets, new.counts, new_t - old_t)
        return WindowStats(
            requests=new.requests - old.requests,
            errors=new.errors - old.errors,
            buckets=new.buckets,
            counts=tuple(n - o for n, o in zip(new.counts, old.counts, strict=True)),
            seconds=new_t - old_t,
        )


def _was_reset(old: Totals, new: Totals) -> bool:
    return (
        old.buckets != new.buckets
        or new.requests < old.requests
        or new.errors < old.errors
        or any(n < o for n, o in zip(new.counts, old.counts, strict=True))
    )


class Outcome(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Verdict:
    """One analysis interval's result and the values behind it (rates as shares 0..1)."""

    result: Outcome
    message: str
    canary_requests: int
    stable_requests: int | None
    error_rate: float | None
    stable_error_rate: float | None
    p99_ms: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "result": self.result.value,
            "message": self.message,
            "canary_requests": self.canary_requests,
            "stable_requests": self.stable_requests,
            "error_rate": self.error_rate,
            "stable_error_rate": self.stable_error_rate,
            "p99_ms": self.p99_ms,
        }


def judge(spec: AnalysisSpec, canary: WindowStats, stable: WindowStats | None) -> Verdict:
    """The verdict on one window: INCONCLUSIVE below `min_requests`, FAIL naming every limit
    the canary is over (a value equal to its limit passes), else PASS with the values."""
    n = canary.requests
    p99_s = canary.quantile(0.99) if n else None
    p99_ms = p99_s * 1000 if p99_s is not None else None
    stable_ok = stable is not None and stable.requests >= spec.min_requests
    verdict = Verdict(
        result=Outcome.INCONCLUSIVE,
        message="",
        canary_requests=n,
        stable_requests=stable.requests if stable is not None else None,
        error_rate=canary.error_rate if n else None,
        stable_error_rate=stable.error_rate if stable is not None and stable.requests else None,
        p99_ms=p99_ms,
    )
    if n < spec.min_requests:
        message = f"not enough traffic to judge: {n:,} requests in {round(canary.seconds)} s"
        return replace(verdict, message=message)

    over = f"over {n:,} requests"
    rate = canary.error_rate
    failures: list[str] = []
    if _share(canary) > _decimal(spec.max_error_rate):
        a, b = _pcts(rate, spec.max_error_rate)
        failures.append(f"error rate {a} > {b} {over}")
    limit_ms = spec.max_p99_latency_ms
    if limit_ms is not None and p99_ms is not None and p99_ms > limit_ms:
        a, b = _nums(p99_ms, limit_ms, 0)
        failures.append(f"p99 latency {a} ms > {b} ms {over}")
    limit_points = spec.max_error_rate_over_stable
    if limit_points is not None and stable is not None and stable_ok:
        if _share(canary) - _share(stable) > _decimal(limit_points):
            diff = rate - stable.error_rate
            points, limit = _nums(diff * 100, limit_points * 100, 1)
            failures.append(
                f"error rate {_pct(rate)} is {points} points over stable's "
                f"{_pct(stable.error_rate)} (limit {limit}) {over}"
            )
    if failures:
        return replace(verdict, result=Outcome.FAIL, message="; ".join(failures))

    values = f"error rate {_pct(rate)}"
    if p99_ms is not None:
        values += f", p99 {p99_ms:.0f} ms"
    if stable is None:
        versus = " (no stable cluster to compare)" if limit_points is not None else ""
    elif not stable_ok and limit_points is not None:
        versus = f" (stable not compared: {stable.requests:,} requests < {spec.min_requests:,})"
    elif stable.requests:
        versus = f" (stable: {_pct(stable.error_rate)} over {stable.requests:,})"
    else:
        versus = " (stable: no requests)"
    return replace(verdict, result=Outcome.PASS, message=f"{values} {over}{versus}")


# Rates compare exactly, as fractions, against the limit as written in the spec (0.005, not the
# binary float next to it): a canary exactly at its limit passes, whatever float subtraction
# (7/200 - 3/100 = 0.0050000000000000044) would say.
def _share(stats: WindowStats) -> Fraction:
    return Fraction(stats.errors, stats.requests) if stats.requests else Fraction(0)


def _decimal(limit: float) -> Fraction:
    return Fraction(repr(limit))


def _pct(share: float) -> str:
    return f"{share * 100:.1f}%"


def _pcts(value: float, limit: float) -> tuple[str, str]:
    a, b = _nums(value * 100, limit * 100, 1)
    return f"{a}%", f"{b}%"


def _nums(value: float, limit: float, digits: int) -> tuple[str, str]:
    """Both numbers with the same decimals: at least `digits`, enough to show the limit as
    set (0.25, not 0.2), and more when fewer would print a value over its limit as equal to
    it ("1.0% > 1.0%")."""
    d = digits
    while d < digits + 4 and abs(round(limit, d) - limit) > _EPSILON:
        d += 1
    while d < digits + 4 and f"{value:.{d}f}" == f"{limit:.{d}f}":
        d += 1
    return f"{value:.{d}f}", f"{limit:.{d}f}"
