"""An emulated Kubernetes API server for the KubeRay tests: kmock's `KubernetesEmulator`
served over real HTTP on loopback, in a thread of its own, reached with the real
`kubernetes` client through a kubeconfig file this module writes.

No Kubernetes cluster can be installed on these machines, so the provider's tests talk to
this instead. kmock 0.8 is an in-memory object store with Kubernetes URLs; `_Emulator` fills
in what a real API server does and kmock does not, so that the product never has to lean on
a kmock quirk:

- `create` answers 201 (kmock: 200), 409 `AlreadyExists` on a taken name;
- on create the server sets `metadata.uid`, `generation` (1), `resourceVersion`,
  `creationTimestamp`, `namespace`; every write bumps `resourceVersion` (one counter for the
  whole server, as etcd's revision); a write to anything but `metadata`/`status` bumps
  `generation`; clients cannot overwrite those fields;
- a status subresource for `rayclusters` (KubeRay's CRD declares one): a patch of the object
  ignores `.status`, a patch of `/status` changes only `.status`;
- `labelSelector` on list and watch (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`,
  `k notin (a,b)`), `fieldSelector` on `metadata.name` / `metadata.namespace`;
- `watch=True` (what the Python client sends) is a watch (kmock only knows `watch=true`);
  `timeoutSeconds` ends a watch; `resourceVersion` on a watch skips older replayed objects;
- errors are Kubernetes `Status` objects with the real reasons (`NotFound`, `AlreadyExists`,
  `Unauthorized`, ...); a request without the bearer token is 401.
- a 429 carries `Retry-After: 1`, as API Priority and Fairness sends it. Measured: urllib3
  under the kubernetes client then retries a GET/list by itself (3 times, 1 s apart), so a
  `fail("list", 429, times=1)` never reaches the caller; a standing one does after ~3 s.
- `fail()` injects API errors (403 RBAC, 422 Invalid, 429, 5xx) for the raygate user only:
  the KubeRay stand-in authenticates with a token of its own, as the operator's service
  account would, and is never hit by them.

Limits that remain (the tests must not rely on the real behaviour here):
- no PUT/replace (405), no JSON patch or strategic merge patch on custom resources (415);
  merge patch only, RFC 7386 style (lists replaced whole, null deletes a key);
- no `resourceVersion` preconditions or conflicts (409 on a stale update never happens), no
  `Expired`/410 on a too-old watch, no bookmarks, no paging (`limit`/`continue` ignored);
- no history: a watch from a `resourceVersion` sends what changes after it starts, not the
  changes made between that version and its start (objects still there are not re-sent);
- no admission, no schema validation of objects (a RayCluster with any spec is stored), no
  defaulting, no RBAC beyond the one token check, no garbage collection of owned objects;
  deletion is immediate unless `metadata.finalizers` is set (kmock handles those);
- resources must be declared here to be listed (others 404): `ray.io/v1` `rayclusters`,
  core `v1` `pods`, `services`, `events.k8s.io/v1` `events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import json
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal import dicts, enums, rendering

RAYCLUSTERS = "ray.io/v1/rayclusters"
RESOURCES: dict[str, dict[str, Any]] = {
    RAYCLUSTERS: {
        "kind": "RayCluster",
        "singular": "raycluster",
        "namespaced": True,
        "subresources": {"status"},
    },
    "v1/pods": {"kind": "Pod", "singular": "pod", "namespaced": True, "subresources": {"status"}},
    "v1/services": {"kind": "Service", "singular": "service", "namespaced": True},
    "events.k8s.io/v1/events": {"kind": "Event", "singular": "event", "namespaced": True},
}
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
_ACTION_VERBS = {
    enums.action.LIST: "list",
    enums.action.WATCH: "watch",
    enums.action.FETCH: "get",
    enums.action.CREATE: "create",
    enums.action.UPDATE: "patch",
    enums.action.DELETE: "delete",
}
_GROUP_KINDS = {"": "", "ray.io": ".ray.io", "events.k8s.io": ".events.k8s.io"}


def status_object(
    code: int, message: str, reason: str | None = None, **details: Any
) -> dict[str, Any]:
    """A Kubernetes `Status` (kind Status, apiVersion v1), as the API server sends on errors."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or REASONS.get(code, "Unknown"),
        "details": details,
        "code": code,
    }


def _status_response(
    code: int, message: str, reason: str | None = None, **details: Any
) -> aiohttp.web.Response:
    headers = {"Retry-After": "1"} if code == 429 else None
    return aiohttp.web.json_response(
        status_object(code, message, reason, **details), status=code, headers=headers
    )


@dataclass
class Fault:
    """The next `times` requests (None: all) of `verb` on `resource` from raygate fail."""

    verb: str
    status: int
    message: str
    reason: str
    resource: str
    times: int | None
    served: int = 0
    # The Status's `details` (default: the object's name and kind). `{}` is what the API
    # server sends when the resource type itself is unknown (a 404 for a missing CRD).
    details: dict[str, Any] | None = None


# ---- selectors ---------------------------------------------------------------------------
_SELECTOR_TERM = re.compile(r"\s*([^,()]+?\s+(?:in|notin)\s+\([^)]*\)|[^,]+)\s*(?:,|$)")


def parse_label_selector(text: str) -> list[tuple[str, str, set[str]]]:
    """`a=b,c!=d,e,!f,g in (x,y)` -> [(key, op, values)] with op in =, !=, exists, !exists,
    in, notin. ValueError on what the API server would reject as a bad selector."""
    terms: list[tuple[str, str, set[str]]] = []
    for match in _SELECTOR_TERM.finditer(text):
        term = match.group(1).strip()
        if not term:
            continue
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", term):
            values = {v.strip() for v in m.group(3).split(",") if v.strip()}
            terms.append((m.group(1), m.group(2), values))
        elif m := re.fullmatch(r"([^!=\s]+)\s*(==|=|!=)\s*([^!=\s]*)", term):
            op = "!=" if m.group(2) == "!=" else "="
            terms.append((m.group(1), op, {m.group(3)}))
        elif m := re.fullmatch(r"!\s*([^!=\s]+)", term):
            terms.append((m.group(1), "!exists", set()))
        elif re.fullmatch(r"[^!=\s(),]+", term):
            terms.append((term, "exists", set()))
        else:
            raise ValueError(f"unable to parse requirement: {term!r}")
    return terms


def labels_match(labels: dict[str, str], terms: list[tuple[str, str, set[str]]]) -> bool:
    for key, op, values in terms:
        present = key in labels
        value = labels.get(key)
        ok = {
            "=": present and value in values,
            "!=": not present or value not in values,
            "exists": present,
            "!exists": not present,
            "in": present and value in values,
            "notin": not present or value not in values,
        }[op]
        if not ok:
            return False
    return True


def _field_filter(text: str) -> dict[str, str]:
    wanted: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = term.replace("==", "=").partition("=")
        if key not in ("metadata.name", "metadata.namespace"):
            raise ValueError(f"field selector {key!r} is not supported by the emulator")
        wanted[key.split(".", 1)[1]] = value
    return wanted


def _selected(
    obj: dict[str, Any], labels: list[tuple[str, str, set[str]]], fields: dict[str, str]
) -> bool:
    meta = obj.get("metadata") or {}
    if not labels_match(meta.get("labels") or {}, labels):
        return False
    return all(meta.get(k) == v for k, v in fields.items())


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- the emulator ------------------------------------------------------------------------
@attrs.define(kw_only=True)
class _Emulator(kmock.KubernetesEmulator):
    tokens: dict[str, str] = attrs.field(factory=dict)  # bearer token -> user name
    faults: list[Fault] = attrs.field(factory=list)
    faults_lock: threading.Lock = attrs.field(factory=threading.Lock)
    revision: int = 0
    write_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock)

    def _next_revision(self) -> str:
        self.revision += 1
        return str(self.revision)

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        user = (
            self.tokens.get(auth.removeprefix("Bearer ").strip())
            if auth.startswith("Bearer ")
            else None
        )
        if user is None:
            return _status_response(401, "Unauthorized")
        if request.resource is None:
            return await super()._handle(request)
        if request.method == enums.method.GET and request.params.get("watch") in (
            "True",
            "1",
            "true",
        ):
            # kmock matches its reactions against the recorded requests by identity.
            watch = attrs.evolve(request, action=enums.action.WATCH)
            self._requests[:] = [watch if r is request else r for r in self._requests]
            request = watch
        if request.method == enums.method.PUT:
            return _status_response(405, "PUT (replace) is not supported by the kmock emulator")
        if (fault := self._take_fault(request, user)) is not None:
            details = fault.details
            if details is None:
                details = {"name": request.name or "", "kind": fault.resource}
            return _status_response(fault.status, fault.message, fault.reason, **details)
        try:
            if request.action in (enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE):
                async with self.write_lock:
                    if (refusal := self._amend_write(request)) is not None:
                        return refusal
                    response = await super()._handle(request)
                    if request.action == enums.action.CREATE and response.status == 200:
                        response.set_status(201)
                    return response
            return await super()._handle(request)
        except kmock.KubernetesError as exc:
            raise self._real_error(exc, request) from exc

    def _take_fault(self, request: rendering.Request, user: str) -> Fault | None:
        if user != "raygate" or request.action is None or request.resource is None:
            return None
        verb = _ACTION_VERBS[request.action]
        with self.faults_lock:
            for fault in self.faults:
                resource_ok = fault.resource == request.resource.plural
                if (
                    fault.verb == verb
                    and resource_ok
                    and (fault.times is None or fault.served < fault.times)
                ):
                    fault.served += 1
                    return fault
        return None

    def _real_error(
        self, exc: kmock.KubernetesError, request: rendering.Request
    ) -> kmock.KubernetesError:
        """kmock's errors with the reasons and messages a real API server sends."""
        assert request.resource is not None
        what = f"{request.resource.plural}{_GROUP_KINDS.get(request.resource.group or '', '')}"
        name = request.name or ((request.data or {}).get("metadata") or {}).get("name") or ""
        details = {"name": name, "kind": request.resource.plural}
        if exc.status == 404:
            if isinstance(exc, kmock.KubernetesObjectNotFoundError):
                return kmock.KubernetesError(404, "NotFound", f'{what} "{name}" not found', details)
            return kmock.KubernetesError(
                404, "NotFound", "the server could not find the requested resource"
            )
        if exc.status == 409:
            return kmock.KubernetesError(
                409, "AlreadyExists", f'{what} "{name}" already exists', details
            )
        return exc

    def _amend_write(self, request: rendering.Request) -> aiohttp.web.Response | None:
        """Fill in, before kmock stores it, what a real API server owns in an object."""
        assert request.resource is not None
        key = (
            f"{request.resource.group}/{request.resource.version}/{request.resource.plural}".lstrip(
                "/"
            )
        )
        has_status = "status" in RESOURCES.get(key, {}).get("subresources", set())
        data = request.data
        if request.action == enums.action.CREATE:
            if not isinstance(data, dict):
                return _status_response(400, "the body of the request was not a JSON object")
            meta = data.setdefault("metadata", {})
            meta.update(
                uid=str(uuid.uuid4()),
                generation=1,
                resourceVersion=self._next_revision(),
                creationTimestamp=_now(),
            )
            if request.namespace:
                meta["namespace"] = request.namespace
            for field in ("deletionTimestamp", "deletionGracePeriodSeconds"):
                meta.pop(field, None)
            return None
        existing = self._existing(request)
        if existing is None:
            return None  # kmock answers the 404
        if request.action == enums.action.DELETE:
            existing.patch({"metadata": {"resourceVersion": self._next_revision()}})
            return None
        content_type = request.headers.get("Content-Type", "")
        if "json-patch" in content_type or "strategic-merge-patch" in content_type:
            return _status_response(
                415, f"the emulator supports only merge patch, not {content_type}"
            )
        if not isinstance(data, dict):
            return _status_response(400, "the body of the request was not a JSON object")
        if request.subresource == "status":
            for field in list(data):
                if field != "status":
                    del data[field]
        elif request.subresource is not None:
            return _status_response(404, f"subresource {request.subresource} is not emulated")
        elif has_status:
            data.pop("status", None)
        old = copy.deepcopy(existing.raw)
        meta = data.setdefault("metadata", {}) if isinstance(data.get("metadata"), dict) else {}
        data["metadata"] = meta
        for field in (
            "uid",
            "generation",
            "resourceVersion",
            "creationTimestamp",
            "namespace",
            "name",
        ):
            meta.pop(field, None)
        new = dicts.patch_dict(copy.deepcopy(old), data)
        body = {k: v for k, v in new.items() if k not in ("metadata", "status")}
        if body != {k: v for k, v in old.items() if k not in ("metadata", "status")}:
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        meta["resourceVersion"] = self._next_revision()
        return None

    def _existing(self, request: rendering.Request) -> kmock.Object | None:
        if request.resource is None or request.name is None:
            return None
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        obj: kmock.Object = self.objects[key]
        return obj

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        try:
            labels = parse_label_selector(request.params.get("labelSelector", ""))
            fields = _field_filter(request.params.get("fieldSelector", ""))
        except ValueError as exc:
            raise kmock.KubernetesError(400, "BadRequest", str(exc)) from exc
        payload = await super()._serve_list(request)
        assert isinstance(payload, dict) and request.resource is not None
        info = RESOURCES.get(
            f"{request.resource.group}/{request.resource.version}/{request.resource.plural}".lstrip(
                "/"
            )
        )
        return {
            "apiVersion": f"{request.resource.group}/{request.resource.version}".lstrip("/"),
            "kind": f"{info['kind']}List" if info else "List",
            "metadata": {"resourceVersion": str(self.revision)},
            "items": [obj for obj in payload["items"] if _selected(obj, labels, fields)],
        }

    async def _serve_watch(self, request: rendering.Request) -> Any:  # an async iterator
        labels = parse_label_selector(request.params.get("labelSelector", ""))
        fields = _field_filter(request.params.get("fieldSelector", ""))
        since = int(request.params.get("resourceVersion") or 0)
        timeout = float(request.params.get("timeoutSeconds") or 0) or None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        events = super()._serve_watch(request)
        try:
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return
                try:
                    event = await asyncio.wait_for(anext(events), remaining)
                except (TimeoutError, StopAsyncIteration):
                    return
                if not isinstance(event, dict):
                    yield event
                    continue
                obj = event.get("object") or {}
                rv = int((obj.get("metadata") or {}).get("resourceVersion") or 0)
                if rv > since and _selected(obj, labels, fields):
                    yield event
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


# ---- the server in its own thread --------------------------------------------------------
class KubeApi:
    """The emulated API server, on 127.0.0.1:<free port>, in a background thread with its own
    event loop (sync tests and a `raygate up` subprocess both reach it over HTTP).

    `kubeconfig` is a file for `kubernetes.config.load_kube_config(config_file=...)` and for
    `raygate up --kubeconfig`: user `raygate` with a bearer token, a context whose namespace is
    `namespace`. `operator_token` is the stand-in operator's own credential."""

    def __init__(self, directory: Path, namespace: str = "raygate") -> None:
        self.namespace = namespace
        self.token = "raygate-" + uuid.uuid4().hex
        self.operator_token = "kuberay-" + uuid.uuid4().hex
        self.kubeconfig = directory / "kubeconfig"
        self._emulator = _Emulator(
            tokens={self.token: "raygate", self.operator_token: "kuberay-operator"}
        )
        for key, info in RESOURCES.items():
            self._emulator.resources[key] = kmock.ResourceInfo(verbs=VERBS, **info)
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kube-api", daemon=True)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False

    def start(self) -> KubeApi:
        self._write_kubeconfig()
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the emulated API server did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        # aiohttp's low-level server, not kmock.Server: that one patches aiohttp's resolver
        # process-wide, which other aiohttp users in this process do not need.
        async with self._emulator:
            runner = aiohttp.web.ServerRunner(
                aiohttp.web.Server(self._emulator), handle_signals=False, shutdown_timeout=0.5
            )
            await runner.setup()
            site = aiohttp.web.SockSite(runner, self._sock)
            await site.start()
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await runner.cleanup()

    def close(self) -> None:
        """Stop the server (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive() and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        self._sock.close()

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulated", "cluster": {"server": self.url}}],
            "users": [{"name": "raygate", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "emulated",
                    "context": {
                        "cluster": "emulated",
                        "user": "raygate",
                        "namespace": self.namespace,
                    },
                }
            ],
            "current-context": "emulated",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))
        self.kubeconfig.chmod(0o600)

    # ---- fault injection (thread-safe) ----------------------------------------------------
    def fail(
        self,
        verb: str,
        status: int,
        message: str,
        times: int | None = None,
        reason: str | None = None,
        resource: str = "rayclusters",
        details: dict[str, Any] | None = None,
    ) -> Fault:
        """The next `times` (None: every) raygate request of `verb` (create, get, list, watch,
        patch, delete) on `resource` answers a `Status` with HTTP `status`."""
        if verb not in _ACTION_VERBS.values():
            raise ValueError(f"unknown verb {verb!r}")
        fault = Fault(
            verb,
            status,
            message,
            reason or REASONS.get(status, "Unknown"),
            resource,
            times,
            details=details,
        )
        with self._emulator.faults_lock:
            self._emulator.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._emulator.faults_lock:
            self._emulator.faults.clear()

    # ---- direct access for assertions (bypasses the API, no faults) -----------------------
    def stored(
        self, name: str, namespace: str | None = None, resource: str = RAYCLUSTERS
    ) -> dict[str, Any] | None:
        """The stored object, or None when absent/deleted."""

        async def read() -> dict[str, Any] | None:
            async with self._emulator._lock:
                key = (kmock.resource(resource), namespace or self.namespace, name)
                if key not in self._emulator.objects or self._emulator.objects[key].deleted:
                    return None
                raw: dict[str, Any] = json.loads(json.dumps(self._emulator.objects[key].raw))
                return raw

        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(10)

    def requests(self) -> list[tuple[str, str, str]]:
        """(HTTP method, path with query, user agent) of every request served so far."""
        return [
            (str(r.method.value), str(r.url.path_qs), r.headers.get("User-Agent", ""))
            for r in list(self._emulator)  # a kmock handler iterates over its requests
        ]


@contextlib.contextmanager
def kube_api(directory: Path, namespace: str = "raygate") -> Iterator[KubeApi]:
    api = KubeApi(directory, namespace).start()
    try:
        yield api
    finally:
        api.close()
