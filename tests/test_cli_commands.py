"""The canary commands and their status lines, from `raygate` (rollout.cli.main) to a real
admin API served by uvicorn on loopback over a real Store. No Ray: the states a controller
would write are committed to the store directly."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rollout.analysis import Outcome, Verdict
from rollout.api import create_admin_app
from rollout.cli import main
from rollout.plan import (
    Active,
    Analysis,
    Canary,
    Command,
    Hold,
    Result,
    Retiring,
    RolloutRecord,
    ServiceState,
)
from rollout.spec import parse_spec
from rollout.store import Store
from tests.loopback import free_port, served
from tests.test_api import TOKEN, canary_spec, canary_state, put_state, spec


class Admin:
    def __init__(self, store: Store, url: str) -> None:
        self.store = store
        self.url = url
        self.woken: list[str] = []

    def run(self, *argv: str) -> int:
        return main([*argv, "--admin-url", self.url])


@pytest.fixture
def admin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Admin]:
    monkeypatch.setenv("RAYGATE_TOKEN", TOKEN)
    store = Store(tmp_path / "raygate.db")
    port = free_port()
    admin = Admin(store, f"http://127.0.0.1:{port}")

    async def in_flight() -> dict[str, int]:
        return {}

    app = create_admin_app(store, TOKEN, admin.woken.append, in_flight)
    with served(app, port):
        yield admin
    store.close()


def live(store: Store, label: str, revision: int, cluster: str = "c1") -> None:
    """Push `label` as `revision` and commit it live on `cluster`."""
    number, _ = store.push(parse_spec(spec(label=label)), float(revision))
    assert number == revision
    put_state(store, ServiceState("digits", Active(cluster, revision, "h1")),
              RolloutRecord(revision, Result.SUCCEEDED, "live"))  # fmt: skip


def in_canary(store: Store, canary: Canary) -> None:
    """Revision 1 live on c1, revision 2 (canary.yaml's steps) at `canary` on c2."""
    live(store, "a", 1)
    store.push(parse_spec(canary_spec()), 2.0)
    verdict = Verdict(Outcome.INCONCLUSIVE, "not enough traffic to judge: 12 requests in 5 s",
                      12, 40, 0.0, 0.0, 80.0)  # fmt: skip
    put_state(store, canary_state(canary, verdict=verdict))


def test_pause_resume_promote_and_abort(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    in_canary(admin.store, Canary(1, 20, 6.0))
    assert admin.run("pause", "digits") == 0
    assert "digits: pause queued" in capsys.readouterr().out
    assert admin.run("promote", "digits", "--full") == 0
    assert "digits: promote --full queued" in capsys.readouterr().out
    assert admin.run("promote", "digits") == 0
    assert admin.run("abort", "digits") == 0
    state = admin.store.load("digits")
    queued = (Command("pause"), Command("promote", True), Command("promote"), Command("abort"))
    assert state is not None and state.commands == queued
    assert admin.woken == ["digits"] * 4

    assert admin.run("resume", "digits") == 1  # not paused (the queued pause is not applied)
    err = capsys.readouterr().err
    assert "raygate: resume digits: the canary is not paused" in err
    put_state(admin.store, canary_state(Canary(1, 20, 6.0, Hold.USER)))
    assert admin.run("resume", "digits") == 0
    assert "digits: resume queued" in capsys.readouterr().out


def test_a_command_that_does_not_apply_prints_why_and_exits_1(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    live(admin.store, "a", 1)
    for kind in ("promote", "abort", "pause", "resume"):
        assert admin.run(kind, "digits") == 1, kind
        assert f"raygate: {kind} digits: no rollout in progress" in capsys.readouterr().err
    assert admin.run("rollback", "digits") == 1
    assert "no good revision before the live one (1)" in capsys.readouterr().err
    assert admin.run("promote", "nope") == 1
    assert "404" in capsys.readouterr().err
    assert admin.woken == []


def test_rollback_then_history_says_rollback_of_and_rolled_back(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    live(admin.store, "a", 1)
    live(admin.store, "b", 2, "c2")
    assert admin.run("rollback", "digits", "--to", "1") == 0
    out = capsys.readouterr().out
    assert "digits: revision 3 brings back the spec of revision 1" in out
    # What the controller records once revision 3 is live again: 2 was rolled back.
    put_state(admin.store, ServiceState("digits", Active("c1", 3, "h1")),
              RolloutRecord(2, Result.ROLLED_BACK, "rolled back by revision 3"),
              RolloutRecord(3, Result.SUCCEEDED, "live"))  # fmt: skip
    assert admin.run("history", "digits") == 0
    lines = capsys.readouterr().out.splitlines()
    assert "rolled_back" in lines[1] and "rolled back by revision 3" in lines[1]
    assert "succeeded  rollback of r1" in lines[2]
    assert "rollback of" not in lines[0] + lines[1]


def test_status_shows_the_canary_and_the_bake_window(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    in_canary(admin.store, Canary(1, 20, 6.0))
    assert admin.run("status", "digits") == 0
    out = capsys.readouterr().out
    assert "canary:  step 2/4 (pause 30s), weight now 20%" in out
    assert "PAUSED" not in out
    assert ("analysis: inconclusive: not enough traffic to judge: 12 requests in 5 s "
            "(failed 0, no data 1 in a row)") in out  # fmt: skip
    assert "traffic: c1=80%, c2=20%" in out

    put_state(admin.store, canary_state(Canary(3, 50, 6.0)))
    assert admin.run("status", "digits") == 0
    out = capsys.readouterr().out
    assert "step 4/4 (pause until promoted), weight now 50%, PAUSED: waiting for `raygate " \
        "promote`" in out  # fmt: skip
    put_state(admin.store, canary_state(Canary(2, 20, 6.0, Hold.NO_DATA)))
    assert admin.run("status", "digits") == 0
    assert "PAUSED: not enough traffic to judge" in capsys.readouterr().out

    until = time.time() + 600
    baking = ServiceState(
        "digits", Active("c2", 2, "h2"), retiring=(Retiring("c1", 9.0, 30.0, 0.0, 1, until),),
        analysis=Analysis("c2", None, 9.0),
    )  # fmt: skip
    put_state(admin.store, baking, RolloutRecord(2, Result.SUCCEEDED, "live"))
    assert admin.run("status", "digits") == 0
    out = capsys.readouterr().out
    stamp = time.strftime("%H:%M:%S", time.localtime(until))
    assert f"baking:  c1 (r1) kept at weight 0 until {stamp}, ready to take traffic back" in out
    assert "bake analysis: not judged yet: no interval judged yet" in out
    assert "canary:" not in out


def test_a_missing_service_is_said_in_words_not_as_a_python_dict(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    """`raygate status nope` printed `raygate: 404: {'detail': "no service 'nope'"}`: the
    server's words inside a Python dict's repr."""
    for argv in (("status", "nope"), ("history", "nope"), ("delete", "nope")):
        assert admin.run(*argv) == 1, argv
        err = capsys.readouterr().err
        assert err == "raygate: no service 'nope' (404)\n", (argv, err)
