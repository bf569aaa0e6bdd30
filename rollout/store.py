"""Durable state in SQLite: services, revisions, clusters (with ports and PIDs), events.

The controller commits a whole decision (new service state, cluster records to create or
delete, finished rollouts, events) in one transaction *before* it acts, so a raygate killed
at any point restarts from a state that names every cluster it may have started.

No update is ever lost, by construction:
- every write of a service's row bumps its `version`, and the controller's commit is a
  compare-and-swap on the version it loaded: a push or a DELETE that landed while a
  reconcile awaited its health checks makes that commit fail with `Conflict`, and the
  reconcile plans again from what is stored now;
- each thread gets its own SQLite connection (no two threads ever share one), and writers
  serialise on SQLite's own lock (`BEGIN IMMEDIATE`, with a busy timeout).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

from rollout.analysis import Outcome, Verdict
from rollout.plan import (
    Active,
    Analysis,
    Canary,
    Command,
    Hold,
    Kind,
    Pending,
    Result,
    Retiring,
    Revision,
    RolloutRecord,
    ServiceState,
    Step,
    Unreachable,
)
from rollout.providers.base import ClusterInfo
from rollout.spec import ServiceSpec

SCHEMA = """
CREATE TABLE IF NOT EXISTS services (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    version INTEGER NOT NULL DEFAULT 0  -- bumped by every write: commits compare-and-swap
);
CREATE TABLE IF NOT EXISTS revisions (
    service TEXT NOT NULL,
    number INTEGER NOT NULL,
    spec TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    pushed_at REAL NOT NULL,
    result TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    finished_at REAL,
    rollback_of INTEGER,  -- `raygate rollback`: the revision whose spec this one brings back
    PRIMARY KEY (service, number)
);
CREATE TABLE IF NOT EXISTS clusters (
    id TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    info TEXT NOT NULL,
    state TEXT NOT NULL   -- creating | running | deleting
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    service TEXT NOT NULL,
    at REAL NOT NULL,
    text TEXT NOT NULL
);
"""


class Conflict(Exception):
    """The service's row changed since it was loaded (a push, a DELETE): plan again."""


class ClusterState(StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    DELETING = "deleting"


def _to_json(state: ServiceState) -> str:
    def enc(value: Any) -> Any:
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, dict):
            return {k: enc(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [enc(v) for v in value]
        return value

    return json.dumps(enc(asdict(state)), sort_keys=True)


def _pending(p: dict[str, Any]) -> Pending:
    c = p.get("canary")
    canary = Canary(**{**c, "hold": Hold(c["hold"])}) if c else None
    return Pending(**{**p, "kind": Kind(p["kind"]), "step": Step(p["step"]), "canary": canary})


def _analysis(a: dict[str, Any] | None) -> Analysis | None:
    if not a:
        return None
    v = a.get("verdict")
    verdict = Verdict(**{**v, "result": Outcome(v["result"])}) if v else None
    return Analysis(**{**a, "verdict": verdict})


def _from_json(text: str) -> ServiceState:
    raw = json.loads(text)
    p = raw["pending"]
    lr = raw["last_rollout"]
    return ServiceState(
        name=raw["name"],
        active=Active(**raw["active"]) if raw["active"] else None,
        pending=_pending(p) if p else None,
        retiring=tuple(Retiring(**r) for r in raw["retiring"]),
        last_rollout=RolloutRecord(lr["revision"], Result(lr["result"]), lr["message"])
        if lr
        else None,
        deleting=raw["deleting"],
        unreachable=tuple(Unreachable(**u) for u in raw.get("unreachable", ())),
        restore=raw.get("restore"),
        waiting=raw.get("waiting", ""),
        # A state written before failed_up_to: its last rollout says what had failed.
        failed_up_to=raw.get("failed_up_to")
        or (lr["revision"] if lr and lr["result"] == Result.ABORTED.value else 0),
        analysis=_analysis(raw.get("analysis")),
        commands=tuple(Command(**c) for c in raw.get("commands", ())),
        active_capacity=raw.get("active_capacity"),
    )


def _mark_deleting(db: sqlite3.Connection, cid: str) -> None:
    db.execute("UPDATE clusters SET state=? WHERE id=?", (ClusterState.DELETING.value, cid))


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(services)")}
        if "version" not in columns:  # a state dir from before versions
            db.execute("ALTER TABLE services ADD COLUMN version INTEGER NOT NULL DEFAULT 0")
        columns = {row[1] for row in db.execute("PRAGMA table_info(revisions)")}
        if "rollback_of" not in columns:  # a state dir from before rollbacks
            db.execute("ALTER TABLE revisions ADD COLUMN rollback_of INTEGER")

    @property
    def _db(self) -> sqlite3.Connection:
        """This thread's own connection: one is never shared between threads."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            # check_same_thread=False only so that close() may close every thread's
            # connection from one thread; each is used by the thread that made it.
            db = sqlite3.connect(
                self._path, isolation_level=None, timeout=10.0, check_same_thread=False
            )
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable against a killed process
            self._local.db = db
            with self._all_lock:
                self._all.append(db)
        return db

    def close(self) -> None:
        with self._all_lock:
            for db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # ---- services and revisions ------------------------------------------------------
    def push(self, spec: ServiceSpec, now: float) -> tuple[int, bool]:
        """Record a pushed spec. Returns (revision, unchanged): an identical push is a no-op.

        A push to a service being deleted takes the deletion back: the service keeps every
        cluster it holds (the planner already retired the active one if it got there)."""
        digest = spec.spec_hash()
        with self.transaction() as db:
            newest, service, same = self._compare(db, spec)
            if same and newest is not None:
                return newest, True
            deleting = service is not None and service.deleting
            number = (newest or 0) + 1
            db.execute(
                "INSERT INTO revisions (service, number, spec, spec_hash, pushed_at, result, "
                "message) VALUES (?,?,?,?,?,?,?)",
                (spec.name, number, json.dumps(spec.to_json()), digest, now, "pending", ""),
            )
            if service is None:
                db.execute(
                    "INSERT INTO services (name, state, created_at) VALUES (?,?,?)",
                    (spec.name, _to_json(ServiceState(spec.name)), now),
                )
            elif deleting:
                state = replace(service, deleting=False)
                self._write_state(db, state)
            else:  # a new revision: a reconcile that loaded the old version plans again
                db.execute("UPDATE services SET version=version+1 WHERE name=?", (spec.name,))
            return number, False

    def identical(self, spec: ServiceSpec) -> int | None:
        """The revision a push of `spec` would be a no-op against (the plan preview asks)."""
        newest, _, same = self._compare(self._db, spec)
        return newest if same else None

    @staticmethod
    def _compare(
        db: sqlite3.Connection, spec: ServiceSpec
    ) -> tuple[int | None, ServiceState | None, bool]:
        """(newest revision, state, same): a push is a no-op when identical to the newest
        revision of a service that is not being deleted (a push takes a deletion back)."""
        row = db.execute(
            "SELECT number, spec_hash FROM revisions WHERE service=? ORDER BY number DESC",
            (spec.name,),
        ).fetchone()
        service = db.execute("SELECT state FROM services WHERE name=?", (spec.name,)).fetchone()
        state = _from_json(service[0]) if service is not None else None
        same = (
            row is not None and state is not None and not state.deleting
            and row[1] == spec.spec_hash()
        )  # fmt: skip
        return (int(row[0]) if row else None), state, same

    @staticmethod
    def _write_state(db: sqlite3.Connection, state: ServiceState) -> None:
        db.execute(
            "UPDATE services SET state=?, version=version+1 WHERE name=?",
            (_to_json(state), state.name),
        )

    def service_names(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT name FROM services ORDER BY name")]

    def load(self, name: str) -> ServiceState | None:
        loaded = self.load_versioned(name)
        return loaded[0] if loaded else None

    def load_versioned(self, name: str) -> tuple[ServiceState, int] | None:
        """The state and the version a `commit` of a decision on it must still find."""
        row = self._db.execute(
            "SELECT state, version FROM services WHERE name=?", (name,)
        ).fetchone()
        return (_from_json(row[0]), int(row[1])) if row else None

    def revision(self, name: str, number: int) -> Revision:
        row = self._db.execute(
            "SELECT spec, rollback_of FROM revisions WHERE service=? AND number=?", (name, number)
        ).fetchone()
        if row is None:
            raise KeyError(f"{name} has no revision {number}")
        return Revision.of(number, ServiceSpec.model_validate(json.loads(row[0])), row[1])

    def latest(self, name: str) -> Revision:
        row = self._db.execute(
            "SELECT MAX(number) FROM revisions WHERE service=?", (name,)
        ).fetchone()
        return self.revision(name, int(row[0]))

    def history(self, name: str, newest: int = -1) -> list[dict[str, Any]]:
        """Every revision, oldest first; only the `newest` n of them if n >= 0."""
        rows = self._db.execute(
            "SELECT number, spec_hash, pushed_at, result, message, finished_at, rollback_of "
            "FROM revisions WHERE service=? ORDER BY number DESC LIMIT ?",
            (name, newest),
        ).fetchall()
        keys = ("revision", "spec_hash", "pushed_at", "result", "message", "finished_at",
                "rollback_of")  # fmt: skip
        return [dict(zip(keys, r, strict=True)) for r in reversed(rows)]

    def latest_specs(self) -> dict[str, ServiceSpec]:
        """The newest spec of every service that is not being deleted."""
        out = {}
        for name in self.service_names():
            state = self.load(name)
            if state is not None and not state.deleting:
                out[name] = self.latest(name).spec
        return out

    def queue_command(
        self, name: str, command: Command, refusal: Callable[[ServiceState], str | None]
    ) -> tuple[bool, str | None]:
        """Queue an operator's command for the planner's next tick, unless `refusal` (read
        on the state inside this transaction) says why it does not apply. Returns (service
        exists, refusal)."""
        with self.transaction() as db:
            row = db.execute("SELECT state FROM services WHERE name=?", (name,)).fetchone()
            if row is None:
                return False, None
            state = _from_json(row[0])
            why = refusal(state)
            if why is None:
                self._write_state(db, replace(state, commands=(*state.commands, command)))
            return True, why

    def rollback(self, name: str, to: int | None, now: float) -> tuple[int | None, str | None]:
        """Record a new revision with the spec of `to` (default: the newest good revision
        before the live one), like `kubectl rollout undo`. Returns (revision, None), or
        (None, why not). A good revision is one that went live and was not rolled back."""
        with self.transaction() as db:
            row = db.execute("SELECT state FROM services WHERE name=?", (name,)).fetchone()
            if row is None:
                return None, f"no service {name!r}"
            state = _from_json(row[0])
            if state.deleting:
                return None, "the service is being deleted"
            if state.active is None:
                return None, "nothing is live: there is nothing to roll back"
            live = state.active.revision
            good = dict(db.execute(
                "SELECT number, spec FROM revisions WHERE service=? AND result=?",
                (name, Result.SUCCEEDED.value),
            ).fetchall())  # fmt: skip
            # By spec, not text: a spec stored by an older raygate lacks the newer fields.
            digest = {n: ServiceSpec.model_validate(json.loads(t)).spec_hash()
                      for n, t in good.items()}  # fmt: skip
            live_spec = self.revision(name, live).spec.spec_hash()
            if to is None:
                older = [n for n in good if n < live and digest[n] != live_spec]
                if not older:
                    return None, f"no good revision before the live one ({live})"
                to = max(older)
            elif to not in good:
                exists = db.execute(
                    "SELECT result FROM revisions WHERE service=? AND number=?", (name, to)
                ).fetchone()
                if exists is None:
                    return None, f"{name} has no revision {to}"
                return None, f"revision {to} is not a good revision (its rollout: {exists[0]})"
            elif digest[to] == live_spec:
                return None, f"revision {to} is what runs now (revision {live})"
            top = db.execute(
                "SELECT MAX(number) FROM revisions WHERE service=?", (name,)
            ).fetchone()[0]
            number = int(top) + 1
            spec = ServiceSpec.model_validate(json.loads(good[to]))
            db.execute(
                "INSERT INTO revisions (service, number, spec, spec_hash, pushed_at, result, "
                "message, rollback_of) VALUES (?,?,?,?,?,?,?,?)",
                (name, number, good[to], spec.spec_hash(), now, "pending",
                 f"rollback to revision {to}", to),
            )  # fmt: skip
            db.execute("UPDATE services SET version=version+1 WHERE name=?", (name,))
            return number, None

    def mark_deleting(self, name: str) -> bool:
        with self.transaction() as db:
            row = db.execute("SELECT state FROM services WHERE name=?", (name,)).fetchone()
            if row is None:
                return False
            self._write_state(db, replace(_from_json(row[0]), deleting=True))
            return True

    # ---- one decision, one transaction -----------------------------------------------
    def commit(
        self,
        state: ServiceState,
        finished: Iterable[RolloutRecord],
        events: Iterable[str],
        now: float,
        *,
        version: int,
        new_clusters: Iterable[ClusterInfo] = (),
        deleting: Iterable[str] = (),
        gone: bool = False,
    ) -> None:
        """Write one decision, if the service is still at `version`; else raise Conflict and
        write nothing."""
        with self.transaction() as db:
            row = db.execute("SELECT version FROM services WHERE name=?", (state.name,)).fetchone()
            if row is None or int(row[0]) != version:
                raise Conflict(f"{state.name} changed since it was loaded")
            if gone:
                db.execute("DELETE FROM services WHERE name=?", (state.name,))
                db.execute("DELETE FROM revisions WHERE service=?", (state.name,))
            else:
                self._write_state(db, state)
            for record in finished:
                db.execute(
                    "UPDATE revisions SET result=?, message=?, finished_at=? "
                    "WHERE service=? AND number=?",
                    (record.result.value, record.message, now, state.name, record.revision),
                )
            if state.pending is not None and not gone:
                db.execute(
                    "UPDATE revisions SET result=? WHERE service=? AND number=? "
                    "AND result='pending'",
                    (Result.IN_PROGRESS.value, state.name, state.pending.revision),
                )
            for text in events:
                db.execute(
                    "INSERT INTO events (service, at, text) VALUES (?,?,?)", (state.name, now, text)
                )
            for info in new_clusters:
                db.execute(
                    "INSERT INTO clusters VALUES (?,?,?,?)",
                    (info.id, info.service, info.to_json(), ClusterState.CREATING.value),
                )
            for cid in deleting:
                _mark_deleting(db, cid)

    # ---- clusters --------------------------------------------------------------------
    def clusters(self) -> list[tuple[ClusterInfo, ClusterState]]:
        rows = self._db.execute("SELECT info, state FROM clusters ORDER BY id")
        return [(ClusterInfo.from_json(i), ClusterState(s)) for i, s in rows]

    def cluster(self, cid: str) -> tuple[ClusterInfo, ClusterState] | None:
        row = self._db.execute("SELECT info, state FROM clusters WHERE id=?", (cid,)).fetchone()
        return (ClusterInfo.from_json(row[0]), ClusterState(row[1])) if row else None

    def update_cluster(self, info: ClusterInfo, state: ClusterState) -> None:
        """New facts about a cluster (its PIDs once started); a mark for deletion stays."""
        self._db.execute(
            "UPDATE clusters SET info=?, state=CASE WHEN state=? THEN state ELSE ? END WHERE id=?",
            (info.to_json(), ClusterState.DELETING.value, state.value, info.id),
        )

    def mark_cluster_deleting(self, cid: str) -> None:
        _mark_deleting(self._db, cid)

    def drop_cluster(self, cid: str) -> None:
        self._db.execute("DELETE FROM clusters WHERE id=?", (cid,))

    # ---- events ----------------------------------------------------------------------
    def add_event(self, name: str, text: str, at: float) -> None:
        self._db.execute("INSERT INTO events (service, at, text) VALUES (?,?,?)", (name, at, text))

    def events(self, name: str, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT at, text FROM events WHERE service=? ORDER BY id DESC LIMIT ?", (name, limit)
        ).fetchall()
        return [{"at": at, "text": text} for at, text in reversed(rows)]
