"""Real servers on loopback for gateway tests: an aiohttp upstream with streaming, slow and
endless endpoints, and the Python gateway under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from aiohttp import web

from gateway.haproxy_config import HAProxySettings
from gateway.haproxy_engine import HAProxyEngine
from gateway.limits import Limits
from gateway.python_engine import GatewaySettings, PythonGateway
from gateway.routes import Backend, Route, RouteTable
from rollout.server import data_plane_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served(app: Any, port: int | None = None) -> Iterator[str]:
    """`app` (ASGI: the admin API) served by uvicorn in a thread on 127.0.0.1, for tests that
    drive it from a CLI process or a browser; yields its URL, and stops it on the way out."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port or free_port(),
                                           log_level="warning", lifespan="off"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "the server did not stop"


async def until(check: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@dataclass
class Upstream:
    url: str
    release: asyncio.Event = field(default_factory=asyncio.Event)
    stream_done: bool = False
    stream_aborted: bool = False
    seen_headers: dict[str, str] = field(default_factory=dict)
    seen_lines: list[tuple[str, str]] = field(default_factory=list)  # repeated names kept
    bodies: list[int] = field(default_factory=list)  # sizes of the bodies echo read whole


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    port = free_port()
    up = Upstream(f"http://127.0.0.1:{port}")

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        up.bodies.append(len(body))
        up.seen_headers = dict(request.headers)
        up.seen_lines = list(request.headers.items())
        return web.json_response(
            {"method": request.method, "path": request.path_qs, "size": len(body),
             "from": "a"},
            headers={"X-Upstream": "yes", "Keep-Alive": "timeout=5",
                     "Proxy-Authenticate": "Basic"},
        )  # fmt: skip

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await resp.write(b"data: first\n\n")
            await asyncio.wait_for(up.release.wait(), 10)
            await resp.write(b"data: second\n\n")
            await resp.write_eof()
            up.stream_done = True
        except (ConnectionResetError, asyncio.CancelledError, TimeoutError):
            up.stream_aborted = True
            raise
        return resp

    async def forever(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            for _ in range(2000):  # bounded: 2000 x 10 ms
                await resp.write(b"x" * 100)
                await asyncio.sleep(0.01)
        except (ConnectionResetError, asyncio.CancelledError):
            up.stream_aborted = True
            raise
        return resp

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_route("*", "/svc/stream", stream)
    app.router.add_route("*", "/svc/forever", forever)
    app.router.add_route("*", "/svc/slow", slow)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield up
    up.release.set()
    await runner.cleanup()


@dataclass
class Gate:
    engine: PythonGateway | HAProxyEngine
    url: str
    client: httpx.AsyncClient
    kind: str = "python"


ENGINES = ["python", "haproxy"]
LIMITS = Limits(max_body_bytes=1_000_000, max_header_bytes=8 * 1024)  # the parity suite's


@pytest.fixture(params=ENGINES)
async def gate(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Gate]:
    """The same data plane tests run against each engine."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if request.param == "haproxy":
        engine = HAProxyEngine(
            HAProxySettings(tmp_path / "hx", port=port, limits=LIMITS)
        )  # fmt: skip
        await engine.start()
        async with httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as client:
            yield Gate(engine, url, client, "haproxy")
        await engine.drain(10)
        return
    async with python_gate() as gate:
        yield gate


@contextlib.asynccontextmanager
async def python_gate() -> AsyncIterator[Gate]:
    """The Python engine alone, for what only it does."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    py = PythonGateway(GatewaySettings(limits=LIMITS))
    server = uvicorn.Server(data_plane_config(py, "127.0.0.1", port))
    task = asyncio.create_task(server.serve())
    await until(lambda: server.started)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as client:
            yield Gate(py, url, client, "python")
    finally:
        server.should_exit = True
        await task


async def flights(gate: Gate) -> dict[str, int]:
    return dict(await gate.engine.in_flight())


async def until_flights(gate: Gate, expected: dict[str, int], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while (seen := await flights(gate)) != expected:
        assert time.monotonic() < deadline, f"in flight {seen}, expected {expected}"
        await asyncio.sleep(0.02)


def table(*backends: Backend, prefix: str = "/svc", timeout: float = 60.0) -> RouteTable:
    return RouteTable((Route(prefix, "svc", "app", tuple(backends), timeout),))


@dataclass
class Labelled:
    """A loopback upstream that says who it is and counts what it answers."""

    label: str
    url: str
    hits: int = 0
    slow_in_flight: int = 0


@contextlib.asynccontextmanager
async def labelled_upstreams(*labels: str) -> AsyncIterator[list[Labelled]]:
    """One aiohttp upstream per label, answering its label; `/svc/slow?s=2` answers after
    that many seconds (bounded at 10)."""
    ups: list[Labelled] = []
    runners: list[web.AppRunner] = []
    for label in labels:
        port = free_port()
        up = Labelled(label, f"http://127.0.0.1:{port}")

        async def slow(request: web.Request, up: Labelled = up) -> web.Response:
            up.slow_in_flight += 1
            try:
                await asyncio.sleep(min(float(request.query.get("s", "1")), 10))
            finally:
                up.slow_in_flight -= 1
            up.hits += 1
            return web.Response(text=up.label)

        async def answer(request: web.Request, up: Labelled = up) -> web.Response:
            up.hits += 1
            return web.Response(text=up.label)

        app = web.Application()
        app.router.add_route("*", "/svc/slow", slow)
        app.router.add_route("*", "/{tail:.*}", answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ups.append(up)
        runners.append(runner)
    try:
        yield ups
    finally:
        for runner in runners:
            await runner.cleanup()
