"""`raygate up` as a real process, without Ray: one instance per state dir, route conflicts
among the specs given on its command line, and the modes of what it keeps in the state dir.

No test here starts a Ray cluster: `raygate up` without a spec starts none, and the specs
used below name `/bin/false` as `cluster.python`, so even a regression that let them through
would fail at `ray start` instead of starting Ray.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from rollout.statedir import StateDirBusy, StateDirLock
from rollout.store import Store
from tests.harness import ROOT, Raygate
from tests.loopback import free_port

APPS = ROOT / "serve_configs" / "apps"


def up(
    state_dir: Path, *specs: Path, port: int = 0, admin_port: int = 0, extra: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """`raygate up` (fresh ports unless given), with its output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "rollout.cli", "up", *map(str, specs),
         "--state-dir", str(state_dir), "--port", str(port or free_port()),
         "--admin-port", str(admin_port or free_port()), "--engine", "python", *extra],
        cwd=ROOT, env={**os.environ, "RAYGATE_TOKEN": "t" * 32}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def exit_of(proc: subprocess.Popen[bytes], within_s: float) -> tuple[int, str]:
    """Exit code and output of `proc`; it is stopped (and the test fails) if still running."""
    try:
        out, _ = proc.communicate(timeout=within_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
        raise AssertionError(
            f"still running after {within_s:g}s:\n{out.decode()[-3000:]}"
        ) from None
    return proc.returncode, out.decode()


def write_spec(path: Path, name: str, prefix: str) -> Path:
    raw: dict[str, Any] = {
        "name": name,
        "cluster": {"code_dir": str(APPS), "python": "/bin/false"},
        "serve": {"applications": [{
            "name": name, "route_prefix": prefix, "import_path": "digits:build",
        }]},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_second_up_on_the_same_state_dir_exits_at_once_and_changes_nothing(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    first = Raygate(state_dir)
    first.start()
    try:
        assert first.proc is not None
        before = sorted(p.name for p in state_dir.iterdir())
        started = time.monotonic()
        code, out = exit_of(up(state_dir), within_s=10)
        took = time.monotonic() - started
        assert code != 0, out
        assert str(state_dir.resolve()) in out and f"pid {first.proc.pid}" in out, out
        assert sorted(p.name for p in state_dir.iterdir()) == before
        assert httpx.get(first.admin_url + "/-/healthz", timeout=5).status_code == 200
        print(f"second up exited {code} after {took:.2f}s")
    finally:
        assert first.kill(signal.SIGKILL, within_s=60) == -signal.SIGKILL
    # Released with the process, even one killed outright: the next `raygate up` starts.
    again = Raygate(state_dir)
    again.start()
    assert again.kill(signal.SIGTERM, within_s=60) == 0


def test_the_lock_is_never_inherited_by_children(tmp_path: Path) -> None:
    """HAProxy and Ray outlive raygate; had one inherited the lock, no raygate could start
    again on that state dir. Even a child given every descriptor (close_fds=False) lacks it."""
    lock = StateDirLock(tmp_path)
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
        close_fds=False,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"up\n"  # settled
        held = []
        for fd in os.listdir(f"/proc/{child.pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                held.append(os.readlink(f"/proc/{child.pid}/fd/{fd}"))
        assert str(tmp_path / "lock") not in held
        with pytest.raises(StateDirBusy, match=f"pid {os.getpid()}"):
            StateDirLock(tmp_path)  # a second open file description: refused
        lock.release()
        take = (
            "import sys, pathlib; from rollout.statedir import StateDirLock as L; "
            "L(pathlib.Path(sys.argv[1]))"
        )
        again = subprocess.run(
            [sys.executable, "-c", take, str(tmp_path)], cwd=ROOT, capture_output=True, timeout=60
        )
        assert again.returncode == 0, again.stderr.decode()
    finally:
        child.kill()
        child.wait()


class TokenFromFile(Raygate):
    """`raygate up` without RAYGATE_TOKEN: it uses (or writes) `<state dir>/token`."""

    def env(self) -> dict[str, str]:
        return {k: v for k, v in super().env().items() if k != "RAYGATE_TOKEN"}


def test_state_dir_and_its_files_are_private(tmp_path: Path) -> None:
    """What an older raygate or a umask of 022 left readable is made private, and what
    raygate creates is private from the start."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    os.chmod(state_dir, 0o755)
    (state_dir / "token").write_text("an-old-token-of-more-than-24-characters\n")
    os.chmod(state_dir / "token", 0o644)
    gate = TokenFromFile(state_dir)
    gate.start()
    try:
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state_dir.iterdir()}
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        assert {"raygate.db", "raygate.db-wal", "raygate.db-shm", "token", "lock"} <= set(modes)
        assert {name: mode for name, mode in modes.items() if mode != 0o600} == {}, modes
    finally:
        assert gate.kill(15, within_s=60) == 0


def test_up_refuses_specs_whose_route_prefixes_conflict(tmp_path: Path) -> None:
    a = write_spec(tmp_path / "a.yaml", "alpha", "/same")
    b = write_spec(tmp_path / "b.yaml", "beta", "/same")
    state_dir = tmp_path / "state"
    code, out = exit_of(up(state_dir, a, b), within_s=30)
    assert code != 0, out
    assert "'/same'" in out and "alpha" in out and "beta" in out, out
    store = Store(state_dir / "raygate.db")
    try:
        assert store.service_names() == []
    finally:
        store.close()


def test_up_refuses_a_spec_conflicting_with_a_stored_service(tmp_path: Path) -> None:
    from rollout.spec import load_spec_file

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    store = Store(state_dir / "raygate.db")
    try:
        store.push(load_spec_file(write_spec(tmp_path / "a.yaml", "alpha", "/same")), 1.0)
    finally:
        store.close()
    b = write_spec(tmp_path / "b.yaml", "beta", "/same")
    code, out = exit_of(up(state_dir, b), within_s=30)
    assert code != 0, out
    assert "route_prefix '/same' is owned by service 'alpha'" in out, out
    store = Store(state_dir / "raygate.db")
    try:
        assert store.service_names() == ["alpha"]
        assert [h["revision"] for h in store.history("alpha")] == [1]
    finally:
        store.close()


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_admin_api_stays_on_loopback_when_the_data_plane_moves(tmp_path: Path) -> None:
    """`--host` moves the data plane only; the admin API (its token is code execution) stays
    on 127.0.0.1 unless `--admin-host` moves it."""
    for extra, admin_at in (((), "127.0.0.1"), (("--admin-host", "127.0.0.3"), "127.0.0.3")):
        port, admin_port = free_port(), free_port()
        proc = up(tmp_path / "state", port=port, admin_port=admin_port,
                  extra=("--host", "127.0.0.2", *extra))  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not answers(f"http://{admin_at}:{admin_port}/-/healthz"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.terminate()
                    log = proc.communicate(timeout=30)[0].decode()
                    raise AssertionError(f"no admin API on {admin_at}:{admin_port}:\n{log}")
                time.sleep(0.1)
            assert answers(f"http://127.0.0.2:{port}/-/healthz")
            others = {"127.0.0.1", "127.0.0.2", "127.0.0.3"} - {admin_at}
            assert not any(answers(f"http://{h}:{admin_port}/-/healthz") for h in others)
        finally:
            proc.terminate()
            assert exit_of(proc, 30)[0] == 0


async def test_a_raygate_that_fails_to_start_tears_nothing_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgraded raygate that cannot start (here: its controller fails at start-up) must
    leave the clusters and data plane it found serving; it used to stop every cluster."""
    from rollout.controller import Controller
    from rollout.server import UpSettings, run_up

    stops: list[bool] = []

    async def failing_start(self: Controller) -> None:
        raise RuntimeError("cannot start")

    async def recording_stop(self: Controller, delete_clusters: bool = True) -> None:
        stops.append(delete_clusters)

    monkeypatch.setattr(Controller, "start", failing_start)
    monkeypatch.setattr(Controller, "stop", recording_stop)
    settings = UpSettings(tmp_path / "state", port=free_port(), admin_port=free_port(),
                          token="t" * 32, engine="python")  # fmt: skip
    with pytest.raises(RuntimeError, match="cannot start"):
        await run_up(settings, [])
    assert stops == [False]


def test_an_empty_or_short_token_is_refused_at_start(tmp_path: Path) -> None:
    """An empty token file (a write that failed) made `Authorization: Bearer ` pass."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "token").write_text("\n")
    env = {k: v for k, v in os.environ.items() if k != "RAYGATE_TOKEN"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollout.cli", "up", "--state-dir", str(state_dir),
         "--port", str(free_port()), "--admin-port", str(free_port()), "--engine", "python"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    code, out = exit_of(proc, within_s=30)
    assert code == 2 and "delete the file" in out, out
    short = subprocess.Popen(
        [sys.executable, "-m", "rollout.cli", "up", "--state-dir", str(tmp_path / "other"),
         "--port", str(free_port()), "--admin-port", str(free_port()), "--engine", "python"],
        cwd=ROOT, env={**env, "RAYGATE_TOKEN": "short"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    code, out = exit_of(short, within_s=30)
    assert code == 2 and "RAYGATE_TOKEN has 5 characters" in out, out


async def test_a_port_in_use_is_a_failed_start_that_tears_nothing_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the second review: a busy admin port made uvicorn exit the process after
    raygate counted itself started, so its default teardown stopped every cluster."""
    import socket

    from rollout.controller import Controller
    from rollout.server import StartFailed, UpSettings, run_up

    stops: list[bool] = []
    real_stop = Controller.stop

    async def recording_stop(self: Controller, delete_clusters: bool = True) -> None:
        stops.append(delete_clusters)
        await real_stop(self, delete_clusters=False)

    monkeypatch.setattr(Controller, "stop", recording_stop)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        settings = UpSettings(tmp_path / "state", port=free_port(),
                              admin_port=busy.getsockname()[1], token="t" * 32,
                              engine="python")  # fmt: skip
        with pytest.raises(StartFailed, match="admin API could not start"):
            await run_up(settings, [])
    assert stops == [False]


def _store_with_cluster(state_dir: Path, provider: str) -> None:
    from rollout.providers.base import ClusterInfo
    from rollout.spec import load_spec_file

    state_dir.mkdir(parents=True)
    store = Store(state_dir / "raygate.db")
    try:
        store.push(load_spec_file(write_spec(state_dir / "a.yaml", "alpha", "/a")), 1.0)
        loaded = store.load_versioned("alpha")
        assert loaded is not None
        info = ClusterInfo("alpha-a1b2c3", "alpha", provider, "", "", 0, 0.0,
                           {"namespace": "ml", "name": "alpha-a1b2c3"})  # fmt: skip
        store.commit(loaded[0], [], [], 1.0, version=loaded[1], new_clusters=[info])
    finally:
        store.close()


def test_up_refuses_a_state_dir_holding_another_providers_clusters(tmp_path: Path) -> None:
    """A kuberay record means nothing to the local provider (nor the reverse): starting on
    it would read its liveness wrong and delete what it cannot find."""
    state_dir = tmp_path / "state"
    _store_with_cluster(state_dir, "kuberay")
    code, out = exit_of(up(state_dir), within_s=30)
    assert code == 2, out
    assert "holds clusters of the kuberay provider" in out, out


def test_down_never_drops_rayclusters_it_cannot_stop(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    _store_with_cluster(state_dir, "kuberay")
    out = subprocess.run(
        [sys.executable, "-m", "rollout.cli", "down", "--state-dir", str(state_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1 and "raygate delete NAME" in out.stderr, out.stderr
    store = Store(state_dir / "raygate.db")
    try:
        assert [info.id for info, _ in store.clusters()] == ["alpha-a1b2c3"]
    finally:
        store.close()


def test_up_refuses_a_kuberay_spec_under_the_local_provider(tmp_path: Path) -> None:
    raw = yaml.safe_load(write_spec(tmp_path / "a.yaml", "alpha", "/a").read_text())
    raw["cluster"] = {"kuberay": {"headGroupSpec": {"template": {"spec": {"containers": [
        {"name": "ray-head", "image": "rayproject/ray:2.60.0"}]}}}}}  # fmt: skip
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(raw))
    code, out = exit_of(up(tmp_path / "state", tmp_path / "a.yaml"), within_s=30)
    assert code == 2, out
    assert "alpha: cluster.kuberay: this raygate runs the local provider" in out, out


def test_each_state_dir_has_its_own_kuberay_instance_id(tmp_path: Path) -> None:
    """The id labels a raygate's RayClusters: a second raygate (another state dir) in the
    same namespace must not see the first one's clusters as its orphans."""
    from rollout.server import load_or_create_instance

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = load_or_create_instance(tmp_path / "a")
    assert first.startswith("rg-") and load_or_create_instance(tmp_path / "a") == first
    assert load_or_create_instance(tmp_path / "b") != first


def test_up_refuses_an_instance_id_that_is_no_label_value(tmp_path: Path) -> None:
    code, out = exit_of(
        up(tmp_path / "state", extra=("--provider", "kuberay", "--instance", "not a label!")),
        within_s=30,
    )
    assert code == 2, out
    assert "not a Kubernetes label value" in out, out
