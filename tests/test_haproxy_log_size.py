"""HAProxy's log file stays bounded while one HAProxy master runs (review of issue 12,
part 2).

The master outlives raygate (it is adopted across restarts), so a size check only when a
master starts lets the file grow for as long as that master lives: every reload writes a
few lines per route, every health check that flaps a few more. Real HAProxy, reloaded by
route changes, with a small limit (the default is 16 MiB).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.haproxy_config import HAProxySettings
from gateway.haproxy_engine import HAProxyEngine
from gateway.routes import Backend, Route, RouteTable
from tests.loopback import free_port, until
from tests.test_haproxy_health import ServeProxy

LIMIT = 8192


def table(url: str, n: int) -> RouteTable:
    backends = (Backend("rg-1", url, 1),)
    return RouteTable(tuple(Route(f"/r{i}", "svc", f"r{i}", backends) for i in range(n)))


async def test_the_log_of_a_running_haproxy_is_rotated_at_its_limit(tmp_path: Path) -> None:
    proxy = ServeProxy()
    await proxy.start()
    settings = HAProxySettings(tmp_path / "hx", port=free_port(), health_path="/-/healthz",
                               log_max_bytes=LIMIT)  # fmt: skip
    log, old = settings.log_path, settings.log_path.with_name("haproxy.log.1")
    engine = HAProxyEngine(settings)
    written = 0
    try:
        await engine.start()
        pid = engine.pid
        for n in range(4, 24):  # 20 reloads: each stops the old worker's proxies, one a line
            before = log.stat().st_size
            await engine.apply(table(proxy.url, n))
            await until(lambda b=before: log.stat().st_size != b, 10)
            written += max(0, log.stat().st_size - before)
            await asyncio.sleep(0.3)
        assert written > 2 * LIMIT, f"the test wrote only {written} bytes"
        await asyncio.sleep(1.5)  # a poll of the engine
        assert engine.pid == pid, "one master all along"
        size = log.stat().st_size
        assert size <= LIMIT, f"haproxy.log is {size} bytes with a limit of {LIMIT}"
        assert old.exists() and old.stat().st_mode & 0o077 == 0
        # HAProxy still writes to the file it was given, from its start again.
        before = log.stat().st_size
        await engine.apply(table(proxy.url, 30))
        await until(lambda: "Loading success" in log.read_text()[before:], 10)
    finally:
        await engine.drain(10)
        await proxy.stop()
