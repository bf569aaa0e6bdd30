"""The Python gateway engine against real servers on loopback: an aiohttp upstream, the
gateway under uvicorn. Streaming, retries, timeouts, limits, headers, in-flight counts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.haproxy_config import HAProxySettings
from gateway.haproxy_engine import HAProxyEngine
from gateway.limits import Limits
from gateway.routes import Backend, Route, RouteTable
from tests.loopback import (
    Gate,
    Upstream,
    flights,
    free_port,
    table,
    until,
    until_flights,
)


async def fresh_get(gate: Gate, path: str) -> httpx.Response:
    """A request on a new connection. After a topology change HAProxy reloads, and its old
    worker answers one last request on each kept-alive connection with the old table
    (`idle-close-on-response`: the price of never resetting a connection under a client)."""
    async with httpx.AsyncClient(timeout=10, trust_env=False) as fresh:
        return await fresh.get(gate.url + path)


async def test_route_table_longest_prefix_and_boundaries() -> None:
    b = Backend("c", "http://x", 1)
    t = RouteTable((Route("/", "s", "root", (b,)), Route("/a", "s", "a", (b,)),
                    Route("/a/b/", "s", "ab", (b,))))  # fmt: skip
    assert [t.match(p).app for p in ("/a", "/a/", "/a/b", "/a/b/c", "/ab", "/")] == [  # type: ignore[union-attr]
        "a", "a", "ab", "ab", "root", "root",
    ]  # fmt: skip
    assert RouteTable((Route("/a", "s", "a", (b,)),)).match("/b") is None
    with pytest.raises(ValueError, match="twice"):
        RouteTable((Route("/a", "s", "a", (b,)), Route("/a/", "s", "b", (b,))))


async def test_weighted_pick_respects_zero_and_exclude() -> None:
    import random

    r = Route("/a", "s", "a", (Backend("x", "u", 0), Backend("y", "u", 3), Backend("z", "u", 1)))
    rng = random.Random(7)
    picks = [r.pick(rng=rng).cluster for _ in range(4000)]  # type: ignore[union-attr]
    assert "x" not in picks
    assert 0.70 < picks.count("y") / len(picks) < 0.80
    assert r.pick(exclude=["y", "z"]) is None


async def test_unknown_prefix_is_404_json_with_request_id(gate: Gate) -> None:
    r = await gate.client.get("/nowhere", headers={"x-request-id": "abc"})
    assert r.status_code == 404
    assert r.json() == {"error": "no route for path /nowhere", "request_id": "abc"}
    assert r.headers["x-request-id"] == "abc"
    # A client's id can hold anything: the body stays valid JSON.
    odd = 'a"b\\c'
    r = await gate.client.get("/nowhere", headers={"x-request-id": odd})
    assert r.json()["request_id"] == odd


async def test_no_cluster_is_503_with_retry_after(gate: Gate, upstream: Upstream) -> None:
    await gate.engine.apply(table(Backend("c1", upstream.url, 0)))
    r = await gate.client.get("/svc/x")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "no cluster" in r.json()["error"]


async def test_proxies_method_query_body_and_headers(gate: Gate, upstream: Upstream) -> None:
    await gate.engine.apply(table(Backend("c1", upstream.url, 1)))
    r = await gate.client.post(
        "/svc/predict?x=1&y=2",
        content=b"z" * 5000,
        headers={"Connection": "X-Secret", "X-Secret": "hop", "TE": "trailers", "X-Keep": "1",
                 "Keep-Alive": "timeout=5", "Trailer": "X-Sum", "Proxy-Connection": "keep-alive",
                 "Proxy-Authorization": "Basic eDp5"},
    )  # fmt: skip
    assert r.status_code == 200
    assert r.json() == {"method": "POST", "path": "/svc/predict?x=1&y=2", "size": 5000,
                        "from": "a"}  # fmt: skip
    seen = {k.lower(): v for k, v in upstream.seen_headers.items()}
    hop_by_hop = {"x-secret", "te", "keep-alive", "trailer", "proxy-connection",
                  "proxy-authorization"}  # fmt: skip
    assert not hop_by_hop & seen.keys()
    assert seen["x-keep"] == "1"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    # Host passes through unchanged, so there is no X-Forwarded-Host.
    assert seen["host"] == gate.client.base_url.netloc.decode() and "x-forwarded-host" not in seen
    assert str(uuid.UUID(seen["x-request-id"])) == seen["x-request-id"]
    assert "connection" not in seen
    assert r.headers["x-request-id"] == seen["x-request-id"]
    assert r.headers["x-upstream"] == "yes"
    assert "keep-alive" not in r.headers and "proxy-authenticate" not in r.headers


async def test_large_chunked_request_body_streams_through(gate: Gate, upstream: Upstream) -> None:
    await gate.engine.apply(table(Backend("c1", upstream.url, 1)))

    async def body() -> AsyncIterator[bytes]:
        for _ in range(50):
            yield b"y" * 10_000

    r = await gate.client.put("/svc/upload", content=body())
    assert r.json()["size"] == 500_000


async def test_body_over_the_limit_is_413(gate: Gate, upstream: Upstream) -> None:
    """Answered from Content-Length, before the body is read. A raw client sends only the
    start of the body, so no connection reset can race the answer."""
    await gate.engine.apply(table(Backend("c1", upstream.url, 1)))
    host, port = gate.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /svc/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000001\r\n\r\n")
    writer.write(b"a" * 1000)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"x-request-id" in head.lower()


async def test_chunked_body_over_the_limit_is_413(gate: Gate, upstream: Upstream) -> None:
    """No Content-Length to judge by: the body is counted as it streams and cut at the limit
    (HAProxy: the body_limit Lua filter), before the upstream could answer."""
    await gate.engine.apply(table(Backend("c1", upstream.url, 1)))

    async def body() -> AsyncIterator[bytes]:
        for _ in range(30):
            yield b"b" * 50_000

    r = await gate.client.post("/svc/x", content=body(), headers={"x-request-id": 'a"b'})
    assert r.status_code == 413
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": "request body over 1000000 bytes", "request_id": 'a"b'}
    assert r.headers["x-request-id"] == 'a"b'
    # The upstream never got a whole request: it was cut before the end of the body.
    assert (await gate.client.post("/svc/x", content=b"ok")).json()["size"] == 2
    assert upstream.bodies == [2]


async def test_chunked_requests_follow_the_weights(gate: Gate, upstream: Upstream) -> None:
    """HAProxy sends chunked requests through a twin backend per route: a weight change
    must reach it too, or these would still go to the dead cluster."""
    dead = f"http://127.0.0.1:{free_port()}"
    await gate.engine.apply(table(Backend("dead", dead, 1), Backend("c1", upstream.url, 0)))
    await gate.engine.apply(table(Backend("dead", dead, 0), Backend("c1", upstream.url, 1)))

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 1000

    codes = [(await gate.client.post("/svc/x", content=body())).status_code for _ in range(20)]
    assert codes == [200] * 20
    assert upstream.bodies == [1000] * 20


async def test_first_chunk_arrives_before_upstream_finishes(gate: Gate, upstream: Upstream) -> None:
    await gate.engine.apply(table(Backend("c1", upstream.url, 1)))
    async with gate.client.stream("GET", "/svc/stream") as r:
        chunks = r.aiter_raw()
        first = await asyncio.wait_for(chunks.__anext__(), 5)
        assert first == b"data: first\n\n"
        assert not upstream.stream_done, "the upstream is still holding the rest"
        assert await flights(gate) == {"c1": 1}
        upstream.release.set()
        rest = b"".join([c async for c in chunks])
    assert rest == b"data: second\n\n"
    await until_flights(gate, {})


async def test_connect_failure_is_retried_on_another_cluster(
    gate: Gate, upstream: Upstream
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    await gate.engine.apply(table(Backend("dead", dead, 1), Backend("c1", upstream.url, 1)))
    codes = [(await gate.client.post("/svc/x", content=b"{}")).status_code for _ in range(40)]
    assert codes == [200] * 40

    async def chunked() -> AsyncIterator[bytes]:
        yield b"{}"

    codes = [(await gate.client.post("/svc/x", content=chunked())).status_code for _ in range(20)]
    assert codes == [200] * 20
    await gate.engine.apply(table(Backend("dead", dead, 1)))
    r = await fresh_get(gate, "/svc/x")
    assert r.status_code == 502 and r.json()["request_id"] == r.headers["x-request-id"]
    if gate.kind == "python":
        assert "refused" in r.json()["error"]
    assert await flights(gate) == {}


async def test_slow_upstream_is_504(gate: Gate, upstream: Upstream) -> None:
    await gate.engine.apply(table(Backend("c1", upstream.url, 1), timeout=0.5))
    started = time.monotonic()
    r = await gate.client.get("/svc/slow")
    assert r.status_code == 504 and "did not answer in time" in r.json()["error"]
    assert time.monotonic() - started < 2.5


async def test_client_disconnect_cancels_upstream_and_frees_in_flight(
    gate: Gate, upstream: Upstream
) -> None:
    await gate.engine.apply(table(Backend("c1", upstream.url, 1)))
    async with gate.client.stream("GET", "/svc/forever") as r:
        chunks = r.aiter_raw()
        await asyncio.wait_for(chunks.__anext__(), 5)
        assert await flights(gate) == {"c1": 1}
    # Leaving the block closes the connection mid-stream.
    await until_flights(gate, {})
    await until(lambda: upstream.stream_aborted)


async def test_switch_is_atomic_and_old_requests_finish(gate: Gate, upstream: Upstream) -> None:
    """A request that started on the old cluster finishes there after the table switches.

    As the controller does it: the new cluster is in the table at weight 0 first, then the
    switch is a change of weights only."""
    await gate.engine.apply(table(Backend("old", upstream.url, 1), Backend("new", upstream.url, 0)))
    async with gate.client.stream("GET", "/svc/stream") as r:
        chunks = r.aiter_raw()  # keep it: a collected iterator closes the response
        await asyncio.wait_for(chunks.__anext__(), 5)
        await gate.engine.apply(table(Backend("old", upstream.url, 0),
                                      Backend("new", upstream.url, 1)))  # fmt: skip
        r2 = await gate.client.get("/svc/after")
        assert r2.status_code == 200
        assert await flights(gate) == {"old": 1}
        upstream.release.set()
        assert b"".join([c async for c in chunks]) == b"data: second\n\n"
    await until_flights(gate, {})


async def test_ready_and_drain(gate: Gate, upstream: Upstream) -> None:
    assert (await gate.client.get("/-/healthz")).status_code == 200
    assert (await gate.client.get("/-/ready")).status_code == 503  # no routes yet
    await gate.engine.apply(table(Backend("c1", upstream.url, 1)))
    assert (await fresh_get(gate, "/-/ready")).status_code == 200

    async def slow_request() -> int:
        return (await fresh_get(gate, "/svc/stream")).status_code

    pending = asyncio.create_task(slow_request())
    await until_flights(gate, {"c1": 1})
    drained = asyncio.create_task(gate.engine.drain(5))
    await asyncio.sleep(0.3)
    # Draining: the Python engine answers /-/ready with 503, HAProxy closes its listener.
    try:
        async with httpx.AsyncClient(timeout=2, trust_env=False) as fresh:
            assert (await fresh.get(gate.url + "/-/ready")).status_code == 503
    except httpx.ConnectError:
        assert gate.kind == "haproxy"
    assert not drained.done()
    upstream.release.set()
    assert await pending == 200
    await asyncio.wait_for(drained, 5)


async def test_upstream_server_and_date_pass_through_once(gate: Gate, upstream: Upstream) -> None:
    """uvicorn must not add its own Server/Date headers in front of the upstream's."""
    await gate.engine.apply(table(Backend("c1", upstream.url, 1)))
    r = await gate.client.get("/svc/x")
    assert len(r.headers.get_list("server")) == 1 and "Python" in r.headers["server"]
    assert len(r.headers.get_list("date")) == 1


async def test_client_forwarded_for_is_appended_to_not_trusted(
    gate: Gate, upstream: Upstream
) -> None:
    await gate.engine.apply(table(Backend("c1", upstream.url, 1)))
    for sent in ("6.6.6.6", "6.6.6.6, 7.7.7.7"):
        await gate.client.get(
            "/svc/x",
            headers={"X-Forwarded-For": sent, "X-Forwarded-Host": "evil.example",
                     "X-Forwarded-Proto": "https"},
        )  # fmt: skip
        lines = [(k.lower(), v) for k, v in upstream.seen_lines]
        assert [v for k, v in lines if k == "x-forwarded-for"] == [f"{sent}, 127.0.0.1"]
        assert not [v for k, v in lines if k == "x-forwarded-host"]
        assert [v for k, v in lines if k == "x-forwarded-proto"] == ["http"]


# ---- HAProxy engine only: what comes from running a separate process ------------------------
@pytest.fixture
async def haproxy(tmp_path: Path) -> AsyncIterator[HAProxyEngine]:
    engine = HAProxyEngine(HAProxySettings(tmp_path / "hx", port=free_port()))
    await engine.start()
    yield engine
    await engine.drain(10)


async def test_haproxy_reloads_under_keepalive_load_drop_nothing(
    haproxy: HAProxyEngine, upstream: Upstream
) -> None:
    """A topology change reloads HAProxy; clients on kept-alive connections must not see it."""
    base = (Backend("a", upstream.url, 1),)
    await haproxy.apply(table(*base))
    url = f"http://127.0.0.1:{haproxy.settings.port}/svc/x"
    outcomes: list[str] = []
    stop = asyncio.Event()

    async def client() -> None:
        async with httpx.AsyncClient(timeout=10, trust_env=False) as c:
            while not stop.is_set():
                try:
                    r = await c.post(url, content=b"{}")
                    outcomes.append("ok" if r.status_code == 200 else str(r.status_code))
                except httpx.HTTPError as exc:
                    outcomes.append(repr(exc))

    clients = [asyncio.create_task(client()) for _ in range(8)]
    await until(lambda: len(outcomes) > 100, 10)
    for i in range(10):
        extra = (Backend(f"x{i}", upstream.url, 0),) if i % 2 == 0 else ()
        await haproxy.apply(table(*base, *extra))
        await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*clients)
    failures = [o for o in outcomes if o != "ok"]
    assert len(outcomes) > 500 and not failures, f"{len(failures)}/{len(outcomes)}: {failures[:5]}"
    # Every request is in the metrics, the ones old workers answered after a reload too.
    labels = {"service": "svc", "app": "app", "cluster": "a", "code": "200"}

    def counted() -> float | None:
        return haproxy.metrics.registry.get_sample_value("raygate_requests_total", labels)

    with contextlib.suppress(AssertionError):
        await until(lambda: counted() == len(outcomes), 10)
    assert counted() == len(outcomes)


async def test_haproxy_weight_change_applies_within_50ms(
    haproxy: HAProxyEngine, upstream: Upstream
) -> None:
    await haproxy.apply(table(Backend("a", upstream.url, 1), Backend("b", upstream.url, 0)))
    started = time.perf_counter()
    await haproxy.apply(table(Backend("a", upstream.url, 0), Backend("b", upstream.url, 1)))
    took = time.perf_counter() - started
    assert took < 0.05, f"weight change took {took * 1000:.1f} ms"
    current, old = await haproxy.workers()
    assert current
    for pid in current + old:  # in force in HAProxy itself, without a reload
        a = await haproxy.master(f"@!{pid} get weight rt:svc/a")
        if pid in old and a.startswith("No such backend"):
            continue  # an old worker still exiting, from the config before the route existed
        for backend in ("rt:svc", "ck:svc"):
            a = await haproxy.master(f"@!{pid} get weight {backend}/a")
            assert a.startswith("0 "), a
            assert (await haproxy.master(f"@!{pid} get weight {backend}/b")).startswith("1 ")


async def until_flights_of(engine: HAProxyEngine, expected: dict[str, int]) -> None:
    deadline = time.monotonic() + 5
    while dict(await engine.in_flight()) != expected:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_haproxy_that_dies_is_restarted_with_current_weights(
    haproxy: HAProxyEngine, upstream: Upstream
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    await haproxy.apply(table(Backend("a", dead, 0), Backend("b", upstream.url, 1)))
    first = haproxy.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await until(lambda: haproxy.pid not in (None, first), 15)
    url = f"http://127.0.0.1:{haproxy.settings.port}/svc/x"
    deadline = time.monotonic() + 15
    while True:
        try:
            async with httpx.AsyncClient(timeout=5, trust_env=False) as c:
                codes = [(await c.get(url)).status_code for _ in range(10)]
            break
        except httpx.ConnectError:
            assert time.monotonic() < deadline, "haproxy did not come back"
            await asyncio.sleep(0.1)
    assert codes == [200] * 10, "weights survived the restart: nothing went to 'a'"


async def test_haproxy_cuts_a_chunked_body_that_runs_on_past_the_limit(
    upstream: Upstream, tmp_path: Path
) -> None:
    """Past the limit, the rest of a chunked body is read and dropped so that the client can
    read its 413; a body still coming body_drain_s later is cut, so a client cannot hold
    the connection by sending forever."""
    settings = HAProxySettings(
        tmp_path / "hx", port=free_port(), limits=Limits(max_body_bytes=10_000, body_drain_s=1)
    )
    engine = HAProxyEngine(settings)
    await engine.start()
    try:
        await engine.apply(table(Backend("c1", upstream.url, 1)))
        reader, writer = await asyncio.open_connection("127.0.0.1", settings.port)
        writer.write(b"POST /svc/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        started = time.monotonic()
        cut = False
        while time.monotonic() - started < 10:  # a client that would send for 10 s
            try:
                writer.write(b"1000\r\n" + b"z" * 0x1000 + b"\r\n")
                await writer.drain()
                if await asyncio.wait_for(reader.read(65536), 0.1) == b"":
                    cut = True  # closed from HAProxy's side
                    break
            except TimeoutError:
                continue  # nothing to read yet: keep sending
            except ConnectionError:
                cut = True
                break
        took = time.monotonic() - started
        writer.close()
        assert cut, "the connection was still open after 10 s of body past the limit"
        assert 0.9 < took < 4, f"cut after {took:.1f} s, not about 1 s after the limit"
        assert upstream.bodies == []
        # HAProxy lives on and serves.
        async with httpx.AsyncClient(timeout=5, trust_env=False) as c:
            r = await c.get(f"http://127.0.0.1:{settings.port}/svc/ok")
        assert r.status_code == 200
    finally:
        await engine.drain(10)
