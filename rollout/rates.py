"""Requests per second and error rate per service and cluster over the last minutes, for the
status page's small charts.

The gateway counts answers per cluster since the process started
(`gateway.metrics.Metrics.all_cluster_totals`); the page wants rates over time, and raygate
has no Prometheus of its own. So a task samples the counters every few seconds into a
bounded ring held in memory (120 samples: 10 minutes at 5 s), and the page reads the rates
between neighbouring samples. Lost on restart, like any in-memory chart: the counters are too.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from gateway.metrics import Totals

log = logging.getLogger("raygate.rates")

Sample = tuple[float, dict[str, dict[str, tuple[int, int]]]]  # at, service -> cluster -> (n, 5xx)


class RateHistory:
    def __init__(self, every_s: float = 5.0, keep: int = 120) -> None:
        self.every_s = every_s
        self._samples: deque[Sample] = deque(maxlen=keep)

    def record(self, at: float, totals: Mapping[str, Mapping[str, Totals]]) -> None:
        self._samples.append((at, {
            service: {c: (t.requests, t.errors) for c, t in clusters.items()}
            for service, clusters in totals.items()
        }))  # fmt: skip

    def series(self, service: str) -> dict[str, list[dict[str, Any]]]:
        """cluster -> [{"at", "rps", "error_rate"}] between each pair of neighbouring samples
        (error_rate is null where there were no requests). A counter that went down (the
        process restarted) reads as a fresh start, never as a negative rate."""
        out: dict[str, list[dict[str, Any]]] = {}
        samples = list(self._samples)
        clusters = {c for _, s in samples for c in s.get(service, {})}
        for before, after in itertools.pairwise(samples):
            span = after[0] - before[0]
            if span <= 0:
                continue
            was, now = before[1].get(service, {}), after[1].get(service, {})
            for cluster in clusters:
                if cluster not in was and cluster not in now:
                    continue  # not counted yet (or any more): no point, rather than a 0
                n0, e0 = was.get(cluster, (0, 0))
                n1, e1 = now.get(cluster, (0, 0))
                if n1 < n0:
                    n0, e0 = 0, 0
                n, e = n1 - n0, max(0, e1 - e0)
                out.setdefault(cluster, []).append({
                    "at": after[0], "rps": round(n / span, 3),
                    "error_rate": round(e / n, 4) if n else None,
                })  # fmt: skip
        return out

    async def run(self, read: Callable[[], Mapping[str, Mapping[str, Totals]]]) -> None:
        """Sample `read()` every `every_s` until cancelled; a failed read skips one sample."""
        while True:
            try:
                self.record(time.time(), read())
            except Exception:
                log.exception("sampling the gateway's counters failed")
            await asyncio.sleep(self.every_s)
