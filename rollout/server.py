"""`raygate up`: the composition root. Wires store, provider, gateway, controller and the two
HTTP servers (data plane, admin API) into one asyncio process, and shuts them down in order:
gateway stops taking requests and drains, controller stops, every cluster is stopped by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from gateway.python_engine import PythonGateway
from rollout.api import create_admin_app
from rollout.controller import Controller
from rollout.providers.local import LocalProvider, LocalSettings
from rollout.spec import ServiceSpec
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


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `up` owns SIGINT/SIGTERM for all parts."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def load_or_create_token(state_dir: Path) -> tuple[str, Path]:
    path = state_dir / "token"
    if path.exists():
        return path.read_text().strip(), path
    state_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, path


async def run_up(settings: UpSettings, specs: Sequence[ServiceSpec]) -> int:
    state_dir = settings.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    if settings.token:
        token = settings.token
        log.info("admin token: from RAYGATE_TOKEN")
    else:
        token, token_path = load_or_create_token(state_dir)
        log.info("admin token: %s", token_path)

    store = Store(state_dir / "raygate.db")
    provider = LocalProvider(LocalSettings(state_dir))
    gateway = PythonGateway()
    http = httpx.AsyncClient(trust_env=False)
    controller = Controller(store, provider, gateway, http)

    admin = create_admin_app(store, token, controller.wake, gateway.in_flight)
    data_server = _Server(
        uvicorn.Config(
            gateway,
            host=settings.host,
            port=settings.port,
            lifespan="on",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=int(settings.drain_timeout_s),
        )
    )
    admin_server = _Server(
        uvicorn.Config(
            admin,
            host=settings.host,
            port=settings.admin_port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
        )
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    try:
        await controller.start()
        for spec in specs:
            revision, unchanged = store.push(spec, time.time())
            note = "unchanged" if unchanged else "pushed"
            log.info("%s: revision %d %s", spec.name, revision, note)
            controller.wake(spec.name)
        servers = [
            asyncio.create_task(data_server.serve(), name="data-plane"),
            asyncio.create_task(admin_server.serve(), name="admin-api"),
        ]
        log.info(
            "gateway on http://%s:%d, admin API on http://%s:%d",
            settings.host,
            settings.port,
            settings.host,
            settings.admin_port,
        )
        done_early = asyncio.create_task(asyncio.wait(servers, return_when=asyncio.FIRST_COMPLETED))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([done_early, stopper], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        done_early.cancel()
        log.info("shutting down: draining the gateway")
        # /-/ready turns 503 and listeners close; in-flight requests and streams finish.
        data_server.should_exit = True
        admin_server.should_exit = True
        await gateway.drain(settings.drain_timeout_s)
        for task in servers:
            with contextlib.suppress(Exception):
                await task
        failed = [t for t in servers if t.done() and not t.cancelled() and t.exception()]
    finally:
        log.info("stopping every Ray cluster raygate started")
        await controller.stop(delete_clusters=True)
        await gateway.close()
        await http.aclose()
        await provider.close()
        store.close()
    return 1 if failed else 0
