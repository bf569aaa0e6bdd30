"""The data plane's limits and timeouts, defined once and handed to both engines.

The Python engine enforces them in its ASGI handler, the HAProxy engine writes them into
haproxy.cfg; either way a client meets the same limits whichever engine runs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 16 * 1024 * 1024  # a larger request body: 413
    max_header_bytes: int = 64 * 1024  # larger request headers: 431
    # A chunked body past the limit is read and dropped for up to this long, so the client
    # can read the 413 (closing on unread data sends a reset); then the connection is cut.
    body_drain_s: int = 30
    connect_timeout_s: float = 5.0  # to an upstream; a failed connect may be retried elsewhere
    client_timeout_s: float = 60.0  # a client that sends nothing for this long is cut
    request_header_timeout_s: float = 30.0  # a client's whole request head must come by then
    retry_after_s: int = 1  # the Retry-After of a 503 (no cluster can take the request)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_header_bytes", "body_drain_s", "retry_after_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("connect_timeout_s", "client_timeout_s", "request_header_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
