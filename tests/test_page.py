"""The status page's access rules, without a browser: nothing with service data without the
token or a session; the session cookie is HttpOnly, SameSite=Strict and not the token; a
cookie alone never changes anything (CSRF); logout ends the session; a session survives a
restart. And the rates the charts draw. (The page itself: tests/test_e2e_page.py.)"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.metrics import Totals
from rollout.api import create_admin_app
from rollout.rates import RateHistory
from rollout.sessions import COOKIE, CSRF_HEADER, Sessions
from rollout.spec import parse_spec
from rollout.store import Store
from tests.test_api import spec

TOKEN = "page-test-token-of-24-characters"
DATA_ROUTES = ["/ui/state", "/ui/state/digits", "/v1/services", "/v1/services/digits",
               "/v1/services/digits/history", "/metrics"]  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "raygate.db")
    s.push(parse_spec(spec()), 1.0)
    return s


def make_client(store: Store, sessions: Sessions, base_url: str = "http://admin"
                ) -> httpx.AsyncClient:  # fmt: skip
    async def in_flight() -> dict[str, int]:
        return {}

    from prometheus_client import CollectorRegistry

    app = create_admin_app(store, TOKEN, lambda name: None, in_flight,
                           metrics_registry=CollectorRegistry(), sessions=sessions,
                           rates=RateHistory())  # fmt: skip
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)


@pytest.fixture
async def client(store: Store, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(store, Sessions(tmp_path / "sessions.json")) as c:
        yield c


async def login(client: httpx.AsyncClient, token: str = TOKEN) -> httpx.Response:
    return await client.post("/login", data={"token": token})


async def csrf_of(client: httpx.AsyncClient) -> str:
    page = (await client.get("/")).text
    marker = 'name="raygate-csrf" content="'
    assert marker in page
    return page.split(marker, 1)[1].split('"', 1)[0]


async def test_nothing_with_data_without_token_or_session(client: httpx.AsyncClient) -> None:
    for route in DATA_ROUTES:
        r = await client.get(route)
        assert r.status_code == 401, route
        assert "digits" not in r.text or route.endswith("digits"), route
    for page in ("/", "/services/digits"):
        r = await client.get(page)
        assert r.status_code == 401 and 'name="token"' in r.text, page
        assert "raygate-csrf" not in r.text and "/digits" not in r.text
    # A token in the URL is not a credential
    assert (await client.get(f"/ui/state?token={TOKEN}")).status_code == 401
    # Static files carry no data and need nothing
    for f in ("page.js", "page.css"):
        assert (await client.get(f"/static/{f}")).status_code == 200
    assert (await client.get("/static/../api.py")).status_code == 404


async def test_the_cookie_is_secure_over_https_only(store: Store, tmp_path: Path) -> None:
    """Over HTTPS (a TLS proxy in front) the cookie must never go out in clear text; over
    plain HTTP on loopback a Secure cookie would never come back, so it is not set there."""
    for scheme, secure in (("https", True), ("http", False)):
        sessions = Sessions(tmp_path / f"{scheme}.json")
        async with make_client(store, sessions, f"{scheme}://admin") as c:
            parts = [p.strip().lower() for p in (await login(c)).headers["set-cookie"].split(";")]
            assert ("secure" in parts) is secure, scheme


async def test_wrong_token_is_refused_with_no_session(client: httpx.AsyncClient) -> None:
    r = await login(client, "wrong-" + TOKEN)
    assert r.status_code == 401 and "wrong token" in r.text
    assert "set-cookie" not in r.headers and not client.cookies
    assert (await client.get("/ui/state")).status_code == 401


async def test_login_sets_an_httponly_strict_cookie_that_is_not_the_token(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    r = await login(client)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    parts = [p.strip().lower() for p in cookie.split(";")]
    assert "httponly" in parts and "samesite=strict" in parts and "path=/" in parts
    sid = client.cookies[COOKIE]
    assert len(sid) >= 40 and TOKEN not in sid and sid != TOKEN
    # Only a digest of it is on disk, readable by raygate's user alone
    saved = tmp_path / "sessions.json"
    assert sid not in saved.read_text() and TOKEN not in saved.read_text()
    assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600
    r = await client.get("/ui/state")
    assert r.status_code == 200
    [svc] = r.json()["services"]
    assert svc["name"] == "digits" and svc["phase"] == "deploying" and svc["history"]
    assert (await client.get("/v1/services/digits")).status_code == 200
    page = await client.get("/")
    assert page.status_code == 200 and "raygate-csrf" in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    # Two logins are two sessions
    other = client.cookies[COOKIE]
    client.cookies.clear()
    await login(client)
    assert client.cookies[COOKIE] != other


async def test_cookie_alone_changes_nothing_csrf(client: httpx.AsyncClient, store: Store) -> None:
    await login(client)
    csrf = await csrf_of(client)
    route = "/v1/services/digits/pause"
    assert (await client.post(route, json={})).status_code == 401  # no CSRF header
    assert (await client.post(route, json={}, headers={CSRF_HEADER: "x" * 43})).status_code == 401
    cross = {CSRF_HEADER: csrf, "Sec-Fetch-Site": "cross-site"}
    assert (await client.post(route, json={}, headers=cross)).status_code == 401
    evil = {CSRF_HEADER: csrf, "Origin": "http://evil.example"}
    assert (await client.delete("/v1/services/digits", headers=evil)).status_code == 401
    assert store.load("digits") is not None and not store.load("digits").deleting  # type: ignore[union-attr]
    # With the page's header, from the page: the API answers (409: nothing to pause)
    same = {CSRF_HEADER: csrf, "Sec-Fetch-Site": "same-origin"}
    assert (await client.post(route, json={}, headers=same)).status_code == 409
    assert (await client.delete("/v1/services/digits", headers=same)).status_code == 202
    # A login posted from another site is refused (login CSRF)
    client.cookies.clear()
    r = await client.post("/login", data={"token": TOKEN}, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403 and not client.cookies


async def test_bearer_clients_need_no_csrf(client: httpx.AsyncClient) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert (await client.post("/v1/services/digits/pause", json={}, headers=bearer)).status_code \
        == 409  # fmt: skip
    assert (await client.get("/ui/state", headers=bearer)).status_code == 200


async def test_logout_ends_the_session(client: httpx.AsyncClient) -> None:
    await login(client)
    csrf = await csrf_of(client)
    sid = client.cookies[COOKIE]
    assert (await client.post("/logout", data={})).status_code == 403
    r = await client.post("/logout", data={"csrf": csrf})
    assert r.status_code == 303 and COOKIE in r.headers["set-cookie"]
    client.cookies.clear()
    client.cookies[COOKIE] = sid  # the old id, kept by an attacker, is worth nothing now
    assert (await client.get("/ui/state")).status_code == 401


async def test_a_session_survives_a_restart_not_a_new_token(store: Store, tmp_path: Path) -> None:
    saved = tmp_path / "sessions.json"
    async with make_client(store, Sessions(saved, TOKEN.encode())) as first:
        await login(first)
        sid = first.cookies[COOKIE]
    async with make_client(store, Sessions(saved, TOKEN.encode())) as second:
        second.cookies[COOKIE] = sid
        assert (await second.get("/ui/state")).status_code == 200
    # The token rotated (raygate restarted with another): the old sessions are worth nothing
    async with make_client(store, Sessions(saved, b"another-token")) as third:
        third.cookies[COOKIE] = sid
        assert (await third.get("/ui/state")).status_code == 401


def test_sessions_expire() -> None:
    sessions = Sessions(ttl_s=10)
    sid, _ = sessions.create(now=100.0)
    assert sessions.get(sid, now=105.0) is not None
    assert sessions.get(sid, now=111.0) is None


def test_rates_between_samples() -> None:
    def totals(n: int, e: int) -> dict[str, dict[str, Totals]]:
        return {"digits": {"a": Totals(n, e, (float("inf"),), (n,))}}

    rates = RateHistory(every_s=5, keep=3)
    rates.record(0.0, totals(0, 0))
    rates.record(5.0, totals(50, 5))
    rates.record(10.0, totals(50, 5))
    rates.record(15.0, totals(20, 0))  # the counters restarted: a fresh start, not negative
    points = rates.series("digits")["a"]
    assert [(p["at"], p["rps"], p["error_rate"]) for p in points] == [
        (10.0, 0.0, None), (15.0, 4.0, 0.0)]  # the oldest sample fell out of the ring
    assert rates.series("other") == {}


def test_rates_leave_out_a_cluster_before_it_is_counted() -> None:
    rates = RateHistory()
    one = Totals(10, 0, (float("inf"),), (10,))
    rates.record(0.0, {"digits": {"a": one}})
    rates.record(5.0, {"digits": {"a": one}})
    rates.record(10.0, {"digits": {"a": one, "b": Totals(5, 5, (float("inf"),), (5,))}})
    series = rates.series("digits")
    assert [p["at"] for p in series["a"]] == [5.0, 10.0]
    assert [(p["at"], p["rps"], p["error_rate"]) for p in series["b"]] == [(10.0, 1.0, 1.0)]
