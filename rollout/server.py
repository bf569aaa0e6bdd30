"""`raygate up`: the composition root. Wires store, provider, gateway, controller and the two
HTTP servers (data plane, admin API) into one asyncio process, and shuts them down in order:
gateway stops taking requests and drains, controller stops, every cluster is stopped by PID.

With `on_exit="keep"` the shutdown stops raygate's own process only: clusters and a data
plane that can outlive raygate (HAProxy) keep serving, and the next `raygate up` on the same
state dir adopts them. `raygate down` (run_down) tears down what such a raygate left.
It drives the engine through the `DataPlane` lifecycle only: which engine it holds is
`make_engine`'s business alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from gateway.dataplane import ASGIApp, DataPlane
from gateway.haproxy_config import HAProxySettings
from gateway.haproxy_engine import HAProxyEngine
from gateway.limits import Limits
from gateway.metrics import Metrics
from gateway.python_engine import GatewaySettings, PythonGateway
from gateway.routes import Backend, Route, RouteTable
from rollout.api import create_admin_app, create_metrics_app
from rollout.conflicts import startup_conflicts
from rollout.controller import Controller
from rollout.notify import Notifier, WebhookTarget
from rollout.providers.kuberay import (
    KubeRayProvider,
    KubeRaySettings,
    default_namespace,
    load_api_client,
)
from rollout.providers.local import LocalProvider, LocalSettings
from rollout.rates import RateHistory
from rollout.sessions import Sessions
from rollout.spec import ServiceSpec
from rollout.statedir import StateDirLock, make_private
from rollout.store import Store

log = logging.getLogger("raygate")


@dataclass(frozen=True)
class UpSettings:
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    admin_port: int = 8001
    drain_timeout_s: float = 30.0
    token: str | None = None  # RAYGATE_TOKEN, read by the CLI
    admin_host: str = "127.0.0.1"  # the token grants code execution: loopback unless asked
    engine: str = "haproxy"  # or "python"
    on_exit: str = "teardown"  # or "keep": leave clusters and HAProxy serving
    provider: str = "local"  # or "kuberay"
    namespace: str | None = None  # kuberay: where the RayClusters live
    kubeconfig: str | None = None  # kuberay: else in-cluster, $KUBECONFIG, ~/.kube/config
    instance: str | None = None  # kuberay: the label value that tells this raygate's
    # RayClusters from another's; default: an id made once per state dir
    webhooks: tuple[str, ...] = ()  # every service's rollout events go there too
    webhook_secret: str | None = field(default=None, repr=False)  # signs their bodies


PROVIDERS = ("local", "kuberay")
LABEL_VALUE = re.compile(r"(?=.{1,63}$)[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


def make_provider(settings: UpSettings, state_dir: Path) -> LocalProvider | KubeRayProvider:
    """The one place that knows the providers by name."""
    if settings.provider == "kuberay":
        instance = settings.instance or load_or_create_instance(state_dir)
        if not LABEL_VALUE.fullmatch(instance):
            raise ValueError(f"--instance {instance!r} is not a Kubernetes label value (at "
                             "most 63 of [A-Za-z0-9-_.], alphanumeric at both ends)")  # fmt: skip
        namespace = settings.namespace or default_namespace(settings.kubeconfig)
        api = load_api_client(settings.kubeconfig)
        return KubeRayProvider(api, KubeRaySettings(namespace, instance))
    return LocalProvider(LocalSettings(state_dir))


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `up` owns SIGINT/SIGTERM for all parts."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class SpecConflict(ValueError):
    """The specs given to `raygate up` cannot all be pushed; nothing was."""


MIN_TOKEN_CHARS = 24  # a generated token has 43


class WeakToken(ValueError):
    """The admin token is empty or too short to guard what it grants (code execution)."""


def load_or_create_instance(state_dir: Path) -> str:
    """This state dir's instance id, made on first use. It labels the RayClusters this
    raygate creates, and only those are its orphans to delete: a second raygate in the same
    namespace (another state dir) never takes the first one's clusters. A state dir that is
    lost leaves its RayClusters running for `kubectl delete` rather than deleting anyone's."""
    path = state_dir / "instance"
    if path.exists():
        return path.read_text().strip()
    instance = f"rg-{secrets.token_hex(6)}"
    _write_whole(path, instance)
    return instance


def load_or_create_token(state_dir: Path) -> tuple[str, Path]:
    path = state_dir / "token"
    if path.exists():
        token = path.read_text().strip()
        if len(token) < MIN_TOKEN_CHARS:  # e.g. a write that failed (disk full) left it empty
            raise WeakToken(
                f"the token in {path} has {len(token)} characters, fewer than "
                f"{MIN_TOKEN_CHARS}: delete the file to have a new one made"
            )
        return token, path
    state_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    _write_whole(path, token)
    return token, path


def _write_whole(path: Path, text: str) -> None:
    """`text` (a line) into a new private file at `path`, written whole, then named: never an
    empty or partial file, whatever interrupts the write."""
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def data_plane_config(
    gateway: ASGIApp, host: str, port: int, drain_timeout_s: float = 30.0
) -> uvicorn.Config:
    """uvicorn as a proxy's front: the upstream's Server and Date headers pass through (no
    duplicates), and a client's own X-Forwarded-For never replaces its address."""
    return uvicorn.Config(
        gateway, host=host, port=port, lifespan="on", log_level="warning", access_log=False,
        timeout_graceful_shutdown=int(drain_timeout_s), server_header=False,
        date_header=False, proxy_headers=False,
    )  # fmt: skip


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket several gateway processes can share: the kernel spreads
    connections over them (SO_REUSEPORT)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


ENGINES = ("haproxy", "python")  # the names make_engine knows


def make_engine(
    name: str, metrics: Metrics, work_dir: Path, host: str, port: int, max_body_bytes: int,
    health_path: str | None, threads: int = 1,
) -> DataPlane:  # fmt: skip
    """The one place that knows the engines by name."""
    limits = Limits(max_body_bytes=max_body_bytes)
    if name == "haproxy":
        return HAProxyEngine(
            HAProxySettings(work_dir / "haproxy", host=host, port=port, threads=threads,
                            limits=limits, health_path=health_path),
            metrics,
        )  # fmt: skip
    return PythonGateway(GatewaySettings(limits=limits), metrics)


class StartFailed(RuntimeError):
    """A listener could not be opened (a port in use): nothing was served."""


async def _serve(server: uvicorn.Server, what: str, sockets: Any = None) -> None:
    """uvicorn exits the process (SystemExit) when it cannot bind: an error here instead."""
    try:
        await server.serve(sockets=sockets)
    except SystemExit as exc:
        raise StartFailed(
            f"the {what} could not start (exit {exc.code}): is its port in use?"
        ) from None


async def _until_started(
    servers: Sequence[uvicorn.Server], tasks: Sequence[asyncio.Task[None]], within_s: float = 30
) -> bool:
    """True once every server listens; False if one ended first (or took too long)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not all(s.started for s in servers):  # uvicorn has no event for it: poll
        if any(t.done() for t in tasks) or asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def serve_until_signal(
    gateway: DataPlane,
    admin: Any | None,
    host: str,
    port: int,
    admin_port: int,
    drain_timeout_s: float,
    data_socket: socket.socket | None = None,
    admin_host: str | None = None,
    keep: bool = False,
    on_serving: Callable[[], None] | None = None,
) -> int:
    """Serve the data plane (and the admin app, if any) until SIGINT/SIGTERM, then shut down
    in order: /-/ready turns 503 and the listeners close, in-flight requests and streams
    finish (bounded by `drain_timeout_s`). With `keep`, a data plane that can outlive
    raygate is released instead, still serving. Returns 0, or 1 if a server or the engine
    failed."""
    servers = []
    data_server = None
    app = gateway.app()
    if app is not None:
        data_server = _Server(data_plane_config(app, host, port, drain_timeout_s))
        servers.append(asyncio.create_task(
            _serve(data_server, "data plane", [data_socket] if data_socket else None),
            name="data",
        ))  # fmt: skip
    admin_server = None
    if admin is not None:
        admin_host = admin_host or host
        admin_server = _Server(
            uvicorn.Config(admin, host=admin_host, port=admin_port, log_level="warning",
                           access_log=False, timeout_graceful_shutdown=5)
        )  # fmt: skip
        servers.append(asyncio.create_task(_serve(admin_server, "admin API"), name="admin-api"))
        log.info(
            "gateway on http://%s:%d, admin on http://%s:%d", host, port, admin_host, admin_port
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    uvicorns = [s for s in (data_server, admin_server) if s is not None]
    if not await _until_started(uvicorns, servers):
        failed = [t for t in servers if t.done() and not t.cancelled() and t.exception()]
        reason = failed[0].exception() if failed else "timed out"
        for server in uvicorns:  # the ones that did start close again; the engine is left
            server.should_exit = True
        _done, pending = await asyncio.wait(servers, timeout=10)
        for task in pending:
            task.cancel()
        raise StartFailed(f"raygate could not start serving: {reason}")
    if on_serving is not None:
        on_serving()
    stopper = asyncio.create_task(stop.wait())
    watch = [*servers, stopper]
    engine_task = gateway.watch()
    if engine_task is not None:
        watch.append(engine_task)
    await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    engine_failed = engine_task is not None and engine_task.done()
    if engine_failed:
        log.error("the data plane engine stopped: %s", await gateway.health())
    log.info("shutting down: %s the gateway", "releasing" if keep else "draining")
    if data_server is not None:
        data_server.should_exit = True
    if admin_server is not None:
        admin_server.should_exit = True
    if keep:
        await gateway.release(drain_timeout_s)
    else:
        await gateway.drain(drain_timeout_s)
    for task in servers:
        with contextlib.suppress(BaseException):
            await task
    failed = [t for t in servers if t.cancelled() or t.exception() is not None]
    return 1 if failed or engine_failed else 0


async def _ready(controller: Controller, gateway: DataPlane) -> str | None:
    """Why raygate cannot take traffic yet (None: it can): the controller has not published
    its routes and recovered, or the data plane engine is unhealthy."""
    if not controller.started:
        return "the controller is still starting"
    return await gateway.health()


async def run_up(settings: UpSettings, specs: Sequence[ServiceSpec]) -> int:
    state_dir = settings.state_dir.resolve()
    lock = StateDirLock(state_dir)  # before anything reads or writes the state dir
    make_private(state_dir)
    if settings.token:
        token = settings.token
        if len(token) < MIN_TOKEN_CHARS:
            lock.release()
            raise WeakToken(f"RAYGATE_TOKEN has {len(token)} characters, fewer than "
                            f"{MIN_TOKEN_CHARS}")  # fmt: skip
        log.info("admin token: from RAYGATE_TOKEN")
    else:
        try:
            token, token_path = load_or_create_token(state_dir)
        except WeakToken:
            lock.release()
            raise
        log.info("admin token: %s", token_path)
    keep = settings.on_exit == "keep"

    metrics = Metrics()
    store = Store(state_dir / "raygate.db")
    conflicts = startup_conflicts(specs, store.latest_specs())
    try:
        provider = make_provider(settings, state_dir)
    except Exception as exc:  # no kubeconfig, an unreadable one
        store.close()
        lock.release()
        raise StartFailed(f"the {settings.provider} provider cannot start: {exc}") from None
    conflicts += [f"{spec.name}: {field}: {problem}"
                  for spec in specs for field, problem in provider.check(spec)]  # fmt: skip
    others = sorted({i.provider for i, _ in store.clusters() if i.provider != provider.name})
    if others:  # one provider per state dir: another's records mean nothing to this one
        conflicts.append(f"{state_dir} holds clusters of the {', '.join(others)} provider; "
                         f"start it with that --provider, or use another --state-dir")  # fmt: skip
    if conflicts:
        await provider.close()
        store.close()
        lock.release()
        raise SpecConflict("; ".join(conflicts) + "; nothing was pushed")
    # On Kubernetes, clusters outlive raygate (a pod rescheduled, a rolling upgrade): they
    # are never deleted on exit, only by `raygate delete` or a rollout.
    keep_clusters = keep or provider.keeps_clusters
    # The Serve proxy's own health endpoint is what HAProxy checks on each cluster.
    gateway = make_engine(settings.engine, metrics, state_dir, settings.host, settings.port,
                          16 * 1024 * 1024, "/-/healthz")  # fmt: skip
    if keep and gateway.app() is not None:
        log.warning("--on-exit keep: the %s engine serves from raygate's own process, so the "
                    "data port is down while raygate restarts; clusters keep running",
                    settings.engine)  # fmt: skip
    http = httpx.AsyncClient(trust_env=False)
    # A spec's `secret_env` names a variable of this process: read here, once.
    notifier = Notifier(metrics, [WebhookTarget(u, settings.webhook_secret)
                                  for u in settings.webhooks], env=os.environ)  # fmt: skip
    controller = Controller(store, provider, gateway, http, metrics=metrics, notifier=notifier)
    rates = RateHistory()  # the status page's charts: the gateway's counters every 5 s
    admin = create_admin_app(
        store, token, controller.wake, gateway.in_flight, metrics_registry=metrics.registry,
        check_spec=provider.check, ready=lambda: _ready(controller, gateway),
        sessions=Sessions(state_dir / "sessions.json", token.encode()), rates=rates,
    )  # fmt: skip
    sampling = asyncio.create_task(rates.run(metrics.all_cluster_totals))
    code = 1
    started = False  # every listener open: from here on, a stop is a stop, not a failed start
    failed_start = False

    def serving() -> None:
        nonlocal started
        started = True

    try:
        await gateway.start()  # adopts a running data plane; before the first route table
        await controller.start()
        for spec in specs:
            revision, unchanged = store.push(spec, time.time())
            log.info(
                "%s: revision %d %s", spec.name, revision, "unchanged" if unchanged else "pushed"
            )
            controller.wake(spec.name)
        code = await serve_until_signal(
            gateway, admin, settings.host, settings.port, settings.admin_port,
            settings.drain_timeout_s, admin_host=settings.admin_host, keep=keep,
            on_serving=serving,
        )  # fmt: skip
    except Exception:
        failed_start = not started
        raise
    finally:
        sampling.cancel()
        # A raygate that failed to start (not one stopped while starting: Ctrl-C tears
        # down) never tears down what it found serving: an upgrade that cannot start must
        # leave the services running.
        if keep or failed_start:
            why = "--on-exit keep" if not failed_start else "start-up failed"
            log.info("leaving every Ray cluster and the data plane running (%s)", why)
            await controller.stop(delete_clusters=False)
            try:
                await gateway.release(settings.drain_timeout_s)
            except Exception:
                log.exception("releasing the data plane failed")
        elif keep_clusters:
            log.info("leaving every %s cluster running: a restarted raygate adopts them",
                     provider.name)  # fmt: skip
            await controller.stop(delete_clusters=False)
        else:
            log.info("stopping every Ray cluster raygate started")
            await controller.stop(delete_clusters=True)
        await notifier.close()  # after the controller: its last events go out too
        await gateway.close()
        await http.aclose()
        await provider.close()
        store.close()
        lock.release()
    return code


async def run_down(state_dir: Path, drain_timeout_s: float = 30.0) -> int:
    """`raygate down`: tear down what a raygate stopped with `--on-exit keep` (or killed)
    left on `state_dir`: the data plane drains and stops, then every cluster is stopped, the
    way `raygate up` does on SIGTERM. Refuses while a raygate runs there. `state_dir` is
    absolute (the clusters' owner marker is derived from it). Raises StateDirBusy."""
    if not (state_dir / "raygate.db").exists():
        log.error("%s holds no raygate state", state_dir)
        return 1
    lock = StateDirLock(state_dir)  # no `raygate up` may start meanwhile either
    try:
        store = Store(state_dir / "raygate.db")
        remote = sorted(i.id for i, _ in store.clusters() if i.provider != LocalProvider.name)
        store.close()
        if remote:  # they outlive raygate by design: only `raygate delete NAME` removes them
            log.error("%s holds clusters `raygate down` does not stop (%s): remove them "
                      "with `raygate delete NAME` while raygate runs",
                      state_dir, ", ".join(remote))  # fmt: skip
            return 1
        await _tear_down(state_dir, drain_timeout_s)
    finally:
        lock.release()
    return 0


async def _tear_down(state_dir: Path, drain_timeout_s: float) -> None:
    metrics = Metrics()
    engines = [make_engine(n, metrics, state_dir, "127.0.0.1", 0, 0, None) for n in ENGINES]
    for name, gateway in zip(ENGINES, engines, strict=True):
        if await gateway.attach():
            log.info("draining the %s data plane", name)
            await gateway.drain(drain_timeout_s)
        await gateway.close()
    store = Store(state_dir / "raygate.db")
    provider = LocalProvider(LocalSettings(state_dir))
    http = httpx.AsyncClient(trust_env=False)
    try:
        # Only its stop(): the same teardown as `raygate up` does, without a control loop.
        controller = Controller(store, provider, engines[0], http, metrics=metrics)
        log.info("stopping every Ray cluster of %s", state_dir)
        await controller.stop(delete_clusters=True)
    finally:
        await http.aclose()
        await provider.close()
        store.close()


@dataclass(frozen=True)
class GatewayOnlySettings:
    routes: tuple[tuple[str, str], ...]  # (prefix, upstream URL); a prefix may repeat
    host: str = "127.0.0.1"
    port: int = 8000
    admin_port: int = 8001
    timeout_s: float = 60.0
    max_body_bytes: int = 16 * 1024 * 1024
    drain_timeout_s: float = 30.0
    workers: int = 1
    serve_admin: bool = True  # False in the extra worker processes
    engine: str = "haproxy"  # or "python"


def standalone_table(routes: Sequence[tuple[str, str]], timeout_s: float) -> RouteTable:
    """`--route /p=http://a:1 --route /p=http://b:2`: one route, two equal backends."""
    backends: dict[str, list[Backend]] = {}
    for prefix, url in routes:
        key = "/" + prefix.strip("/") if prefix.strip("/") else "/"
        name = url.split("://", 1)[-1].rstrip("/")
        backends.setdefault(key, []).append(Backend(name, url.rstrip("/"), 1))
    return RouteTable(tuple(
        Route(prefix, "standalone", prefix, tuple(bs), timeout_s)
        for prefix, bs in backends.items()
    ))  # fmt: skip


async def run_gateway(settings: GatewayOnlySettings, extra_workers: Sequence[str] = ()) -> int:
    """`raygate gateway`: the same data plane in front of endpoints raygate did not start.

    With several workers, every worker process binds the data port with SO_REUSEPORT, and
    prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by the CLI before
    anything imports prometheus_client) sums their metrics on the one admin port.
    `extra_workers` is the command line that starts one more worker process.
    """
    metrics = Metrics()
    work_dir = Path(tempfile.mkdtemp(prefix="rg-gw-"))
    gateway = make_engine(settings.engine, metrics, work_dir, settings.host, settings.port,
                          settings.max_body_bytes, None, settings.workers)  # fmt: skip
    table = standalone_table(settings.routes, settings.timeout_s)
    await gateway.start()
    await gateway.apply(table)
    metrics.set_weights(table.weights())
    multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    admin = None
    if settings.serve_admin:
        registry = metrics.registry
        if multiproc_dir:
            from prometheus_client import CollectorRegistry, multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, multiproc_dir)  # type: ignore[no-untyped-call]
        admin = create_metrics_app(registry)
    # Worker processes share the port only for an engine served from raygate's process; the
    # other engine takes `workers` as threads of its own.
    several = settings.workers > 1 and gateway.app() is not None
    sock = reuse_port_socket(settings.host, settings.port) if several else None
    children = [
        await asyncio.create_subprocess_exec(*extra_workers, stdin=asyncio.subprocess.DEVNULL)
        for _ in range(settings.workers - 1)
    ] if extra_workers else []  # fmt: skip
    try:
        return await serve_until_signal(
            gateway, admin, settings.host, settings.port, settings.admin_port,
            settings.drain_timeout_s, sock,
        )  # fmt: skip
    finally:
        for child in children:
            if child.returncode is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            await child.wait()
        await gateway.close()
        shutil.rmtree(work_dir, ignore_errors=True)
        if multiproc_dir:  # every worker: its live-summed gauges leave with it
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid(), multiproc_dir)  # type: ignore[no-untyped-call]
