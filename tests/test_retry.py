"""Both engines retry a request on another cluster only when the connection could not be
made; once an upstream got the request, a failure is the client's 502, never a second send
(README: "nothing is retried once the upstream got the request"). Before the fix the Python
engine resent such requests, to the same upstream (aiohttp) and then to another cluster."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from gateway.routes import Backend
from tests.loopback import (
    Gate,
    flights,
    free_port,
    labelled_upstreams,
    python_gate,
    table,
    until_flights,
)

REQUESTS = 40


@contextlib.asynccontextmanager
async def hanging_up(reset: bool) -> AsyncIterator[list[int]]:
    """An upstream that accepts, reads a request head, and then resets (RST) or closes the
    connection without answering. Yields its count of requests received."""
    got = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            got[0] += 1
            if reset:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    got.append(port)
    try:
        yield got
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("reset", [True, False], ids=["reset", "close"])
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_request_the_upstream_got_is_never_sent_again(
    gate: Gate, reset: bool, method: str
) -> None:
    async with labelled_upstreams("good") as (good,), hanging_up(reset) as bad:
        bad_url = f"http://127.0.0.1:{bad[1]}"
        await gate.engine.apply(table(Backend("bad", bad_url, 1), Backend("good", good.url, 1)))
        codes = [
            (await gate.client.request(method, "/svc/x", content=b"{}")).status_code
            for _ in range(REQUESTS)
        ]
    failed = codes.count(502)
    assert failed + codes.count(200) == REQUESTS, codes
    assert bad[0] >= 1, "the hanging-up upstream was never picked"
    # Each request the hanging-up upstream got is one 502: not resent to it, nor elsewhere.
    assert (bad[0], good.hits) == (failed, REQUESTS - failed), (
        f"{method} {'reset' if reset else 'close'}: the bad upstream got {bad[0]} requests, "
        f"the good one {good.hits}, clients saw {failed} 502s of {REQUESTS}"
    )


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_refused_connection_is_retried_on_another_cluster(
    gate: Gate, method: str
) -> None:
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with labelled_upstreams("good") as (good,):
        await gate.engine.apply(table(Backend("gone", refused, 1), Backend("good", good.url, 1)))
        codes = [
            (await gate.client.request(method, "/svc/x", content=b"{}")).status_code
            for _ in range(REQUESTS)
        ]
    assert codes == [200] * REQUESTS and good.hits == REQUESTS


async def test_a_slow_upload_is_in_flight_from_routing_and_retried_by_the_current_table() -> None:
    """Python engine. A request is routed when its head arrives, but a small body is read
    whole before it goes upstream. It must count as in flight on its cluster from the
    routing on (the controller deletes a drained cluster: one with nothing in flight), and
    if its cluster refuses the connection by the time the body is in, the retry must pick
    from the table in force then, not from the route of its arrival (where the cluster it
    should go to had weight 0)."""
    async with python_gate() as gate, labelled_upstreams("b") as (b,):

        async def answer_a(_request: web.Request) -> web.Response:
            return web.Response(text="a")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer_a)
        a = web.AppRunner(app, access_log=None)
        await a.setup()
        a_url = f"http://127.0.0.1:{free_port()}"
        await web.TCPSite(a, "127.0.0.1", int(a_url.rsplit(":", 1)[1])).start()
        await gate.engine.apply(table(Backend("a", a_url, 1), Backend("b", b.url, 0)))
        port = int(gate.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /svc/x HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhello")
            await writer.drain()
            await until_flights(gate, {"a": 1})  # routed to `a`, half its body still to come
            await gate.engine.apply(table(Backend("a", a_url, 0), Backend("b", b.url, 1)))
            assert await flights(gate) == {"a": 1}, "a request routed to `a` is still on it"
            await a.cleanup()  # `a` is gone (deleted, or died): it refuses connections
            await gate.engine.apply(table(Backend("b", b.url, 1)))
            writer.write(b"world")
            await writer.drain()
            async with asyncio.timeout(10):
                answer = (await reader.read(4096)).decode(errors="replace")
        finally:
            writer.close()
            await a.cleanup()
        assert answer.startswith("HTTP/1.1 200") and answer.endswith("b"), answer
        assert b.hits == 1
        await until_flights(gate, {})
