"""Where webhooks are configured: a spec's `notifications.webhooks` (validated at push, kept
out of the spec hash when unset) and `raygate up --webhook` (a real process, without Ray:
its spec names `/bin/false` as the cluster's Python, so the rollout starts and aborts at
once, and a receiver on loopback hears both, signed)."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from rollout.api import create_admin_app
from rollout.cli import main
from rollout.spec import SpecError, parse_spec
from rollout.store import Store
from tests.harness import ROOT
from tests.loopback import free_port
from tests.test_notify import Receiver, until
from tests.test_spec import base

TOKEN = "t" * 32


def with_hooks(*hooks: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(base())
    raw["notifications"] = {"webhooks": list(hooks)}
    return raw


def test_a_spec_without_notifications_keeps_the_hash_it_had_before_they_existed() -> None:
    """bbdcdf2a506fa793: `spec_hash()` of this spec on the commit before notifications; a
    stored revision that changed hash would be pushed again as a new revision."""
    spec = parse_spec(base())
    assert spec.spec_hash() == "bbdcdf2a506fa793"
    stored = json.loads(json.dumps(spec.to_json()))  # as the store keeps it
    assert parse_spec(stored).spec_hash() == "bbdcdf2a506fa793"
    for empty in ({}, {"webhooks": []}):  # nothing to notify: no new revision either
        assert parse_spec({**base(), "notifications": empty}).spec_hash() == "bbdcdf2a506fa793"


def test_notifications_change_the_revision_not_the_cluster_or_serve_config() -> None:
    a = parse_spec(base())
    b = parse_spec(with_hooks({"url": "https://hooks.example/x", "secret_env": "RAYGATE_HOOK_KEY"}))
    assert (a.cluster_hash(), a.serve_hash()) == (b.cluster_hash(), b.serve_hash())
    assert a.spec_hash() != b.spec_hash()
    assert b.notifications is not None
    assert b.notifications.webhooks[0].secret_env == "RAYGATE_HOOK_KEY"


@pytest.mark.parametrize(("url", "why"), [
    ("ftp://hooks.example/x", "must be an http:// or https:// URL"),
    ("hooks.example/x", "must be an http:// or https:// URL"),
    ("http://", "must name a host"),
    ("http://hooks.example/a b", "must not contain spaces or control characters"),
    ("http://hooks.example/#frag", "must not have a #fragment"),
])  # fmt: skip
def test_a_bad_webhook_url_is_refused_naming_the_field(url: str, why: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(with_hooks({"url": "http://127.0.0.1:9/ok"}, {"url": url}))
    assert info.value.problems == [("notifications.webhooks.1.url", why)]


def test_a_secret_is_named_never_given_in_the_spec() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(with_hooks({"url": "http://127.0.0.1:9/", "secret": "inline"}))
    assert info.value.problems == [("notifications.webhooks.0.secret", "unknown field")]
    with pytest.raises(SpecError) as info:
        parse_spec(with_hooks({"url": "http://127.0.0.1:9/", "secret_env": "NOT-A-NAME"}))
    assert [p for p, _ in info.value.problems] == ["notifications.webhooks.0.secret_env"]


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Store]]:
    store = Store(tmp_path / "raygate.db")

    async def in_flight() -> dict[str, int]:
        return {}

    app = create_admin_app(store, TOKEN, lambda name: None, in_flight)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://a", headers=auth) as client:
        yield client, store
    store.close()


async def test_the_admin_api_answers_a_bad_webhook_url_with_a_422(
    admin: tuple[httpx.AsyncClient, Store],
) -> None:
    client, store = admin
    r = await client.put("/v1/services/digits", json=with_hooks({"url": "gopher://x"}))
    assert r.status_code == 422
    assert r.json()["errors"] == [{"field": "notifications.webhooks.0.url",
                                   "message": "must be an http:// or https:// URL"}]  # fmt: skip
    assert store.service_names() == []


def test_up_refuses_a_bad_webhook_url_or_an_empty_secret_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = str(tmp_path / "state")
    assert main(["up", "--state-dir", state, "--webhook", "ftp://x/"]) == 2
    assert "--webhook 'ftp://x/': must be an http:// or https:// URL" in capsys.readouterr().err
    empty = tmp_path / "secret"
    empty.write_text("\n")
    assert main(["up", "--state-dir", state, "--webhook", "http://127.0.0.1:9/",
                 "--webhook-secret-file", str(empty)]) == 2  # fmt: skip
    assert "is empty" in capsys.readouterr().err
    assert not (tmp_path / "state").exists(), "nothing was started"


async def test_up_sends_a_failed_rollout_to_its_webhook_signed(tmp_path: Path) -> None:
    receiver = Receiver()
    await receiver.start()
    secret = tmp_path / "hook-secret"
    secret.write_text("file-secret\n")
    spec = tmp_path / "svc.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "hooked",
        "cluster": {"code_dir": str(ROOT / "serve_configs" / "apps"), "python": "/bin/false"},
        "serve": {"applications": [{"name": "a", "route_prefix": "/a",
                                    "import_path": "digits:build"}]},
    }))  # fmt: skip
    admin_port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rollout.cli", "up", str(spec), "--state-dir",
        str(tmp_path / "state"), "--port", str(free_port()), "--admin-port", str(admin_port),
        "--engine", "python", "--webhook", receiver.url, "--webhook-secret-file", str(secret),
        cwd=ROOT, env={**os.environ, "RAYGATE_TOKEN": TOKEN}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        await until("the aborted rollout's webhook",
                    lambda: any(b["event"] == "rollout_aborted" for b in receiver.bodies()),
                    within_s=60)  # fmt: skip
        # Counted in the registry the admin API serves.
        line = 'raygate_webhook_deliveries_total{result="delivered",service="hooked"} 2.0'
        scraped = ""

        async def scrape() -> None:
            nonlocal scraped
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as c:
                scraped = (await c.get(f"http://127.0.0.1:{admin_port}/metrics")).text

        deadline = time.monotonic() + 10
        while line not in scraped and time.monotonic() < deadline:
            await scrape()
            await asyncio.sleep(0.1)
        assert line in scraped, scraped[-2000:]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        await receiver.stop()
    assert proc.returncode == 0, out.decode()[-3000:]
    bodies = receiver.bodies()
    assert [(b["event"], b["revision"], b["service"]) for b in bodies] == [
        ("rollout_started", 1, "hooked"), ("rollout_aborted", 1, "hooked")], bodies
    assert "cluster start failed" in bodies[1]["message"]
    for headers, body in receiver.got:
        want = "sha256=" + hmac.new(b"file-secret", body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Raygate-Signature"], want)
    assert b"file-secret" not in out, "the secret is never logged"
    assert time.time() - bodies[0]["time"] < 120
