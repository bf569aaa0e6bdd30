"""haproxy.cfg as text: a snapshot of a rendered config, and the values derived from the
route table (hard-stop-after), checked on the text and on a real HAProxy."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import httpx

from gateway.haproxy_config import HAProxySettings, render
from gateway.haproxy_engine import HAProxyEngine
from gateway.haproxy_names import backend_name, server_name, weight_commands
from gateway.limits import Limits
from gateway.routes import Backend, Route, RouteTable
from tests.loopback import free_port, labelled_upstreams, until

SNAPSHOT = Path(__file__).with_name("snapshots") / "haproxy.cfg"
SNAPSHOT_DIR = Path("/run/raygate-snapshot")  # a fixed work dir, so the text is stable


def snapshot_table() -> RouteTable:
    """Two services, a canary, a retiring cluster at 0, the root route and a long timeout."""
    return RouteTable((
        Route("/", "web", "root", (Backend("web-a1b2c3", "http://127.0.0.2:8100", 1),)),
        Route("/digits", "digits", "digits", (
            Backend("digits-0f0f0f", "http://127.0.0.3:8100", 90),
            Backend("digits-1e1e1e", "http://127.0.0.4:8100", 10),
            Backend("digits-2d2d2d", "http://127.0.0.5:8100", 0),
        ), timeout_s=120),
        Route("/digits/v2", "digits", "v2",
              (Backend("digits-0f0f0f", "http://127.0.0.3:8100", 1),)),
    ))  # fmt: skip


def snapshot_text() -> str:
    settings = HAProxySettings(
        SNAPSHOT_DIR, port=8000, limits=Limits(max_body_bytes=1_000_000), health_path="/-/healthz"
    )
    return render(snapshot_table(), settings).replace(str(Path(__file__).parent.parent), "<src>")


def test_rendered_config_matches_the_snapshot() -> None:
    """Any change to the rendered config shows here as a diff of tests/snapshots/haproxy.cfg.
    After a deliberate change, regenerate it: RAYGATE_SNAPSHOT=write pytest -k snapshot."""
    text = snapshot_text()
    if os.environ.get("RAYGATE_SNAPSHOT") == "write":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(text)
    assert text == SNAPSHOT.read_text(), "see the docstring to regenerate the snapshot"


def hard_stop(table: RouteTable, limits: Limits) -> int:
    text = render(table, HAProxySettings(Path("/x"), limits=limits))
    found = re.search(r"^\s+hard-stop-after (\d+)s$", text, re.MULTILINE)
    assert found is not None
    return int(found.group(1))


def test_hard_stop_after_outlasts_the_longest_route_timeout() -> None:
    """An old worker is cut hard-stop-after a reload: never before a request could have had
    its answer (before: a fixed 60 s, which cut a 300 s route's requests)."""
    backend = (Backend("c", "http://127.0.0.1:1", 1),)
    table = RouteTable((Route("/a", "s", "a", backend, 30), Route("/b", "s", "b", backend, 300)))
    limits = Limits(connect_timeout_s=5)
    assert hard_stop(table, limits) >= 300 + 3 * 5
    assert hard_stop(RouteTable((Route("/a", "s", "a", backend, 3),)), limits) < 60


async def test_a_request_younger_than_its_timeout_outlives_a_reload(tmp_path: Path) -> None:
    """Real HAProxy: a route with a 3 s timeout, a request taking 2.5 s, a reload under it
    (hard-stop-after is then 3 + 3 x 0.5 + 5 = 10 s, not 60 s): the answer arrives."""
    settings = HAProxySettings(tmp_path / "hx", port=free_port(),
                               limits=Limits(connect_timeout_s=0.5))  # fmt: skip
    engine = HAProxyEngine(settings)
    await engine.start()
    try:
        async with labelled_upstreams("a") as (a,):
            route = Route("/svc", "svc", "app", (Backend("a", a.url, 1),), timeout_s=3)
            await engine.apply(RouteTable((route,)))
            async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
                url = f"http://127.0.0.1:{settings.port}/svc/slow?s=2.5"
                slow = asyncio.create_task(client.get(url))
                await until(lambda: a.slow_in_flight == 1)
                other = Route("/other", "o", "o", (Backend("a", a.url, 1),), timeout_s=3)
                await engine.apply(RouteTable((route, other)))  # a reload
                _current, old = await engine.workers()
                assert old, "the request should be on an old worker now"
                response = await slow
            assert (response.status_code, response.text) == (200, "a")
    finally:
        await engine.drain(10)


def test_weight_commands_raise_before_they_lower_and_skip_what_did_not_change() -> None:
    def svc(*weights: int) -> RouteTable:
        names = ("a", "b", "c")
        return RouteTable((Route("/svc", "s", "app", tuple(
            Backend(n, f"http://127.0.0.1:{i + 1}", w) for i, (n, w) in enumerate(
                zip(names, weights, strict=True))
        )),))  # fmt: skip

    assert weight_commands(svc(0, 1, 5), since=svc(1, 0, 5)) == [
        "set server rt:svc/b weight 1",
        "set server ck:svc/b weight 1",
        "set server rt:svc/a weight 0",
        "set server ck:svc/a weight 0",
    ]
    assert weight_commands(svc(1, 0, 5), since=svc(1, 0, 5)) == []
    assert len(weight_commands(svc(1, 0, 5))) == 6  # no `since`: every server


def test_names_depend_on_the_prefix_and_cluster_alone() -> None:
    assert (backend_name("/"), backend_name("/a/b_c~d")) == ("rt:", "rt:a:b__c_td")
    assert server_name("digits-a1b2c3") == "digits-a1b2c3"
    odd = server_name("odd name/1")
    assert odd.startswith("odd_name_1-") and odd == server_name("odd name/1")
    assert server_name("odd name/2") != odd
