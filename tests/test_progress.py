"""`raygate push --wait` and `raygate status --watch` show a rollout as it goes (issue 12).

Statuses come from the real admin API over a real Store (the states a controller would
write are committed directly, as in test_cli_commands.py). The views are checked as pure
functions, then through the real command: on a real pseudo-terminal (a live view drawn
with escape sequences), through a pipe (a line per change, never a repeat) and as JSON Lines.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from rich.console import Console

from rollout.analysis import Outcome, Verdict
from rollout.api import create_admin_app, status_of
from rollout.cli import _wait, main
from rollout.plan import (
    Active,
    Canary,
    Hold,
    Kind,
    Pending,
    Result,
    RolloutRecord,
    ServiceState,
    Step,
)
from rollout.progress import Done, Mode, Progress, StepView, steps, summary, view
from rollout.spec import parse_spec
from rollout.store import Store
from tests.harness import ROOT
from tests.loopback import free_port, served
from tests.test_api import TOKEN, canary_spec, canary_state, put_state, spec

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"  # rich's "dots"


class Admin:
    """The admin API on loopback; `polls` counts status reads (each asks for in-flight
    counts, which change at every read here, as they do under load)."""

    def __init__(self, store: Store, url: str) -> None:
        self.store = store
        self.url = url
        self.polls = 0


@pytest.fixture
def admin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Admin]:
    monkeypatch.setenv("RAYGATE_TOKEN", TOKEN)
    store = Store(tmp_path / "raygate.db")
    port = free_port()
    admin = Admin(store, f"http://127.0.0.1:{port}")

    async def in_flight() -> dict[str, int]:
        admin.polls += 1
        return {"c1": admin.polls}

    app = create_admin_app(store, TOKEN, lambda _name: None, in_flight)
    with served(app, port):
        yield admin
    store.close()


VERDICT = Verdict(Outcome.PASS, "error rate 0.0% (stable 0.0%), p99 80 ms", 120, 400, 0.0, 0.0,
                  80.0)  # fmt: skip


def live_r1(store: Store) -> None:
    store.push(parse_spec(spec(label="a")), 1.0)
    put_state(store, ServiceState("digits", Active("c1", 1, "h1")),
              RolloutRecord(1, Result.SUCCEEDED, "live"))  # fmt: skip


def canary_at(store: Store, canary: Canary) -> None:
    """r1 live on c1; r2 (canary.yaml's four steps) at `canary` on c2."""
    if store.load("digits") is None:
        live_r1(store)
        store.push(parse_spec(canary_spec()), 2.0)
    put_state(store, canary_state(canary, verdict=VERDICT))


def bluegreen_in_health(store: Store, streak: int) -> None:
    live_r1(store)
    store.push(parse_spec(spec(label="b")), 2.0)
    pending = Pending(2, Kind.NEW_CLUSTER, "c2", "h2", Step.HEALTH, time.time() - 75, streak,
                      "2 apps RUNNING")  # fmt: skip
    put_state(store, ServiceState("digits", Active("c1", 1, "h1"), pending))


def status(store: Store) -> dict[str, object]:
    s = status_of(store, "digits", {"c1": 3})
    assert s is not None
    return s


# ---- the views, as pure functions of a real status ------------------------------------------
def test_a_canary_s_steps_stand_at_the_canary_with_a_bar(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    canary_at(store, Canary(1, 20, 6.0))
    s = status(store)
    assert steps(s) == [
        StepView("start cluster c2", Done.DONE),
        StepView("deploy the Serve apps, pass health checks", Done.DONE),
        StepView("canary steps", Done.CURRENT, "step 2/4 (pause 30s), weight now 20%", (1, 4)),
        StepView("all traffic on c2", Done.TODO, "", None),
    ]
    line = summary(s)
    assert line.startswith("digits upgrading r2: canary steps: step 2/4 (pause 30s), weight now")
    assert "analysis pass: error rate 0.0% (stable 0.0%), p99 80 ms" in line
    assert line.endswith("traffic c1=80%, c2=20%")

    put_state(store, canary_state(Canary(2, 20, 6.0, Hold.USER), verdict=VERDICT))
    assert "step 3/4 (weight 50%), weight now 20%, PAUSED by `raygate pause`" in summary(
        status(store)
    )


def test_a_blue_green_shows_its_health_streak(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    bluegreen_in_health(store, 2)
    s = status(store)
    assert [(v.label, v.state) for v in steps(s)] == [
        ("start cluster c2", Done.DONE),
        ("deploy the Serve apps, pass health checks", Done.CURRENT),
        ("switch traffic to c2", Done.TODO),
    ]
    assert steps(s)[1].detail == "2 OK in a row; 2 apps RUNNING"
    assert summary(s) == ("digits upgrading r2: deploy the Serve apps, pass health checks: "
                          "2 OK in a row; 2 apps RUNNING; traffic c1=100%, c2=0%")  # fmt: skip


def test_the_live_view_on_a_terminal(tmp_path: Path) -> None:
    """What `rich` draws for a real terminal (force_terminal: escape sequences, colours)."""
    store = Store(tmp_path / "db")
    canary_at(store, Canary(1, 20, 6.0))
    s = status(store)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=110, color_system="standard")
    console.print(view(s, now=5.0 + 72))  # the rollout started at 5.0
    text = out.getvalue()
    print(text)
    assert "\x1b[" in text, "no escape sequence: not drawn for a terminal"
    assert "digits" in text and "upgrading" in text and "r2 on c2 (new cluster, canary)" in text
    assert "elapsed 1m12s" in text
    assert "✓" in text and any(c in text for c in SPINNER), "no spinner on the current step"
    assert "step 2/4 (pause 30s), weight now 20%" in text
    assert "━" in text, "no bars (canary steps, traffic)"
    assert " 80%" in text and " 20%" in text
    assert "analysis: pass: error rate 0.0%" in text


def test_plain_output_prints_a_line_only_when_something_changed(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    canary_at(store, Canary(1, 20, 6.0))
    out = io.StringIO()
    progress = Progress(Mode.PLAIN, out)
    for flights in (1, 2, 3):  # in-flight counts change at every poll under load
        s = status_of(store, "digits", {"c1": flights, "c2": flights})
        assert s is not None
        progress.show([s])
    assert len(out.getvalue().splitlines()) == 1, out.getvalue()
    canary_at(store, Canary(2, 50, 6.0))
    progress.show([status(store)])
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "step 3/4 (weight 50%)" in lines[1], lines


def test_push_wait_on_a_terminal_draws_the_view_and_keeps_its_exit_code(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    canary_at(admin.store, Canary(3, 50, 6.0))  # at its `pause: {}` step: held for a person
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=110)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=admin.url, trust_env=False, headers=auth) as client:
        rc = _wait(client, "digits", 2, 5.0, Progress(Mode.LIVE, console=console))
    assert rc == 3
    assert "step 4/4 (pause until promoted)" in screen.getvalue()
    assert "\x1b[?25l" in screen.getvalue(), "no live display (hidden cursor)"
    assert "raygate promote digits" in capsys.readouterr().err


def test_push_wait_json_is_json_lines_and_words_go_to_stderr(
    admin: Admin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live_r1(admin.store)
    path = tmp_path / "v2.yaml"
    path.write_text(yaml.safe_dump(spec(label="b")))
    argv = ["push", str(path), "--wait", "--json", "--timeout", "2.5", "--admin-url", admin.url]
    assert main(argv) == 1  # nothing runs it: a timeout
    out, err = capsys.readouterr()
    docs = [json.loads(line) for line in out.splitlines()]
    assert docs[0]["revision"] == 2 and docs[0]["unchanged"] is False, "first: the answer"
    assert len(docs) == 2, "one status: it did not change (in-flight counts do not count)"
    assert docs[1]["name"] == "digits" and docs[1]["desired_revision"] == 2
    assert "revision 2 pushed" in err and "gave up waiting after 2.5s" in err


# ---- `raygate status --watch` as a process: a terminal, a pipe, JSON ------------------------
def cli(admin: Admin, *args: str) -> list[str]:
    return [sys.executable, "-m", "rollout.cli", *args, "--admin-url", admin.url]


def read_more(fd: int, seen: bytearray, within_s: float) -> bool:
    """What `fd` has within `within_s` (0: only what is there now); False when it ended."""
    ready, _, _ = select.select([fd], [], [], max(0.0, within_s))
    if not ready:
        return True
    try:
        chunk = os.read(fd, 65536)
    except OSError:  # a pty reads EIO once the process on it exited
        chunk = b""
    seen += chunk
    return bool(chunk)


def read_until(fd: int, seen: bytearray, want: bytes, lines: int = 0, within_s: float = 15) -> None:
    """Read until `want` is in the output and it holds `lines` lines."""
    deadline = time.monotonic() + within_s
    while want not in seen or seen.count(b"\n") < lines:
        left = deadline - time.monotonic()
        assert left > 0, f"{want!r} not seen in:\n{seen.decode(errors='replace')[-2000:]}"
        assert read_more(fd, seen, left), f"output ended:\n{seen.decode(errors='replace')}"


def test_status_watch_on_a_real_terminal(admin: Admin) -> None:
    canary_at(admin.store, Canary(1, 20, 6.0))
    leader, follower = pty.openpty()
    proc = subprocess.Popen(cli(admin, "status", "digits", "--watch"), cwd=ROOT,
                            stdin=follower, stdout=follower, stderr=follower,
                            env={**os.environ, "COLUMNS": "110", "TERM": "xterm"})  # fmt: skip
    os.close(follower)
    seen = bytearray()
    try:
        read_until(leader, seen, b"step 2/4 (pause 30s)")
        canary_at(admin.store, Canary(2, 50, 6.0))
        read_until(leader, seen, b"step 3/4 (weight 50%)")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
        while read_more(leader, seen, 0.2):
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    text = seen.decode(errors="replace")
    assert "\x1b[?25l" in text, "no live display (rich hides the cursor while it draws)"
    assert "Traceback" not in text
    assert any(c in text for c in SPINNER)


def watch_through_a_pipe(admin: Admin, *extra: str) -> list[str]:
    """`status digits --watch` into a pipe across two changes, with polls between them that
    must print nothing; returns its lines."""
    canary_at(admin.store, Canary(1, 20, 6.0))
    proc = subprocess.Popen(cli(admin, "status", "digits", "--watch", *extra), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    seen = bytearray()
    try:
        fd = proc.stdout.fileno()
        read_until(fd, seen, b"\n", lines=1)
        for i, canary in enumerate((Canary(2, 50, 6.0), Canary(3, 50, 6.0))):
            polls = admin.polls
            deadline = time.monotonic() + 15
            while admin.polls < polls + 2:  # a whole poll went by: it wrote what it had to
                assert time.monotonic() < deadline, "status --watch stopped polling"
                time.sleep(0.05)
            read_more(fd, seen, 0)
            assert seen.count(b"\n") == 1 + i, f"a line without a change:\n{seen.decode()}"
            canary_at(admin.store, canary)
            read_until(fd, seen, b"\n", lines=2 + i)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    return seen.decode().splitlines()


def test_status_watch_through_a_pipe_prints_a_line_per_change(admin: Admin) -> None:
    lines = watch_through_a_pipe(admin)
    print("\n".join(lines))
    assert len(lines) == 3, lines
    assert "step 2/4 (pause 30s)" in lines[0] and "\x1b" not in "".join(lines)
    assert "step 3/4 (weight 50%)" in lines[1] and "step 4/4 (pause until promoted)" in lines[2]


def test_status_watch_json_is_one_document_per_change(admin: Admin) -> None:
    docs = [json.loads(line) for line in watch_through_a_pipe(admin, "--json")]
    assert [d["pending"]["canary_step"]["index"] for d in docs] == [2, 3, 4]
    assert all(d["name"] == "digits" and "traffic" in d for d in docs)


def test_watching_every_service_draws_each(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    canary_at(store, Canary(1, 20, 6.0))
    store.push(parse_spec(spec(name="other", prefix="/other")), 3.0)
    put_state(store, ServiceState("other", Active("c9", 1, "h9")),
              RolloutRecord(1, Result.SUCCEEDED, "live"))  # fmt: skip
    screen = io.StringIO()
    with Progress(Mode.LIVE, console=Console(file=screen, force_terminal=True, width=110)) as p:
        p.show([s for n in ("digits", "other") if (s := status_of(store, n, {}))])
    text = screen.getvalue()
    assert "step 2/4" in text and "other" in text and "r1 on c9" in text
    assert "\x1b[34m━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━\x1b[0m 100%" in text, "a full bar"


def test_status_watch_into_a_reader_that_leaves_ends_quietly(admin: Admin) -> None:
    """`raygate status --watch | head -1`: once the reader has its line and goes, the watch
    ends at its next write, with 141 (as a shell says of a SIGPIPE'd writer), no traceback."""
    canary_at(admin.store, Canary(1, 20, 6.0))
    proc = subprocess.Popen(cli(admin, "status", "digits", "--watch"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        seen = bytearray()
        read_until(proc.stdout.fileno(), seen, b"\n", lines=1)
        proc.stdout.close()  # the reader leaves
        canary_at(admin.store, Canary(2, 50, 6.0))  # a change: the watch writes again
        assert proc.wait(15) == 141
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
