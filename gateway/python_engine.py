"""The Python gateway engine: a plain ASGI callable that proxies with aiohttp's client.

Kept out of any web framework on purpose: FACTS.md measured FastAPI routing plus httpx at
~6 ms of CPU per request against ~0.4 ms for a raw ASGI app with aiohttp's client.

Every error the gateway itself produces is a JSON body `{"error", "request_id"}`; aiohttp
exceptions are translated to status codes in one place (`_classify`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.limits import Limits
from gateway.metrics import Metrics
from gateway.routes import Backend, Route, RouteTable

log = logging.getLogger("raygate.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# RFC 9110 §7.6.1 hop-by-hop headers, never forwarded in either direction.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request bodies up to this size are read whole, so a failed attempt can be replayed on
# another cluster; larger ones stream straight through.
REPLAYABLE_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class GatewaySettings:
    limits: Limits = field(default_factory=Limits)
    # Below Serve's proxy keep-alive (raygate sets it to 90 s), so the gateway never reuses
    # a connection the upstream is about to close.
    upstream_keepalive_s: float = 30.0


class _Rejected(Exception):
    """The gateway answers the request itself with `status`."""

    def __init__(self, status: int, message: str, cluster: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.cluster = cluster  # set when metrics for this answer were already recorded


class _BodyTooLarge(Exception):
    pass


def _hop_by_hop(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    names = set(HOP_BY_HOP)
    for k, v in headers:
        if k.lower() == b"connection":
            names.update(t.strip().lower() for t in v.split(b",") if t.strip())
    return names


class PythonGateway:
    """ASGI application and `DataPlane` implementation in one object."""

    def __init__(self, settings: GatewaySettings | None = None, metrics: Metrics | None = None):
        self.settings = settings or GatewaySettings()
        self.metrics = metrics or Metrics()
        self._table = RouteTable()
        self._in_flight: dict[str, int] = {}
        self._session: aiohttp.ClientSession | None = None
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- DataPlane -------------------------------------------------------------------
    async def start(self) -> None:
        """Nothing to start: raygate's own server serves `app()`; no data plane outlives it."""

    async def attach(self) -> bool:
        return False

    def app(self) -> PythonGateway:
        return self

    def watch(self) -> None:
        """Nothing to watch: the server serving `app()` is raygate's own task."""
        return None

    async def health(self) -> str | None:
        return "draining" if self._draining else None

    async def release(self, timeout_s: float) -> None:
        """This data plane lives in raygate's process and cannot outlive it: drain."""
        await self.drain(timeout_s)

    async def apply(self, table: RouteTable) -> None:
        # One reference swap: every request picks its backend from exactly one table.
        self._table = table

    @property
    def table(self) -> RouteTable:
        return self._table

    async def in_flight(self) -> Mapping[str, int]:
        return dict(self._in_flight)

    async def routed(self) -> set[str]:
        return self._table.routed()  # one table, swapped whole: nothing older routes

    async def drain(self, timeout_s: float) -> None:
        self._draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- ASGI -------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await self._refuse_websocket(scope, receive, send)

    async def _refuse_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """WebSocket is not proxied yet: answer the upgrade with a clear 501."""
        await receive()  # websocket.connect
        if "websocket.http.response" in scope.get("extensions", {}):
            body = json.dumps(
                {"error": "WebSocket is not supported by this gateway", "request_id": ""}
            ).encode()
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": 501,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1003})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._ensure_session()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=0,
                keepalive_timeout=self.settings.upstream_keepalive_s,
                use_dns_cache=False,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            # aiohttp resends an idempotent request once when its connection breaks, even
            # after the upstream read it. It has no public switch; its own test client turns
            # it off the same way (aiohttp/test_utils.py). tests/test_retry.py guards it.
            self._session._retry_connection = False
        return self._session

    def _enter(self, service: str, cluster: str) -> None:
        count = self._in_flight.get(cluster, 0) + 1
        self._in_flight[cluster] = count
        self._idle.clear()
        self.metrics.set_in_flight(service, cluster, count)

    def _leave(self, service: str, cluster: str) -> None:
        left = self._in_flight.get(cluster, 0) - 1
        if left > 0:
            self._in_flight[cluster] = left
        else:
            self._in_flight.pop(cluster, None)
        self.metrics.set_in_flight(service, cluster, max(left, 0))
        if not self._in_flight:
            self._idle.set()

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: list[tuple[bytes, bytes]] = list(scope["headers"])
        request_id = ""
        header_bytes = 0
        for k, v in headers:
            header_bytes += len(k) + len(v) + 4
            if k == b"x-request-id":
                request_id = v.decode("latin-1")
        if not request_id:
            request_id = str(uuid.uuid4())
            headers.append((b"x-request-id", request_id.encode()))

        path: str = scope["path"]
        if path == "/-/healthz":
            # The pid tells which worker answered when several share the port.
            await _json(send, 200, {"status": "ok", "pid": os.getpid()}, request_id)
            return
        if path == "/-/ready":
            ready = bool(self._table.routes) and not self._draining
            await _json(send, 200 if ready else 503, {"ready": ready}, request_id)
            return

        route = self._table.match(path)
        try:
            limit = self.settings.limits.max_header_bytes
            if header_bytes > limit:
                raise _Rejected(431, f"request headers over {limit} bytes")
            if route is None:
                raise _Rejected(404, f"no route for path {path}")
            await self._proxy(scope, receive, send, route, headers, request_id)
        except _Rejected as rejected:
            extra = []
            if rejected.status == 503:
                extra.append((b"retry-after", str(self.settings.limits.retry_after_s).encode()))
            if rejected.cluster is None:
                service, app = (route.service, route.app) if route else ("", "")
                self.metrics.gateway_answer(service, app, rejected.status)
            await _json(send, rejected.status, {"error": rejected.message}, request_id, extra)

    async def _proxy(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: Route,
        headers: list[tuple[bytes, bytes]],
        request_id: str,
    ) -> None:
        backend = route.pick()
        if backend is None:
            raise _Rejected(503, f"no cluster is serving route {route.prefix!r}")

        content_length = _content_length(headers)
        limit = self.settings.limits.max_body_bytes
        if content_length is not None and content_length > limit:
            raise _Rejected(413, f"request body over {limit} bytes")
        # In flight on its cluster from the moment it is routed, not once its body is in: the
        # controller deletes a cluster once nothing routes to it and nothing is in flight on
        # it, and a slow client may still be uploading while a switch takes the cluster out.
        self._enter(route.service, backend.cluster)
        try:
            body: bytes | _StreamedBody
            if content_length is not None and content_length <= REPLAYABLE_BODY_BYTES:
                body = await _read_body(receive, limit)
            else:
                body = _StreamedBody(receive, limit)

            upstream_headers = _upstream_headers(scope, headers)
            target = scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
            if scope.get("query_string"):
                target += "?" + scope["query_string"].decode("latin-1")

            tried: list[str] = []
            started = time.perf_counter()
            while True:
                outcome = await self._attempt(
                    scope, receive, send, route, backend, target, upstream_headers, body, request_id
                )
                if outcome is None:
                    return
                status, message, kind, retryable = outcome
                self.metrics.upstream_error(route.service, backend.cluster, kind)
                tried.append(backend.cluster)
                replayable = isinstance(body, bytes) or not body.consumed
                # From the table in force now: the route the request arrived with may be
                # stale (a switch while its body was read), its other cluster deleted since.
                now = self._table.match(scope["path"])
                nxt = None
                if now is not None and retryable and replayable and len(tried) < 2:
                    nxt = now.pick(exclude=tried)
                if now is None or nxt is None:
                    self.metrics.observe_request(
                        route.service,
                        route.app,
                        backend.cluster,
                        status,
                        None,
                        time.perf_counter() - started,
                    )
                    raise _Rejected(status, message, backend.cluster)
                log.info("retrying %s on %s after: %s", request_id, nxt.cluster, message)
                self._enter(now.service, nxt.cluster)  # before the leave: never idle between
                self._leave(route.service, backend.cluster)
                route, backend = now, nxt
        finally:
            self._leave(route.service, backend.cluster)

    async def _attempt(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: Route,
        backend: Backend,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | _StreamedBody,
        request_id: str,
    ) -> tuple[int, str, str, bool] | None:
        """One upstream attempt. None when a response went out; else
        (status, why, error kind, retryable)."""
        session = self._ensure_session()
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.settings.limits.connect_timeout_s,
            sock_read=route.timeout_s,
        )
        data: Any = body if isinstance(body, bytes) else body.iterate()
        started = False
        t0 = time.perf_counter()
        status = 0
        ttfb: float | None = None
        try:
            async with session.request(
                scope["method"],
                backend.url + target,
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=timeout,
            ) as resp:
                raw = list(resp.raw_headers)
                drop = _hop_by_hop(raw)
                out_headers = [(k, v) for k, v in raw if k.lower() not in drop]
                if not any(k.lower() == b"x-request-id" for k, _ in out_headers):
                    out_headers.append((b"x-request-id", request_id.encode()))
                ttfb = time.perf_counter() - t0
                status = resp.status
                await send(
                    {"type": "http.response.start", "status": resp.status, "headers": out_headers}
                )
                started = True
                await self._stream_back(receive, send, resp, body)
            return None
        except (aiohttp.ClientError, TimeoutError, _BodyTooLarge) as exc:
            if isinstance(body, _StreamedBody) and body.too_large and not started:
                limit = self.settings.limits.max_body_bytes
                raise _Rejected(413, f"request body over {limit} bytes") from None
            if started:
                # Bytes already went to the client: nothing to retry, just cut the stream.
                log.info("upstream %s failed mid-response: %r", backend.cluster, exc)
                self.metrics.upstream_error(route.service, backend.cluster, "mid_response")
                return None
            return _classify(exc, backend)
        finally:
            if started:
                self.metrics.observe_request(
                    route.service,
                    route.app,
                    backend.cluster,
                    status,
                    ttfb,
                    time.perf_counter() - t0,
                )

    async def _stream_back(
        self,
        receive: Receive,
        send: Send,
        resp: aiohttp.ClientResponse,
        body: bytes | _StreamedBody,
    ) -> None:
        """Copy the upstream body chunk by chunk; a client that leaves cancels the upstream."""
        current = asyncio.current_task()
        watcher: asyncio.Task[None] | None = None
        if isinstance(body, bytes) or body.finished:
            watcher = asyncio.create_task(_cancel_on_disconnect(receive, current))
        try:
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if watcher is not None:
                watcher.cancel()


class _StreamedBody:
    """A request body passed to the upstream as it arrives, with the size limit enforced."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self.consumed = False
        self.finished = False
        self.too_large = False  # aiohttp wraps what the iterator raises; remember it here

    async def iterate(self) -> AsyncIterator[bytes]:
        size = 0
        more = True
        while more:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise asyncio.CancelledError("client went away")
            chunk: bytes = message.get("body", b"")
            more = bool(message.get("more_body", False))
            size += len(chunk)
            if size > self._limit:
                self.too_large = True
                raise _BodyTooLarge()
            if chunk:
                self.consumed = True
                yield chunk
        self.finished = True


async def _read_body(receive: Receive, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError("client went away")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _Rejected(413, f"request body over {limit} bytes")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task[Any] | None) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if task is not None:
                task.cancel()
            return


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    chunked = False
    length: int | None = None
    for k, v in headers:
        if k == b"content-length":
            try:
                length = int(v)
            except ValueError:
                raise _Rejected(400, "invalid Content-Length header") from None
        elif k == b"transfer-encoding" and b"chunked" in v.lower():
            chunked = True
    if chunked:
        return None
    return 0 if length is None else length


def _upstream_headers(scope: Scope, headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """What the upstream gets: the client's headers but hop-by-hop ones, Host unchanged (so
    no X-Forwarded-Host), X-Forwarded-For with the client's peer appended."""
    drop = _hop_by_hop(headers) | {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
    out: list[tuple[str, str]] = []
    forwarded_for = ""
    for k, v in headers:
        if k == b"x-forwarded-for":
            forwarded_for = v.decode("latin-1")
        if k not in drop and k != b"content-length":
            out.append((k.decode("latin-1"), v.decode("latin-1")))
    client = scope.get("client")
    if client:
        forwarded_for = f"{forwarded_for}, {client[0]}" if forwarded_for else str(client[0])
    if forwarded_for:
        out.append(("X-Forwarded-For", forwarded_for))
    out.append(("X-Forwarded-Proto", str(scope.get("scheme", "http"))))
    return out


def _classify(exc: BaseException, backend: Backend) -> tuple[int, str, str, bool]:
    """aiohttp's exceptions, translated once: (status, message, kind, safe to retry elsewhere).
    Only a connection that could not be made is safe: nothing reached the upstream."""
    c = backend.cluster
    if isinstance(exc, aiohttp.ClientConnectorError):
        return 502, f"cluster {c} refused the connection", "connect", True
    if isinstance(exc, (aiohttp.ServerTimeoutError, TimeoutError)):
        return 504, f"cluster {c} did not answer in time", "timeout", False
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        # The connection was made and the request (or part of it) went out: the upstream
        # may be acting on it, so it is not sent again.
        return 502, f"cluster {c} closed the connection before answering", "disconnect", False
    return 502, f"cluster {c} failed: {exc.__class__.__name__}", "other", False


async def _json(
    send: Send,
    status: int,
    payload: dict[str, Any],
    request_id: str,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps({**payload, "request_id": request_id}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
