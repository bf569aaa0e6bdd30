"""What operators see of the gateway: metrics (values and promtool), header and WebSocket
refusals, and the standalone `raygate gateway` process with its graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gateway.haproxy_config import HAProxySettings
from gateway.haproxy_engine import HAProxyEngine
from gateway.limits import Limits
from gateway.metrics import Metrics
from gateway.python_engine import GatewaySettings, PythonGateway
from gateway.routes import Backend
from rollout.server import data_plane_config
from tests.harness import ROOT
from tests.loopback import ENGINES, Gate, Upstream, free_port, table, until

SMALL_BODIES = Limits(max_header_bytes=8 * 1024, max_body_bytes=100_000)


@pytest.fixture(params=ENGINES)
async def metered(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Gate, CollectorRegistry]]:
    """An engine whose metrics go to a fresh registry, so values can be asserted exactly."""
    import uvicorn

    registry = CollectorRegistry()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if request.param == "haproxy":
        hx = HAProxyEngine(
            HAProxySettings(tmp_path / "hx", port=port, limits=SMALL_BODIES),
            Metrics(registry),
        )
        await hx.start()
        async with httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as client:
            yield Gate(hx, url, client, "haproxy"), registry
        await hx.drain(10)
        return
    engine = PythonGateway(
        GatewaySettings(limits=SMALL_BODIES), Metrics(registry)
    )
    server = uvicorn.Server(data_plane_config(engine, "127.0.0.1", port))
    task = asyncio.create_task(server.serve())
    await until(lambda: server.started)
    async with httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as client:
        yield Gate(engine, url, client), registry
    server.should_exit = True
    await task


async def test_request_metrics_have_the_right_values(
    metered: tuple[Gate, CollectorRegistry], upstream: Upstream
) -> None:
    """Both engines: exact status codes and latency histograms under the same names. The
    HAProxy engine's arrive from its request log a moment later, hence the polling."""
    gate, reg = metered
    dead = f"http://127.0.0.1:{free_port()}"
    await gate.engine.apply(table(Backend("c1", upstream.url, 1), Backend("dead", dead, 0)))
    for _ in range(2):
        assert (await gate.client.get("/svc/a")).status_code == 200

    async def chunked(size: int) -> AsyncIterator[bytes]:
        for _ in range(size // 10_000):
            yield b"c" * 10_000

    # Chunked bodies: HAProxy takes them through the route's twin backend.
    assert (await gate.client.post("/svc/a", content=chunked(20_000))).status_code == 200
    assert (await gate.client.post("/svc/a", content=chunked(300_000))).status_code == 413
    assert (await gate.client.get("/elsewhere")).status_code == 404
    await gate.engine.apply(table(Backend("c1", upstream.url, 0), Backend("dead", dead, 1)))
    assert (await gate.client.get("/svc/a")).status_code == 502
    await gate.engine.apply(table(Backend("c1", upstream.url, 0), Backend("dead", dead, 0)))
    assert (await gate.client.get("/svc/a")).status_code == 503

    route = {"service": "svc", "app": "app"}
    expected = {
        ("raygate_requests_total", ("c1", "200")): 3,
        ("raygate_request_duration_seconds_count", ("c1", None)): 3,
        ("raygate_time_to_first_byte_seconds_count", ("c1", None)): 3,
        ("raygate_requests_total", ("dead", "502")): 1,
        ("raygate_requests_total", ("", "503")): 1,
        ("raygate_requests_total", ("", "413")): 1,
        ("raygate_upstream_errors_total", ("dead", "connect")): 1,
    }

    def values() -> dict[tuple[str, tuple[str, str | None]], float | None]:
        out = {}
        for name, (cluster, extra) in expected:
            labels = {**route, "cluster": cluster}
            if name == "raygate_requests_total":
                labels["code"] = extra or ""
            if name == "raygate_upstream_errors_total":
                labels = {"service": "svc", "cluster": cluster, "kind": extra or ""}
            out[(name, (cluster, extra))] = reg.get_sample_value(name, labels)
        return out

    with contextlib.suppress(AssertionError):
        await until(lambda: values() == expected)
    assert values() == expected
    labels_404 = {"service": "", "app": "", "cluster": "", "code": "404"}
    assert reg.get_sample_value("raygate_requests_total", labels_404) == 1
    # Durations are real: every request took under a second and none took a negative time.
    fast = {**route, "cluster": "c1", "le": "1.0"}
    assert reg.get_sample_value("raygate_request_duration_seconds_bucket", fast) == 3
    flight = {"service": "svc", "cluster": "c1"}
    await until(lambda: reg.get_sample_value("raygate_in_flight_requests", flight) == 0)
    # The raw path never becomes a label value.
    assert b"/svc/a" not in generate_latest(reg)


async def test_haproxy_counts_what_the_old_worker_answers_after_a_reload(
    upstream: Upstream, tmp_path: Path
) -> None:
    """A reload leaves the old worker to answer the last request on each kept-alive
    connection: it is counted too, and the old worker still exits once it is done."""
    registry = CollectorRegistry()
    port = free_port()
    hx = HAProxyEngine(HAProxySettings(tmp_path / "hx", port=port), Metrics(registry))
    await hx.start()
    try:
        await hx.apply(table(Backend("c1", upstream.url, 1)))
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=10, trust_env=False
        ) as client:
            for _ in range(5):
                assert (await client.get("/svc/a")).status_code == 200
            # A cluster joins the route: a reload. The kept-alive connection stays with the
            # old worker, which answers one more request on it and closes it.
            await hx.apply(table(Backend("c1", upstream.url, 1), Backend("c2", upstream.url, 0)))
            _current, old = await hx.workers()
            assert old, "the reload left no old worker"
            r = await client.get("/svc/a")
            assert r.status_code == 200 and r.headers.get("connection") == "close"
            for _ in range(4):  # a new connection, to the new worker
                assert (await client.get("/svc/a")).status_code == 200
        labels = {"service": "svc", "app": "app", "cluster": "c1", "code": "200"}
        with contextlib.suppress(AssertionError):
            await until(lambda: registry.get_sample_value("raygate_requests_total", labels) == 10)
        assert registry.get_sample_value("raygate_requests_total", labels) == 10

        async def old_workers_gone() -> bool:
            return not set(old) & set((await hx.workers())[1])

        deadline = time.monotonic() + 10
        while not await old_workers_gone():
            assert time.monotonic() < deadline, "the old worker is still alive after 10 s"
            await asyncio.sleep(0.1)
    finally:
        await hx.drain(10)


async def test_haproxy_request_metrics_survive_a_log_session_cut_mid_header(
    upstream: Upstream, tmp_path: Path
) -> None:
    """The engine follows each worker's request log through a runtime API session that
    starts with `show info` up to a blank line. A session closed before that line (EOF
    mid-header, asyncio.IncompleteReadError) used to end the follow loop, which nothing
    watches: request metrics stopped for good. Here the admin socket is, across a reload,
    a socket that sends half a header and closes; then the real one is back."""
    registry = CollectorRegistry()
    port = free_port()
    hx = HAProxyEngine(HAProxySettings(tmp_path / "hx", port=port), Metrics(registry))
    admin = hx.settings.admin_socket
    cut = 0

    async def half_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal cut
        # Read the command: unread, the close would be a reset (OSError), not an EOF.
        if b"show events" in await reader.readline():  # not the stats poller's `show stat`
            cut += 1
        writer.write(b"Name: HAProxy\nPid: 1")
        await writer.drain()
        writer.close()

    labels = {"service": "svc", "app": "app", "cluster": "c1", "code": "200"}

    def counted() -> float | None:
        return registry.get_sample_value("raygate_requests_total", labels)

    await hx.start()
    try:
        await hx.apply(table(Backend("c1", upstream.url, 1)))
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=10, trust_env=False
        ) as client:
            assert (await client.get("/svc/a")).status_code == 200
            await until(lambda: counted() == 1)  # the first worker's log is followed
            os.rename(admin, admin.with_name("admin.real"))
            server = await asyncio.start_unix_server(half_header, str(admin))
            try:
                # A reload: the new worker's log needs a session, and gets a cut one.
                two = (Backend("c1", upstream.url, 1), Backend("c2", upstream.url, 0))
                await hx.apply(table(*two))
                await until(lambda: cut >= 1)
            finally:
                server.close()
                await server.wait_closed()
                os.replace(admin.with_name("admin.real"), admin)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=10, trust_env=False
        ) as client:  # a new connection: the new worker
            for _ in range(5):
                assert (await client.get("/svc/a")).status_code == 200
        with contextlib.suppress(AssertionError):
            await until(lambda: counted() == 6)
        assert counted() == 6
    finally:
        await hx.drain(10)


async def test_in_flight_gauge_counts_an_open_stream(
    metered: tuple[Gate, CollectorRegistry], upstream: Upstream
) -> None:
    gate, reg = metered
    await gate.engine.apply(table(Backend("c1", upstream.url, 1)))
    async with gate.client.stream("GET", "/svc/stream") as r:
        chunks = r.aiter_raw()
        await chunks.__anext__()
        labels = {"service": "svc", "cluster": "c1"}
        # The HAProxy engine's gauge follows `show stat`, polled every second.
        await until(lambda: reg.get_sample_value("raygate_in_flight_requests", labels) == 1)
        upstream.release.set()
        _ = [c async for c in chunks]
    await until(lambda: reg.get_sample_value("raygate_in_flight_requests", labels) == 0)


def test_observing_n_requests_at_once_equals_observing_them_one_by_one() -> None:
    """The HAProxy engine observes repeated log lines in one step (gateway.metrics._observe)."""
    one_by_one, at_once = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    for ttfb, total, n in ((0.0, 0.0, 5), (0.002, 0.003, 7), (None, 45.0, 2), (0.3, 99.0, 3)):
        for _ in range(n):
            one_by_one.observe_request("s", "a", "c", 200, ttfb, total)
        at_once.observe_request("s", "a", "c", 200, ttfb, total, n)

    def samples(m: Metrics) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
        # n * value and value added n times may differ in the last bits of a float.
        return sorted((s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
                      for f in m.registry.collect() for s in f.samples
                      if not s.name.endswith("_created"))  # fmt: skip

    assert samples(at_once) == samples(one_by_one)
    assert (
        at_once.registry.get_sample_value(
            "raygate_request_duration_seconds_count", {"service": "s", "app": "a", "cluster": "c"}
        )
        == 17
    )


def test_metrics_output_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: ./dev test installs Debian's prometheus package"
    m = Metrics(CollectorRegistry())
    m.observe_request("digits", "digits", "digits-abc", 200, 0.01, 0.02)
    m.gateway_answer("", "", 404)
    m.set_in_flight("digits", "digits-abc", 2)
    m.upstream_error("digits", "digits-abc", "connect")
    m.set_weights({"digits": {"digits-abc": 100, "digits-old": 0}})
    m.set_phase("digits", "live", ("deploying", "live", "upgrading", "failed", "deleting"))
    m.rollout_ended("digits", "succeeded")
    m.step_took("create_cluster", 12.5)
    out = subprocess.run([promtool, "check", "metrics"], input=generate_latest(m.registry),
                         capture_output=True, timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()
    assert out.stdout.strip() == b"" and out.stderr.strip() == b"", "promtool lint warnings"


async def test_headers_over_the_limit_are_431(
    metered: tuple[Gate, CollectorRegistry], upstream: Upstream
) -> None:
    gate, _ = metered
    await gate.engine.apply(table(Backend("c1", upstream.url, 1)))
    r = await gate.client.get("/svc/a", headers={"X-Big": "v" * 9000})
    assert r.status_code == 431 and "request_id" in r.json()


async def test_websocket_upgrade_is_refused_with_501(
    metered: tuple[Gate, CollectorRegistry], upstream: Upstream
) -> None:
    gate, _ = metered
    await gate.engine.apply(table(Backend("c1", upstream.url, 1)))
    host, port = gate.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /svc/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 501"), status_line


# ---- standalone process ------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("engine", ENGINES)
async def test_standalone_gateway_proxies_exports_metrics_and_drains_on_sigterm(
    upstream: Upstream, engine: str
) -> None:
    port, admin = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rollout.cli", "gateway", "--engine", engine,
        "--route", f"/svc={upstream.url}",
        "--port", str(port), "--admin-port", str(admin), "--log-level", "WARNING",
        cwd=ROOT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    ready = await client.get(f"http://127.0.0.1:{port}/-/ready")
                    if ready.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "standalone gateway did not come up"
                await asyncio.sleep(0.1)
            r = await client.post(f"http://127.0.0.1:{port}/svc/x?q=1", content=b"hi")
            assert r.json()["path"] == "/svc/x?q=1"
            # The admin port may come up after the data port, and HAProxy's request log is
            # read in batches.
            deadline, text = time.monotonic() + 10, ""
            while True:
                with contextlib.suppress(httpx.ConnectError):
                    text = (await client.get(f"http://127.0.0.1:{admin}/metrics")).text
                if 'raygate_requests_total{app="/svc",cluster="127.0.0.1:' in text:
                    break
                assert time.monotonic() < deadline, f"no request in the metrics:\n{text}"
                await asyncio.sleep(0.1)
            assert 'raygate_traffic_weight{cluster="127.0.0.1:' in text

            async with client.stream("GET", f"http://127.0.0.1:{port}/svc/stream") as s:
                chunks = s.aiter_raw()
                assert await chunks.__anext__() == b"data: first\n\n"
                proc.send_signal(signal.SIGTERM)
                # New connections are refused while the open stream keeps going.
                await until(lambda: _refused(port), 10)
                assert proc.returncode is None
                upstream.release.set()
                rest = b"".join([c async for c in chunks])
            assert rest == b"data: second\n\n"
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:  # stopped the way that also stops its HAProxy
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def test_standalone_gateway_rejects_a_bad_route() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rollout.cli", "gateway", "--route", "svc=localhost:1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "expected /PREFIX=http://HOST:PORT" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "rollout.cli", "gateway", "--route", "/a#b=http://127.0.0.1:1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "the prefix may hold only" in out.stderr, out.stderr


async def test_several_workers_share_the_port_and_sum_their_metrics(upstream: Upstream) -> None:
    port, admin = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rollout.cli", "gateway", "--engine", "python",
        "--route", f"/svc={upstream.url}",
        "--workers", "2", "--port", str(port), "--admin-port", str(admin),
        "--log-level", "WARNING", cwd=ROOT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"http://127.0.0.1:{admin}/-/healthz")).status_code == 200:
                        break
                assert time.monotonic() < deadline, "gateway did not come up"
                await asyncio.sleep(0.1)
            pids: set[int] = set()
            # Fresh connections, so the kernel spreads them over both workers (bounded).
            for _ in range(200):
                async with httpx.AsyncClient(timeout=10, trust_env=False) as fresh:
                    pids.add((await fresh.get(f"http://127.0.0.1:{port}/-/healthz")).json()["pid"])
                if len(pids) == 2:
                    break
            assert len(pids) == 2, "both worker processes answer on the one port"
            sent = 0
            for _ in range(40):
                async with httpx.AsyncClient(timeout=10, trust_env=False) as fresh:
                    assert (await fresh.get(f"http://127.0.0.1:{port}/svc/w")).status_code == 200
                    sent += 1
            text = (await client.get(f"http://127.0.0.1:{admin}/metrics")).text
            line = next(x for x in text.splitlines() if x.startswith("raygate_requests_total{"))
            assert float(line.rsplit(" ", 1)[1]) == sent
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        await until(lambda: _refused(port), 10)
        await until(lambda: not any(_alive(pid) for pid in pids), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
