"""HAProxy's own lines go to its log file; raygate says what matters in its own words.

A real HAProxy (the engine's) checks a real Serve-like upstream on loopback that goes away
and comes back: the terminal (the test's fds 1 and 2, which HAProxy would inherit) gets no
raw HAProxy line, raygate's log says once, in service and cluster names, that the cluster
fails its health check and once that it passes again, through a reload that makes a new
worker report the same DOWN again; the raw lines are in `<work dir>/haproxy.log`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from gateway.haproxy_config import HAProxySettings
from gateway.haproxy_engine import HAProxyEngine, HAProxyError
from gateway.haproxy_health import ClusterHealth, changes, cluster_health
from gateway.routes import Backend, Route, RouteTable
from tests.harness import ROOT
from tests.loopback import free_port, until

CLUSTER = "rg-7f3a"
DOWN_WORDS = f"digits: cluster {CLUSTER}'s Serve proxy fails HAProxy's health check"
UP_WORDS = f"digits: cluster {CLUSTER}'s Serve proxy passes HAProxy's health check again"


class ServeProxy:
    """A stand-in for a cluster's Serve proxy (named as such): answers /-/healthz, can be
    stopped and started again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def healthz(_request: web.Request) -> web.Response:
            return web.Response(text="success")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", healthz)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def proxy() -> AsyncIterator[ServeProxy]:
    p = ServeProxy()
    await p.start()
    yield p
    await p.stop()


PENDING = f"http://127.0.0.1:{free_port()}"  # a pending cluster's proxy, not up: no listener


def routes(url: str, *prefixes: str) -> RouteTable:
    """`CLUSTER` takes the traffic; "rg-pending" is in the table at weight 0 (as a pending
    cluster is before its switch) and its check never passes."""
    backends = (Backend(CLUSTER, url, 1), Backend("rg-pending", PENDING, 0))
    return RouteTable(tuple(Route(p, "digits", p.strip("/"), backends) for p in prefixes))


def said(caplog: pytest.LogCaptureFixture, words: str) -> int:
    return sum(words in r.getMessage() for r in caplog.records if r.name == "raygate.haproxy")


async def test_a_cluster_failing_its_check_is_told_once_in_raygate_words(
    tmp_path: Path,
    proxy: ServeProxy,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="raygate.haproxy")
    settings = HAProxySettings(tmp_path / "hx", port=free_port(), health_path="/-/healthz")
    engine = HAProxyEngine(settings)
    raw = settings.work_dir / "haproxy.log"  # the log file in the state dir

    def lines(words: str) -> int:
        return raw.read_text().count(words) if raw.exists() else 0

    try:
        await engine.start()
        await engine.apply(routes(proxy.url, "/a", "/b"))
        stat = lambda: engine.command("show stat -1 4 -1")  # noqa: E731
        deadline = time.monotonic() + 15
        while (await stat()).count("L7OK") < 2:  # both routes' first check passed
            assert time.monotonic() < deadline, await stat()
            await asyncio.sleep(0.1)

        await proxy.stop()
        await until(lambda: said(caplog, DOWN_WORDS) > 0, 15)
        # Every backend of both routes said DOWN in the raw log (route, chunked twin).
        await until(lambda: lines(f"/{CLUSTER} is DOWN") >= 4, 10)
        # A reload while it is down: the new worker starts over, checks, and says DOWN again.
        await engine.apply(routes(proxy.url, "/a", "/b", "/c"))
        await until(lambda: lines(f"Server rt:a/{CLUSTER} is DOWN") >= 2, 15)
        await until(lambda: lines(f"Server rt:c/{CLUSTER} is DOWN") >= 1, 15)

        await proxy.start()
        await until(lambda: said(caplog, UP_WORDS) > 0, 15)
        await until(lambda: lines(f"/{CLUSTER} is UP") >= 6, 10)  # 3 routes x 2 backends
    finally:
        await engine.drain(10)

    told = [r.getMessage() for r in caplog.records if r.name == "raygate.haproxy"]
    print("\n".join(told))
    assert said(caplog, DOWN_WORDS) == 1, told
    assert said(caplog, UP_WORDS) == 1, told
    assert said(caplog, "rg-pending") == 0, "a cluster at weight 0 is raygate's business"
    assert "Server rt:a/rg-pending is DOWN" in raw.read_text()
    down = next(r for r in caplog.records if DOWN_WORDS in r.getMessage())
    assert down.levelno == logging.WARNING
    # (HAProxy's detail, "Connection refused", is blank while a check is under way)
    assert "(Layer4 connection problem" in down.getMessage()
    # Both routes' checks fail within a check interval of each other: one poll may see one.
    assert "no other healthy cluster: requests get 503" in down.getMessage()
    out, err = capfd.readouterr()
    for text in ("is DOWN", "is UP", "[NOTICE]", "[WARNING]", "[ALERT]", "rt:a"):
        assert text not in out + err, f"HAProxy's raw {text!r} on the terminal:\n{out}{err}"
    assert f"Server rt:a/{CLUSTER} is DOWN, reason: Layer4 connection problem" in raw.read_text()
    assert raw.stat().st_mode & 0o077 == 0


async def test_a_haproxy_that_cannot_start_says_why(tmp_path: Path) -> None:
    """Its ALERT is in the log file now, not on the terminal: the error quotes it."""
    port = free_port()
    blocker = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", port)
    settings = HAProxySettings(tmp_path / "hx", port=port)
    try:
        engine = HAProxyEngine(settings)
        with pytest.raises(HAProxyError) as failed:
            await engine.start()
        await engine.close()
    finally:
        blocker.close()
    assert "cannot bind socket" in str(failed.value) or "Address in use" in str(failed.value)
    assert str(settings.log_path) in str(failed.value)
    print(failed.value)


def test_raygate_up_keeps_haproxy_lines_off_its_terminal(tmp_path: Path) -> None:
    """A real `raygate up --engine haproxy` (no spec: no Ray): HAProxy's start-up NOTICEs
    are in `<state-dir>/haproxy/haproxy.log`, not in raygate's output, which names the file."""
    state, admin_port = tmp_path / "state", free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollout.cli", "up", "--state-dir", str(state), "--port",
         str(free_port()), "--admin-port", str(admin_port), "--engine", "haproxy"],
        cwd=ROOT, env={**os.environ, "RAYGATE_TOKEN": "t" * 32}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    log_file = state / "haproxy" / "haproxy.log"
    try:
        deadline = time.monotonic() + 60
        while not _answers(f"http://127.0.0.1:{admin_port}/-/healthz"):
            assert proc.poll() is None and time.monotonic() < deadline, "raygate up did not start"
            time.sleep(0.1)
        while "Loading success" not in (log_file.read_text() if log_file.exists() else ""):
            assert time.monotonic() < deadline, "HAProxy wrote no start-up line to its log"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    text = out.decode()
    print(text)
    assert proc.returncode == 0, text
    for raw in ("[NOTICE]", "[WARNING]", "New worker", "Loading success"):
        assert raw not in text, f"HAProxy's {raw!r} on raygate's terminal:\n{text}"
    assert f"its own messages go to {log_file}" in text


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


# ---- the translation alone, on rows HAProxy 2.8 wrote (trimmed to the fields read) ---------
def row(px: str, status: str, check: str, weight: str = "1", **extra: str) -> dict[str, str]:
    return {"pxname": px, "svname": CLUSTER, "status": status, "check_status": check,
            "weight": weight, **extra}  # fmt: skip


ROUTES = {f"{kind}:{p}": Route(f"/{p}", "digits", p, ()) for kind in ("rt", "ck") for p in "ab"}
NAMES = {CLUSTER: CLUSTER}
REFUSED = {"check_desc": "Layer4 connection problem", "last_chk": "Connection refused"}


def test_down_on_any_route_is_down_and_up_on_every_route_is_up() -> None:
    up = [row("rt:a", "UP", "L7OK"), row("ck:a", "UP", ""), row("rt:b", "UP", "* L7OK")]
    assert cluster_health(up, ROUTES, NAMES)[("digits", CLUSTER)].up
    half = [row("rt:a", "UP", "L7OK"), row("rt:b", "DOWN", "L4CON", **REFUSED)]
    health = cluster_health(half, ROUTES, NAMES)[("digits", CLUSTER)]
    assert health == ClusterHealth(False, "Layer4 connection problem: Connection refused",
                                   ("/b",))  # fmt: skip
    # A new worker's first check has not run: it says nothing either way.
    assert cluster_health([row("rt:a", "UP", "INI")], ROUTES, NAMES) == {}
    # Another healthy cluster with weight on the route: it is not left alone.
    other = row("rt:b", "UP", "L7OK") | {"svname": "rg-other"}
    two = cluster_health([*half, other], ROUTES, NAMES | {"rg-other": "rg-other"})
    assert two[("digits", CLUSTER)].alone == ()


def test_changes_are_told_once_and_a_first_up_is_not_told() -> None:
    key = ("digits", CLUSTER)
    down, up = ClusterHealth(False, "x"), ClusterHealth(True, "y")
    assert changes(set(), {key: up}) == ([], set())
    told, told_down = changes(set(), {key: down})
    assert [c.health for c in told] == [down] and told_down == {key}
    assert changes({key}, {key: down}) == ([], {key})
    told, told_down = changes({key}, {key: up})
    assert [c.health.up for c in told] == [True] and told_down == set()
    assert changes({key}, {}) == ([], set())  # left the table: nothing to say


def test_a_cluster_without_weight_is_not_told_down() -> None:
    """A pending cluster at weight 0 whose Serve proxy is still starting; told once it has
    weight and still fails; its UP after that is told."""
    key = ("digits", CLUSTER)
    starting = ClusterHealth(False, "x", serving=False)
    assert changes(set(), {key: starting}) == ([], set())
    told, told_down = changes(set(), {key: ClusterHealth(False, "x")})
    assert len(told) == 1 and told_down == {key}
    # Its weight went to 0 (traffic moved away) while it still fails: nothing new to say.
    assert changes({key}, {key: starting}) == ([], {key})
    rows = [row("rt:a", "DOWN", "L4CON", weight="0", **REFUSED)]
    assert cluster_health(rows, ROUTES, NAMES)[key].serving is False
