"""The service spec a user pushes: a cluster spec, a Ray Serve config, upgrade settings.

The Serve section is validated by Ray's own `ServeDeploySchema`. Ray's models accept unknown
keys silently, so `_unknown_keys` walks the same models and rejects any key they do not
declare: a typo such as `num_replica` must never fall back to a default.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import pydantic
from pydantic import BaseModel, ConfigDict, Field

from gateway.routes import route_prefix_problem

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$"
# Sections of a Serve config whose contents are free-form for Ray itself.
_FREE_FORM = frozenset({"runtime_env", "args", "user_config", "autoscaling_policy"})


class SpecError(ValueError):
    """An invalid spec: one (field path, message) pair per problem."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{path}: {msg}" for path, msg in problems))

    def as_json(self) -> list[dict[str, str]]:
        return [{"field": path, "message": msg} for path, msg in self.problems]


class _Strict(BaseModel):
    """The models a stored revision is loaded with too. Checks added later go to
    `parse_spec` (push time only), never here: a stored revision that a newer raygate would
    refuse must still load, or the upgraded raygate could not start."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ClusterSpec(_Strict):
    """Anything here changes the Ray cluster itself, so a change means a new cluster.

    The first five fields are the local provider's; `kuberay` is the KubeRay provider's: a
    RayCluster `spec` (rayVersion, headGroupSpec, workerGroupSpecs, ...) passed through to
    KubeRay. The two sets are mutually exclusive (`parse_spec`)."""

    num_cpus: int = Field(2, ge=1, le=256)
    object_store_memory_mb: int = Field(200, ge=75)
    env: dict[str, str] = Field(default_factory=dict)
    code_dir: str | None = None
    python: str | None = None
    kuberay: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        """What the cluster hash is taken over. `kuberay` only when set: a revision stored
        before the field existed must keep its hash, or an upgrade of raygate would roll
        every service out onto a new cluster."""
        dumped = self.model_dump(mode="json")
        if dumped.get("kuberay") is None:
            dumped.pop("kuberay", None)
        return dumped


LOCAL_FIELDS = ("num_cpus", "object_store_memory_mb", "env", "code_dir", "python")


class Probe(_Strict):
    """A smoke request sent straight to a pending cluster's Serve proxy."""

    path: str = Field(pattern=r"^/")
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = "GET"
    json_body: Any = Field(None, alias="json")
    headers: dict[str, str] = Field(default_factory=dict)
    expect_status: int = Field(200, ge=100, le=599)
    expect_body_contains: str | None = None
    timeout_s: float = Field(10.0, gt=0)


class HealthSpec(_Strict):
    timeout_s: float = Field(300.0, gt=0)
    consecutive_successes: int = Field(3, ge=1, le=100)
    probes: tuple[Probe, ...] = ()


class PauseSpec(_Strict):
    """A canary step that holds the weight: for `duration_s`, or (no duration) until
    `raygate promote`."""

    duration_s: float | None = Field(None, gt=0, le=7 * 86400)


class CanaryStep(_Strict):
    """One step: exactly one of `weight` (percent of new requests to the new cluster, at
    once) or `pause`."""

    weight: int | None = Field(None, ge=1, le=100)
    pause: PauseSpec | None = None


class AnalysisSpec(_Strict):
    """How the canary (and the bake window) is judged, from the gateway's own counters over
    the last `interval_s`, against the stable cluster in the same window."""

    interval_s: float = Field(10.0, ge=1, le=3600)
    min_requests: int = Field(50, ge=1)
    max_error_rate: float = Field(0.01, ge=0, le=1)  # 5xx and gateway errors / answers
    max_p99_latency_ms: float | None = Field(None, gt=0)
    max_error_rate_over_stable: float | None = Field(None, ge=0, le=1)
    failure_limit: int = Field(2, ge=1, le=100)  # failed intervals in a row that abort
    inconclusive_limit: int = Field(6, ge=1, le=1000)  # intervals without data: pause


class CanarySpec(_Strict):
    steps: tuple[CanaryStep, ...] = Field(min_length=1, max_length=100)
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    scale_with_traffic: bool = False  # Serve target_capacity follows the weights


class UpgradeSpec(_Strict):
    health: HealthSpec = Field(default_factory=HealthSpec)
    drain_timeout_s: float = Field(30.0, ge=0)
    deletion_delay_s: float = Field(0.0, ge=0)
    strategy: Literal["bluegreen", "canary"] = "bluegreen"
    canary: CanarySpec | None = None
    # After a new cluster took all traffic: keep the old one this long (weight 0) and put
    # traffic back on it at once if analysis fails meanwhile.
    bake_s: float = Field(0.0, ge=0, le=7 * 86400)

    @property
    def analysis(self) -> AnalysisSpec:
        """What judges the canary and the bake window: the canary's, else the defaults."""
        return self.canary.analysis if self.canary is not None else AnalysisSpec()

    def identity(self) -> dict[str, Any]:
        """As `ClusterSpec.identity`: fields added since revisions were first stored count
        only when set, so a stored revision keeps its hash across an upgrade of raygate."""
        dumped = self.model_dump(mode="json", by_alias=True)
        for key, default in (("strategy", "bluegreen"), ("canary", None), ("bake_s", 0.0)):
            if dumped.get(key) == default:
                dumped.pop(key, None)
        return dumped


class LivenessSpec(_Strict):
    """When a cluster that still exists counts as dead. A Ray dashboard is one Python process
    that stalls under load or GC while Serve keeps serving, so an unanswered dashboard alone
    never condemns a cluster: only one that has not answered for `dead_after_s` while its
    Serve proxy does not answer either is replaced (gated, then switched)."""

    dead_after_s: float = Field(300.0, ge=10, le=86400)


class GatewaySpec(_Strict):
    """How the gateway treats this service's routes; a change here needs no new cluster."""

    timeout_s: float = Field(60.0, gt=0, le=3600)  # upstream too slow: 504


ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


class Webhook(_Strict):
    """A URL that gets this service's rollout events (rollout/notify.py). The secret is
    never in the spec (the spec is stored and shown): `secret_env` names an environment
    variable of the raygate process that holds it."""

    url: str = Field(max_length=2048)
    secret_env: str | None = Field(None, pattern=ENV_NAME_PATTERN)


class NotificationsSpec(_Strict):
    webhooks: tuple[Webhook, ...] = Field(default=(), max_length=10)


class ServiceSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    serve: dict[str, Any]
    upgrade: UpgradeSpec = Field(default_factory=UpgradeSpec)
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)
    liveness: LivenessSpec = Field(default_factory=LivenessSpec)
    # Who hears of this service's rollouts; never part of what a cluster runs.
    notifications: NotificationsSpec | None = None

    def app_routes(self) -> dict[str, str]:
        """app name -> route prefix, for apps reachable over HTTP."""
        out: dict[str, str] = {}
        for app in self.serve.get("applications", []):
            prefix = app.get("route_prefix", "/")
            if prefix is not None:
                out[app["name"]] = prefix
        return out

    def cluster_hash(self) -> str:
        return _digest(self.cluster.identity())

    def serve_hash(self) -> str:
        return _digest(self.serve)

    def spec_hash(self) -> str:
        dumped = self.model_dump(mode="json", by_alias=True)
        dumped["cluster"] = self.cluster.identity()  # the same rule as cluster_hash
        dumped["upgrade"] = self.upgrade.identity()
        if not (dumped.get("notifications") or {}).get("webhooks"):  # unset or empty:
            dumped.pop("notifications", None)  # revisions stored before it keep their hashes
        return _digest(dumped)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_defaults=False)


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PathPolicy:
    """How `cluster.code_dir` is resolved: CLI pushes are relative to the spec file."""

    base_dir: Path | None = None  # None: paths must already be absolute (admin API)


def parse_spec(raw: Any, paths: PathPolicy | None = None) -> ServiceSpec:
    """Validate a raw spec (parsed YAML/JSON). Raises SpecError naming every bad field."""
    if not isinstance(raw, dict):
        raise SpecError([("", "a spec must be a mapping with name, cluster, serve, upgrade")])
    try:
        spec = ServiceSpec.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise SpecError(_pydantic_problems(exc)) from None

    problems: list[tuple[str, str]] = []
    _check_finite(spec.model_dump(mode="python", exclude={"serve"}), "", problems)
    _check_probes(spec.upgrade.health.probes, problems)
    _check_kuberay(spec.cluster, problems)
    _check_upgrade(spec.upgrade, problems)
    if spec.notifications is not None:
        for i, hook in enumerate(spec.notifications.webhooks):
            why = webhook_url_problem(hook.url)
            if why is not None:
                problems.append((f"notifications.webhooks.{i}.url", why))
            if hook.secret_env is not None and not hook.secret_env.startswith(OUR_ENV_PREFIX):
                # Ray clusters and HAProxy inherit raygate's environment but for its own
                # variables: any other name would hand the secret to every cluster's code.
                problems.append((f"notifications.webhooks.{i}.secret_env", f"must start "
                                 f"with {OUR_ENV_PREFIX} (raygate keeps those out of the "
                                 "environment of Ray clusters and HAProxy)"))  # fmt: skip
    serve = _validate_serve(spec.serve, problems)
    cluster = _resolve_cluster(spec.cluster, paths or PathPolicy(), problems)
    if problems:
        raise SpecError(problems)
    return spec.model_copy(update={"serve": serve, "cluster": cluster})


def _check_finite(value: Any, path: str, problems: list[tuple[str, str]]) -> None:
    """No inf/nan anywhere: an infinite health timeout would leave a pending cluster
    waiting forever."""
    if isinstance(value, dict):
        for key, inner in value.items():
            _check_finite(inner, f"{path}.{key}" if path else str(key), problems)
    elif isinstance(value, list | tuple):
        for i, inner in enumerate(value):
            _check_finite(inner, f"{path}.{i}", problems)
    elif isinstance(value, float) and not math.isfinite(value):
        problems.append((path, "must be a finite number"))


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 5.1)
_PROBE_PATH = re.compile(r"/[\x21-\x7e]*")  # visible ASCII: no space, no newline
MAX_PROBE_TIMEOUT_S = 600.0


def _check_probes(probes: tuple[Probe, ...], problems: list[tuple[str, str]]) -> None:
    """What could only fail when the health gate sends a probe fails at push."""
    for i, probe in enumerate(probes):
        at = f"upgrade.health.probes.{i}"
        if not _PROBE_PATH.fullmatch(probe.path):
            problems.append((f"{at}.path", "must be visible ASCII: no space, no newline"))
        if probe.timeout_s > MAX_PROBE_TIMEOUT_S:
            problems.append((f"{at}.timeout_s", f"at most {MAX_PROBE_TIMEOUT_S:g}"))
        for name, value in probe.headers.items():
            if not _TOKEN.fullmatch(name):
                problems.append((f"{at}.headers", f"header name {name!r} is not an HTTP token"))
            elif any(c in value for c in "\r\n\0") or not value.isascii():
                problems.append(
                    (f"{at}.headers", f"header {name!r}: value must be ASCII without CR, LF, NUL")
                )


def webhook_url_problem(url: str) -> str | None:
    """Why `url` cannot receive webhooks (None: it can): an absolute http(s) URL with a
    host, nothing that would make the one POST ambiguous. `raygate up --webhook` is checked
    with the same rule."""
    if any(c.isspace() for c in url) or not url.isprintable():
        return "must not contain spaces or control characters"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        return f"not a URL: {exc}"
    if parsed.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parsed.host:
        return "must name a host"
    if parsed.fragment:
        return "must not have a #fragment"
    return None


def _check_upgrade(upgrade: UpgradeSpec, problems: list[tuple[str, str]]) -> None:
    if upgrade.strategy == "canary" and upgrade.canary is None:
        problems.append(("upgrade.canary", "required with strategy canary: the steps to walk"))
    if upgrade.strategy != "canary" and upgrade.canary is not None:
        problems.append(("upgrade.strategy", "set it to canary to use upgrade.canary"))
    judged = upgrade.analysis
    # failure_limit failed intervals, and one more for the ticks' drift and the first one
    need = (judged.failure_limit + 1) * judged.interval_s
    if 0 < upgrade.bake_s < need:
        why = f"shorter than (failure_limit + 1) x interval_s ({need:g}s)"
        problems.append(("upgrade.bake_s", f"{why}: a failing revision could not be rolled back"))
    if upgrade.canary is None:
        return
    for i, step in enumerate(upgrade.canary.steps):
        if (step.weight is None) == (step.pause is None):
            problems.append((f"upgrade.canary.steps[{i}]", "exactly one of weight or pause"))
    if not any(step.weight is not None for step in upgrade.canary.steps):
        problems.append(("upgrade.canary.steps", "at least one weight step: a canary that "
                         "never takes traffic cannot be judged"))  # fmt: skip


def _check_kuberay(cluster: ClusterSpec, problems: list[tuple[str, str]]) -> None:
    """The RayCluster spec is KubeRay's to validate in full; what KubeRay or raygate needs
    before anything is created is checked here, so it fails at push, naming the field:
    a head group whose first container (the Ray container, by KubeRay's convention) has an
    image, and container ports raygate can read."""
    if cluster.kuberay is None:
        return
    for field in LOCAL_FIELDS:
        if field in cluster.model_fields_set and getattr(cluster, field) != (
            ClusterSpec.model_fields[field].get_default(call_default_factory=True)
        ):
            problems.append((f"cluster.{field}", "a local-provider field: with cluster.kuberay "
                             "the RayCluster spec describes the cluster"))  # fmt: skip
    at = "cluster.kuberay"
    for key in ("metadata", "apiVersion", "kind", "status"):
        if key in cluster.kuberay:
            problems.append((f"{at}.{key}", "cluster.kuberay is a RayCluster's `spec` only; "
                             "raygate names and labels the object"))  # fmt: skip
    head = cluster.kuberay.get("headGroupSpec")
    if not isinstance(head, dict):
        problems.append((f"{at}.headGroupSpec", "required: a mapping with the head pod template"))
        return
    params = head.get("rayStartParams", {})
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        problems.append((f"{at}.headGroupSpec.rayStartParams", "a mapping of strings"))
    containers = _dig(head, "template", "spec", "containers")
    where = f"{at}.headGroupSpec.template.spec.containers"
    if not isinstance(containers, list) or not containers:
        problems.append((where, "required: at least the Ray container (containers[0])"))
        return
    for i, container in enumerate(containers):
        if not isinstance(container, dict):
            problems.append((f"{where}[{i}]", "a container must be a mapping"))
            continue
        if i == 0 and not (isinstance(container.get("image"), str) and container["image"]):
            problems.append((f"{where}[0].image", "required: the Ray image"))
        ports = container.get("ports", [])
        if not isinstance(ports, list) or not all(
            isinstance(p, dict) and isinstance(p.get("containerPort"), int) for p in ports
        ):
            problems.append((f"{where}[{i}].ports", "a list of {name, containerPort: int}"))
    if "authOptions" in cluster.kuberay:
        problems.append((f"{at}.authOptions", "raygate cannot yet authenticate to a Ray "
                         "dashboard that requires a token"))  # fmt: skip
    _check_head_ports(head, containers[0], f"{where}[0].ports", problems)
    _check_group_resources(head, f"{at}.headGroupSpec", problems)
    workers = cluster.kuberay.get("workerGroupSpecs", [])
    if not isinstance(workers, list):
        problems.append((f"{at}.workerGroupSpecs", "a list of worker groups"))
        return
    for i, group in enumerate(workers):
        _check_worker_group(group, f"{at}.workerGroupSpecs[{i}]", problems)


# The ports raygate dials on the head container (by name) and KubeRay's numbers for them.
HEAD_PORTS = {"dashboard": 8265, "serve": 8000}


def head_ports(ray: dict[str, Any]) -> dict[str, int]:
    """The head container's dashboard and serve ports: as the user listed them by name, the
    dashboard's from `rayStartParams["dashboard-port"]` when set there, else KubeRay's
    defaults. These are the numbers raygate lists when missing, dials at the head Service's
    IP, and has Serve bind."""
    head = _dig(ray, "headGroupSpec") or {}
    containers = _dig(head, "template", "spec", "containers")
    container = containers[0] if isinstance(containers, list) and containers else {}
    ports = dict(HEAD_PORTS)
    param = _dashboard_param(head)
    if param is not None and str(param).isdigit():
        ports["dashboard"] = int(param)
    for port in _listed_ports(container):
        if port.get("name") in HEAD_PORTS and isinstance(port.get("containerPort"), int):
            ports[port["name"]] = port["containerPort"]
    return ports


def _dashboard_param(head: Any) -> Any:
    params = _dig(head, "rayStartParams")
    return params.get("dashboard-port") if isinstance(params, dict) else None


def _listed_ports(container: Any) -> list[dict[str, Any]]:
    listed = container.get("ports") if isinstance(container, dict) else None
    return [p for p in listed if isinstance(p, dict)] if isinstance(listed, list) else []


def _check_head_ports(
    head: dict[str, Any], container: Any, at: str, problems: list[tuple[str, str]]
) -> None:
    """raygate lists `dashboard` and `serve` when missing: not over a number the user listed
    under another name (the head Service would hold it twice, which the API server
    refuses), and the dashboard where `rayStartParams` puts it."""
    listed = {p.get("name"): p.get("containerPort") for p in _listed_ports(container)}
    wanted = head_ports({"headGroupSpec": head})
    param = _dashboard_param(head)
    if "dashboard" in listed and isinstance(param, str) and param.isdigit():
        if listed["dashboard"] != int(param):
            problems.append((at, f"the port named dashboard ({listed['dashboard']}) is not "
                             f"rayStartParams dashboard-port ({param})"))  # fmt: skip
    for name, number in wanted.items():
        if name in listed:
            continue
        other = next((n for n, v in listed.items() if v == number), None)
        if other is not None:
            problems.append((at, f"port {number} is listed as {other!r}: name it {name!r} "
                             f"(raygate reaches the {name} port by that name)"))  # fmt: skip


def _check_group_resources(group: dict[str, Any], at: str, problems: list[tuple[str, str]]
                           ) -> None:  # fmt: skip
    """KubeRay refuses a group that sets resources both in rayStartParams and `resources`,
    or rayStartParams["labels"] (ValidateRayClusterSpec)."""
    params = group.get("rayStartParams") or {}
    if not isinstance(params, dict):
        return
    both = [k for k in ("num-cpus", "num-gpus", "memory", "resources") if params.get(k)]
    if both and group.get("resources"):
        problems.append((f"{at}.resources", f"KubeRay refuses resources set both here and in "
                         f"rayStartParams ({', '.join(both)}): use one"))  # fmt: skip
    if "labels" in params:
        problems.append((f"{at}.rayStartParams.labels", "KubeRay refuses it: use the group's "
                         "top-level labels field"))  # fmt: skip


def _check_worker_group(group: Any, at: str, problems: list[tuple[str, str]]) -> None:
    """What KubeRay v1.7's validation refuses of a worker group: it would answer the
    RayCluster with a Warning Event only, and the rollout would wait out its health timeout."""
    if not isinstance(group, dict):
        problems.append((at, "a worker group must be a mapping"))
        return
    if not isinstance(group.get("groupName"), str) or not group["groupName"]:
        problems.append((f"{at}.groupName", "required"))
    containers = _dig(group, "template", "spec", "containers")
    if not isinstance(containers, list) or not containers:
        problems.append((f"{at}.template.spec.containers", "required: at least one"))
    bounds = {k: group.get(k) for k in ("minReplicas", "maxReplicas", "replicas")}
    for key, value in bounds.items():
        if value is not None and (not isinstance(value, int) or value < 0):
            problems.append((f"{at}.{key}", "a whole number, at least 0"))
    low, high = bounds["minReplicas"], bounds["maxReplicas"]
    # Not refused when absent: the CRD defaults them (0 and 2147483647) before KubeRay
    # validates, so its "must set both" rule never meets a spec that omits them.
    if isinstance(low, int) and isinstance(high, int) and low > high:
        problems.append((f"{at}.minReplicas", f"greater than maxReplicas ({low} > {high})"))
    _check_group_resources(group, at, problems)


def _dig(value: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _pydantic_problems(exc: pydantic.ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        path = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        problems.append((path, msg))
    return problems


def _validate_serve(serve: dict[str, Any], problems: list[tuple[str, str]]) -> dict[str, Any]:
    from ray.serve.schema import ServeDeploySchema  # heavy import, done on first use

    before = len(problems)
    problems.extend(_unknown_keys(ServeDeploySchema, serve, "serve"))
    http = serve.get("http_options")
    if isinstance(http, dict):
        for key in ("host", "port"):
            if key in http:
                problems.append(
                    (f"serve.http_options.{key}", "set by raygate: each cluster gets its own")
                )
    apps = serve.get("applications")
    if not apps:
        problems.append(("serve.applications", "at least one application is required"))
    for i, app in enumerate(apps if isinstance(apps, list) else []):
        prefix = app.get("route_prefix") if isinstance(app, dict) else None
        # The gateway's rule, stricter than Serve's: the prefix is written into haproxy.cfg.
        problem = route_prefix_problem(prefix) if isinstance(prefix, str) else None
        if problem is not None:
            problems.append((f"serve.applications[{i}].route_prefix", problem))
    if len(problems) > before:
        return serve
    try:
        schema = ServeDeploySchema.model_validate(serve)
    except pydantic.ValidationError as exc:
        problems.extend(_pydantic_problems(exc, "serve"))
        return serve
    dumped: dict[str, Any] = schema.model_dump(mode="json", exclude_unset=True)
    return dumped


def _unknown_keys(model: type[BaseModel], value: Any, path: str) -> list[tuple[str, str]]:
    """Keys in `value` that `model` (recursively) does not declare."""
    if not isinstance(value, dict):
        return []
    fields = model.model_fields
    known = {name for name in fields} | {f.alias for f in fields.values() if f.alias}
    problems = [(f"{path}.{k}", "unknown field") for k in value if k not in known]
    for name, info in fields.items():
        key = info.alias if info.alias and info.alias in value else name
        if key not in value or name in _FREE_FORM:
            continue
        sub = value[key]
        for inner in _models_in(info.annotation):
            if isinstance(sub, list):
                for i, item in enumerate(sub):
                    problems.extend(_unknown_keys(inner, item, f"{path}.{key}[{i}]"))
            elif isinstance(sub, dict) and not _is_mapping_of_models(info.annotation):
                problems.extend(_unknown_keys(inner, sub, f"{path}.{key}"))
            break
    return problems


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple, typing.Annotated):
        found: list[type[BaseModel]] = []
        for arg in typing.get_args(annotation):
            found.extend(_models_in(arg))
        return found
    return []


def _is_mapping_of_models(annotation: Any) -> bool:
    return typing.get_origin(annotation) is dict


# `cluster.env` names a cluster's processes may not take from a spec, and why.
OUR_ENV_PREFIX = "RAYGATE_"  # the owner/cluster markers that find a cluster's PIDs, the token
RESERVED_ENV = {
    "RAY_ADDRESS": "raygate starts each cluster as its own head; Ray would join another",
    "RAY_USAGE_STATS_ENABLED": "set by raygate (0)",
}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Linux refuses to exec with one "NAME=value" longer than this (MAX_ARG_STRLEN, with its NUL).
_MAX_ENV_ENTRY = 128 * 1024


def _check_env(env: dict[str, str], problems: list[tuple[str, str]]) -> None:
    """What `ray start` would only fail on later (or do silently wrong) is named now."""
    for key, value in env.items():
        path = f"cluster.env.{key}"
        if not _ENV_NAME.fullmatch(key):
            problems.append((path, "not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)"))
        elif key.startswith(OUR_ENV_PREFIX):
            problems.append((path, f"{OUR_ENV_PREFIX}* variables are raygate's own"))
        elif key in RESERVED_ENV:
            problems.append((path, RESERVED_ENV[key]))
        elif "\0" in value:
            problems.append((path, "a NUL character cannot be passed in the environment"))
        elif not _is_text(value):
            problems.append((path, "a lone UTF-16 surrogate is not text"))
        elif len(key) + 2 + len(value.encode()) > _MAX_ENV_ENTRY:
            problems.append((path, f"longer than {_MAX_ENV_ENTRY} bytes: exec would refuse it"))


def _is_text(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _resolve_cluster(
    cluster: ClusterSpec, paths: PathPolicy, problems: list[tuple[str, str]]
) -> ClusterSpec:
    _check_env(cluster.env, problems)
    for field in ("code_dir", "python"):
        value = getattr(cluster, field)
        if value is not None and "\0" in value:
            problems.append((f"cluster.{field}", "a path cannot hold a NUL character"))
            return cluster
    updates: dict[str, str] = {}
    if cluster.code_dir is not None and os.pathsep in cluster.code_dir:
        problems.append(
            ("cluster.code_dir", f"goes on PYTHONPATH, so it cannot hold {os.pathsep!r}")
        )
        return cluster
    if cluster.code_dir is not None:
        code_dir = Path(cluster.code_dir)
        if not code_dir.is_absolute():
            if paths.base_dir is None:
                problems.append(
                    ("cluster.code_dir", "must be an absolute path when pushed through the API")
                )
                return cluster
            code_dir = (paths.base_dir / code_dir).resolve()
        if not code_dir.is_dir():
            problems.append(("cluster.code_dir", f"{code_dir} is not a directory"))
        updates["code_dir"] = str(code_dir)
    if cluster.python is not None:
        python = Path(cluster.python)
        if not python.is_absolute() or not os.access(python, os.X_OK):
            problems.append(("cluster.python", f"{python} is not an absolute path to a program"))
    return cluster.model_copy(update=updates) if updates else cluster


def load_spec_file(path: Path) -> ServiceSpec:
    """Read a YAML or JSON spec file; relative paths in it are relative to the file."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError([("", f"{path} is not valid YAML: {exc}")]) from None
    return parse_spec(raw, PathPolicy(base_dir=path.parent.resolve()))
