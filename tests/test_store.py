"""The store on its own: no lost update (compare-and-swap commits), a push that takes a
deletion back keeps every cluster, one SQLite connection per thread, old state dirs."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from rollout.plan import Active, Kind, Pending, Result, RolloutRecord, ServiceState, Step
from rollout.providers.base import ClusterInfo
from rollout.spec import ServiceSpec, parse_spec
from rollout.store import ClusterState, Conflict, Store
from tests.test_api import spec as raw_spec


def a_spec(label: str = "a") -> ServiceSpec:
    return parse_spec(raw_spec(label=label))


LIVE = ServiceState("digits", Active("c1", 1, "h"), last_rollout=RolloutRecord(1, Result.SUCCEEDED))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "raygate.db")
    s.push(a_spec(), 1.0)
    return s


def versioned(store: Store) -> tuple[ServiceState, int]:
    loaded = store.load_versioned("digits")
    assert loaded is not None
    return loaded


def test_a_commit_on_a_stale_version_writes_nothing(store: Store) -> None:
    _, version = versioned(store)
    store.commit(LIVE, [], ["live"], 2.0, version=version)
    state, now_version = versioned(store)
    assert state == LIVE and now_version == version + 1
    with pytest.raises(Conflict):
        store.commit(ServiceState("digits"), [], ["stale"], 3.0, version=version)
    assert versioned(store) == (LIVE, now_version)
    assert [e["text"] for e in store.events("digits")] == ["live"]


def test_a_delete_landing_during_a_reconcile_is_not_lost(store: Store) -> None:
    _, version = versioned(store)  # a reconcile loads ...
    assert store.mark_deleting("digits")  # ... a DELETE lands while it awaits its checks ...
    with pytest.raises(Conflict):  # ... and its decision, planned without it, is refused
        store.commit(LIVE, [], [], 2.0, version=version)
    state, _ = versioned(store)
    assert state.deleting


def test_a_push_landing_during_a_reconcile_is_not_lost(store: Store) -> None:
    _, version = versioned(store)
    number, unchanged = store.push(a_spec(label="b"), 2.0)
    assert (number, unchanged) == (2, False)
    with pytest.raises(Conflict):
        store.commit(LIVE, [], [], 3.0, version=version)
    assert store.latest("digits").number == 2


def test_an_identical_push_changes_no_version(store: Store) -> None:
    _, version = versioned(store)
    assert store.push(a_spec(), 2.0) == (1, True)
    assert versioned(store)[1] == version


def test_a_push_to_a_service_being_deleted_keeps_its_clusters(store: Store) -> None:
    pending = Pending(2, Kind.NEW_CLUSTER, "c2", "h2", Step.HEALTH, 5.0)
    _, version = versioned(store)
    store.commit(replace(LIVE, pending=pending), [], [], 2.0, version=version)
    store.mark_deleting("digits")
    store.push(a_spec(label="b"), 3.0)
    state, _ = versioned(store)
    assert not state.deleting
    assert state.active == LIVE.active and state.pending == pending


def test_a_deletion_mark_survives_a_later_update_of_the_cluster(store: Store) -> None:
    info = ClusterInfo("c1", "digits", "local", "http://d", "127.0.0.2", 1, 0.0)
    _, version = versioned(store)
    store.commit(LIVE, [], [], 2.0, version=version, new_clusters=[info])
    store.mark_cluster_deleting("c1")
    store.update_cluster(replace(info, data={"pids": [1]}), ClusterState.RUNNING)
    assert store.cluster("c1") == (replace(info, data={"pids": [1]}), ClusterState.DELETING)


def test_each_thread_has_its_own_connection_and_no_write_is_lost(store: Store) -> None:
    connections: set[int] = set()
    errors: list[BaseException] = []

    def pushes(label: str) -> None:
        try:
            connections.add(id(store._db))
            for i in range(20):
                store.push(a_spec(label=f"{label}{i}"), 1.0)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=pushes, args=(x,)) for x in "xyz"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(connections) == 3
    assert store.latest("digits").number == 1 + 3 * 20
    store.close()  # closes the other threads' connections too


def test_a_state_dir_from_before_versions_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE services (name TEXT PRIMARY KEY, state TEXT NOT NULL, "
        "created_at REAL NOT NULL);"
    )
    db.close()
    store = Store(path)
    store.push(a_spec(), 1.0)
    assert versioned(store)[1] == 0


def test_a_state_from_before_failed_up_to_keeps_its_aborted_revision_given_up(
    store: Store,
) -> None:
    """Written before `failed_up_to` existed: its aborted last rollout still says revision 2
    is not to be tried again."""
    import json

    from rollout.store import _to_json

    aborted = replace(LIVE, last_rollout=RolloutRecord(2, Result.ABORTED, "boom"))
    raw = json.loads(_to_json(aborted))
    del raw["failed_up_to"]
    store._db.execute("UPDATE services SET state=? WHERE name=?", (json.dumps(raw), "digits"))
    state, _ = versioned(store)
    assert state.failed_up_to == 2
