"""One rule for what a route prefix may hold (`route_prefix_problem`), applied at push time
(spec validation), by the route table, by `raygate gateway --route`, and checked again before
a prefix is written into haproxy.cfg.

Before the rule, a prefix with "#" or a newline reached haproxy.cfg and the reload failed
(every later change stalled with it), and "/a b" was read by HAProxy as two patterns."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway.haproxy_config import HAProxySettings, render
from gateway.haproxy_engine import haproxy_binary
from gateway.routes import Backend, Route, RouteTable, route_prefix_problem
from rollout.spec import SpecError, parse_spec
from tests.test_spec import base

UNSAFE = ["/a b", "/a#b", "/a\nb", '/a"b', "/a'b", "/a%20b", "/a{b}", "/a\\b", "/a;b", "/é"]
MALFORMED = ["a", "/a/", "//a", "/a//b", "/a/../b", "/."]
SAFE = ["/", "/digits", "/a/b", "/v1.2", "/x_y-z~w", "/x__y", "/A/B-c"]


def test_the_rule() -> None:
    assert [p for p in SAFE if route_prefix_problem(p) is not None] == []
    assert [p for p in UNSAFE + MALFORMED if route_prefix_problem(p) is None] == []
    assert "'#'" in (route_prefix_problem("/a#b") or "")


def test_the_route_table_refuses_an_unsafe_prefix() -> None:
    backend = (Backend("c", "http://127.0.0.1:1", 1),)
    for prefix in UNSAFE:
        with pytest.raises(ValueError, match="route prefix"):
            RouteTable((Route(prefix, "s", "a", backend),))


def test_render_checks_again_what_it_writes(tmp_path: Path) -> None:
    """A prefix that got past the table some other way is still never written."""
    table = RouteTable((Route("/ok", "s", "a", (Backend("c", "http://127.0.0.1:1", 1),)),))
    object.__setattr__(table, "routes", (Route("/a#b", "s", "a", table.routes[0].backends),))
    with pytest.raises(ValueError, match="route prefix"):
        render(table, HAProxySettings(tmp_path))


def test_every_safe_prefix_makes_a_config_haproxy_accepts(tmp_path: Path) -> None:
    """Real HAProxy checks the config: names derived from these prefixes (including ones
    that differ only in "_" and "~") are valid and distinct."""
    table = RouteTable(tuple(
        Route(p, "s", f"app{i}", (Backend("c1", "http://127.0.0.1:1", 1),
                                  Backend("odd cluster/name", "http://127.0.0.1:2", 0)))
        for i, p in enumerate([*SAFE, "/x~y", "/x_ty", "/x_y"])
    ))  # fmt: skip
    (tmp_path / "hx").mkdir()
    config = tmp_path / "hx" / "haproxy.cfg"
    config.write_text(render(table, HAProxySettings(tmp_path / "hx")))
    out = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(config)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stdout + out.stderr


def spec_with(prefix: str) -> dict[str, Any]:
    raw = base()
    raw["serve"]["applications"][0]["route_prefix"] = prefix
    return raw


def test_a_push_with_an_unsafe_prefix_is_refused_naming_the_field() -> None:
    for prefix in UNSAFE:
        with pytest.raises(SpecError) as info:
            parse_spec(spec_with(prefix))
        assert [f for f, _ in info.value.problems] == ["serve.applications[0].route_prefix"]
    assert parse_spec(spec_with("/x_y-z~w")).app_routes() == {"digits": "/x_y-z~w"}
