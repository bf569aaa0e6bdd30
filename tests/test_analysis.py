"""Canary analysis without Ray: per-cluster totals read from a real `Metrics`, windows over
sampled totals (restarts, counter resets, pruning), quantiles, and `judge`'s verdicts and
messages, with property tests for "no data is never success"."""

from __future__ import annotations

import bisect
import math
import statistics
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway.metrics import LATENCY_BUCKETS, TOTALS_BUCKETS, Metrics, Totals
from rollout.analysis import Outcome, Sampler, Verdict, WindowStats, judge
from rollout.spec import AnalysisSpec

INF = math.inf


def cumulative(latencies: list[tuple[float, int]]) -> tuple[int, ...]:
    """Prometheus `le` counts of (latency_s, how many) over TOTALS_BUCKETS, by hand."""
    per = [0] * len(TOTALS_BUCKETS)
    for latency, n in latencies:
        per[bisect.bisect_left(TOTALS_BUCKETS, latency)] += n
    out, run = [], 0
    for c in per:
        run += c
        out.append(run)
    return tuple(out)


def totals(requests: int, errors: int = 0, latency: float = 0.02) -> Totals:
    return Totals(requests, errors, TOTALS_BUCKETS, cumulative([(latency, requests)]))


def ws(
    requests: int,
    errors: int = 0,
    latency: float = 0.02,
    seconds: float = 10.0,
    slow: int = 0,
    slow_latency: float = 2.0,
) -> WindowStats:
    counts = cumulative([(latency, requests - slow), (slow_latency, slow)])
    return WindowStats(requests, errors, TOTALS_BUCKETS, counts, seconds)


# ---- Metrics.cluster_totals -----------------------------------------------------------------
def test_cluster_totals_counts_answers_errors_and_latency_per_cluster() -> None:
    m = Metrics(CollectorRegistry())
    m.observe_request("s", "a", "c1", 200, 0.001, 0.003, times=3)  # le 0.005
    m.observe_request("s", "b", "c1", 200, 0.0001, 0.0004)  # another app: le 0.001
    m.observe_request("s", "a", "c1", 502, None, 0.02, times=2)  # failed upstream: le 0.025
    m.observe_request("s", "a", "c1", 404, 0.1, 0.2)  # 4xx is no error: le 0.25
    m.observe_request("s", "a", "c2", 500, 1.0, 70.0)  # over every finite bound: +Inf
    m.observe_request("s", "b", "c2", 504, None, 60.0, times=4)  # exactly on a bound: le 60
    m.gateway_answer("s", "a", 503, times=7)  # no cluster: nobody's
    m.observe_request("t", "a", "c1", 500, None, 0.01, times=9)  # another service

    got = m.cluster_totals("s")

    assert set(got) == {"c1", "c2"}
    c1, c2 = got["c1"], got["c2"]
    assert (c1.requests, c1.errors) == (7, 2)
    assert (c2.requests, c2.errors) == (5, 5)
    assert c1.buckets == c2.buckets == (*LATENCY_BUCKETS, INF)
    #                 .001 .0025 .005 .01 .025 .05  .1 .25  .5  1 2.5  5 10 30 60 inf
    assert c1.counts == (1, 1, 4, 4, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7)
    assert c2.counts == (0,) * 14 + (4, 5)
    # The same numbers a scrape reads, one series at a time.
    reg = m.registry
    for cluster, t in got.items():
        scraped = sum(
            reg.get_sample_value(
                "raygate_request_duration_seconds_bucket",
                {"service": "s", "app": app, "cluster": cluster, "le": "+Inf"},
            )
            or 0
            for app in ("a", "b")
        )
        assert t.counts[-1] == scraped == t.requests


def test_cluster_totals_of_an_unknown_service_or_only_gateway_answers_is_empty() -> None:
    m = Metrics(CollectorRegistry())
    m.gateway_answer("s", "a", 503)
    m.gateway_answer("", "", 404)
    assert m.cluster_totals("s") == {}
    assert m.cluster_totals("nobody") == {}


def test_all_cluster_totals_holds_every_service_as_cluster_totals_sees_it() -> None:
    m = Metrics(CollectorRegistry())
    m.observe_request("s", "a", "c1", 200, 0.001, 0.003)
    m.observe_request("t", "a", "c1", 503, None, 0.02, times=2)
    m.observe_request("t", "a", "c9", 200, None, 3.0)
    m.gateway_answer("u", "a", 503)
    every = m.all_cluster_totals()
    assert set(every) == {"s", "t"}
    assert every["s"] == m.cluster_totals("s") and every["t"] == m.cluster_totals("t")
    assert every["t"]["c1"] == Totals(2, 2, TOTALS_BUCKETS, cumulative([(0.02, 2)]))


def test_all_cluster_totals_is_cheap_with_50_series() -> None:
    """Called about once a second: 25 services x 2 clusters = 50 histogram series and 100
    counter series (two codes each) must cost a few milliseconds at most."""
    m = Metrics(CollectorRegistry())
    for s in range(25):
        for c in range(2):
            m.observe_request(f"s{s}", "app", f"c{c}", 200, 0.01, 0.02)
            m.observe_request(f"s{s}", "app", f"c{c}", 503, None, 0.5)
    expected = Totals(2, 1, TOTALS_BUCKETS, cumulative([(0.02, 1), (0.5, 1)]))
    assert m.all_cluster_totals()["s7"]["c1"] == expected
    per_call = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(20):
            m.all_cluster_totals()
        per_call.append((time.perf_counter() - t0) / 20)
    # Measured ~2.3 ms on the 2-core dev box; 20 ms would mean something went quadratic.
    assert statistics.median(per_call) < 0.02, per_call


# ---- WindowStats.quantile ---------------------------------------------------------------------
def test_quantile_interpolates_inside_the_bucket_like_histogram_quantile() -> None:
    w = WindowStats(40, 0, (0.1, 0.2, 0.4, INF), (10, 30, 40, 40), 10.0)
    assert w.quantile(0.5) == pytest.approx(0.15)  # rank 20: half way through (0.1, 0.2]
    assert w.quantile(0.99) == pytest.approx(0.392)  # rank 39.6: 9.6 of 10 in (0.2, 0.4]
    assert w.quantile(0.25) == pytest.approx(0.1)  # rank 10: the top of the first bucket
    assert w.quantile(0.1) == pytest.approx(0.04)  # the first bucket starts at 0
    assert w.quantile(1.0) == pytest.approx(0.4)
    assert w.quantile(0.0) == 0.0


def test_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    assert WindowStats(5, 0, (0.1, 0.4, INF), (0, 0, 5), 1.0).quantile(0.5) == 0.4
    assert WindowStats(5, 0, (0.1, 0.4, INF), (4, 4, 5), 1.0).quantile(0.99) == 0.4
    assert ws(10, slow=10, slow_latency=1e6).quantile(0.99) == LATENCY_BUCKETS[-1]


def test_quantile_without_observations_is_none_and_q_outside_0_1_is_an_error() -> None:
    assert ws(0).quantile(0.99) is None
    assert WindowStats(0, 0, TOTALS_BUCKETS, (), 10.0).quantile(0.5) is None
    with pytest.raises(ValueError):
        ws(10).quantile(1.5)


def test_quantile_after_a_reset_mid_window_is_made_monotonic() -> None:
    # (Prometheus' ensureMonotonic): a count that went down reads as the one before it.
    w = WindowStats(10, 0, (0.1, 0.2, 0.4, INF), (6, 4, 10, 10), 10.0)
    assert w.quantile(0.5) == pytest.approx(0.05 * 5 / 3)


@settings(max_examples=300, deadline=None)
@given(
    latencies=st.lists(
        st.tuples(
            st.floats(0, 100, allow_nan=False).filter(lambda x: x not in LATENCY_BUCKETS),
            st.integers(1, 5),
        ),
        min_size=1,
        max_size=60,
    ),
    q=st.floats(0.01, 1.0),
)
def test_quantile_of_real_metrics_is_the_true_percentile_within_bucket_resolution(
    latencies: list[tuple[float, int]], q: float
) -> None:
    """Latencies through a real `Metrics` (with `times`), then `quantile` against the
    q-quantile of the raw latencies: both lie in the same bucket."""
    m = Metrics(CollectorRegistry())
    raw: list[float] = []
    for latency, n in latencies:
        m.observe_request("s", "a", "c", 200, None, latency, times=n)
        raw += [latency] * n
    t = m.cluster_totals("s")["c"]
    w = WindowStats(t.requests, t.errors, t.buckets, t.counts, 10.0)
    got = w.quantile(q)
    raw.sort()
    true = raw[max(1, math.ceil(q * len(raw))) - 1]  # the rank-th observation
    b = bisect.bisect_left(TOTALS_BUCKETS, true)
    if b == len(TOTALS_BUCKETS) - 1:
        assert got == LATENCY_BUCKETS[-1]
    else:
        lower = TOTALS_BUCKETS[b - 1] if b else 0.0
        assert got is not None and lower <= got <= TOTALS_BUCKETS[b], (got, true)


# ---- Sampler ----------------------------------------------------------------------------------
def test_a_window_is_the_newest_sample_minus_the_newest_one_interval_ago() -> None:
    s = Sampler()
    s.record("svc", 0.0, {"c": totals(100, 1)})
    s.record("svc", 5.0, {"c": totals(150, 2)})
    later = Totals(400, 10, TOTALS_BUCKETS, cumulative([(0.02, 150), (0.3, 250)]))
    s.record("svc", 10.0, {"c": later})
    w = s.window("svc", "c", 10.0, 10.0)
    assert w == WindowStats(300, 9, TOTALS_BUCKETS, cumulative([(0.02, 50), (0.3, 250)]), 10.0)
    # Newest at or before now - 7 is t=0; at or before now - 5 is t=5.
    assert s.window("svc", "c", 7.0, 10.0) == w
    w5 = s.window("svc", "c", 5.0, 10.0)
    assert w5 is not None and (w5.requests, w5.errors, w5.seconds) == (250, 8, 5.0)


def test_no_window_without_a_sample_that_old() -> None:
    """Right after a start (or a restart of raygate) there is no earlier sample: no window,
    so no verdict, rather than a window claiming totals from before the start."""
    s = Sampler()
    assert s.window("svc", "c", 10.0, 100.0) is None
    s.record("svc", 100.0, {"c": totals(10)})
    assert s.window("svc", "c", 10.0, 100.0) is None
    s.record("svc", 105.0, {"c": totals(20)})
    assert s.window("svc", "c", 10.0, 105.0) is None
    s.record("svc", 110.0, {"c": totals(30)})
    w = s.window("svc", "c", 10.0, 110.0)
    assert w is not None and (w.requests, w.seconds) == (20, 10.0)


def test_no_window_when_nothing_was_recorded_since_the_start_sample() -> None:
    s = Sampler()
    s.record("svc", 0.0, {"c": totals(10)})
    s.record("svc", 1.0, {"c": totals(20)})
    assert s.window("svc", "c", 10.0, 500.0) is None  # both samples are older than the window


def test_a_cluster_new_since_the_older_sample_counts_from_zero_and_a_gone_one_has_none() -> None:
    s = Sampler()
    s.record("svc", 0.0, {"old": totals(100)})
    s.record("svc", 10.0, {"old": totals(160), "new": totals(40, 2)})
    w = s.window("svc", "new", 10.0, 10.0)
    assert w is not None and (w.requests, w.errors, w.counts) == (40, 2, totals(40).counts)
    s.record("svc", 20.0, {"new": totals(90, 2)})
    assert s.window("svc", "old", 10.0, 20.0) is None
    assert s.window("svc", "elsewhere", 10.0, 20.0) is None
    assert s.window("other-svc", "new", 10.0, 20.0) is None


@pytest.mark.parametrize(
    "after",
    [
        Totals(30, 1, TOTALS_BUCKETS, totals(30).counts),  # requests went down
        Totals(500, 0, TOTALS_BUCKETS, totals(500).counts),  # errors went down
        # Totals up, but one bucket down: the counters restarted and then grew past the old.
        Totals(500, 5, TOTALS_BUCKETS, cumulative([(0.5, 500)])),
    ],
)
def test_counters_that_went_down_count_from_zero(after: Totals) -> None:
    """The gateway (or HAProxy, for its engine) restarted between the samples: the new
    totals are all that happened since, as Prometheus' `increase()` treats a reset."""
    s = Sampler()
    s.record("svc", 0.0, {"c": totals(100, 3, latency=0.02)})
    s.record("svc", 10.0, {"c": after})
    w = s.window("svc", "c", 10.0, 10.0)
    assert w == WindowStats(after.requests, after.errors, after.buckets, after.counts, 10.0)


def test_old_samples_are_pruned_but_a_window_of_max_age_still_finds_its_start() -> None:
    s = Sampler(max_age_s=100.0)
    for t in range(501):
        s.record("svc", float(t), {"c": totals(t * 10)})
        assert s.samples("svc") <= 102
    w = s.window("svc", "c", 100.0, 500.0)
    assert w is not None and (w.requests, w.seconds) == (1000, 100.0)
    assert s.window("svc", "c", 101.0, 500.0) is None


def test_recording_faster_than_max_samples_allows_thins_old_samples_keeps_the_newest() -> None:
    s = Sampler(max_age_s=100.0, max_samples=50)  # a sample every ~2.2 s at most
    t, n = 0.0, 0
    while t <= 300.0:
        n += 7
        s.record("svc", t, {"c": totals(n)})
        assert s.samples("svc") <= 50
        t = round(t + 0.1, 6)
    now = t - 0.1
    for interval in (10.0, 50.0, 100.0):
        w = s.window("svc", "c", interval, now)
        assert w is not None
        # The newest totals are in (n), the start at most one spacing before the cutoff.
        assert interval <= w.seconds <= interval + 2 * 100.0 / 46 + 1e-6, (interval, w.seconds)
        assert w.requests == round(w.seconds / 0.1) * 7


def test_a_clock_going_back_drops_the_samples_ahead_of_it_and_forget_drops_all() -> None:
    s = Sampler()
    for t, n in ((0.0, 10), (10.0, 20), (20.0, 30)):
        s.record("svc", t, {"c": totals(n)})
    s.record("svc", 15.0, {"c": totals(25)})
    assert s.samples("svc") == 3
    w = s.window("svc", "c", 15.0, 15.0)
    assert w is not None and (w.requests, w.seconds) == (15, 15.0)
    s.forget("svc")
    assert s.samples("svc") == 0 and s.window("svc", "c", 1.0, 15.0) is None


# ---- judge ------------------------------------------------------------------------------------
SPEC = AnalysisSpec(
    interval_s=10,
    min_requests=50,
    max_error_rate=0.01,
    max_p99_latency_ms=500,
    max_error_rate_over_stable=0.005,
)
LOOSE = AnalysisSpec(min_requests=50, max_error_rate=0.05, max_error_rate_over_stable=0.005)


def test_too_few_canary_requests_is_inconclusive_whatever_they_say() -> None:
    v = judge(SPEC, ws(12, errors=12, seconds=10.4, slow=12), ws(3000))
    assert v.result is Outcome.INCONCLUSIVE
    assert v.message == "not enough traffic to judge: 12 requests in 10 s"
    assert (v.canary_requests, v.stable_requests, v.error_rate) == (12, 3000, 1.0)
    v0 = judge(SPEC, ws(0, seconds=9.6), None)
    assert v0.result is Outcome.INCONCLUSIVE and v0.error_rate is None and v0.p99_ms is None
    assert v0.message == "not enough traffic to judge: 0 requests in 10 s"
    assert judge(SPEC, ws(49), ws(3000)).result is Outcome.INCONCLUSIVE


def test_exactly_min_requests_is_judged() -> None:
    assert judge(SPEC, ws(50), ws(3000)).result is Outcome.PASS
    assert judge(SPEC, ws(50, errors=50), ws(3000)).result is Outcome.FAIL


def test_an_error_rate_over_the_limit_fails_with_the_measured_values() -> None:
    v = judge(SPEC, ws(250, errors=78), None)
    assert v.result is Outcome.FAIL
    assert v.message == "error rate 31.2% > 1.0% over 250 requests"
    assert v.error_rate == pytest.approx(0.312)


def test_an_error_rate_equal_to_the_limit_passes_and_just_over_prints_apart() -> None:
    assert judge(SPEC, ws(100, errors=1), None).result is Outcome.PASS
    assert judge(SPEC, ws(10_000, errors=100), None).result is Outcome.PASS
    v = judge(SPEC, ws(10_000, errors=101), None)
    assert v.result is Outcome.FAIL
    assert v.message == "error rate 1.01% > 1.00% over 10,000 requests"


def test_a_p99_over_the_limit_fails() -> None:
    # 3 of 212 in (0.5, 1.0]: rank 209.88 is 0.88 of 3 into that bucket -> 646.7 ms.
    v = judge(SPEC, ws(212, slow=3, slow_latency=0.8), None)
    assert v.result is Outcome.FAIL
    assert v.message == "p99 latency 647 ms > 500 ms over 212 requests"
    assert v.p99_ms == pytest.approx(500 + 500 * (0.99 * 212 - 209) / 3)
    no_limit = AnalysisSpec(min_requests=50, max_error_rate=0.01)
    assert judge(no_limit, ws(212, slow=212, slow_latency=50.0), None).result is Outcome.PASS


def test_an_error_rate_over_stable_by_more_than_the_limit_fails() -> None:
    v = judge(LOOSE, ws(200, errors=6), ws(1000, errors=5))
    assert v.result is Outcome.FAIL
    assert v.message == (
        "error rate 3.0% is 2.5 points over stable's 0.5% (limit 0.5) over 200 requests"
    )
    assert (v.stable_requests, v.stable_error_rate) == (1000, 0.005)


def test_an_error_rate_over_stable_by_exactly_the_limit_passes() -> None:
    # 7/200 - 3/100 is 0.0050000000000000044 in floats; as fractions it is 0.005.
    v = judge(LOOSE, ws(200, errors=7), ws(100, errors=3))
    assert v.result is Outcome.PASS, v.message
    assert judge(LOOSE, ws(200, errors=8), ws(100, errors=3)).result is Outcome.FAIL


def test_a_stable_with_too_few_requests_is_not_compared_and_the_pass_says_so() -> None:
    v = judge(LOOSE, ws(200, errors=6), ws(10, errors=0))
    assert v.result is Outcome.PASS
    assert (
        v.message
        == "error rate 3.0%, p99 25 ms over 200 requests (stable not compared: 10 requests < 50)"
    )
    v = judge(LOOSE, ws(200, errors=6), None)
    assert v.result is Outcome.PASS and v.message.endswith("(no stable cluster to compare)")
    assert v.stable_requests is None and v.stable_error_rate is None


def test_every_failure_is_named() -> None:
    v = judge(SPEC, ws(212, errors=66, slow=3, slow_latency=0.8), ws(2800, errors=3))
    assert v.result is Outcome.FAIL
    assert v.message == (
        "error rate 31.1% > 1.0% over 212 requests; "
        "p99 latency 647 ms > 500 ms over 212 requests; "
        "error rate 31.1% is 31.0 points over stable's 0.1% (limit 0.5) over 212 requests"
    )


def test_a_pass_carries_the_values_behind_it() -> None:
    v = judge(SPEC, ws(500, errors=1), ws(2800, errors=3))
    assert v.result is Outcome.PASS
    # p99 of 500 answers in (0.01, 0.025]: 0.01 + 0.015 * 0.99 = 24.85 ms.
    assert v.message == "error rate 0.2%, p99 25 ms over 500 requests (stable: 0.1% over 2,800)"
    assert v.to_json() == {
        "result": "pass",
        "message": v.message,
        "canary_requests": 500,
        "stable_requests": 2800,
        "error_rate": 0.002,
        "stable_error_rate": 3 / 2800,
        "p99_ms": pytest.approx(24.85),
    }


@st.composite
def windows(draw: st.DrawFn, max_requests: int = 400) -> WindowStats:
    requests = draw(st.integers(0, max_requests))
    errors = draw(st.integers(0, requests))
    per = [0] * len(TOTALS_BUCKETS)
    for _ in range(requests):
        per[draw(st.integers(0, len(per) - 1))] += 1
    counts, run = [], 0
    for c in per:
        run += c
        counts.append(run)
    return WindowStats(requests, errors, TOTALS_BUCKETS, tuple(counts), draw(st.floats(1, 60)))


specs = st.builds(
    AnalysisSpec,
    interval_s=st.floats(1, 60),
    min_requests=st.integers(1, 300),
    max_error_rate=st.floats(0, 1),
    max_p99_latency_ms=st.none() | st.floats(1, 60_000),
    max_error_rate_over_stable=st.none() | st.floats(0, 1),
)


@settings(max_examples=400, deadline=None)
@given(spec=specs, canary=windows(), stable=st.none() | windows(2000))
def test_no_pass_without_enough_data_or_over_the_error_rate(
    spec: AnalysisSpec, canary: WindowStats, stable: WindowStats | None
) -> None:
    v = judge(spec, canary, stable)
    assert isinstance(v, Verdict) and v.message
    if canary.requests < spec.min_requests:
        assert v.result is Outcome.INCONCLUSIVE
    else:
        assert v.result is not Outcome.INCONCLUSIVE
        if canary.error_rate > spec.max_error_rate:
            assert v.result is Outcome.FAIL
            assert "error rate" in v.message
        p99 = canary.quantile(0.99)
        if spec.max_p99_latency_ms is not None and p99 is not None:
            if p99 * 1000 > spec.max_p99_latency_ms:
                assert v.result is Outcome.FAIL
    assert v.to_json()["result"] == v.result.value
