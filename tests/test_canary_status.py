"""Review (h-rev1): the status and the command refusals answer on every state a random
canary history reaches (no 500), and a rollback picks by spec, not by JSON text."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollout.api import status_of
from rollout.plan import COMMANDS, Command, Result, refusal
from rollout.store import Store
from tests.test_canary_plan import SPECS, World, observation


def _insert(store: Store, w: World, n: int) -> None:
    r = w.revisions[n]
    store._db.execute(
        "INSERT INTO revisions (service, number, spec, spec_hash, pushed_at, result, message,"
        " rollback_of) VALUES (?,?,?,?,?,?,?,?)",
        (
            "svc",
            n,
            json.dumps(r.spec.to_json()),
            r.spec.spec_hash(),
            0.0,
            "pending",
            "",
            r.rollback_of,
        ),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_status_answers_on_every_state_of_a_random_history(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "db")
        w = World()
        w.push(SPECS[0])
        _insert(store, w, 1)
        store._db.execute(
            "INSERT INTO services (name, state, created_at) VALUES ('svc', ?, 0)",
            (__import__("rollout.store").store._to_json(w.state),),
        )
        for _ in range(data.draw(st.integers(5, 50))):
            choice = data.draw(st.integers(0, 12))
            if choice == 0:
                w.push(data.draw(st.sampled_from(SPECS)))
                _insert(store, w, max(w.revisions))
            elif choice == 1:
                w.command(data.draw(st.sampled_from(list(COMMANDS))), data.draw(st.booleans()))
            elif choice == 2 and w.state.active is not None:
                to = data.draw(st.sampled_from(sorted(w.revisions)))
                w.push(w.revisions[to].spec, rollback_of=to)
                _insert(store, w, max(w.revisions))
            obs = {c: data.draw(observation) for c in w.state.clusters()}
            d = w.tick(obs, data.draw(st.floats(0.1, 20)))
            _, version = store.load_versioned("svc")  # type: ignore[misc]
            store.commit(d.state, d.finished, d.events, w.now, version=version, gone=d.gone)
            if d.gone:
                break
            status = status_of(store, "svc", {})
            assert status is not None
            json.dumps(status)
            for kind in COMMANDS:
                refusal(d.state, Command(kind))
        store.close()


def test_rollback_default_target_is_by_spec_not_by_json_text(tmp_path: Path) -> None:
    """r1 (spec A) was stored by a raygate from before canaries (no strategy/canary/bake_s in
    its JSON); r2 (spec B) aborted; r3 = A pushed again after the upgrade, live. The default
    rollback target must not be r1: it runs exactly what r3 runs."""
    store = Store(tmp_path / "db")
    a, b = SPECS[0], SPECS[1]
    old_text = a.to_json()
    for key in ("strategy", "canary", "bake_s"):
        old_text["upgrade"].pop(key)
    rows = [
        (1, json.dumps(old_text), a, "succeeded"),
        (2, json.dumps(b.to_json()), b, "aborted"),
        (3, json.dumps(a.to_json()), a, "succeeded"),
    ]
    for n, text, s, result in rows:
        store._db.execute(
            "INSERT INTO revisions (service, number, spec, spec_hash, pushed_at, result, message)"
            " VALUES ('svc',?,?,?,0,?, '')",
            (n, text, s.spec_hash(), result),
        )
    from rollout.plan import Active, ServiceState
    from rollout.store import _to_json

    state = ServiceState("svc", active=Active("c3", 3, a.cluster_hash()))
    store._db.execute(
        "INSERT INTO services (name, state, created_at) VALUES ('svc', ?, 0)", (_to_json(state),)
    )
    assert store.revision("svc", 1).spec.spec_hash() == store.revision("svc", 3).spec.spec_hash()
    number, _why = store.rollback("svc", None, 10.0)
    assert number is None, (
        f"rollback recorded revision {number} = the spec of r1, which is r3's spec: nothing "
        f"changes, yet r3 will be marked {Result.ROLLED_BACK.value}"
    )


OLD_STATE = (  # written by raygate at 0de38e2 (before canaries): a rollout in its health step
    '{"active": {"cluster": "c1", "cluster_hash": "h1", "revision": 1}, "deleting": false, '
    '"failed_up_to": 0, "last_rollout": {"message": "ok", "result": "succeeded", "revision": 1},'
    ' "name": "svc", "pending": {"cluster": "c2", "cluster_hash": "h2", "kind": "new_cluster", '
    '"message": "m", "ok_streak": 1, "revision": 2, "started_at": 900.0, "step": "health"}, '
    '"restore": null, "retiring": [{"cluster": "c0", "deletion_delay_s": 0.0, '
    '"drain_timeout_s": 30.0, "since": 950.0}], "unreachable": [], "waiting": ""}'
)


def test_a_state_from_before_canaries_loads_and_plans() -> None:
    from rollout.plan import ClusterObservation, Health, Liveness, Observation, Revision, plan
    from rollout.store import _from_json

    state = _from_json(OLD_STATE)
    assert state.pending is not None and state.pending.canary is None
    assert state.retiring[0].revision is None and state.retiring[0].bake_until is None
    a, b = SPECS[0], SPECS[0].model_copy(update={"serve": {"applications": []}})
    revs = {1: Revision.of(1, a), 2: Revision.of(2, SPECS[0])}
    ok = ClusterObservation(Liveness.UP, Health.OK)
    d = plan(state, revs[2], revs, Observation({"c0": ok, "c1": ok, "c2": ok}), 1000.0, "c9")
    assert d.state.active is not None and d.state.active.cluster == "c2"
    assert d.state.traffic() == {"c1": 0, "c2": 100}
    del b
