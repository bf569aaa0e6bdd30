"""Webhook delivery of rollout events: in the background, never in the controller's way.

The controller calls `publish` (synchronous, no await): each event is put on the queue of
each target URL and the tick goes on. Every target has its own bounded queue and one worker
task, so a slow or dead receiver delays only its own events. A full queue drops its oldest
event; a POST that fails is retried with exponential backoff and jitter up to `attempts`
times, each attempt bounded by `timeout_s` in total. Whatever is finally not delivered is
counted in `raygate_webhook_deliveries_total{result="failed"|"dropped"}` and logged; every failed
attempt in `raygate_webhook_attempt_failures_total{reason}`. `close` gives the queues a bounded
time to flush at shutdown.

Events live in memory only: raygate killed (not stopped) loses what was queued. The body
carries an `id` (rollout/events.py) that stays the same across retries, for receivers that
dedupe.

The body is signed, when a secret is set, as GitHub does it: `X-Raygate-Signature:
sha256=<hex HMAC-SHA256 of the raw body>`. URLs are logged as scheme://host:port only: a
webhook URL often carries its credential in the path (Slack's do).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import httpx

from gateway.metrics import Metrics
from rollout.events import RolloutEvent
from rollout.spec import NotificationsSpec

log = logging.getLogger("raygate.notify")

SIGNATURE_HEADER = "X-Raygate-Signature"


@dataclass(frozen=True)
class WebhookTarget:
    url: str
    secret: str | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        """The URL without path or query, fit for a log line."""
        parsed = httpx.URL(self.url)
        port = f":{parsed.port}" if parsed.port else ""
        return f"{parsed.scheme}://{parsed.host}{port}"


@dataclass(frozen=True)
class NotifierSettings:
    queue_size: int = 100  # events waiting per target; the oldest goes when full
    attempts: int = 6  # POSTs per event, the first included
    backoff_s: float = 0.5  # before the second attempt; doubled each time
    max_backoff_s: float = 30.0
    timeout_s: float = 5.0  # one attempt, connect to last byte
    flush_s: float = 5.0  # at shutdown, at most this long for what is queued


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class _AttemptFailed(Exception):
    def __init__(self, reason: str, detail: str, retry: bool) -> None:
        super().__init__(detail)
        self.reason, self.retry = reason, retry


class Notifier:
    def __init__(
        self,
        metrics: Metrics,
        targets: Sequence[WebhookTarget] = (),
        settings: NotifierSettings | None = None,
        env: Mapping[str, str] | None = None,  # where a spec's `secret_env` is looked up
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.metrics = metrics
        self.targets = tuple(targets)
        self.settings = settings or NotifierSettings()
        self.env = dict(env or {})
        self._rng = rng or random.Random()
        self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False,
                                         transport=transport)  # fmt: skip
        self._queues: dict[WebhookTarget, asyncio.Queue[RolloutEvent]] = {}
        self._workers: dict[WebhookTarget, asyncio.Task[None]] = {}
        self._closed = False

    # ---- what the controller calls ------------------------------------------------------
    def publish(self, events: Iterable[RolloutEvent], spec: NotificationsSpec | None) -> None:
        """Queue each event for every target (raygate's own and the service's). Never
        waits, never raises for a target's sake."""
        targets = self.targets_for(spec)
        for event in events:
            for target in targets:
                if target is None:  # a secret_env that is not set: never sent unsigned
                    log.error("%s: webhook not sent (%s): its secret_env is not set in "
                              "raygate's environment", event.service, event.kind.value)
                    self.metrics.webhook_delivery(event.service, "failed")
                    continue
                self._enqueue(target, event)

    def targets_for(self, spec: NotificationsSpec | None) -> list[WebhookTarget | None]:
        """raygate's targets, then the service's (None for one whose secret is not set);
        a URL given twice with the same secret gets each event once."""
        out: list[WebhookTarget | None] = []
        for target in self._spec_targets(spec):
            if target is None or target not in out:
                out.append(target)
        return out

    def _spec_targets(self, spec: NotificationsSpec | None) -> list[WebhookTarget | None]:
        out: list[WebhookTarget | None] = list(self.targets)
        for hook in spec.webhooks if spec is not None else ():
            if hook.secret_env is None:
                out.append(WebhookTarget(hook.url))
            elif self.env.get(hook.secret_env):
                out.append(WebhookTarget(hook.url, self.env[hook.secret_env]))
            else:
                out.append(None)
        return out

    def _enqueue(self, target: WebhookTarget, event: RolloutEvent) -> None:
        if self._closed:
            self.metrics.webhook_delivery(event.service, "dropped")
            log.warning("%s: webhook %s dropped: raygate is stopping", event.service, event.id)
            return
        queue = self._queues.get(target)
        if queue is None:
            queue = self._queues[target] = asyncio.Queue(self.settings.queue_size)
            self._workers[target] = asyncio.get_running_loop().create_task(
                self._work(target, queue), name=f"webhook-{target.where}")
        if queue.full():
            old = queue.get_nowait()
            queue.task_done()
            self.metrics.webhook_delivery(old.service, "dropped")
            log.warning("%s: webhook queue for %s is full: dropped the oldest event (%s, %s)",
                        old.service, target.where, old.kind.value, old.id)  # fmt: skip
        queue.put_nowait(event)

    # ---- delivery -------------------------------------------------------------------------
    async def _work(self, target: WebhookTarget, queue: asyncio.Queue[RolloutEvent]) -> None:
        while True:
            event = await queue.get()
            try:
                await self._deliver(target, event)
            except asyncio.CancelledError:  # stopped with this one still unsent
                self.metrics.webhook_delivery(event.service, "dropped")
                log.warning("%s: webhook %s (%s) to %s not sent: raygate stopped", event.service,
                            event.id, event.kind.value, target.where)  # fmt: skip
                raise
            except Exception:  # the worker never dies: the next event still goes out
                log.exception("webhook to %s failed unexpectedly", target.where)
                self.metrics.webhook_delivery(event.service, "failed")
            finally:
                queue.task_done()

    async def _deliver(self, target: WebhookTarget, event: RolloutEvent) -> None:
        s = self.settings
        body = json.dumps(event.to_json(), separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "raygate",
                   "X-Raygate-Event": event.kind.value, "X-Raygate-Delivery": event.id}  # fmt: skip
        if target.secret:
            headers[SIGNATURE_HEADER] = sign(target.secret, body)
        why = ""
        for attempt in range(1, s.attempts + 1):
            try:
                await self._post(target.url, body, headers)
            except _AttemptFailed as exc:
                self.metrics.webhook_attempt_failed(exc.reason)
                why = str(exc)
                if not exc.retry or attempt == s.attempts:
                    break
                delay = min(s.max_backoff_s, s.backoff_s * 2 ** (attempt - 1))
                delay = delay / 2 + self._rng.uniform(0, delay / 2)  # jitter: no lockstep
                log.info("%s: webhook to %s: attempt %d failed (%s); again in %.2fs",
                         event.service, target.where, attempt, why, delay)  # fmt: skip
                await asyncio.sleep(delay)
                continue
            self.metrics.webhook_delivery(event.service, "delivered")
            return
        self.metrics.webhook_delivery(event.service, "failed")
        log.error(
            "%s: webhook %s (%s) to %s not delivered after %d attempt(s): %s",
            event.service, event.id, event.kind.value, target.where, attempt, why,
        )  # fmt: skip

    async def _post(self, url: str, body: bytes, headers: Mapping[str, str]) -> None:
        """One attempt; raises _AttemptFailed. httpx's errors are translated here only."""
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                resp = await self._client.post(url, content=body, headers=headers)
        except TimeoutError:
            raise _AttemptFailed("timeout", f"no answer within {self.settings.timeout_s:g}s",
                                 True) from None  # fmt: skip
        except httpx.TimeoutException as exc:
            raise _AttemptFailed("timeout", repr(exc), True) from None
        except httpx.ConnectError as exc:
            raise _AttemptFailed("connect", repr(exc), True) from None
        except httpx.HTTPError as exc:
            raise _AttemptFailed("other", repr(exc), True) from None
        if 200 <= resp.status_code < 300:
            return
        # A receiver's 4xx says this request will never do (bad signature, wrong path);
        # retrying helps against 5xx, timeouts and rate limits only.
        retry = resp.status_code >= 500 or resp.status_code in (408, 429)
        raise _AttemptFailed("status", f"HTTP {resp.status_code}", retry)

    # ---- shutdown ---------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop taking events; give what is queued `flush_s` to go out, then stop the
        workers (what is left is counted as dropped and logged)."""
        self._closed = True
        queues = list(self._queues.values())
        left = sum(q.qsize() for q in queues)
        if left:
            log.info("sending %d queued webhook event(s) (at most %gs)", left,
                     self.settings.flush_s)  # fmt: skip
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.flush_s):
                for queue in queues:
                    await queue.join()
        unsent = 0
        for queue in queues:
            while not queue.empty():
                event = queue.get_nowait()
                queue.task_done()
                self.metrics.webhook_delivery(event.service, "dropped")
                unsent += 1
        busy = [w for w in self._workers.values() if not w.done()]
        for worker in busy:
            worker.cancel()
        for worker in busy:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        if unsent:
            log.warning("%d webhook event(s) not sent at shutdown", unsent)
        await self._client.aclose()
