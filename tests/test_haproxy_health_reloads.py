"""A cluster failing HAProxy's health check is told once, however many reloads follow
(review of issue 12, part 2).

Every reload starts a new worker whose checks start over (`INI`, no result) and are spread
over the check interval: a cluster whose servers come late in the config (another service's
routes come first) has no result for most of a second after each reload. Real HAProxy, a
real Serve-like upstream that goes away (tests/test_haproxy_health.py's stand-in), reloads
by pushes of another service.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from gateway.haproxy_config import HAProxySettings
from gateway.haproxy_engine import HAProxyEngine
from gateway.haproxy_health import ClusterHealth, changes
from gateway.routes import Backend, Route, RouteTable
from tests.loopback import free_port, until
from tests.test_haproxy_health import CLUSTER, DOWN_WORDS, UP_WORDS, ServeProxy, said


def table(digits: str, other: str, extra: int) -> RouteTable:
    """Eight routes of service "other" (healthy) come first; digits' come last; `extra`
    more routes of "other" make a new topology (a reload) each time it grows."""
    mine = (Backend(CLUSTER, digits, 1),)
    theirs = (Backend("rg-other", other, 1),)
    routes = [Route(f"/a{i}", "other", f"a{i}", theirs) for i in range(8 + extra)]
    routes.append(Route("/zdigits", "digits", "digits", mine))
    return RouteTable(tuple(routes))


async def test_a_down_cluster_is_not_told_again_at_each_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="raygate.haproxy")
    digits, other = ServeProxy(), ServeProxy()
    await digits.start()
    await other.start()
    settings = HAProxySettings(tmp_path / "hx", port=free_port(), health_path="/-/healthz")
    engine = HAProxyEngine(settings)
    try:
        await engine.start()
        await engine.apply(table(digits.url, other.url, 0))
        await digits.stop()
        await until(lambda: said(caplog, DOWN_WORDS) == 1, 15)
        for extra in range(1, 5):  # four pushes of "other": four reloads, digits still down
            await engine.apply(table(digits.url, other.url, extra))
            # Two polls of the engine (one a second) after the new worker took over.
            await asyncio.sleep(2.2)
        await digits.start()
        await until(lambda: said(caplog, UP_WORDS) >= 1, 15)
    finally:
        await engine.drain(10)
        await digits.stop()
        await other.stop()
    told = [r.getMessage() for r in caplog.records if r.name == "raygate.haproxy"]
    assert said(caplog, DOWN_WORDS) == 1, "\n".join(told)
    assert said(caplog, UP_WORDS) == 1, "\n".join(told)


def test_a_told_cluster_whose_new_checks_have_no_result_yet_stays_told() -> None:
    key = ("digits", CLUSTER)
    down = ClusterHealth(False, "Layer4 connection problem")
    told, state = changes(set(), {key: down})
    assert len(told) == 1 and state == {key}
    # A reload: the cluster is in the table, its checks are INI (no result).
    told, state = changes(state, {}, {key})
    assert told == [] and state == {key}
    told, state = changes(state, {key: down}, {key})
    assert told == [], "told DOWN again after a reload"
    told, state = changes(state, {key: ClusterHealth(True, "")}, {key})
    assert [c.health.up for c in told] == [True] and state == set()
