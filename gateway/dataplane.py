"""The interface between the control plane and any gateway engine.

The controller only ever applies whole route tables and reads in-flight counts, so an
engine (the Python one here, HAProxy next) can be swapped without touching it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from gateway.routes import RouteTable


class DataPlane(Protocol):
    async def apply(self, table: RouteTable) -> None:
        """Make `table` the one new requests are routed by. Returns once it is in force."""

    async def in_flight(self) -> Mapping[str, int]:
        """Requests in flight per cluster name, right now."""

    async def drain(self, timeout_s: float) -> None:
        """Stop taking new requests and wait (bounded) for in-flight ones to finish."""
