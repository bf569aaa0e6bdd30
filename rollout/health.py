"""Health gates for a cluster: Serve's own status, the Serve proxy, then the user's probes.

A check never blocks the loop for long: every request has a short timeout, and the result is
a report (NOT_DEPLOYED / PENDING / OK / FAILED) that the planner counts over ticks.
`evaluate_status` is pure, so the gate logic is tested without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from rollout.plan import Health
from rollout.serve_client import ServeApiError, ServeClient
from rollout.spec import Probe, ServiceSpec

TERMINAL_APP = frozenset({"DEPLOY_FAILED"})
TERMINAL_DEPLOYMENT = frozenset({"DEPLOY_FAILED"})


SCALING_DEPLOYMENT = frozenset({"UPSCALING", "DOWNSCALING"})  # Serve: app still RUNNING


@dataclass(frozen=True)
class Report:
    health: Health
    message: str = ""
    # PENDING only because deployments scale (autoscaling, a replica being replaced) while
    # every app RUNS with a replica up and every proxy routes: the gate waits, but the
    # cluster serves (the health metrics, deploy/monitoring/, count it healthy).
    serving: bool = False


def is_subset(expected: Any, actual: Any) -> bool:
    """True if `actual` holds everything `expected` says (Ray may add defaults)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return False
        return all(k in actual and is_subset(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(expected) != len(actual):
            return False
        return all(is_subset(e, a) for e, a in zip(expected, actual, strict=True))
    return bool(expected == actual)


def evaluate_status(
    status: dict[str, Any], serve_config: dict[str, Any], capacity: int | None = None
) -> Report:
    """Gate on Serve's REST status: every expected app RUNNING with its config, every
    deployment HEALTHY at its target replica count, every proxy HEALTHY. `capacity` is the
    Serve target_capacity raygate last sent (scale_with_traffic; None: the config's own): a
    cluster at another one has not taken that deploy (it failed, or raygate restarted
    before sending it), and is NOT_DEPLOYED, so it is sent again."""
    apps: dict[str, Any] = status.get("applications") or {}
    expected = {a["name"]: a for a in serve_config.get("applications", [])}
    for name, want in expected.items():
        app = apps.get(name)
        if app is None:
            return Report(Health.NOT_DEPLOYED, f"application {name!r} is not deployed")
        if not is_subset(want, app.get("deployed_app_config") or {}):
            return Report(Health.NOT_DEPLOYED, f"application {name!r} runs another config")
    want_capacity = _percent(
        capacity if capacity is not None else serve_config.get("target_capacity")
    )
    running = _percent(status.get("target_capacity"))
    if expected and running != want_capacity:
        return Report(Health.NOT_DEPLOYED,
                      f"runs at target_capacity {running:g}%, not {want_capacity:g}%")  # fmt: skip
    failures = []
    for name in expected:
        app = apps[name]
        if app.get("status") in TERMINAL_APP:
            failures.append(f"application {name!r} {app['status']}: {app.get('message', '')}")
        for dname, dep in (app.get("deployments") or {}).items():
            if dep.get("status") in TERMINAL_DEPLOYMENT:
                failures.append(
                    f"deployment {name}/{dname} {dep['status']}: {dep.get('message', '')}"
                )
    if failures:
        return Report(Health.FAILED, "\n".join(failures))
    for extra in sorted(set(apps) - set(expected)):
        return Report(Health.PENDING, f"application {extra!r} is still being removed")
    scaling = ""  # the first deployment that only scales: PENDING, but serving
    for name in expected:
        app = apps[name]
        if app.get("status") != "RUNNING":
            return Report(Health.PENDING, f"application {name!r} is {app.get('status')}")
        deployments = app.get("deployments") or {}
        if not deployments:
            return Report(Health.PENDING, f"application {name!r} reports no deployments yet")
        for dname, dep in deployments.items():
            status_ = dep.get("status")
            running = sum(1 for r in dep.get("replicas") or [] if r.get("state") == "RUNNING")
            if status_ != "HEALTHY" and (status_ not in SCALING_DEPLOYMENT or running == 0):
                return Report(Health.PENDING, f"deployment {name}/{dname} is {status_}")
            target = dep.get("target_num_replicas")
            short = target is not None and running != target
            if status_ != "HEALTHY" or short:
                if running == 0:
                    return Report(Health.PENDING, f"deployment {name}/{dname} has 0/{target} "
                                  "replicas")  # fmt: skip
                scaling = scaling or (f"deployment {name}/{dname} is {status_}" if not short
                                      else f"deployment {name}/{dname} has {running}/{target} "
                                      "replicas")  # fmt: skip
    proxies = status.get("proxies") or {}
    if not proxies:
        return Report(Health.PENDING, "no Serve proxy reported yet")
    for node, proxy in proxies.items():
        state = proxy.get("status") if isinstance(proxy, dict) else proxy
        if state != "HEALTHY":
            return Report(Health.PENDING, f"Serve proxy on node {node[:12]} is {state}")
    if scaling:
        return Report(Health.PENDING, scaling, serving=True)
    return Report(Health.OK, "all applications RUNNING, deployments HEALTHY")


def _percent(value: Any) -> float:
    """Serve's target_capacity: unset means all of it."""
    return 100.0 if value is None else float(value)


class HealthChecker:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self._http = client
        self._serve = ServeClient(client)

    async def check(
        self,
        dashboard_url: str,
        serve_url: str,
        spec: ServiceSpec,
        probes: bool,
        capacity: int | None = None,
    ) -> Report:
        try:
            status = await self._serve.status(dashboard_url)
        except ServeApiError as exc:
            return Report(Health.PENDING, str(exc))
        report = evaluate_status(status, spec.serve, capacity)
        if report.serving:  # scaling: serving only if its proxy routes the apps too
            proxy = await self._proxy(serve_url, set(spec.app_routes().values()))
            return report if proxy.health is Health.OK else proxy
        if report.health is not Health.OK:
            return report
        report = await self._proxy(serve_url, set(spec.app_routes().values()))
        if report.health is not Health.OK or not probes:
            return report
        for probe in spec.upgrade.health.probes:
            report = await self._probe(serve_url, probe)
            if report.health is not Health.OK:
                return report
        return Report(Health.OK, "every gate passed this check")

    async def proxy_alive(self, serve_url: str) -> bool:
        """Does the Serve proxy answer its health check? Asked of a cluster whose dashboard
        does not answer: the proxy and replicas may well keep serving meanwhile."""
        try:
            resp = await self._http.get(serve_url + "/-/healthz", timeout=2.0)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def _proxy(self, serve_url: str, prefixes: set[str]) -> Report:
        try:
            healthz = await self._http.get(serve_url + "/-/healthz", timeout=3.0)
            routes = await self._http.get(serve_url + "/-/routes", timeout=3.0)
        except httpx.HTTPError as exc:
            return Report(Health.PENDING, f"Serve proxy at {serve_url} unreachable: {exc!r}")
        if healthz.status_code != 200:
            return Report(Health.PENDING, f"Serve proxy /-/healthz answered {healthz.status_code}")
        try:
            listed = set(routes.json())
        except ValueError:
            return Report(Health.PENDING, "Serve proxy /-/routes did not answer JSON")
        missing = sorted(prefixes - listed)
        if missing:
            return Report(Health.PENDING, f"Serve proxy does not route {', '.join(missing)} yet")
        return Report(Health.OK)

    async def _probe(self, serve_url: str, probe: Probe) -> Report:
        name = f"probe {probe.method} {probe.path}"
        try:
            resp = await self._http.request(
                probe.method,
                serve_url + probe.path,
                json=probe.json_body,
                headers=probe.headers,
                timeout=probe.timeout_s,
            )
        except httpx.HTTPError as exc:
            return Report(Health.PENDING, f"{name} failed: {exc!r}")
        body = resp.text
        if resp.status_code != probe.expect_status:
            return Report(
                Health.PENDING,
                f"{name} answered {resp.status_code}, expected {probe.expect_status}: {body[:500]}",
            )
        if probe.expect_body_contains is not None and probe.expect_body_contains not in body:
            return Report(
                Health.PENDING, f"{name} body lacks {probe.expect_body_contains!r}: {body[:500]}"
            )
        return Report(Health.OK)
