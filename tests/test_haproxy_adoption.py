"""The HAProxy engine adopts the HAProxy a dead raygate left running (issue 9, point 3).

raygate's death is real: the engine runs in a child Python process that is SIGKILLed. HAProxy
must keep answering meanwhile, and a new engine on the same work dir must take over that very
master (never start a second one beside it: SO_REUSEPORT would let both bind), reload it with
its own table so the stale routes vanish, and supervise it although it is not its child.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from gateway.haproxy_config import HAProxySettings
from gateway.haproxy_engine import HAProxyEngine, haproxy_binary
from gateway.routes import Backend
from tests.haproxy_procs import haproxy_masters, haproxy_processes
from tests.harness import ROOT
from tests.loopback import free_port, labelled_upstreams, table, until
from tests.test_switch import a_then_b, http_get, idle_client_on_a, until_routed

# The engine of a raygate that is about to die: started, one route applied, then it waits.
CHILD = """
import asyncio, sys
from pathlib import Path
from gateway.haproxy_config import HAProxySettings
from gateway.haproxy_engine import HAProxyEngine, haproxy_binary
from gateway.routes import Backend
from tests.loopback import table

async def main() -> None:
    engine = HAProxyEngine(HAProxySettings(Path(sys.argv[1]), port=int(sys.argv[2])))
    await engine.start()
    await engine.apply(table(Backend("a", sys.argv[3], 1)))
    Path(sys.argv[4]).write_text(f"{engine.pid}")
    await asyncio.Event().wait()

asyncio.run(main())
"""


def background(argv: list[str]) -> subprocess.Popen[bytes]:
    """A process left running in its own session (as HAProxy is)."""
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)


@contextlib.asynccontextmanager
async def named_upstream(name: str) -> AsyncIterator[str]:
    """An upstream that answers with its name, so a test sees which one got a request."""

    async def answer(_request: web.Request) -> web.Response:
        return web.Response(text=name)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class Traffic:
    """Clients sending one request after another until stopped; outcome per request."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.outcomes: list[str] = []
        self.by_client: list[list[str]] = [[] for _ in range(clients)]
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._client(mine)) for mine in self.by_client]

    async def _client(self, mine: list[str]) -> None:
        async with httpx.AsyncClient(timeout=10, trust_env=False) as c:
            while not self._stop.is_set():
                try:
                    r = await c.get(self.url)
                    outcome = r.text if r.status_code == 200 else str(r.status_code)
                except httpx.HTTPError as exc:
                    outcome = repr(exc)
                self.outcomes.append(outcome)
                mine.append(outcome)
                await asyncio.sleep(0)  # a refused connect may not yield to the loop at all

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def failures(self, *ok: str) -> list[str]:
        return [o for o in self.outcomes if o not in ok]


@pytest.fixture
def work_dir(tmp_path: Path) -> AsyncIterator[Path]:
    path = tmp_path / "hx"
    yield path  # type: ignore[misc]
    for pid in haproxy_masters(path / "haproxy.cfg"):  # even when a test failed
        os.kill(pid, signal.SIGKILL)


async def start_dying_raygate(work_dir: Path, port: int, upstream: str) -> tuple[int, int]:
    """(pid of the process holding the engine, pid of the HAProxy master it started)."""
    ready = work_dir.with_name("ready")
    ready.unlink(missing_ok=True)
    # Not a pipe for its output: HAProxy would inherit it and hold it open.
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(work_dir), str(port), upstream, str(ready),
        cwd=ROOT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    await until(
        lambda: (ready.exists() and ready.read_text() != "") or child.returncode is not None, 30
    )
    assert child.returncode is None, "the engine did not start"
    master = int(ready.read_text())
    os.kill(child.pid, signal.SIGKILL)  # raygate dies: no drain, no cleanup
    await child.wait()
    return child.pid, master


async def test_a_new_engine_adopts_the_master_of_a_killed_one_under_load(work_dir: Path) -> None:
    port = free_port()
    config = work_dir / "haproxy.cfg"
    async with named_upstream("a") as a, named_upstream("b") as b:
        _child, master = await start_dying_raygate(work_dir, port, a)
        traffic = Traffic(f"http://127.0.0.1:{port}/svc/x")  # from here on: all answered
        # Its raygate is dead; HAProxy keeps answering with the table it had.
        seen = len(traffic.outcomes)
        await until(lambda: len(traffic.outcomes) > seen + 200, 10)
        engine = HAProxyEngine(HAProxySettings(work_dir, port=port))
        await engine.start()
        try:
            assert engine.pid == master, "adopted, not started anew"
            assert haproxy_masters(config) == [master]
            # The first table reloads it: the stale route to `a` is gone, `b` answers.
            await engine.apply(table(Backend("b", b, 1)))
            switched = len(traffic.outcomes)
            per_client = [len(mine) for mine in traffic.by_client]
            await until(lambda: len(traffic.outcomes) > switched + 200, 10)
            # Each client's kept-alive connection may get one last answer from the worker
            # that was current before the reload (HAProxy's idle-close-on-response), by the
            # stale table; after that, only `b`.
            for mine, start in zip(traffic.by_client, per_client, strict=True):
                after = mine[start:]
                assert set(after) <= {"a", "b"} and "a" not in after[1:], after[:5]
            assert traffic.outcomes[-1] == "b"
            assert haproxy_masters(config) == [master], "a reload keeps the master"
            assert await engine.health() is None
            # Weight changes through the runtime API reach the adopted master's workers.
            await engine.apply(table(Backend("b", b, 0), Backend("a2", a, 1)))
            await until(lambda: traffic.outcomes[-1] == "a", 5)
        finally:
            await traffic.stop()
            await engine.drain(10)
        failures = traffic.failures("a", "b")
        assert len(traffic.outcomes) > 400 and not failures, failures[:5]
        assert haproxy_masters(config) == []


async def test_an_adopted_master_that_dies_is_started_again(work_dir: Path) -> None:
    """Not our child, so no SIGCHLD: the engine sees its exit through a pidfd."""
    port = free_port()
    async with named_upstream("a") as a:
        _child, master = await start_dying_raygate(work_dir, port, a)
        engine = HAProxyEngine(HAProxySettings(work_dir, port=port))
        await engine.start()
        try:
            await engine.apply(table(Backend("a", a, 1)))
            assert engine.pid == master
            os.kill(master, signal.SIGKILL)
            await until(lambda: engine.pid not in (None, master), 15)
            await until(lambda: haproxy_masters(work_dir / "haproxy.cfg") == [engine.pid], 15)
            async with httpx.AsyncClient(timeout=5, trust_env=False) as c:
                for _ in range(50):
                    with contextlib.suppress(httpx.ConnectError):
                        if (await c.get(f"http://127.0.0.1:{port}/svc/x")).text == "a":
                            break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("the restarted haproxy does not serve the table")
        finally:
            await engine.drain(10)


async def test_a_stale_pid_file_is_ignored(work_dir: Path) -> None:
    """A pid file naming a dead process, or a live one that is not our HAProxy (its pid was
    reused): nothing is adopted or killed, a master of our own is started."""
    work_dir.mkdir(parents=True)  # noqa: ASYNC240 (a test's tmp dir, once)
    dead = background(["true"])
    dead.wait()
    bystander = background(["sleep", "60"])
    try:
        for pid in (dead.pid, bystander.pid):
            (work_dir / "haproxy.pid").write_text(f"{pid}\n")
            (work_dir / "master.sock").touch()  # a socket file nobody listens on
            engine = HAProxyEngine(HAProxySettings(work_dir, port=free_port()))
            await engine.start()
            try:
                assert engine.pid not in (dead.pid, bystander.pid)
                assert haproxy_masters(work_dir / "haproxy.cfg") == [engine.pid]
                assert bystander.poll() is None, "a process that is not ours was signalled"
            finally:
                await engine.drain(10)
    finally:
        bystander.kill()
        bystander.wait()


async def test_a_second_master_left_beside_ours_is_stopped(work_dir: Path) -> None:
    """What raygate before this fix left after a restart: two masters on one config, the
    second started the way the old engine did (sockets unlinked, a new master on the same
    port). The one answering on our master socket is adopted, the other soft-stopped."""
    port = free_port()
    settings = HAProxySettings(work_dir, port=port)
    async with named_upstream("a") as a:
        _child, first = await start_dying_raygate(work_dir, port, a)
        for sock in (settings.admin_socket, settings.master_socket):
            sock.unlink()
        second = background([haproxy_binary(), "-W", "-S", f"{settings.master_socket},mode,600",
                             "-f", str(settings.config_path)])  # fmt: skip
        await until(lambda: settings.admin_socket.exists(), 10)
        assert haproxy_masters(settings.config_path) == sorted([first, second.pid])
        engine = HAProxyEngine(settings)
        await engine.start()
        try:
            assert engine.pid == second.pid, "the master answering on our socket"
            await until(lambda: second.poll() is None and haproxy_masters(
                settings.config_path) == [second.pid], 15)  # fmt: skip
        finally:
            await engine.drain(10)
            second.wait(10)


async def test_a_process_that_only_names_our_config_is_left_alone(work_dir: Path) -> None:
    """An operator's `tail -f haproxy.cfg` (or a pager, an editor) names our config file
    but is no HAProxy: neither an adoption nor `raygate down` (attach, then drain) may
    take it for a stale master and signal it."""
    settings = HAProxySettings(work_dir, port=free_port())
    first = HAProxyEngine(settings)
    await first.start()
    await first.release(5)  # a kept HAProxy, for the next raygate to adopt
    tail = background(["tail", "-f", str(settings.config_path)])
    try:
        engine = HAProxyEngine(settings)
        assert await engine.attach(), "the kept master is adopted"  # what `raygate down` does
        await engine.drain(10)
        engine = HAProxyEngine(settings)
        await engine.start()  # nothing to adopt now: a master is started
        try:
            assert haproxy_masters(settings.config_path) == [engine.pid]
        finally:
            await engine.drain(10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            tail.wait(1)  # a signal, had one been sent, has been delivered by now
        assert tail.poll() is None, f"tail -f was signalled: {tail.returncode}"
    finally:
        tail.kill()
        tail.wait()


async def test_haproxy_does_not_inherit_raygate_settings(
    work_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HAProxy outlives raygate: a RAYGATE_* variable (RAYGATE_TOKEN is a secret) must not
    be in its master's or workers' environment; the rest of the environment is."""
    monkeypatch.setenv("RAYGATE_TOKEN", "s3cret")
    monkeypatch.setenv("RAYGATE_OTHER", "x")
    monkeypatch.setenv("NOT_RAYGATE", "kept")
    engine = HAProxyEngine(HAProxySettings(work_dir, port=free_port()))
    await engine.start()
    try:
        procs = haproxy_processes(work_dir / "haproxy.cfg")
        assert engine.pid in procs and len(procs) >= 2, procs  # the master and a worker
        for pid in procs:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")  # noqa: ASYNC240
            assert b"NOT_RAYGATE=kept" in environ, pid
            leaked = [v for v in environ if v.startswith(b"RAYGATE_")]
            assert not leaked, (pid, leaked)
    finally:
        await engine.drain(10)


async def test_a_master_that_cannot_be_adopted_is_replaced_without_a_gap(work_dir: Path) -> None:
    """A kept master whose master socket is gone cannot be adopted: a new master replaces
    it. The new one must start with the table the old one serves (saved with it), not an
    empty one (404 until the controller's first publish), and the old one may only stop
    once the new one answers. Under load, before any apply of the new engine."""
    port = free_port()
    settings = HAProxySettings(work_dir, port=port)
    async with named_upstream("a") as a:
        first = HAProxyEngine(settings)
        await first.start()
        await first.apply(table(Backend("a", a, 1)))
        await first.release(5)
        old = first.pid
        settings.master_socket.unlink()  # a tmp cleaner, an operator: it cannot be adopted
        traffic = Traffic(f"http://127.0.0.1:{port}/svc/x")
        engine = HAProxyEngine(settings)
        try:
            seen = len(traffic.outcomes)
            await until(lambda: len(traffic.outcomes) > seen + 100, 10)
            await engine.start()
            assert engine.pid != old, "a new master, not the unadoptable one"
            await until(lambda: haproxy_masters(settings.config_path) == [engine.pid], 20)
            done = len(traffic.outcomes)
            await until(lambda: len(traffic.outcomes) > done + 100, 10)
        finally:
            await traffic.stop()
            await engine.drain(10)
        failures = traffic.failures("a")
        assert not failures, (len(failures), len(traffic.outcomes), failures[:3])


async def test_an_old_worker_found_at_adoption_keeps_its_clusters_routed(work_dir: Path) -> None:
    """An old worker that already existed when the master was adopted answers one more
    request on each idle kept-alive connection, by weights the adopting engine never saw.
    Until that client is gone, the clusters it may route to (every cluster of the saved
    table) must be reported routed, or the controller could delete one under that request."""
    settings = HAProxySettings(work_dir, port=free_port())
    first = HAProxyEngine(settings)
    await first.start()
    engine = HAProxyEngine(settings)
    try:
        async with labelled_upstreams("a", "b") as (a, b):
            kept = await idle_client_on_a(first, a_then_b(a, b))
            await first.apply(table(Backend("a", a.url, 1), Backend("b", b.url, 0)))  # reload
            await first.apply(table(Backend("a", a.url, 0), Backend("b", b.url, 1)))  # switch
            master = first.pid
            await first.release(5)  # raygate restarts; HAProxy is kept
            await engine.start()
            assert engine.pid == master, "adopted"
            await engine.apply(table(Backend("a", a.url, 0), Backend("b", b.url, 1)))
            await engine.apply(table(Backend("b", b.url, 1)))  # `a` retired: a reload
            assert await engine.routed() == {"a", "b"}, "the idle client may still get `a`"
            status, headers, body = await http_get(*kept, "/svc/x")
            assert (status, body, headers.get("connection")) == (200, "a", "close")
            kept[1].close()
            await until_routed(engine, {"b"})
    finally:
        await engine.drain(10)


async def test_without_its_saved_table_an_adopted_worker_keeps_every_cluster_routed(
    work_dir: Path,
) -> None:
    """A master adopted without the table it routes by (left by a raygate that saved none):
    its worker, once old, may send an idle client's next request anywhere, so no cluster
    is reported free until that client is gone (found by the second review: such workers
    were taken to route nowhere)."""
    from gateway.dataplane import ANY_CLUSTER

    settings = HAProxySettings(work_dir, port=free_port())
    first = HAProxyEngine(settings)
    await first.start()
    engine = HAProxyEngine(settings)
    try:
        async with labelled_upstreams("a", "b") as (a, b):
            kept = await idle_client_on_a(first, a_then_b(a, b))
            await first.release(5)
            (work_dir / "table.json").unlink()  # as a raygate from before left it
            await engine.start()
            await engine.apply(table(Backend("b", b.url, 1)))  # a reload: that worker is old
            assert ANY_CLUSTER in await engine.routed(), "an unknown table routes anywhere"
            status, _headers, body = await http_get(*kept, "/svc/x")
            assert (status, body) == (200, "a")
            kept[1].close()
            await until_routed(engine, {"b"})
    finally:
        await engine.drain(10)


async def test_a_failed_replacement_leaves_the_master_that_still_serves(work_dir: Path) -> None:
    """No master can be adopted (its socket is gone) and the new one cannot be started (the
    binary is gone): raygate's failed start releases the engine, and the stale master, the
    only HAProxy serving, must be left serving (found by the second review: it was
    soft-stopped and the data port went dark)."""
    import dataclasses

    settings = HAProxySettings(work_dir, port=free_port())
    async with labelled_upstreams("a") as (a,):
        first = HAProxyEngine(settings)
        await first.start()
        await first.apply(table(Backend("a", a.url, 1)))
        serving = first.pid
        await first.release(5)
        settings.master_socket.unlink()
        engine = HAProxyEngine(dataclasses.replace(settings, binary="/nonexistent/haproxy"))
        with pytest.raises(OSError):
            await engine.start()
        await engine.release(5)  # what raygate up does when its start failed
        await engine.close()
        assert haproxy_masters(settings.config_path) == [serving]
        async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
            r = await client.get(f"http://127.0.0.1:{settings.port}/svc/x")
        assert (r.status_code, r.text) == (200, "a")
