"""The interface between raygate and any gateway engine.

The controller only ever applies whole route tables and reads in-flight counts; the
composition root (rollout/server.py) only drives the lifecycle below. Neither knows which
engine it holds, so an engine can be swapped without touching them.

Lifecycle: `start` (an engine whose data plane outlives raygate adopts the one a previous
raygate left running), then `apply`/`in_flight` while it runs, then either `drain` + `close`
(stop serving: raygate's own shutdown) or `release` (leave the data plane serving for the
next raygate, where the engine can). What the composition root must run itself is `app()`,
an ASGI app to serve on the data port (or None when the engine owns the port), and what it
must watch is `watch()`, a task that ends only when the engine cannot go on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Protocol

from gateway.routes import RouteTable

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


# In `DataPlane.routed()`: some part of the data plane routes by a table nobody knows (an
# HAProxy worker adopted without its table, a stale master soft-stopping): no cluster is free.
ANY_CLUSTER = "*"


class DataPlane(Protocol):
    async def start(self) -> None:
        """Be ready for `apply`: `attach`, or else start a data plane of its own."""

    async def attach(self) -> bool:
        """Take over the data plane a previous raygate on this state dir left serving;
        True if there was one. Starts nothing (`raygate down` uses it to find leftovers)."""

    async def apply(self, table: RouteTable) -> None:
        """Make `table` the one new requests are routed by. Returns once it is in force."""

    async def in_flight(self) -> Mapping[str, int]:
        """Requests in flight per cluster name, right now."""

    async def routed(self) -> set[str]:
        """Clusters some part of the data plane may still send a new request to: those with
        weight in the current table, and any an older part still routes by (an old HAProxy
        worker keeps the weights it had and answers one more request on each kept-alive
        connection). A cluster in here must not be deleted."""

    async def drain(self, timeout_s: float) -> None:
        """Stop taking new requests and wait (bounded) for in-flight ones to finish."""

    async def release(self, timeout_s: float) -> None:
        """Stop steering the data plane and leave it serving for the next raygate to adopt.
        An engine whose data plane lives in raygate's process cannot: it drains instead
        (bounded by `timeout_s`)."""

    async def close(self) -> None:
        """Free what is left; after `release` the data plane is not touched."""

    async def health(self) -> str | None:
        """None when the engine itself is healthy, else what is wrong with it."""

    def app(self) -> ASGIApp | None:
        """The ASGI app the composition root serves on the data port, if any."""

    def watch(self) -> asyncio.Task[None] | None:
        """A task that ends only when the engine cannot go on (raygate then stops)."""
