"""The local provider without Ray: allocation, the `ray start` command line and environment,
and how it finds a cluster's processes (real processes, started and stopped by the test)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from rollout.providers.local import (
    CLUSTER_ENV,
    OWNER_ENV,
    LocalProvider,
    LocalSettings,
    _alive,
    _claimed_ancestor,
)
from rollout.spec import ClusterSpec


@pytest.fixture
def provider(tmp_path: Path) -> LocalProvider:
    return LocalProvider(LocalSettings(tmp_path / "state"))


def test_allocate_gives_each_cluster_its_own_loopback_address_and_ports(
    provider: LocalProvider,
) -> None:
    spec = ClusterSpec()
    first = provider.allocate("a", "svc", spec, [])
    second = provider.allocate("b", "svc", spec, [first])
    try:
        assert first.serve_host != second.serve_host
        assert first.serve_host.startswith("127.0.0.") and first.serve_host != "127.0.0.1"
        assert set(first.data["ports"].values()).isdisjoint(second.data["ports"].values())
        lo, hi = first.data["worker_ports"]
        assert first.data["ports"]["client_server"] not in range(lo, hi + 1)
        # Ray puts Unix sockets under the temp dir: its path must stay short.
        assert len(first.data["temp_dir"]) < 40
    finally:
        for info in (first, second):  # allocating only names it; `start` creates it
            assert not os.path.exists(info.data["temp_dir"])


def test_command_sets_every_port_and_environment_is_marked(
    provider: LocalProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "somewhere:6379")
    spec = ClusterSpec(num_cpus=3, env={"OMP_NUM_THREADS": "1"}, code_dir="/srv/apps")
    info = provider.allocate("c", "svc", spec, [])
    try:
        cmd = " ".join(provider.command(info, spec))
        for flag in ("--port=", "--dashboard-port=", "--ray-client-server-port=",
                     "--dashboard-agent-listen-port=", "--dashboard-agent-grpc-port=",
                     "--runtime-env-agent-port=", "--metrics-export-port=",
                     "--node-manager-port=", "--object-manager-port=", "--min-worker-port=",
                     "--max-worker-port=", "--temp-dir=", "--disable-usage-stats"):  # fmt: skip
            assert flag in cmd
        assert f"--node-ip-address={info.serve_host}" in cmd and "--num-cpus=3" in cmd
        env = provider.environment(info, spec)
        assert "RAY_ADDRESS" not in env
        assert env["OMP_NUM_THREADS"] == "1"
        assert env["PYTHONPATH"].split(os.pathsep)[0] == "/srv/apps"
        assert env[OWNER_ENV] == provider.owner and env[CLUSTER_ENV] == "c"
    finally:
        assert not os.path.exists(info.data["temp_dir"])


def test_raygate_variables_stay_out_of_the_ray_environment(
    provider: LocalProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admin token grants code execution; every Ray process would inherit it."""
    monkeypatch.setenv("RAYGATE_TOKEN", "secret-admin-token")
    monkeypatch.setenv("RAYGATE_ADMIN_URL", "http://127.0.0.1:8001")
    monkeypatch.setenv(OWNER_ENV, "someone-else")
    monkeypatch.setenv("RAYGATEWAY", "not ours: kept")
    spec = ClusterSpec()
    info = provider.allocate("c", "svc", spec, [])
    env = provider.environment(info, spec)
    ours = {k: v for k, v in env.items() if k.startswith("RAYGATE_")}
    assert ours == {OWNER_ENV: provider.owner, CLUSTER_ENV: "c"}
    assert "secret-admin-token" not in env.values()
    assert env["RAYGATEWAY"] == "not ours: kept"


def test_claimed_ancestor_walks_up_the_tree() -> None:
    parents = {10: 1, 11: 10, 12: 11, 20: 1}
    claimed = {10: "c1"}
    assert _claimed_ancestor(12, parents, claimed) == "c1"
    assert _claimed_ancestor(20, parents, claimed) is None


def running(pid: int) -> bool:
    """Alive and not a zombie (the test's own children stay zombies until reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


TREE = textwrap.dedent(
    """
    import os, subprocess, sys, time
    # A child whose environment lost the cluster id, as Ray's setproctitle can cause.
    env = {k: v for k, v in os.environ.items() if k != "RAYGATE_CLUSTER"}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    print(child.pid, flush=True)
    time.sleep(60)
    """
)


@pytest.fixture
def process_tree(provider: LocalProvider) -> Iterator[tuple[int, int, int]]:
    marked = {**os.environ, OWNER_ENV: provider.owner, CLUSTER_ENV: "c1"}
    parent = subprocess.Popen([sys.executable, "-c", TREE], env=marked, stdout=subprocess.PIPE)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    # Carries our owner marker, no cluster, no marked ancestor: must never be claimed.
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             env={**os.environ, OWNER_ENV: provider.owner})  # fmt: skip
    try:
        yield parent.pid, child, stray.pid
    finally:
        for pid in (child, parent.pid, stray.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        parent.wait()
        stray.wait()


def test_pids_claims_descendants_and_never_unnamed_processes(
    provider: LocalProvider, process_tree: tuple[int, int, int]
) -> None:
    parent, child, stray = process_tree
    found = provider.pids()
    assert found.get(parent) == "c1"
    assert found.get(child) == "c1", "a descendant belongs to its ancestor's cluster"
    assert stray not in found
    assert set(provider.pids("c1")) >= {parent, child}


async def test_orphans_stops_unknown_clusters_but_not_unnamed_processes(
    provider: LocalProvider, process_tree: tuple[int, int, int]
) -> None:
    parent, child, stray = process_tree
    assert await provider.orphans([]) == ["c1"]
    # _stop returns once every claimed process is gone (SIGTERM, then SIGKILL).
    assert provider.pids("c1") == {}
    for pid in (parent, child):
        assert not running(pid)
    assert running(stray), "it was not ours to stop"


async def test_a_cancelled_start_ends_ray_start_and_what_it_spawned(
    provider: LocalProvider, tmp_path: Path
) -> None:
    """A start superseded (or raygate stopping) while `ray start` runs: nothing of it keeps
    running. A stand-in for `ray start` (named as such) spawns a child and waits."""
    import asyncio

    fake_ray_start = tmp_path / "fake-ray-start"
    fake_ray_start.write_text('#!/bin/sh\nsleep 300 &\necho $! > "$0.child"\nsleep 300\n')
    fake_ray_start.chmod(0o755)
    spec = ClusterSpec(python=str(fake_ray_start))
    info = provider.allocate("c1", "svc", spec, [])
    task = asyncio.create_task(provider.start(info, spec))
    child_file = Path(f"{fake_ray_start}.child")
    for _ in range(100):  # until the stand-in has spawned its child
        if _read(child_file):
            break
        await asyncio.sleep(0.05)
    child = int(_read(child_file))
    group = os.getpgid(child)
    try:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # until it has gone (not our child: no event to await)
            if not _alive(child):
                break
            await asyncio.sleep(0.05)
        assert not _alive(child), "ray start's child lives on"
    finally:  # the test started them; it stops them, whatever happened
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    await provider.close()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
