"""`raygate diff SPEC` from rollout.cli.main to a real admin API (uvicorn on loopback, a
real Store, no Ray): its exit codes (0 no change, 1 a change, 2 an invalid spec, found by
the CLI or by the server) and what it prints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from rollout.api import create_admin_app
from rollout.cli import main
from rollout.cli_diff import render
from rollout.plan import Active, Result, RolloutRecord, ServiceState
from rollout.spec import ServiceSpec, parse_spec
from rollout.store import Store
from tests.loopback import free_port, served
from tests.test_api import TOKEN, put_state, spec

MAX_CPUS = 8  # what this test's stand-in for a provider check accepts


def provider_check(s: ServiceSpec) -> list[tuple[str, str]]:
    """A stand-in for the running provider's check (create_admin_app's `check_spec`)."""
    if s.cluster.num_cpus > MAX_CPUS:
        return [("cluster.num_cpus", f"more than this machine's {MAX_CPUS} CPUs")]
    return []


@pytest.fixture
def admin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Store, str]]:
    monkeypatch.setenv("RAYGATE_TOKEN", TOKEN)
    store = Store(tmp_path / "raygate.db")
    port = free_port()

    async def in_flight() -> dict[str, int]:
        return {}

    app = create_admin_app(store, TOKEN, lambda name: None, in_flight, check_spec=provider_check)
    with served(app, port):
        yield store, f"http://127.0.0.1:{port}"
    store.close()


def write(tmp_path: Path, raw: dict[str, Any], name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def diff(url: str, path: Path, *extra: str) -> int:
    return main(["diff", str(path), "--admin-url", url, *extra])


def test_exit_codes_and_output(
    admin: tuple[Store, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, url = admin
    assert diff(url, write(tmp_path, spec(label="a"))) == 1  # nothing live yet
    out = capsys.readouterr().out
    assert out.startswith("digits: new cluster (against no live revision)\n")
    assert "  + digits (added)\n" in out and "+++ digits/serve\n" in out

    store.push(parse_spec(spec(label="a")), 1.0)
    put_state(store, ServiceState("digits", Active("c1", 1, parse_spec(spec()).cluster_hash())),
              RolloutRecord(1, Result.SUCCEEDED, "live"))  # fmt: skip
    assert diff(url, write(tmp_path, spec(label="a"))) == 0
    out = capsys.readouterr().out
    assert out == "digits: no change (against live revision 1)\n  - identical to live revision 1\n"

    assert diff(url, write(tmp_path, spec(label="b"))) == 1
    out = capsys.readouterr().out
    assert out.startswith("digits: in place (against live revision 1)\n")
    assert "strategy: in place (the live cluster's Serve config is updated;" in out
    assert "      ~ deployment DigitsClassifier (changed)\n" in out
    assert "-      label: a\n+      label: b\n" in out  # plain: not a terminal
    assert "\033[" not in out
    assert len(store.history("digits")) == 1  # nothing stored


def test_an_invalid_spec_is_2_whether_the_cli_or_the_server_finds_it(
    admin: tuple[Store, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, url = admin
    bad = spec()
    bad["cluster"]["num_cpu"] = 3
    assert diff(url, write(tmp_path, bad)) == 2  # found here: never sent
    assert "cluster.num_cpu: unknown field" in capsys.readouterr().err

    too_big = spec()
    too_big["cluster"]["num_cpus"] = MAX_CPUS + 1  # valid spec; the server's provider refuses
    assert diff(url, write(tmp_path, too_big)) == 2
    err = capsys.readouterr().err
    assert "invalid spec (422)" in err and "cluster.num_cpus: more than this machine's" in err

    store.push(parse_spec(spec()), 1.0)  # owns /digits
    assert diff(url, write(tmp_path, spec()), "--service", "other") == 2
    assert "route_prefix '/digits' is owned by service 'digits'" in capsys.readouterr().err
    assert diff(url, tmp_path / "missing.yaml") == 2
    assert store.service_names() == ["digits"]


def test_colour_only_marks_diff_lines() -> None:
    plan = {"name": "d", "change": "in_place", "live_revision": 1, "reasons": ["x changed"],
            "applications": [], "strategy": None,
            "serve_diff": "--- a\n+++ b\n@@ -1 +1 @@\n-x: 1\n+x: 2\n"}  # fmt: skip
    text = "".join(render(plan, colour=True))
    assert "\033[31m-x: 1\033[0m\n\033[32m+x: 2\033[0m\n" in text
    assert "--- a\n+++ b\n\033[36m@@ -1 +1 @@\033[0m\n" in text
