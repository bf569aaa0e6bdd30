"""`push --wait` and `status --watch` where raygate does not answer for a while, and a push
that a newer one replaces (review of issue 12, part 2).

The admin API is the real one over a real Store, on loopback under uvicorn, stopped and
started again on the same port as a raygate restart (`up --on-exit keep`) does; the states a
controller would write are committed directly (as in test_progress.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from rollout.api import create_admin_app
from rollout.cli import _wait, main
from rollout.plan import Active, Kind, Pending, Result, RolloutRecord, ServiceState, Step
from rollout.progress import Mode, Progress
from rollout.spec import parse_spec
from rollout.store import Store
from tests.harness import ROOT
from tests.loopback import free_port, served
from tests.test_api import TOKEN, put_state, spec
from tests.test_progress import live_r1, read_until


class Admin:
    """The admin API on a fixed loopback port that can go away and come back."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.polls = 0
        self._serving: contextlib.AbstractContextManager[str] | None = None

    def start(self) -> None:
        async def in_flight() -> dict[str, int]:
            self.polls += 1
            return {}

        app = create_admin_app(self.store, TOKEN, lambda _name: None, in_flight)
        self._serving = served(app, self.port)
        self._serving.__enter__()

    def stop(self) -> None:
        assert self._serving is not None
        serving, self._serving = self._serving, None
        serving.__exit__(None, None, None)


@pytest.fixture
def admin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Admin]:
    monkeypatch.setenv("RAYGATE_TOKEN", TOKEN)
    store = Store(tmp_path / "raygate.db")
    admin = Admin(store)
    admin.start()
    yield admin
    if admin._serving is not None:
        admin.stop()
    store.close()


def client(admin: Admin) -> httpx.Client:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    return httpx.Client(base_url=admin.url, trust_env=False, headers=auth, timeout=5.0)


def r2_in_health(store: Store) -> None:
    live_r1(store)
    store.push(parse_spec(spec(label="b")), 2.0)
    pending = Pending(2, Kind.NEW_CLUSTER, "c2", "h2", Step.HEALTH, time.time(), 1, "")
    put_state(store, ServiceState("digits", Active("c1", 1, "h1"), pending))


def test_push_wait_ends_when_a_newer_push_supersedes_its_revision(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    """r2 is superseded by r3 (whose rollout starts in the same tick, as the planner does
    it): waiting for r2 can never end in "live"; it ends at once with 1, not at its timeout."""
    r2_in_health(admin.store)
    admin.store.push(parse_spec(spec(label="c")), 3.0)
    r3 = Pending(3, Kind.NEW_CLUSTER, "c3", "h3", Step.CREATE_CLUSTER, time.time())
    put_state(admin.store, ServiceState("digits", Active("c1", 1, "h1"), r3),
              RolloutRecord(2, Result.SUPERSEDED, "superseded by revision 3"))  # fmt: skip
    started = time.monotonic()
    with client(admin) as c:
        rc = _wait(c, "digits", 2, 8.0, Progress(Mode.PLAIN))
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert rc == 1, err
    assert took < 5.0, f"waited {took:.1f}s for a revision that can no longer go live"
    assert "superseded by revision 3" in err, err


def test_push_wait_for_a_revision_that_went_live_before_a_newer_push_is_0(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    live_r1(admin.store)
    admin.store.push(parse_spec(spec(label="b")), 2.0)
    put_state(admin.store, ServiceState("digits", Active("c2", 2, "h2")),
              RolloutRecord(2, Result.SUCCEEDED, "revision 2 is live on c2"))  # fmt: skip
    admin.store.push(parse_spec(spec(label="c")), 3.0)
    r3 = Pending(3, Kind.IN_PLACE, "c2", "h2", Step.DEPLOY, time.time())
    put_state(admin.store, ServiceState("digits", Active("c2", 2, "h2"), r3))
    with client(admin) as c:
        assert _wait(c, "digits", 2, 5.0, Progress(Mode.PLAIN)) == 0, capsys.readouterr().err


def test_push_wait_rides_out_a_raygate_restart(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    """raygate restarts (`up --on-exit keep`) while a push waits: the wait goes on and ends
    with the rollout's own result, not a traceback and exit 1 ("aborted")."""
    r2_in_health(admin.store)
    result: dict[str, object] = {}

    def wait() -> None:
        with client(admin) as c:
            try:
                result["rc"] = _wait(c, "digits", 2, 30.0, Progress(Mode.PLAIN))
            except Exception as exc:  # the fault: it escapes
                result["error"] = exc

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    deadline = time.monotonic() + 10
    while admin.polls < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    admin.stop()
    time.sleep(2.5)  # raygate is down for a while (more than one poll of the waiter)
    put_state(admin.store, ServiceState("digits", Active("c2", 2, "h2")),
              RolloutRecord(2, Result.SUCCEEDED, "revision 2 is live on c2"))  # fmt: skip
    admin.start()
    waiter.join(15)
    assert not waiter.is_alive(), "still waiting"
    out, err = capsys.readouterr()
    assert "error" not in result, f"the wait died: {result['error']!r}"
    assert result["rc"] == 0, out + err
    assert "does not answer" in err and "answers again" in err, err


def test_status_watch_rides_out_a_raygate_restart(admin: Admin) -> None:
    r2_in_health(admin.store)
    argv = [sys.executable, "-m", "rollout.cli", "status", "digits", "--watch", "--admin-url",
            admin.url]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    seen = bytearray()
    try:
        read_until(proc.stdout.fileno(), seen, b"\n", lines=1)
        admin.stop()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)  # a few polls of the watch against a raygate that is down
        assert proc.poll() is None, (
            f"the watch ended (exit {proc.returncode}) while raygate restarted:\n"
            + proc.stderr.read().decode()[-1500:]
        )
        put_state(admin.store, ServiceState("digits", Active("c2", 2, "h2")),
                  RolloutRecord(2, Result.SUCCEEDED, "revision 2 is live on c2"))  # fmt: skip
        admin.start()
        read_until(proc.stdout.fileno(), seen, b"r2 on c2", lines=2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err, err
    assert "does not answer" in err and "answers again" in err, err


def test_a_watch_of_a_raygate_that_is_not_there_says_so_without_a_traceback(
    tmp_path: Path,
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run([sys.executable, "-m", "rollout.cli", "status", "--watch",
                           "--admin-url", url], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "RAYGATE_TOKEN": TOKEN})  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert url in done.stderr, done.stderr


def test_push_wait_of_a_spec_whose_revision_was_aborted_is_1_not_0(
    admin: Admin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CI job retried after its rollout aborted pushes the same spec again: raygate answers
    "identical to revision 2, which was aborted and is not tried again". `--wait` must not
    say 0 ("live") for a revision that is not live."""
    r2_in_health(admin.store)
    aborted = RolloutRecord(2, Result.ABORTED, "deployment digits/D DEPLOY_FAILED")
    put_state(admin.store, ServiceState("digits", Active("c1", 1, "h1"), last_rollout=aborted),
              aborted)  # fmt: skip
    path = tmp_path / "v2.yaml"
    path.write_text(yaml.safe_dump(spec(label="b")))
    argv = ["push", str(path), "--wait", "--timeout", "5", "--admin-url", admin.url]
    assert main(argv) == 1, capsys.readouterr()
    assert "aborted" in capsys.readouterr().err


def test_push_wait_of_the_live_spec_again_is_0(
    admin: Admin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live_r1(admin.store)
    path = tmp_path / "v1.yaml"
    path.write_text(yaml.safe_dump(spec(label="a")))
    argv = ["push", str(path), "--wait", "--timeout", "5", "--admin-url", admin.url]
    assert main(argv) == 0, capsys.readouterr()
