"""KubeRay provider: each cluster is a `RayCluster` (ray.io/v1) that the KubeRay operator runs
on Kubernetes.

What KubeRay does (FACTS.md, from its v1.7 source) shapes this module:
- the head Service and `status.endpoints` carry only the ports the head container lists (or
  KubeRay's defaults when it lists none), so raygate lists `dashboard` and `serve` itself;
- the default head Service is headless, so `status.head.serviceIP` is the head pod's IP: the
  address raygate dials. Serve itself binds 0.0.0.0 (`ClusterInfo.bind_host`): one
  `http_options.host` holds for the proxy of every node, and each node is its own pod;
- ready is the `HeadPodReady` and `RayClusterProvisioned` conditions (older operators:
  `status.state == "ready"`), for the spec's current generation. The head pod's readiness
  probe checks the Ray agent, not the dashboard, so raygate still waits for the dashboard.

A RayCluster outlives raygate (`keeps_clusters`): stopping raygate never deletes one; a
restarted raygate re-adopts those its store knows and deletes those labelled as its own that
no record knows. The `kubernetes` client is blocking: every call runs in a worker thread.
Transient API errors (no connection, 429, 5xx) are retried; any other refusal (403 RBAC, 422
schema, 404 CRD missing, quota) is permanent and its message reaches the service's status.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx

from rollout.plan import Liveness
from rollout.providers.base import ClusterInfo, ProviderError
from rollout.spec import ClusterSpec, ServiceSpec

log = logging.getLogger("raygate.kuberay")

GROUP, VERSION, PLURAL, KIND = "ray.io", "v1", "rayclusters", "RayCluster"
MANAGED_BY = "app.kubernetes.io/managed-by"
SERVICE_LABEL = "raygate.io/service"
INSTANCE_LABEL = "raygate.io/instance"
# The ports raygate reaches a cluster on, by the names KubeRay gives them, and its defaults.
DEFAULT_PORTS = {"dashboard": 8265, "serve": 8000}
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_NAME = 53  # KubeRay: a RayCluster name is at most 53 characters (DNS-1035)

T = TypeVar("T")
IN_POD_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True)
class KubeRaySettings:
    namespace: str
    instance: str = "raygate"  # two raygates in one namespace must not take each other's
    start_timeout_s: float = 900.0  # pods are scheduled, images pulled
    poll_s: float = 1.0
    request_timeout_s: float = 10.0
    attempts: int = 5  # per API call, for transient errors
    backoff_s: float = 0.5
    replica_failure_s: float = 30.0  # KubeRay's ReplicaFailure this long fails the start


class KubeApiError(ProviderError):
    """The API server refused or could not be reached; `permanent` unless trying again can
    help (connection, 429, 5xx)."""

    def __init__(self, message: str, status: int | None, permanent: bool) -> None:
        super().__init__(message, permanent)
        self.status = status


def load_api_client(kubeconfig: str | None = None) -> Any:
    """The way kubectl finds its cluster: in-cluster config inside a pod, else `kubeconfig`,
    else $KUBECONFIG, else ~/.kube/config (the client's own default chain)."""
    from kubernetes import client, config

    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            pass
    configuration = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return client.ApiClient(configuration)


def default_namespace(kubeconfig: str | None = None) -> str:
    """As kubectl: the namespace of the current kubeconfig context, or in a pod (no
    `kubeconfig` given) its own; else `default`."""
    from kubernetes import config

    if kubeconfig is None:
        try:
            return IN_POD_NAMESPACE.read_text().strip() or "default"
        except OSError:
            pass
    try:
        _contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
    except (config.ConfigException, OSError):
        return "default"
    return str((active or {}).get("context", {}).get("namespace") or "default")


class KubeRayProvider:
    name = "kuberay"
    keeps_clusters = True  # clusters outlive raygate: a restart re-adopts them

    def __init__(self, api_client: Any, settings: KubeRaySettings) -> None:
        from kubernetes import client

        self.settings = settings
        self._api_client = api_client
        self._objects = client.CustomObjectsApi(api_client)
        self._http = httpx.AsyncClient(trust_env=False)

    async def close(self) -> None:
        await self._http.aclose()
        await asyncio.to_thread(self._api_client.close)

    # ---- push-time checks -----------------------------------------------------------
    def check(self, spec: ServiceSpec) -> list[tuple[str, str]]:
        """What this provider cannot run, named by field (the API answers 422)."""
        problems = []
        if spec.cluster.kuberay is None:
            problems.append(("cluster.kuberay", "required: this raygate runs the kuberay "
                             "provider, which takes a RayCluster spec"))  # fmt: skip
        if not spec.name[:1].isalpha():
            problems.append(("name", "must start with a letter under the kuberay provider: "
                             "a RayCluster name is a DNS-1035 label"))  # fmt: skip
        return problems

    # ---- allocate -------------------------------------------------------------------
    def allocate(
        self, cluster_id: str, service: str, spec: ClusterSpec, taken: Sequence[ClusterInfo]
    ) -> ClusterInfo:
        """Names the RayCluster; its address is known only once KubeRay reports it."""
        if len(cluster_id) > MAX_NAME:
            raise ProviderError(f"RayCluster name {cluster_id!r} is longer than {MAX_NAME}")
        return ClusterInfo(
            id=cluster_id,
            service=service,
            provider=self.name,
            dashboard_url="",
            serve_host="",
            serve_port=0,
            created_at=time.time(),
            data={"namespace": self.settings.namespace, "name": cluster_id},
        )

    def body(self, info: ClusterInfo, spec: ClusterSpec) -> dict[str, Any]:
        """The RayCluster raygate creates for `info`: the user's spec, with the head
        container listing the dashboard and serve ports (KubeRay exposes only those listed)."""
        assert spec.kuberay is not None  # check() refused the push otherwise
        ray_spec = copy.deepcopy(spec.kuberay)
        container = ray_spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        ports = container.setdefault("ports", [])
        names = {p.get("name") for p in ports}
        for name, number in DEFAULT_PORTS.items():
            if name not in names:
                ports.append({"name": name, "containerPort": number})
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {
                "name": info.data["name"],
                "namespace": info.data["namespace"],
                "labels": self._labels(info.service),
            },
            "spec": ray_spec,
        }

    def _labels(self, service: str) -> dict[str, str]:
        return {MANAGED_BY: "raygate", SERVICE_LABEL: service,
                INSTANCE_LABEL: self.settings.instance}  # fmt: skip

    def _ours(self, obj: dict[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return bool(labels.get(MANAGED_BY) == "raygate"
                    and labels.get(INSTANCE_LABEL) == self.settings.instance)  # fmt: skip

    # ---- start ----------------------------------------------------------------------
    async def start(self, info: ClusterInfo, spec: ClusterSpec) -> ClusterInfo:
        name, namespace = info.data["name"], info.data["namespace"]
        body = self.body(info, spec)
        try:
            await self._call("create", name, self._objects.create_namespaced_custom_object,
                             GROUP, VERSION, namespace, PLURAL, body)  # fmt: skip
        except KubeApiError as exc:
            if exc.status != 409:
                raise
            # Created by an earlier attempt that did not hear back: take it only if ours.
            existing = await self._get(name, namespace)
            labels = (existing or {}).get("metadata", {}).get("labels") or {}
            if (
                existing is None
                or not self._ours(existing)
                or (labels.get(SERVICE_LABEL) != info.service)
            ):
                raise ProviderError(f"a RayCluster named {name} exists in {namespace} and is "
                                    "not this raygate's") from None  # fmt: skip
        log.info("RayCluster %s/%s created; waiting for KubeRay", namespace, name)
        began = time.monotonic()
        deadline = began + self.settings.start_timeout_s
        why, said, failing_since = "not reported yet", "", None
        while True:
            obj = await self._get(name, namespace)
            if obj is None:
                raise ProviderError(f"RayCluster {name} was deleted while it started")
            failure = replica_failure(obj)
            if failure is None:
                failing_since = None
            elif failing_since is None:
                failing_since = time.monotonic()
            elif time.monotonic() - failing_since >= self.settings.replica_failure_s:
                # KubeRay cannot create the pods (quota, an admission webhook, ...): that
                # rarely heals by itself, and the status must say why.
                raise ProviderError(f"KubeRay cannot create the pods of RayCluster {name}: "
                                    f"{failure}")  # fmt: skip
            ready, why = readiness(obj)
            if ready:
                started = replace(info, **address(obj), data={**info.data, **identity(obj)})
                if await self._api_up(started):
                    return started
                why = "head pod ready; the dashboard does not answer yet"
            if why != said:  # what it waits for, once each time it changes
                log.info("RayCluster %s (%.0fs): %s", name, time.monotonic() - began, why)
                said = why
            if time.monotonic() > deadline:
                raise ProviderError(
                    f"RayCluster {name} not ready within {self.settings.start_timeout_s:g}s: {why}",
                    permanent=False,
                )
            await asyncio.sleep(self.settings.poll_s)

    async def _api_up(self, info: ClusterInfo) -> bool:
        try:
            resp = await self._http.get(info.dashboard_url + "/api/serve/applications/", timeout=2)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    # ---- observe --------------------------------------------------------------------
    async def liveness(self, info: ClusterInfo) -> Liveness:
        """DEAD only when the cluster raygate deployed is gone: the object is deleted (or
        replaced by another of the same name), its head pod was replaced (a new Ray cluster,
        without the Serve apps), or its start never finished (no address was recorded; the
        planner then starts a fresh one). A head pod that is not ready, or a dashboard that
        does not answer, is UNREACHABLE: whether that lasts too long is the planner's call,
        with the same window as any cluster."""
        if not info.serve_host:
            return Liveness.DEAD
        try:
            obj = await self._get(info.data["name"], info.data["namespace"])
        except KubeApiError as exc:  # the API server cannot say: ask the cluster itself
            log.warning("cannot read RayCluster %s: %s", info.id, exc)
            obj = {}
        if obj is None:
            return Liveness.DEAD
        if obj:
            if obj.get("metadata", {}).get("deletionTimestamp"):
                return Liveness.DEAD
            seen, recorded = identity(obj), info.data
            for key in ("uid", "head_pod"):
                if recorded.get(key) and seen.get(key) and recorded[key] != seen[key]:
                    log.warning("RayCluster %s: %s changed from %s to %s: its Ray cluster is new",
                                info.id, key, recorded[key], seen[key])  # fmt: skip
                    return Liveness.DEAD
            if not readiness(obj)[0]:
                return Liveness.UNREACHABLE
        try:
            resp = await self._http.get(info.dashboard_url + "/api/version", timeout=2)
            if resp.status_code == 200:
                return Liveness.UP
        except httpx.HTTPError:
            pass
        return Liveness.UNREACHABLE

    # ---- delete ---------------------------------------------------------------------
    async def delete(self, info: ClusterInfo) -> None:
        """Deletes the RayCluster (background propagation: KubeRay's pods and Services go
        with it). Idempotent: an object already gone is success."""
        await self._delete(info.data["name"], info.data["namespace"])

    async def _delete(self, name: str, namespace: str) -> None:
        from kubernetes import client

        options = client.V1DeleteOptions(propagation_policy="Background")
        try:
            await self._call("delete", name, self._objects.delete_namespaced_custom_object,
                             GROUP, VERSION, namespace, PLURAL, name, body=options)  # fmt: skip
        except KubeApiError as exc:
            if exc.status != 404:
                raise
        log.info("RayCluster %s/%s deleted", namespace, name)

    async def orphans(self, known: Sequence[ClusterInfo]) -> list[str]:
        """RayClusters labelled as this raygate's, in its namespace, that no record knows."""
        ids = {i.id for i in known}
        selector = f"{MANAGED_BY}=raygate,{INSTANCE_LABEL}={self.settings.instance}"
        listed = await self._call(
            "list", "", self._objects.list_namespaced_custom_object,
            GROUP, VERSION, self.settings.namespace, PLURAL, label_selector=selector,
        )  # fmt: skip
        strays = []
        for obj in listed.get("items", []):
            meta = obj.get("metadata", {})
            # Filtered here too: the selector is a request, not a promise of every server.
            if not self._ours(obj) or meta.get("name") in ids or meta.get("deletionTimestamp"):
                continue
            log.warning("deleting orphan RayCluster %s", meta["name"])
            await self._delete(meta["name"], self.settings.namespace)
            strays.append(str(meta["name"]))
        return sorted(strays)

    # ---- the API --------------------------------------------------------------------
    async def _get(self, name: str, namespace: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = await self._call(
                "get", name, self._objects.get_namespaced_custom_object,
                GROUP, VERSION, namespace, PLURAL, name,
            )  # fmt: skip
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    async def _call(self, verb: str, name: str, fn: Callable[..., T], *args: Any,
                    **kwargs: Any) -> T:  # fmt: skip
        """One API call in a worker thread; transient failures are retried with backoff."""
        kwargs.setdefault("_request_timeout", self.settings.request_timeout_s)
        for attempt in range(1, self.settings.attempts + 1):
            try:
                return await asyncio.to_thread(fn, *args, **kwargs)
            except Exception as exc:
                error = api_error(exc, verb, f"RayCluster {name}" if name else "RayClusters",
                                  self.settings.namespace)  # fmt: skip
                if error.permanent or attempt == self.settings.attempts:
                    raise error from None
                delay = self.settings.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random())
                log.warning("%s; retrying in %.1fs", error, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")


def api_error(exc: Exception, verb: str, what: str, namespace: str) -> KubeApiError:
    """A clear message from whatever the client raised: the API server's own `Status`
    message when it sent one (it names the user, verb and resource on a 403)."""
    import json

    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        detail = exc.reason or ""
        try:
            body = json.loads(exc.body or "")
            if isinstance(body, dict) and body.get("message"):
                detail = f"{body.get('reason') or exc.reason}: {body['message']}"
        except ValueError:
            pass
        hint = ""
        if status == 404 and verb in ("create", "list"):
            hint = " (is the KubeRay operator installed? its RayCluster CRD is missing)"
        message = (f"Kubernetes API refused to {verb} {what} in namespace {namespace}: "
                   f"{status} {detail}{hint}")  # fmt: skip
        return KubeApiError(message, status, permanent=status not in TRANSIENT_STATUS)
    # No answer at all (urllib3: connection refused, timeout, DNS): worth another try.
    return KubeApiError(f"Kubernetes API unreachable ({verb} {what}): {exc!r}", None, False)


def readiness(obj: dict[str, Any]) -> tuple[bool, str]:
    """(ready, why not) from a RayCluster's status, by KubeRay's rules."""
    meta, status = obj.get("metadata", {}), obj.get("status") or {}
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if generation is not None and observed is not None and observed != generation:
        return False, f"KubeRay has not seen generation {generation} yet (at {observed})"
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    if "HeadPodReady" in conditions or "RayClusterProvisioned" in conditions:
        for kind in ("HeadPodReady", "RayClusterProvisioned"):
            cond = conditions.get(kind, {})
            if cond.get("status") != "True":
                why = cond.get("message") or cond.get("reason") or "not reported"
                return False, f"{kind} is not True: {why}"
        return True, ""
    state = status.get("state")
    if state == "ready":
        return True, ""
    reason = status.get("reason")
    return False, f"state {state or 'not reported'}" + (f": {reason}" if reason else "")


def replica_failure(obj: dict[str, Any]) -> str | None:
    """Why KubeRay could not create the cluster's pods, if it says so: the `ReplicaFailure`
    condition, or `status.reason` where an older operator writes only that."""
    status = obj.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return str(cond.get("message") or cond.get("reason") or "ReplicaFailure")
    if status.get("state") == "failed" and status.get("reason"):
        return str(status["reason"])
    return None


def address(obj: dict[str, Any]) -> dict[str, Any]:
    """The ClusterInfo fields for where raygate reaches a ready RayCluster: the head
    Service's IP and the ports KubeRay published; Serve binds every interface of the pod."""
    status = obj.get("status") or {}
    head = status.get("head") or {}
    host = head.get("serviceIP") or head.get("podIP")
    if not host:
        raise ProviderError(f"RayCluster {obj['metadata']['name']} is ready but reports no "
                            "head address (status.head.serviceIP)", permanent=False)  # fmt: skip
    endpoints = status.get("endpoints") or {}
    ports = {name: int(endpoints.get(name, default)) for name, default in DEFAULT_PORTS.items()}
    return {
        "dashboard_url": f"http://{_host(host)}:{ports['dashboard']}",
        "serve_host": host,
        "serve_port": ports["serve"],
        "bind_host": "0.0.0.0",
    }


def identity(obj: dict[str, Any]) -> dict[str, str]:
    """What tells this Ray cluster from a later one under the same name: the object's uid
    and the head pod's name (KubeRay recreates a failed head pod under a new name)."""
    meta, head = obj.get("metadata", {}), (obj.get("status") or {}).get("head") or {}
    found = {"uid": meta.get("uid"), "head_pod": head.get("podName")}
    return {k: str(v) for k, v in found.items() if v}


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host  # an IPv6 pod IP in a URL
