"""Webhook delivery (rollout/notify.py) against a real HTTP receiver on loopback.

The receiver is an aiohttp server on 127.0.0.1 that records every POST and can answer
slowly, with an error status, or hold requests until the test lets them go; "down" is a port
nothing listens on (connection refused). Nothing sleeps to synchronise: every wait polls a
condition with a deadline. The controller tests drive the real controller with the provider,
data plane and Serve doubles of tests/test_controller.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.metrics import Metrics
from rollout.controller import Controller
from rollout.events import EventKind, RolloutEvent
from rollout.notify import SIGNATURE_HEADER, Notifier, NotifierSettings, WebhookTarget
from rollout.spec import NotificationsSpec, Webhook, parse_spec
from rollout.store import Store
from tests.loopback import free_port
from tests.test_controller import Clock, DataPlaneDouble, ProviderDouble, ServeDouble, make_spec

FAST = NotifierSettings(attempts=6, backoff_s=0.05, max_backoff_s=0.2, timeout_s=2.0, flush_s=2.0)


class Receiver:
    """A webhook receiver: records each POST (headers, raw body) and answers `status`, after
    `delay_s`, or once `release` is set (when it is not None)."""

    def __init__(self, status: int = 200, delay_s: float = 0.0) -> None:
        self.status = status
        self.delay_s = delay_s
        self.release: asyncio.Event | None = None
        self.got: list[tuple[CIMultiDict[str], bytes]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.got.append((CIMultiDict(request.headers), await request.read()))
        if self.release is not None:
            await asyncio.wait_for(self.release.wait(), 30)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)  # the receiver is slow: its behaviour under test
        return web.Response(status=self.status)

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self.release is not None:
            self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.got]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


async def until(what: str, check: Callable[[], object], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s:g}s waiting for {what}")
        await asyncio.sleep(0.01)


def count(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def delivered(metrics: Metrics, result: str = "delivered", service: str = "svc") -> float:
    return count(metrics, "raygate_webhook_deliveries_total", service=service, result=result)


def event(n: int = 1, kind: EventKind = EventKind.STARTED) -> RolloutEvent:
    return RolloutEvent("svc", kind, n, f"event {n}", 1000.0 + n, "c2")


async def test_an_event_arrives_signed_and_the_signature_verifies(receiver: Receiver) -> None:
    metrics = Metrics()
    notifier = Notifier(metrics, [WebhookTarget(receiver.url, "s3cret")], FAST)
    notifier.publish([event(1)], None)
    await until("the POST", lambda: delivered(metrics) == 1)
    await notifier.close()
    [(headers, body)] = receiver.got
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers[SIGNATURE_HEADER], expected)
    assert not hmac.compare_digest(
        headers[SIGNATURE_HEADER], "sha256=" + hmac.new(b"other", body, hashlib.sha256).hexdigest()
    )
    assert json.loads(body) == {"id": event(1).id, "service": "svc", "event": "rollout_started",
                                "revision": 1, "cluster": "c2", "message": "event 1",
                                "time": 1001.0}  # fmt: skip
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Raygate-Delivery"] == event(1).id
    assert headers["X-Raygate-Event"] == "rollout_started"


async def test_without_a_secret_there_is_no_signature(receiver: Receiver) -> None:
    metrics = Metrics()
    notifier = Notifier(metrics, [WebhookTarget(receiver.url)], FAST)
    notifier.publish([event(1)], None)
    await until("the POST", lambda: delivered(metrics) == 1)
    await notifier.close()
    assert SIGNATURE_HEADER not in receiver.got[0][0]


async def test_a_receiver_that_is_down_then_comes_back_gets_the_event_once() -> None:
    metrics = Metrics()
    port = free_port()
    settings = NotifierSettings(attempts=40, backoff_s=0.05, max_backoff_s=0.2, timeout_s=2.0)
    notifier = Notifier(metrics, [WebhookTarget(f"http://127.0.0.1:{port}/hook")], settings)
    notifier.publish([event(1)], None)
    refused = "raygate_webhook_attempt_failures_total"
    await until("two refused attempts", lambda: count(metrics, refused, reason="connect") >= 2)
    assert delivered(metrics) == 0
    late = Receiver()
    await late.start(port)
    try:
        await until("the retried POST", lambda: delivered(metrics) == 1)
        assert [b["id"] for b in late.bodies()] == [event(1).id]
        assert delivered(metrics, "failed") == 0
    finally:
        await notifier.close()
        await late.stop()


async def test_a_receiver_that_keeps_failing_is_retried_then_counted_and_logged(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.status = 503
    metrics = Metrics()
    settings = NotifierSettings(attempts=3, backoff_s=0.01, max_backoff_s=0.05)
    notifier = Notifier(metrics, [WebhookTarget(receiver.url + "?token=hidden")], settings)
    notifier.publish([event(1)], None)
    await until("the failure counted", lambda: delivered(metrics, "failed") == 1)
    await notifier.close()
    assert len(receiver.got) == 3 and len({b["id"] for b in receiver.bodies()}) == 1
    assert count(metrics, "raygate_webhook_attempt_failures_total", reason="status") == 3
    assert delivered(metrics) == 0
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "not delivered after 3 attempt(s): HTTP 503" in line
    assert f"http://127.0.0.1:{receiver.port}" in line and "hidden" not in line


async def test_a_4xx_is_not_retried(receiver: Receiver) -> None:
    receiver.status = 401  # e.g. the receiver refuses the signature: retrying cannot help
    metrics = Metrics()
    notifier = Notifier(metrics, [WebhookTarget(receiver.url, "wrong")], FAST)
    notifier.publish([event(1)], None)
    await until("the failure counted", lambda: delivered(metrics, "failed") == 1)
    await notifier.close()
    assert len(receiver.got) == 1


async def test_an_attempt_that_gets_no_answer_times_out_and_is_retried(
    receiver: Receiver,
) -> None:
    receiver.release = asyncio.Event()  # never answers until the test ends
    metrics = Metrics()
    settings = NotifierSettings(attempts=2, backoff_s=0.01, timeout_s=0.3)
    notifier = Notifier(metrics, [WebhookTarget(receiver.url)], settings)
    started = time.monotonic()
    notifier.publish([event(1)], None)
    await until("the failure counted", lambda: delivered(metrics, "failed") == 1)
    took = time.monotonic() - started
    await notifier.close()
    assert count(metrics, "raygate_webhook_attempt_failures_total", reason="timeout") == 2
    assert len(receiver.got) == 2
    assert took < 2.0, f"two attempts of 0.3 s took {took:.2f}s"


async def test_a_full_queue_drops_its_oldest_event_and_counts_it(receiver: Receiver) -> None:
    receiver.release = asyncio.Event()
    metrics = Metrics()
    settings = NotifierSettings(queue_size=2, timeout_s=10.0)
    notifier = Notifier(metrics, [WebhookTarget(receiver.url)], settings)
    notifier.publish([event(1)], None)
    await until("the first POST in flight", lambda: len(receiver.got) == 1)
    notifier.publish([event(n) for n in (2, 3, 4, 5)], None)  # the queue holds two
    assert delivered(metrics, "dropped") == 2
    receiver.release.set()
    await until("three delivered", lambda: delivered(metrics) == 3)
    await notifier.close()
    assert [b["revision"] for b in receiver.bodies()] == [1, 4, 5]


async def test_close_is_bounded_and_counts_what_it_could_not_send(receiver: Receiver) -> None:
    receiver.release = asyncio.Event()
    metrics = Metrics()
    settings = NotifierSettings(timeout_s=10.0, flush_s=0.3)
    notifier = Notifier(metrics, [WebhookTarget(receiver.url)], settings)
    notifier.publish([event(1), event(2)], None)
    await until("the first POST in flight", lambda: len(receiver.got) == 1)
    started = time.monotonic()
    await notifier.close()
    took = time.monotonic() - started
    assert took < 1.5, f"close took {took:.2f}s with a flush bound of 0.3 s"
    assert delivered(metrics, "dropped") == 2  # one queued, one in flight
    notifier.publish([event(3)], None)  # after close: counted, not queued
    assert delivered(metrics, "dropped") == 3


async def test_a_spec_webhook_is_signed_with_its_env_secret_and_never_sent_unsigned(
    receiver: Receiver,
) -> None:
    metrics = Metrics()
    ours = WebhookTarget(receiver.url, "from-env")  # raygate's own, the same: sent once
    notifier = Notifier(metrics, [ours], FAST, env={"HOOK_SECRET": "from-env"})
    spec = NotificationsSpec(webhooks=(Webhook(url=receiver.url, secret_env="HOOK_SECRET"),
                                       Webhook(url=receiver.url, secret_env="UNSET")))  # fmt: skip
    notifier.publish([event(1)], spec)
    await until("the POST", lambda: delivered(metrics) == 1)
    await notifier.close()
    [(headers, body)] = receiver.got
    want = "sha256=" + hmac.new(b"from-env", body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == want
    assert delivered(metrics, "failed") == 1, "the one whose secret is not set"


# ---- the controller hands events over; a slow receiver does not slow it ---------------------
async def run_rollouts(
    tmp_path: Path, notifier: Notifier | None, spec_hooks: list[dict[str, Any]] | None = None,
) -> tuple[list[float], Store]:  # fmt: skip
    """A first deploy, then a new-cluster rollout of a second revision, tick by tick with an
    injected clock; returns each tick's wall time."""
    serve = ServeDouble()
    provider = ProviderDouble(serve)
    store = Store(tmp_path / "raygate.db")
    clock = Clock()
    ticks: list[float] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(serve.handler)) as http:
        controller = Controller(store, provider, DataPlaneDouble(), http, clock=clock,
                                notifier=notifier)  # fmt: skip
        second = make_spec(cpus=3)
        if spec_hooks is not None:
            raw = second.model_dump(mode="json", by_alias=True)
            raw["notifications"] = {"webhooks": spec_hooks}
            second = parse_spec(raw)
        for spec in (make_spec(), second):
            store.push(spec, clock.now)
            for _ in range(6):  # create, deploy, two healthy checks, switch; retire
                clock.now += 1.0
                started = time.perf_counter()
                await controller.reconcile("svc")
                ticks.append(time.perf_counter() - started)
    return ticks, store


ROLLOUT = ["rollout_started", "health_passed", "traffic_switched", "rollout_succeeded"]


async def test_the_controller_sends_each_rollout_step_in_order(
    tmp_path: Path, receiver: Receiver
) -> None:
    metrics = Metrics()
    notifier = Notifier(metrics, [WebhookTarget(receiver.url, "k")], FAST)
    _, store = await run_rollouts(tmp_path, notifier)
    await until("eight events", lambda: delivered(metrics) == 8)
    await notifier.close()
    store.close()
    got = [(b["event"], b["revision"]) for b in receiver.bodies()]
    assert got == [(k, 1) for k in ROLLOUT] + [(k, 2) for k in ROLLOUT]
    assert all(b["service"] == "svc" and b["message"] for b in receiver.bodies())


async def test_a_spec_webhook_hears_its_service_and_needs_no_new_cluster(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The second revision adds notifications.webhooks: events go to its URL from then on,
    and a notifications-only change would not have made a new cluster (same cluster hash)."""
    metrics = Metrics()
    notifier = Notifier(metrics, (), FAST)
    _, store = await run_rollouts(tmp_path, notifier, [{"url": receiver.url}])
    await until("four events", lambda: delivered(metrics) == 4)
    await notifier.close()
    assert [(b["event"], b["revision"]) for b in receiver.bodies()] == [(k, 2) for k in ROLLOUT]
    one, two = store.revision("svc", 1), store.revision("svc", 2)
    store.close()
    only_hooks = parse_spec({**one.spec.model_dump(mode="json", by_alias=True),
                             "notifications": {"webhooks": [{"url": receiver.url}]}})  # fmt: skip
    assert only_hooks.cluster_hash() == one.cluster_hash != two.cluster_hash
    assert only_hooks.spec_hash() != one.spec.spec_hash(), "stored as a revision of its own"


async def test_a_slow_receiver_does_not_slow_the_controllers_ticks(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The receiver holds every POST (it answers only once the test lets it): the ticks of
    two rollouts take as long as without any notifier, and every event still arrives."""
    receiver.release = asyncio.Event()
    metrics = Metrics()
    notifier = Notifier(metrics, [WebhookTarget(receiver.url)], NotifierSettings(timeout_s=30))
    try:
        baseline, store = await run_rollouts(tmp_path / "a", None)
        store.close()
        notifier.publish([event(0)], None)
        await until("the receiver holding a POST", lambda: len(receiver.got) == 1)
        try:
            held, store = await asyncio.wait_for(run_rollouts(tmp_path / "b", notifier), 5)
        except TimeoutError:
            pytest.fail("the controller's ticks waited for the receiver")
        store.close()
        assert len(receiver.got) == 1 and delivered(metrics) == 0, "it held them all along"
        receiver.release.set()
        await until("every event", lambda: delivered(metrics) == 9)
    finally:
        await notifier.close()
    print(f"ticks: max {max(baseline) * 1000:.1f} ms, total {sum(baseline) * 1000:.0f} ms "
          f"without a notifier; max {max(held) * 1000:.1f} ms, total {sum(held) * 1000:.0f} ms "
          "with a receiver that holds every POST")  # fmt: skip
    assert max(held) < 0.25, f"a tick took {max(held):.3f}s"
    assert sum(held) < sum(baseline) + 0.25
