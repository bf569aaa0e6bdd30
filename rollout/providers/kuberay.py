"""KubeRay provider: each cluster is a `RayCluster` (ray.io/v1) that the KubeRay operator runs
on Kubernetes.

What KubeRay does (FACTS.md, from its v1.7 source) shapes this module:
- the head Service carries only the ports the head container lists (KubeRay's five defaults
  when it lists none), so raygate lists `dashboard` and `serve`, and all five defaults when
  the user listed no port at all (workers join at the head Service's gcs-server port);
- the default head Service is headless, so `status.head.serviceIP` is the head pod's IP,
  which changes when the pod is replaced: the address is read again on every observation.
  raygate dials it at the head container's own port numbers (for a ClusterIP Service they are
  its ports; `status.endpoints` holds node ports for a NodePort/LoadBalancer Service). Serve
  itself binds 0.0.0.0 (`ClusterInfo.bind_host`): one `http_options.host` holds for the
  proxy of every node, and each node is its own pod;
- ready is the `HeadPodReady` and `RayClusterProvisioned` conditions (older operators:
  `status.state == "ready"`), for the spec's current generation. The head pod's readiness
  probe checks the Ray agent, not the dashboard, so raygate still waits for the dashboard.
- an invalid spec gets a Warning Event and nothing else: what KubeRay refuses is refused at
  push (`rollout.spec._check_kuberay`).

`start` only creates the object: KubeRay may take minutes (scheduling, image pulls), and the
service's loop keeps observing and planning meanwhile (`observe` says STARTING, and why).
A RayCluster outlives raygate (`keeps_clusters`): stopping raygate never deletes one; a
restarted raygate re-adopts those its store knows and deletes those labelled with its own
instance id that no record knows. The `kubernetes` client is blocking: every call runs in a
worker thread, with urllib3's own retries off (raygate's are the only ones, so a call's time
is bounded). Transient API errors (no connection, 429, 5xx) are retried; any other refusal
(403 RBAC, 422 schema, 404 CRD missing, quota) is permanent and its message reaches the
service's status.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx

from rollout.plan import Liveness
from rollout.providers.base import ClusterInfo, ProviderError, Seen, url_host
from rollout.serve_client import dashboard_answers
from rollout.spec import ClusterSpec, ServiceSpec, head_ports

log = logging.getLogger("raygate.kuberay")

GROUP, VERSION, PLURAL, KIND = "ray.io", "v1", "rayclusters", "RayCluster"
MANAGED_BY = "app.kubernetes.io/managed-by"
SERVICE_LABEL = "raygate.io/service"
INSTANCE_LABEL = "raygate.io/instance"
# What KubeRay's head Service carries when the head container lists no port.
KUBERAY_DEFAULT_PORTS = {"client": 10001, "gcs-server": 6379, "dashboard": 8265,
                         "metrics": 8080, "serve": 8000}  # fmt: skip
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_NAME = 53  # KubeRay: a RayCluster name is at most 53 characters (DNS-1035)

T = TypeVar("T")
IN_POD_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True)
class KubeRaySettings:
    namespace: str
    instance: str  # the label value that tells this raygate's RayClusters from another's
    request_timeout_s: float = 10.0
    attempts: int = 5  # per API call of a start or delete, for transient errors
    backoff_s: float = 0.5
    replica_failure_s: float = 30.0  # KubeRay's ReplicaFailure this long fails the start


class KubeApiError(ProviderError):
    """The API server refused or could not be reached; `permanent` unless trying again can
    help (connection, 429, 5xx). `details` is the `Status` object's, when it sent one."""

    def __init__(self, message: str, status: int | None, permanent: bool,
                 details: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__(message, permanent)
        self.status = status
        self.details = details

    def names(self, name: str) -> bool:
        """Whether the error is about the object `name` (a 404 for it means it is gone),
        not about the whole resource type: a 404 for a missing CRD carries empty
        `details`. A server that sends no details at all is taken at its word."""
        return self.details is None or self.details.get("name") == name


def load_api_client(kubeconfig: str | None = None) -> Any:
    """The way kubectl finds its cluster: in-cluster config inside a pod, else `kubeconfig`,
    else $KUBECONFIG, else ~/.kube/config (the client's own default chain)."""
    from kubernetes import client, config

    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return client.ApiClient(_no_hidden_retries(client.Configuration.get_default_copy()))
        except config.ConfigException:
            pass
    configuration = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return client.ApiClient(_no_hidden_retries(configuration))


def _no_hidden_retries(configuration: Any) -> Any:
    """urllib3 retries a failed request 3 times by default, under raygate's own retries: a
    hung API server would cost 4x every call's timeout."""
    configuration.retries = False
    return configuration


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
        self._failing: dict[str, float] = {}  # cluster -> since when ReplicaFailure is True

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
        if spec.kuberay is None:  # a revision pushed to a raygate on the local provider
            raise ProviderError("the kuberay provider needs a RayCluster spec in "
                                "cluster.kuberay; push one")  # fmt: skip
        return ClusterInfo(
            id=cluster_id,
            service=service,
            provider=self.name,
            dashboard_url="",
            serve_host="",
            serve_port=0,
            created_at=time.time(),
            data={
                "namespace": self.settings.namespace,
                "name": cluster_id,
                "ports": head_ports(spec.kuberay),
            },
        )

    def body(self, info: ClusterInfo, spec: ClusterSpec) -> dict[str, Any]:
        """The RayCluster raygate creates for `info`: the user's spec, with the head
        container listing the ports raygate dials (KubeRay exposes only those listed)."""
        assert spec.kuberay is not None  # allocate() refused it otherwise
        ray_spec = copy.deepcopy(spec.kuberay)
        container = ray_spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        ports = container.setdefault("ports", [])
        wanted = {**(KUBERAY_DEFAULT_PORTS if not ports else {}), **info.data["ports"]}
        names = {p.get("name") for p in ports}
        for name, number in wanted.items():
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
        """Creates the RayCluster and returns: KubeRay brings it up meanwhile, and
        `observe` says STARTING (and why) until it is."""
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
        log.info("RayCluster %s/%s created; KubeRay brings it up", namespace, name)
        return info

    # ---- observe --------------------------------------------------------------------
    async def observe(self, info: ClusterInfo) -> Seen:
        """What KubeRay says of the cluster, and where it is now.

        DEAD only when the cluster raygate made is gone: the object is deleted, being
        deleted, or replaced by another of the same name (a new uid). A head pod that is not
        ready, or a dashboard that does not answer, is UNREACHABLE once the cluster was up
        (whether that lasts too long is the planner's call, with the same window as any
        cluster), STARTING before. A head pod replaced by KubeRay comes back at a new
        address, which the returned record carries (with GCS fault tolerance the same Ray
        cluster; without, an empty one that the planner deploys to again)."""
        was_up = bool(info.serve_host)
        try:
            obj = await self._get(info.data["name"], info.data["namespace"], attempts=2)
        except KubeApiError as exc:  # the API server cannot say: ask the cluster itself
            log.warning("cannot read RayCluster %s: %s", info.id, exc)
            if not was_up:
                return Seen(Liveness.STARTING, info, f"cannot read the RayCluster: {exc}")
            return Seen(await self._dashboard(info), info, f"cannot read the RayCluster: {exc}")
        if obj is None:
            return Seen(Liveness.DEAD, info, "the RayCluster is gone")
        meta = obj.get("metadata", {})
        if meta.get("deletionTimestamp"):
            return Seen(Liveness.DEAD, info, "the RayCluster is being deleted")
        seen = identity(obj)
        if info.data.get("uid") and seen.get("uid") and info.data["uid"] != seen["uid"]:
            log.warning("RayCluster %s was replaced by another of the same name", info.id)
            return Seen(Liveness.DEAD, info, "the RayCluster was replaced by another")
        error = self._replica_failure(info.id, obj)
        ready, why = readiness(obj)
        waiting = Liveness.UNREACHABLE if was_up else Liveness.STARTING
        if not ready:
            return Seen(waiting, info, why, error)
        try:
            found = replace(info, **address(obj, info.data["ports"]),
                            data={**info.data, **seen})  # fmt: skip
        except ProviderError as exc:
            return Seen(waiting, info, str(exc), error)
        if found.serve_host != info.serve_host and was_up:
            log.warning("RayCluster %s: its head moved from %s to %s (a new head pod)",
                        info.id, info.serve_host, found.serve_host)  # fmt: skip
        liveness = await self._dashboard(found)
        if liveness is Liveness.UP:
            return Seen(Liveness.UP, found, "", error)
        return Seen(waiting, found if was_up else info, "the dashboard does not answer yet",
                    error)  # fmt: skip

    async def _dashboard(self, info: ClusterInfo) -> Liveness:
        up = await dashboard_answers(self._http, info.dashboard_url)
        return Liveness.UP if up else Liveness.UNREACHABLE

    def _replica_failure(self, cluster: str, obj: dict[str, Any]) -> str | None:
        """KubeRay's ReplicaFailure held for `replica_failure_s`: it cannot create the pods
        (a quota, an admission webhook), which rarely heals by itself."""
        failure = replica_failure(obj)
        if failure is None:
            self._failing.pop(cluster, None)
            return None
        since = self._failing.setdefault(cluster, time.monotonic())
        if time.monotonic() - since < self.settings.replica_failure_s:
            return None
        return f"KubeRay cannot create the pods of RayCluster {cluster}: {failure}"

    # ---- delete ---------------------------------------------------------------------
    async def delete(self, info: ClusterInfo) -> None:
        """Deletes the RayCluster (background propagation: KubeRay's pods and Services go
        with it). Idempotent: an object already gone is success."""
        await self._delete(info.data["name"], info.data["namespace"])
        self._failing.pop(info.id, None)

    async def _delete(self, name: str, namespace: str) -> None:
        from kubernetes import client

        options = client.V1DeleteOptions(propagation_policy="Background")
        try:
            await self._call("delete", name, self._objects.delete_namespaced_custom_object,
                             GROUP, VERSION, namespace, PLURAL, name, body=options)  # fmt: skip
        except KubeApiError as exc:
            if exc.status != 404 or not exc.names(name):
                raise
        log.info("RayCluster %s/%s deleted", namespace, name)

    async def orphans(self, known: Sequence[ClusterInfo]) -> list[str]:
        """RayClusters labelled with this raygate's instance id, in its namespace, that no
        record knows. Called before any cluster is created (recovery), so a record of a
        cluster being made cannot be missed."""
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
    async def _get(self, name: str, namespace: str, attempts: int | None = None
                   ) -> dict[str, Any] | None:  # fmt: skip
        try:
            obj: dict[str, Any] = await self._call(
                "get", name, self._objects.get_namespaced_custom_object,
                GROUP, VERSION, namespace, PLURAL, name, attempts=attempts,
            )  # fmt: skip
        except KubeApiError as exc:
            if exc.status == 404 and exc.names(name):
                return None  # the object is gone (not: the resource type is unknown)
            raise
        return obj

    async def _call(self, verb: str, name: str, fn: Callable[..., T], *args: Any,
                    attempts: int | None = None, **kwargs: Any) -> T:  # fmt: skip
        """One API call in a worker thread; transient failures are retried with backoff."""
        kwargs.setdefault("_request_timeout", self.settings.request_timeout_s)
        tries = attempts or self.settings.attempts
        for attempt in range(1, tries + 1):
            call = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
            try:
                return await asyncio.shield(call)
            except asyncio.CancelledError:
                # The request is on the wire and its thread goes on: hear its answer (its
                # timeout bounds the wait), so a delete that follows finds what it created.
                await asyncio.wait({call})
                if not call.cancelled():
                    call.exception()  # retrieved: the caller is gone
                raise
            except Exception as exc:
                error = api_error(exc, verb, f"RayCluster {name}" if name else "RayClusters",
                                  self.settings.namespace)  # fmt: skip
                if error.permanent or attempt == tries:
                    raise error from None
                delay = self.settings.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random())
                log.warning("%s; retrying in %.1fs", error, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")


def api_error(exc: Exception, verb: str, what: str, namespace: str) -> KubeApiError:
    """A clear message from whatever the client raised: the API server's own `Status`
    message when it sent one (it names the user, verb and resource on a 403)."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        detail = exc.reason or ""
        details: dict[str, Any] | None = None
        try:
            body = json.loads(exc.body or "")
        except ValueError:
            body = None
        if isinstance(body, dict):
            if body.get("message"):
                detail = f"{body.get('reason') or exc.reason}: {body['message']}"
            if isinstance(body.get("details"), dict):
                details = body["details"]
        hint = ""
        if status == 404 and verb in ("create", "list"):
            hint = " (is the KubeRay operator installed? its RayCluster CRD is missing)"
        message = (f"Kubernetes API refused to {verb} {what} in namespace {namespace}: "
                   f"{status} {detail}{hint}")  # fmt: skip
        return KubeApiError(message, status, status not in TRANSIENT_STATUS, details)
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


def address(obj: dict[str, Any], ports: dict[str, int]) -> dict[str, Any]:
    """The ClusterInfo fields for where raygate reaches a ready RayCluster: the head
    Service's IP (the pod IP for KubeRay's default headless Service) at the head container's
    ports; Serve binds every interface of the pod."""
    status = obj.get("status") or {}
    head = status.get("head") or {}
    host = head.get("serviceIP") or head.get("podIP")
    if not host:
        raise ProviderError(f"RayCluster {obj['metadata']['name']} is ready but reports no "
                            "head address (status.head.serviceIP)", permanent=False)  # fmt: skip
    return {
        "dashboard_url": f"http://{url_host(host)}:{ports['dashboard']}",
        "serve_host": host,
        "serve_port": int(ports["serve"]),
        "bind_host": "0.0.0.0",
    }


def identity(obj: dict[str, Any]) -> dict[str, str]:
    """What tells this Ray cluster from a later one under the same name: the object's uid
    and the head pod's name (KubeRay recreates a failed head pod under a new name)."""
    meta, head = obj.get("metadata", {}), (obj.get("status") or {}).get("head") or {}
    found = {"uid": meta.get("uid"), "head_pod": head.get("podName")}
    return {k: str(v) for k, v in found.items() if v}
