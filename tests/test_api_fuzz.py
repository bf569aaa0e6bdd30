"""The admin API fuzzed from its own OpenAPI schema (schemathesis): no input gets a 5xx, and
every answer has a status code and a body the schema documents for its route.

The API runs in a real uvicorn on loopback, on its own thread and event loop, over a real
Store created on that thread (SQLite's connection must stay on it); `wake` and `in_flight` are
stubs at create_admin_app's own interface. Bounded: a few dozen examples per operation, a
few seconds in all, no Ray.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from rollout.api import create_admin_app
from rollout.spec import parse_spec
from rollout.store import Store
from tests.loopback import free_port, until
from tests.test_api import spec

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 30


def _serve_admin(db: Path, port: int, started: threading.Event, stop: threading.Event) -> None:
    async def main() -> None:
        store = Store(db)  # created on the thread that will use it
        store.push(parse_spec(spec()), time.time())  # a service for the fuzzer to find

        async def in_flight() -> dict[str, int]:
            return {"c1": 1}

        app = create_admin_app(store, TOKEN, lambda name: None, in_flight, CollectorRegistry())
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        task = asyncio.create_task(server.serve())
        await until(lambda: server.started or task.done(), within_s=60)
        started.set()
        await asyncio.to_thread(stop.wait)
        server.should_exit = True
        await task
        store.close()

    asyncio.run(main())


@pytest.fixture(scope="module")
def admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    started, stop = threading.Event(), threading.Event()
    db = tmp_path_factory.mktemp("fuzz") / "raygate.db"
    thread = threading.Thread(target=_serve_admin, args=(db, port, started, stop), daemon=True)
    thread.start()
    assert started.wait(90), "the admin API did not start"
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/-/healthz", timeout=10).status_code == 200
    try:
        yield url
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def admin_schema(admin_url: str) -> Any:
    loaded = schemathesis.openapi.from_url(f"{admin_url}/openapi.json", headers=AUTH)
    loaded.config.update(base_url=admin_url)
    loaded.config.generation.update(max_examples=EXAMPLES)
    return loaded


schema = schemathesis.pytest.from_fixture("admin_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_input_is_a_server_error(case: Any) -> None:
    case.call_and_validate(
        headers=AUTH,
        checks=[
            schemathesis.checks.not_a_server_error,
            schemathesis.checks.response_schema_conformance,
            schemathesis.checks.status_code_conformance,
        ],
        timeout=30,
    )


# What a header value may carry on the wire: visible ASCII, spaces, and obs-text (0x80-0xff).
HEADER_TEXT = st.text(
    st.characters(codec="latin-1", exclude_categories=["Cc"]).filter(lambda c: c != "\x7f"),
    max_size=60,
)


# A value neither starts nor ends with a space on the wire (h11 refuses to send one).
AUTH_VALUES = st.one_of(HEADER_TEXT, HEADER_TEXT.map(lambda t: "Bearer " + t)).map(str.strip)


@given(value=AUTH_VALUES)
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_authorization_header_is_a_401_never_a_5xx(admin_url: str, value: str) -> None:
    """Any wrong header value HTTP can carry, non-ASCII included, is a 401."""
    raw = value.encode("latin-1")
    r = httpx.get(f"{admin_url}/v1/services", headers=[(b"Authorization", raw)], timeout=10)
    assert r.status_code == 401, (raw, r.status_code, r.text)
