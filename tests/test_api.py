"""The admin API over a real SQLite store: auth, validation that changes nothing, conflicts,
no-op pushes, status shape, history, delete."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from rollout.api import create_admin_app
from rollout.plan import Active, Result, RolloutRecord, ServiceState
from rollout.store import Store

TOKEN = "test-token"
EXAMPLE = Path(__file__).resolve().parent.parent / "serve_configs" / "digits" / "v1.yaml"


def spec(name: str = "digits", prefix: str = "/digits", label: str = "a") -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    raw["name"] = name
    raw["cluster"]["code_dir"] = str(EXAMPLE.parent.parent / "apps")
    raw["serve"]["applications"][0]["route_prefix"] = prefix
    raw["serve"]["applications"][0]["deployments"][0]["user_config"] = {"label": label}
    return raw


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "raygate.db")


@pytest.fixture
async def client(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    woken: list[str] = []

    async def in_flight() -> dict[str, int]:
        return {"c1": 2}

    app = create_admin_app(store, TOKEN, woken.append, in_flight)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://admin",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as c:
        c.woken = woken  # type: ignore[attr-defined]
        yield c


async def test_every_route_but_healthz_needs_the_token(client: httpx.AsyncClient) -> None:
    bare = {"Authorization": ""}
    assert (await client.get("/-/healthz", headers=bare)).status_code == 200
    assert (await client.get("/v1/services", headers=bare)).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await client.put("/v1/services/digits", json=spec(), headers=wrong)).status_code == 401


async def test_push_json_then_identical_push_is_a_noop(
    client: httpx.AsyncClient, store: Store
) -> None:
    r = await client.put("/v1/services/digits", json=spec())
    assert r.status_code == 202
    assert r.json() == {"name": "digits", "revision": 1, "phase": "deploying", "unchanged": False}
    assert client.woken == ["digits"]  # type: ignore[attr-defined]
    r = await client.put("/v1/services/digits", json=spec())
    assert r.status_code == 200 and r.json()["unchanged"] is True
    assert len(store.history("digits")) == 1


async def test_push_yaml_body(client: httpx.AsyncClient) -> None:
    body = yaml.safe_dump(spec())
    r = await client.put(
        "/v1/services/digits", content=body, headers={"Content-Type": "application/yaml"}
    )
    assert r.status_code == 202, r.text


async def test_invalid_spec_is_422_with_field_paths_and_changes_nothing(
    client: httpx.AsyncClient, store: Store
) -> None:
    await client.put("/v1/services/digits", json=spec())
    bad = spec(label="b")
    bad["serve"]["applications"][0]["deployments"][0]["num_replica"] = 3
    bad["cluster"]["num_cpu"] = 2
    r = await client.put("/v1/services/digits", json=bad)
    assert r.status_code == 422
    fields = {e["field"] for e in r.json()["errors"]}
    assert fields == {"cluster.num_cpu"}
    del bad["cluster"]["num_cpu"]
    r = await client.put("/v1/services/digits", json=bad)
    assert r.status_code == 422
    assert [e["field"] for e in r.json()["errors"]] == [
        "serve.applications[0].deployments[0].num_replica"
    ]
    assert [h["revision"] for h in store.history("digits")] == [1]
    r = await client.put("/v1/services/digits", content=b"{not: [valid")
    assert r.status_code == 422


async def test_name_mismatch_and_relative_code_dir(client: httpx.AsyncClient) -> None:
    r = await client.put("/v1/services/other", json=spec())
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "name"
    rel = spec()
    rel["cluster"]["code_dir"] = "../apps"
    r = await client.put("/v1/services/digits", json=rel)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "cluster.code_dir"


async def test_route_prefix_owned_by_another_service_is_409(
    client: httpx.AsyncClient, store: Store
) -> None:
    assert (await client.put("/v1/services/digits", json=spec())).status_code == 202
    r = await client.put("/v1/services/copy", json=spec(name="copy"))
    assert r.status_code == 409 and "owned by service 'digits'" in r.json()["errors"][0]
    assert store.service_names() == ["digits"]
    ok = await client.put("/v1/services/copy", json=spec(name="copy", prefix="/copy"))
    assert ok.status_code == 202


async def test_status_shape(client: httpx.AsyncClient, store: Store) -> None:
    await client.put("/v1/services/digits", json=spec())
    loaded = store.load_versioned("digits")
    assert loaded is not None
    store.commit(
        ServiceState(
            "digits", Active("c1", 1, "h"), last_rollout=RolloutRecord(1, Result.SUCCEEDED, "live")
        ),
        [RolloutRecord(1, Result.SUCCEEDED, "live")],
        ["went live"],
        1.0,
        version=loaded[1],
    )
    body = (await client.get("/v1/services/digits")).json()
    assert body["phase"] == "live"
    assert body["active"] == {"revision": 1, "cluster": "c1", "serve_url": None}
    assert body["pending"] is None
    assert body["last_rollout"] == {"revision": 1, "result": "succeeded", "message": "live"}
    assert body["traffic"] == {"c1": 100} and body["in_flight"] == {"c1": 2}
    assert body["events"][-1]["text"] == "went live"
    history = (await client.get("/v1/services/digits/history")).json()
    assert history[0]["result"] == "succeeded" and len(history[0]["spec_hash"]) == 16
    listed = (await client.get("/v1/services")).json()
    assert [s["name"] for s in listed] == ["digits"]
    assert (await client.get("/v1/services/nope")).status_code == 404


async def test_delete_marks_the_service_and_a_push_revives_it(
    client: httpx.AsyncClient, store: Store
) -> None:
    assert (await client.delete("/v1/services/nope")).status_code == 404
    await client.put("/v1/services/digits", json=spec())
    r = await client.delete("/v1/services/digits")
    assert r.status_code == 202 and r.json()["phase"] == "deleting"
    state = store.load("digits")
    assert state is not None and state.deleting
    r = await client.put("/v1/services/digits", json=spec())
    assert r.status_code == 202 and r.json()["revision"] == 2
    state = store.load("digits")
    assert state is not None and not state.deleting


def test_state_survives_reopening_the_store(tmp_path: Path) -> None:
    from rollout.plan import Kind, Pending, Retiring, Step

    first = Store(tmp_path / "db")
    from rollout.spec import parse_spec

    first.push(parse_spec(json.loads(json.dumps(spec()))), 1.0)
    state = ServiceState(
        "digits",
        Active("a", 1, "h1"),
        Pending(2, Kind.NEW_CLUSTER, "b", "h2", Step.HEALTH, 5.0, 1, "msg"),
        (Retiring("old", 3.0, 30.0, 0.0),),
        RolloutRecord(1, Result.SUCCEEDED, "ok"),
    )
    first.commit(state, [], [], 6.0, version=0)
    first.close()
    again = Store(tmp_path / "db")
    assert again.load("digits") == state


async def test_unsafe_route_prefix_is_422_and_changes_nothing(
    client: httpx.AsyncClient, store: Store
) -> None:
    """Before the prefix rule these were accepted (202); "#" and a newline then failed the
    HAProxy reload, which stalled every service's traffic changes."""
    for prefix in ("/a b", "/a#b", "/a\nb"):
        r = await client.put("/v1/services/digits", json=spec(prefix=prefix))
        assert r.status_code == 422, (prefix, r.text)
        fields = [e["field"] for e in r.json()["errors"]]
        assert fields == ["serve.applications[0].route_prefix"], fields


async def test_a_non_ascii_authorization_header_is_a_401(client: httpx.AsyncClient) -> None:
    for value in ("Bearer t\u00e9st-token", "B\u00e9arer x", "Bearer \u00ff" * 3):
        headers = {"Authorization": value.encode("latin-1")}
        r = await client.get("/v1/services", headers=headers)  # type: ignore[arg-type]
        assert r.status_code == 401, (value, r.status_code, r.text)


async def test_docs_are_off_and_the_schema_needs_the_token(client: httpx.AsyncClient) -> None:
    bare = {"Authorization": ""}
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert (await client.get(path)).status_code == 404, path
    assert (await client.get("/openapi.json", headers=bare)).status_code == 401
    schema = (await client.get("/openapi.json")).json()
    assert "/v1/services/{name}" in schema["paths"]
    assert "/openapi.json" not in schema["paths"]


async def test_a_body_over_the_limit_is_a_413_declared_or_chunked(
    client: httpx.AsyncClient, store: Store
) -> None:
    from rollout.api import MAX_BODY_BYTES

    big = b"#" * (MAX_BODY_BYTES + 1)
    r = await client.put("/v1/services/digits", content=big)
    assert r.status_code == 413 and "larger than" in r.json()["detail"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(64):
            yield b"#" * (64 * 1024)

    r = await client.put("/v1/services/digits", content=chunks())
    assert r.status_code == 413 and "larger than" in r.json()["detail"]
    assert "content-length" not in r.request.headers
    # A spec just under the limit still goes through (comments are part of the body).
    body = yaml.safe_dump(spec()).encode()
    padded = body + b"\n#" + b"x" * (MAX_BODY_BYTES - len(body) - 3)
    assert len(padded) == MAX_BODY_BYTES - 1
    r = await client.put("/v1/services/digits", content=padded)
    assert r.status_code == 202, r.text
    assert store.service_names() == ["digits"]


class ThreadRecordingStore(Store):
    """A real Store that notes the thread of every use: SQLite's one connection must stay on
    the event loop's thread, so no endpoint may run in FastAPI's thread pool."""

    def __init__(self, path: Path) -> None:
        self.threads: set[int] = set()
        super().__init__(path)

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_") and name != "threads":
            object.__getattribute__(self, "threads").add(threading.get_ident())
        return super().__getattribute__(name)


async def test_every_endpoint_uses_the_store_on_the_event_loop_thread(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    store = ThreadRecordingStore(tmp_path / "raygate.db")

    async def in_flight() -> dict[str, int]:
        return {}

    app = create_admin_app(store, TOKEN, lambda name: None, in_flight, CollectorRegistry())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://admin",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as c:
        answers = [
            (await c.put("/v1/services/digits", json=spec())).status_code,
            (await c.get("/v1/services")).status_code,
            (await c.get("/v1/services/digits")).status_code,
            (await c.get("/v1/services/digits/history")).status_code,
            (await c.get("/metrics")).status_code,
            (await c.delete("/v1/services/digits")).status_code,
        ]
    assert answers == [202, 200, 200, 200, 200, 202]
    assert store.threads == {threading.get_ident()}


LAUGHS = (
    "{a: &a [x, x, x, x, x, x, x, x, x, x], "
    + ", ".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(6)
    )
    + "}"
)  # 10^7 values once the aliases are expanded, in 300 bytes


async def test_bodies_that_parse_but_are_not_text_are_422_and_change_nothing(
    client: httpx.AsyncClient, store: Store
) -> None:
    with_binary = spec()
    with_binary["serve"]["applications"][0]["deployments"][0]["user_config"] = {"b": "BIN"}
    surrogate = json.dumps(spec()).replace('"label"', '"\\ud800"')
    bodies = {
        "binary": yaml.safe_dump(with_binary).replace("BIN", "!!binary /w=="),
        "surrogate": surrogate,
        "surrogate-key": json.dumps({**spec(), "\udcff": 1}),
        "deep": "[" * 5000 + "]" * 5000,
        "self-alias": "a: &a [*a]\n",
        "laughs": yaml.safe_dump(with_binary).replace("BIN", LAUGHS),
    }
    expected = {
        "binary": ("serve.applications[0].deployments[0].user_config.b", "binary data"),
        "surrogate": ("serve.applications[0].deployments[0].user_config.\\ud800", "surrogate"),
        "surrogate-key": ("\\udcff", "surrogate"),
        "deep": ("", "nested too deeply"),
        "self-alias": ("", "more than 100000 values"),
        "laughs": ("", "more than 100000 values"),
    }
    for what, body in bodies.items():
        r = await client.put("/v1/services/digits", content=body.encode("utf-8", "surrogatepass"))
        assert r.status_code == 422, (what, r.status_code, r.text[:300])
        [error] = r.json()["errors"]
        field, words = expected[what]
        assert error["field"] == field and words in error["message"], (what, error)
    assert store.service_names() == []


async def test_a_bad_env_key_is_a_422_naming_it(client: httpx.AsyncClient, store: Store) -> None:
    bad = spec()
    bad["cluster"]["env"] = {"A=B": "1", "RAY_ADDRESS": "x:1"}
    r = await client.put("/v1/services/digits", json=bad)
    assert r.status_code == 422
    assert {e["field"] for e in r.json()["errors"]} == {
        "cluster.env.A=B",
        "cluster.env.RAY_ADDRESS",
    }
    bad["cluster"] = {"python": "/bin/python3\u0000"}
    r = await client.put("/v1/services/digits", json=bad)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "cluster.python"
    assert store.service_names() == []


async def test_a_spec_the_running_provider_cannot_run_is_refused_and_changes_nothing(
    store: Store, tmp_path: Path
) -> None:
    from rollout.providers.local import LocalProvider, LocalSettings

    async def in_flight() -> dict[str, int]:
        return {}

    local = LocalProvider(LocalSettings(tmp_path))
    app = create_admin_app(store, TOKEN, lambda name: None, in_flight, check_spec=local.check)
    raw = spec()
    for key in ("num_cpus", "env", "code_dir"):
        raw["cluster"].pop(key)
    raw["cluster"]["kuberay"] = {"headGroupSpec": {"template": {"spec": {"containers": [
        {"name": "ray-head", "image": "rayproject/ray:2.60.0"}]}}}}  # fmt: skip
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a",
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as c:  # fmt: skip
        r = await c.put("/v1/services/digits", json=raw)
    assert r.status_code == 422
    assert [e["field"] for e in r.json()["errors"]] == ["cluster.kuberay"]
    assert "--provider kuberay" in r.json()["errors"][0]["message"]
    assert store.service_names() == []
    await local.close()


async def test_ready_says_why_not_until_raygate_can_take_traffic(store: Store) -> None:
    why: list[str | None] = ["the controller is still starting"]

    async def ready() -> str | None:
        return why[0]

    async def in_flight() -> dict[str, int]:
        return {}

    app = create_admin_app(store, TOKEN, lambda name: None, in_flight, ready=ready)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as c:
        r = await c.get("/-/ready")  # no token: a kubelet probes it
        assert r.status_code == 503 and r.json()["reason"] == "the controller is still starting"
        why[0] = None
        r = await c.get("/-/ready")
        assert r.status_code == 200 and r.json() == {"status": "ready"}
