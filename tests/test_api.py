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

from rollout.analysis import Outcome, Verdict
from rollout.api import create_admin_app
from rollout.plan import (
    Active,
    Analysis,
    Canary,
    Command,
    Hold,
    Kind,
    Pending,
    Result,
    Retiring,
    RolloutRecord,
    ServiceState,
    Step,
)
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


async def test_an_identical_push_of_a_failed_revision_says_how_to_try_again(
    client: httpx.AsyncClient, store: Store
) -> None:
    """An aborted or rolled back revision is not tried again; pushing the same spec changes
    nothing, and the answer says so rather than just "nothing to do"."""
    assert (await client.put("/v1/services/digits", json=spec())).status_code == 202
    state = store.load("digits")
    assert state is not None
    put_state(store, state, RolloutRecord(1, Result.ROLLED_BACK, "died while baking"))
    r = await client.put("/v1/services/digits", json=spec())
    assert r.status_code == 200 and r.json()["unchanged"] is True
    assert r.json()["message"] == (
        "identical to revision 1, which was rolled_back and is not tried again: change the "
        "spec to try again"
    )


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


# ---- canary commands and status ----------------------------------------------------------
CANARY = {
    "strategy": "canary",
    "canary": {
        "steps": [{"weight": 20}, {"pause": {"duration_s": 30}}, {"weight": 50}, {"pause": {}}],
        "analysis": {"interval_s": 5, "min_requests": 20},
    },
}


def canary_spec(label: str = "b") -> dict[str, Any]:
    raw = spec(label=label)
    raw["upgrade"].update(CANARY)
    return raw


def put_state(store: Store, state: ServiceState, *finished: RolloutRecord) -> None:
    """Commit `state` as the controller would (compare-and-swap on the loaded version)."""
    loaded = store.load_versioned(state.name)
    assert loaded is not None
    store.commit(state, finished, [], 10.0, version=loaded[1])


async def live_r1(client: httpx.AsyncClient, store: Store) -> None:
    """Revision 1 live on c1."""
    assert (await client.put("/v1/services/digits", json=spec())).status_code == 202
    put_state(store, ServiceState("digits", Active("c1", 1, "h1")),
              RolloutRecord(1, Result.SUCCEEDED, "live"))  # fmt: skip


def canary_state(canary: Canary, step: Step = Step.CANARY, verdict: Verdict | None = None
                 ) -> ServiceState:  # fmt: skip
    pending = Pending(2, Kind.NEW_CLUSTER, "c2", "h2", step, 5.0, 0, "weight 20%",
                      canary if step is Step.CANARY else None)  # fmt: skip
    analysis = Analysis("c2", "c1", 9.0, failures=0, inconclusive=1, verdict=verdict)
    return ServiceState("digits", Active("c1", 1, "h1"), pending,
                        analysis=analysis if step is Step.CANARY else None)  # fmt: skip


async def test_status_shows_the_canary_step_weight_and_last_verdict(
    client: httpx.AsyncClient, store: Store
) -> None:
    await live_r1(client, store)
    assert (await client.put("/v1/services/digits", json=canary_spec())).status_code == 202
    put_state(store, canary_state(Canary(), Step.HEALTH))
    p = (await client.get("/v1/services/digits")).json()["pending"]
    assert (p["strategy"], p["canary_step"], p["weight"], p["paused"]) == ("canary", None, 0, False)
    assert p["hold"] is None and p["analysis"] is None

    verdict = Verdict(Outcome.INCONCLUSIVE, "not enough traffic to judge: 12 requests in 5 s",
                      12, 40, 0.0, 0.0, 80.0)  # fmt: skip
    put_state(store, canary_state(Canary(1, 20, 6.0), verdict=verdict))
    body = (await client.get("/v1/services/digits")).json()
    p = body["pending"]
    assert body["phase"] == "upgrading" and p["step"] == "canary"
    assert p["canary_step"] == {"index": 2, "of": 4, "step": {"pause": {"duration_s": 30.0}}}
    assert (p["weight"], p["paused"], p["hold"]) == (20, False, None)
    assert p["analysis"] == {**verdict.to_json(), "cluster": "c2", "stable": "c1",
                             "judged_at": 9.0, "failures": 0, "inconclusive": 1}  # fmt: skip
    assert body["traffic"] == {"c1": 80, "c2": 20}
    assert body["analysis"] is None  # only while a bake window runs

    put_state(store, canary_state(Canary(3, 50, 6.0)))  # at `pause: {}`: waits for promote
    p = (await client.get("/v1/services/digits")).json()["pending"]
    assert p["canary_step"] == {"index": 4, "of": 4, "step": {"pause": {}}}
    assert (p["paused"], p["hold"]) == (True, None)
    assert p["analysis"]["result"] is None and p["analysis"]["canary_requests"] == 0

    put_state(store, canary_state(Canary(2, 20, 6.0, Hold.NO_DATA)))
    p = (await client.get("/v1/services/digits")).json()["pending"]
    assert (p["canary_step"]["index"], p["paused"], p["hold"]) == (3, True, "no_data")


async def test_a_rollback_shows_as_bluegreen_whatever_its_spec(
    client: httpx.AsyncClient, store: Store
) -> None:
    await client.put("/v1/services/digits", json=canary_spec("a"))
    put_state(store, ServiceState("digits", Active("c1", 1, "h1")),
              RolloutRecord(1, Result.SUCCEEDED, "live"))  # fmt: skip
    await client.put("/v1/services/digits", json=canary_spec("b"))
    put_state(store, ServiceState("digits", Active("c1", 2, "h1")),
              RolloutRecord(2, Result.SUCCEEDED, "live"))  # fmt: skip
    r = await client.post("/v1/services/digits/rollback")
    assert r.status_code == 202, r.text
    pending = Pending(3, Kind.NEW_CLUSTER, "c2", "h1", Step.HEALTH, 5.0)
    put_state(store, ServiceState("digits", Active("c1", 2, "h1"), pending))
    p = (await client.get("/v1/services/digits")).json()["pending"]
    assert (p["revision"], p["strategy"], p["canary_step"]) == (3, "bluegreen", None)


async def test_canary_commands_are_queued_and_wake_the_controller(
    client: httpx.AsyncClient, store: Store
) -> None:
    await live_r1(client, store)
    await client.put("/v1/services/digits", json=canary_spec())
    put_state(store, canary_state(Canary(1, 20, 6.0)))
    client.woken.clear()  # type: ignore[attr-defined]
    for path, body in (("pause", None), ("promote", {"full": True}), ("promote", {}),
                       ("abort", {})):  # fmt: skip
        r = await client.post(f"/v1/services/digits/{path}", json=body)
        assert r.status_code == 202, (path, r.text)
        assert r.json()["pending"]["weight"] == 20 and r.json()["name"] == "digits"
    state = store.load("digits")
    assert state is not None
    assert state.commands == (Command("pause"), Command("promote", True), Command("promote"),
                              Command("abort"))  # fmt: skip
    assert client.woken == ["digits"] * 4  # type: ignore[attr-defined]
    put_state(store, canary_state(Canary(1, 20, 6.0, Hold.USER)))
    assert (await client.post("/v1/services/digits/resume")).status_code == 202


async def test_commands_that_do_not_apply_are_409_with_the_reason_and_queue_nothing(
    client: httpx.AsyncClient, store: Store
) -> None:
    await live_r1(client, store)
    r = await client.post("/v1/services/digits/promote")
    assert r.status_code == 409 and r.json() == {"detail": "no rollout in progress"}
    assert (await client.post("/v1/services/digits/abort")).status_code == 409
    await client.put("/v1/services/digits", json=canary_spec())
    put_state(store, canary_state(Canary(), Step.HEALTH))
    r = await client.post("/v1/services/digits/pause")
    assert r.status_code == 409 and "in its health step" in r.json()["detail"]
    put_state(store, canary_state(Canary(1, 20, 6.0)))
    r = await client.post("/v1/services/digits/resume")
    assert r.status_code == 409 and "not paused" in r.json()["detail"]
    put_state(store, canary_state(Canary(1, 20, 6.0, Hold.USER)))
    r = await client.post("/v1/services/digits/pause")
    why = "the canary is paused already (`raygate resume` goes on)"
    assert r.status_code == 409 and r.json()["detail"] == why
    state = store.load("digits")
    assert state is not None and state.commands == ()
    assert client.woken == ["digits"] * 2  # type: ignore[attr-defined]  # the pushes only


async def test_rollback_in_the_bake_window_records_the_old_spec_again(
    client: httpx.AsyncClient, store: Store
) -> None:
    await live_r1(client, store)
    await client.put("/v1/services/digits", json=spec(label="b"))
    verdict = Verdict(Outcome.PASS, "error rate 0.0% over 80 requests", 80, None, 0.0, None, 9.0)
    baking = ServiceState(
        "digits", Active("c2", 2, "h1"),
        retiring=(Retiring("c1", 9.0, 30.0, 0.0, 1, 1e12),),
        analysis=Analysis("c2", None, 9.0, verdict=verdict),
    )  # fmt: skip
    put_state(store, baking, RolloutRecord(2, Result.SUCCEEDED, "live"))
    body = (await client.get("/v1/services/digits")).json()
    assert body["retiring"] == [{"cluster": "c1", "revision": 1, "since": 9.0,
                                 "bake_until": 1e12, "in_flight": 2}]  # fmt: skip
    assert body["analysis"]["result"] == "pass" and body["analysis"]["stable"] is None
    assert body["traffic"] == {"c1": 0, "c2": 100}

    r = await client.post("/v1/services/digits/rollback")
    assert r.status_code == 202, r.text
    assert (r.json()["revision"], r.json()["rollback_of"], r.json()["desired_revision"]) == (
        3, 1, 3)  # fmt: skip
    row = store.history("digits")[2]
    assert (row["revision"], row["rollback_of"], row["result"]) == (3, 1, "pending")
    assert store.revision("digits", 3).spec == store.revision("digits", 1).spec
    history = (await client.get("/v1/services/digits/history")).json()
    assert [h["rollback_of"] for h in history] == [None, None, 1]
    assert client.woken[-1] == "digits"  # type: ignore[attr-defined]


async def test_rollback_to_a_named_revision_and_when_there_is_none(
    client: httpx.AsyncClient, store: Store
) -> None:
    await live_r1(client, store)
    r = await client.post("/v1/services/digits/rollback")
    assert r.status_code == 409
    assert r.json() == {"detail": "no good revision before the live one (1)"}
    await client.put("/v1/services/digits", json=spec(label="b"))
    put_state(store, ServiceState("digits", Active("c1", 1, "h1")),
              RolloutRecord(2, Result.ABORTED, "analysis failed"))  # fmt: skip
    await client.put("/v1/services/digits", json=spec(label="c"))
    put_state(store, ServiceState("digits", Active("c1", 3, "h1")),
              RolloutRecord(3, Result.SUCCEEDED, "live"))  # fmt: skip
    r = await client.post("/v1/services/digits/rollback", json={"to": 2})
    assert r.status_code == 409
    assert r.json()["detail"] == "revision 2 is not a good revision (its rollout: aborted)"
    r = await client.post("/v1/services/digits/rollback", json={"to": 9})
    assert r.status_code == 409 and r.json()["detail"] == "digits has no revision 9"
    r = await client.post("/v1/services/digits/rollback", json={"to": 1})
    assert r.status_code == 202 and r.json()["revision"] == 4
    assert store.history("digits")[3]["rollback_of"] == 1


COMMAND_PATHS = ("promote", "abort", "pause", "resume", "rollback")


async def test_commands_need_the_token_and_an_existing_service(
    client: httpx.AsyncClient, store: Store
) -> None:
    await live_r1(client, store)
    for path in COMMAND_PATHS:
        r = await client.post(f"/v1/services/digits/{path}", headers={"Authorization": ""})
        assert r.status_code == 401, path
        r = await client.post(f"/v1/services/nope/{path}", json={})
        assert r.status_code == 404 and r.json() == {"detail": "no service 'nope'"}, path
    assert store.history("digits")[-1]["revision"] == 1
    schema = (await client.get("/openapi.json")).json()
    assert {f"/v1/services/{{name}}/{p}" for p in COMMAND_PATHS} <= set(schema["paths"])


async def test_bad_command_bodies_are_422_naming_the_field(
    client: httpx.AsyncClient, store: Store
) -> None:
    await live_r1(client, store)
    cases: list[tuple[str, str | bytes, str, str]] = [
        ("promote", '{"full": "yes"}', "full", "true or false"),
        ("promote", '{"full": 1}', "full", "true or false"),
        ("promote", '{"to": 1}', "to", "unknown field for promote (allowed: full)"),
        ("rollback", '{"to": "3"}', "to", "an integer"),
        ("rollback", '{"to": true}', "to", "an integer"),
        ("rollback", '{"to": 1.0}', "to", "an integer"),
        ("rollback", '{"to": 0}', "to", "revision number"),
        ("rollback", '{"to": 99999999999999999999}', "to", "revision number"),
        ("rollback", '{"full": true}', "full", "unknown field for rollback (allowed: to)"),
        ("abort", '{"full": true}', "full", "unknown field for abort (allowed: none)"),
        ("pause", '{"\\ud800": 1}', "\\ud800", "unknown field"),
        ("resume", "[1]", "", "a JSON object"),
        ("pause", "{not json", "", "a JSON object"),
        ("pause", b"\xff\xfe", "", "a JSON object"),
        ("pause", "[" * 3000, "", "a JSON object"),
    ]
    for path, body, field, words in cases:
        r = await client.post(f"/v1/services/digits/{path}", content=body)
        assert r.status_code == 422, (path, body, r.status_code, r.text)
        [error] = r.json()["errors"]
        assert error["field"] == field and words in error["message"], (path, body, error)
    r = await client.post("/v1/services/digits/abort", content=b" " * 5000)
    assert r.status_code == 413 and "larger than 4096 bytes" in r.json()["detail"]
    state = store.load("digits")
    assert state is not None and state.commands == ()
    assert [h["revision"] for h in store.history("digits")] == [1]
