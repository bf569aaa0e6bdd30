"""Faults a cold review of issue 12's work found, each shown by a test that failed before its
fix: the plan preview against the real planner while a canary's cluster is pending (reused,
or draining), `raygate diff`'s exit code on a spec that is not UTF-8 or an answer that is no
plan, a service's page once its service is gone (real Chromium), the page's poll of the whole
history, and the health series of a live cluster whose deployments autoscale. No Ray."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml

from rollout.cli import main
from rollout.controller import Controller
from rollout.plan import (
    Active,
    Canary,
    ClusterObservation,
    Health,
    Kind,
    Liveness,
    Observation,
    Pending,
    ServiceState,
    Step,
    plan,
)
from rollout.spec import parse_spec
from rollout.store import Store
from tests import test_api, test_page_browser
from tests.test_api import put_state, spec
from tests.test_controller import (
    Clock,
    DataPlaneDouble,
    FakeCluster,
    ProviderDouble,
    Rig,
    ServeDouble,
)
from tests.test_plan_preview import _canary, live, with_env

store, client = test_api.store, test_api.client  # the admin API over a real Store (fixtures)
admin = test_page_browser.admin  # the same, served on loopback for the browser (a fixture)


async def test_undoing_a_canary_by_pushing_the_live_spec_again_previews_what_the_planner_does(
    client: httpx.AsyncClient, store: Store
) -> None:
    """A serve-only canary (revision 2) rolls out on its own cluster c2; the user previews
    the live spec again (the usual undo). The planner supersedes revision 2 and reuses c2
    (same cluster hash): a new-cluster rollout, not an in-place update of c1."""
    live(store, _canary(spec(label="a")))
    store.push(parse_spec(_canary(spec(label="b"))), 2.0)
    active = Active("c1", 1, parse_spec(spec()).cluster_hash())
    pending = Pending(2, Kind.NEW_CLUSTER, "c2", active.cluster_hash, Step.HEALTH, 2.0)
    put_state(store, ServiceState("digits", active, pending))
    body = (await client.post("/v1/services/digits/plan", json=_canary(spec(label="a")))).json()

    pushed = await client.put("/v1/services/digits", json=_canary(spec(label="a")))
    assert pushed.status_code == 202
    state = store.load("digits")
    assert state is not None
    revisions = {n: store.revision("digits", n) for n in (1, 2, 3)}
    seen = Observation({"c1": ClusterObservation(Liveness.UP, Health.OK),
                        "c2": ClusterObservation(Liveness.UP, Health.OK)})  # fmt: skip
    after = plan(state, revisions[3], revisions, seen, 10.0, "c3").state.pending
    assert after is not None and (after.kind, after.cluster) == (Kind.NEW_CLUSTER, "c2")
    assert body["change"] == after.kind.value, body
    assert "reuses revision 2's pending cluster c2" in body["reasons"]
    assert body["strategy"]["name"] == "canary"  # it walks its canary steps on c2


def test_diff_of_a_spec_that_is_not_utf8_exits_2_not_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit 1 means "a push would change something"; a file raygate cannot read is 2."""
    monkeypatch.setenv("RAYGATE_TOKEN", "t" * 24)
    bad = tmp_path / "spec.yaml"
    bad.write_bytes(b'name: digits\ncluster: {env: {A: "\xff\xfe"}}\n')
    code = main(["diff", str(bad), "--admin-url", "http://127.0.0.1:9"])  # never asked
    assert code == 2
    assert "spec.yaml" in capsys.readouterr().err


def test_push_of_a_spec_that_is_not_utf8_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`raygate push` shares the fault: a traceback (exit 1) instead of "invalid spec" (2)."""
    monkeypatch.setenv("RAYGATE_TOKEN", "t" * 24)
    bad = tmp_path / "spec.yaml"
    bad.write_bytes(b'name: digits\ncluster: {env: {A: "\xff\xfe"}}\n')
    assert main(["push", str(bad), "--admin-url", "http://127.0.0.1:9"]) == 2
    assert "invalid spec" in capsys.readouterr().err


def test_a_service_page_of_a_deleted_service_says_so_not_that_raygate_is_unreachable(
    admin: tuple[str, Store],
) -> None:
    """A user who deletes a service from its own page (or follows an old link) met
    "raygate unreachable, retrying…" over the last state drawn, forever: raygate answered,
    with a 404. In a real browser (Debian's Chromium) against the real admin API."""
    from playwright.sync_api import expect

    from tests.browser import chromium
    from tests.test_page_browser import TOKEN

    url, store = admin
    with chromium() as browser:
        page = browser.new_context().new_page()
        page.goto(url + "/services/digits")
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")
        page.goto(url + "/services/digits")
        expect(page.locator("section.card[data-name=digits]")).to_be_visible()
        loaded = store.load_versioned("digits")
        assert loaded is not None
        # The controller's last tick of a deletion
        store.commit(loaded[0], [], [], 3.0, version=loaded[1], gone=True)
        assert store.load("digits") is None
        expect(page.locator("#main")).to_contain_text("No service digits", timeout=10_000)
        expect(page.locator("section.card")).to_have_count(0)
        assert "unreachable" not in (page.locator("#conn").text_content() or "")


class AutoscalingServe(ServeDouble):
    """Serve's REST API (a test double at our interface, as in tests/test_controller.py) whose
    deployments, once `scaling`, autoscale up: Serve then says the app is RUNNING ("all
    deployments are healthy or autoscaling") and each deployment UPSCALING, 1 of 2 replicas
    running while the second waits for a node."""

    scaling = False

    def _dashboard(self, c: FakeCluster, request: httpx.Request) -> httpx.Response:
        resp = super()._dashboard(c, request)
        if not self.scaling or request.method != "GET":
            return resp
        body = resp.json()
        for app in body["applications"].values():
            for dep in app["deployments"].values():
                dep.update(status="UPSCALING", target_num_replicas=2)
        return httpx.Response(200, json=body)


async def test_an_autoscaling_live_cluster_is_not_a_service_without_a_healthy_cluster(
    tmp_path: Path,
) -> None:
    """RaygateServiceWithoutHealthyCluster (critical) reads raygate_service_healthy_clusters
    == 0 for 3 minutes. A live cluster whose deployment autoscales up (waiting minutes for a
    node on a KubeRay cluster) serves every request, yet its health check says PENDING (the
    rollout gate's strictness), so the gauge reads 0 and the alert pages someone."""
    serve = AutoscalingServe()
    store = Store(tmp_path / "raygate.db")
    clock = Clock()
    async with httpx.AsyncClient(transport=httpx.MockTransport(serve.handler)) as http:
        provider, plane = ProviderDouble(serve), DataPlaneDouble()
        controller = Controller(store, provider, plane, http, clock=clock)
        rig = Rig(store, provider, plane, serve, clock, controller)
        await rig.live()
        serve.scaling = True
        await rig.tick(3, dt=60)  # three minutes of autoscaling
        registry = controller.metrics.registry
        labels = {"service": "svc"}
        assert registry.get_sample_value("raygate_service_healthy_clusters", labels) == 1
        assert rig.status()[1] is None  # nothing rolls out: the gate's PENDING is unchanged
    store.close()


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, text="<html>a login page of some proxy</html>"),
        httpx.Response(200, json={"prediction": 7}),  # a Serve app on the gateway's port
    ],
)
def test_diff_against_something_that_is_not_raygate_exits_2_not_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], answer: httpx.Response
) -> None:
    """`--admin-url` at the wrong port: a 200 that is no plan made `raygate diff` crash with
    a traceback, exit 1 ("a push would change something"). The other server is a double."""
    from argparse import Namespace

    from rollout.cli_diff import diff

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec()))
    transport = httpx.MockTransport(lambda request: answer)
    with httpx.Client(transport=transport, base_url="http://127.0.0.1:8000") as other:
        assert diff(Namespace(spec=path, service=None), other) == 2
    assert "not a plan" in capsys.readouterr().err


async def test_the_page_polls_a_bounded_history_however_many_revisions(
    client: httpx.AsyncClient, store: Store
) -> None:
    """The page draws the newest 12 revisions, but every 2 s each open tab fetched the whole
    history, messages (Serve's tracebacks) and all, encoded in the controller's event loop:
    3,000 aborted revisions made each poll 3.5 MB and ~200 ms here."""
    traceback = "Traceback (most recent call last):\n" + "  File app.py, line 1\n" * 40
    for i in range(60):
        store.push(parse_spec(spec(label=str(i))), float(i))
    with store.transaction() as db:
        db.execute("UPDATE revisions SET result='aborted', message=?", (traceback,))
    for path in ("/ui/state", "/ui/state/digits"):
        r = await client.get(path)
        assert r.status_code == 200
        history = r.json()["services"][0]["history"]
        assert [h["revision"] for h in history] == list(range(49, 61)), path
        assert len(r.content) < 40_000, (path, len(r.content))


async def test_a_push_over_a_canary_that_carried_traffic_previews_the_wait_the_planner_does(
    client: httpx.AsyncClient, store: Store
) -> None:
    """A canary (revision 2, on c2) carries 20% of the traffic; the user previews a cluster
    change. The planner drains c2 (its requests finish) and the new cluster waits for it to
    go: two clusters at most. The preview said nothing of the wait."""
    live(store, _canary(spec(label="a")))
    store.push(parse_spec(_canary(spec(label="b"))), 2.0)
    active = Active("c1", 1, parse_spec(spec()).cluster_hash())
    canary = Pending(2, Kind.NEW_CLUSTER, "c2", active.cluster_hash, Step.CANARY, 2.0,
                     canary=Canary(0, 20, 5.0))  # fmt: skip
    put_state(store, ServiceState("digits", active, canary))
    moved = with_env(spec(), V="2")
    body = (await client.post("/v1/services/digits/plan", json=moved)).json()

    assert (await client.put("/v1/services/digits", json=moved)).status_code == 202
    state = store.load("digits")
    assert state is not None
    revisions = {n: store.revision("digits", n) for n in (1, 2, 3)}
    seen = Observation({"c1": ClusterObservation(Liveness.UP, Health.OK),
                        "c2": ClusterObservation(Liveness.UP, Health.OK)})  # fmt: skip
    after = plan(state, revisions[3], revisions, seen, 10.0, "c3").state
    assert after.pending is None and after.waiting, after
    assert body["change"] == "new_cluster"
    assert "waits for retiring cluster c2 to be deleted first" in body["reasons"], body["reasons"]
