"""The admin API's answers as pydantic models, so /openapi.json describes real shapes.

The endpoints build their JSON as plain dicts and return them as `JSONResponse`s: FastAPI
then sends them as they are, and these models only document them (a `response_model` would
re-serialize, turning `1` into `1.0` or dropping a key, and the CLI, the tests and the status
page read this JSON). So that the documentation cannot drift, every model forbids unknown
keys and tests/test_api_models.py validates real answers of every route against them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PhaseName = Literal["deploying", "live", "upgrading", "failed", "deleting"]
RolloutResult = Literal["in_progress", "succeeded", "aborted", "superseded", "rolled_back"]


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- errors ------------------------------------------------------------------------------
class Detail(_Out):
    """401 (missing or wrong token), 404 (no such service), 409 (a command that does not
    apply now, with the reason), 413 (body too large)."""

    detail: str


class FieldError(_Out):
    field: str = Field(description="the field's path in the spec, e.g. cluster.env.FOO")
    message: str


class Invalid(_Out):
    """422: every problem, each naming its field."""

    detail: str = Field(examples=["invalid spec"])
    errors: list[FieldError]


class Conflict(_Out):
    """409 on a push (or plan): route prefixes another service owns; on a command: why it
    does not apply now (no `errors`)."""

    detail: str
    errors: list[str] | None = None


# ---- status ------------------------------------------------------------------------------
class ActiveOut(_Out):
    revision: int
    cluster: str
    serve_url: str | None


class VerdictOut(_Out):
    """The last analysis verdict (null fields before the first interval is judged)."""

    result: Literal["pass", "fail", "inconclusive"] | None
    message: str
    canary_requests: int
    stable_requests: int | None
    error_rate: float | None
    stable_error_rate: float | None
    p99_ms: float | None
    cluster: str
    stable: str | None
    judged_at: float | None
    failures: int
    inconclusive: int


class CanaryStepOut(_Out):
    index: int = Field(description="counts from 1, as `raygate status` prints it (step 2/4)")
    of: int
    step: dict[str, Any] = Field(description="the spec's step: {weight} or {pause}")


class PendingOut(_Out):
    revision: int
    cluster: str
    step: Literal["create_cluster", "deploy", "health", "canary"]
    kind: Literal["new_cluster", "in_place"]
    started_at: float
    healthy_streak: int
    message: str
    strategy: Literal["bluegreen", "canary"]
    canary_step: CanaryStepOut | None
    weight: int = Field(description="percent of new requests on the pending cluster")
    paused: bool
    hold: Literal["user", "no_data"] | None
    analysis: VerdictOut | None


class RetiringOut(_Out):
    cluster: str
    revision: int | None
    since: float
    bake_until: float | None = Field(description="kept at weight 0 until then, ready to take back")
    in_flight: int


class LastRollout(_Out):
    revision: int
    result: RolloutResult
    message: str


class Degraded(_Out):
    cluster: str
    since: float
    message: str


class Event(_Out):
    at: float
    text: str


class Status(_Out):
    """One service as it stands (GET /v1/services/{name}, and each of GET /v1/services)."""

    name: str
    phase: PhaseName
    desired_revision: int
    active: ActiveOut | None
    pending: PendingOut | None
    retiring: list[RetiringOut]
    analysis: VerdictOut | None = Field(description="the new revision's verdicts while it bakes")
    last_rollout: LastRollout | None
    waiting: str | None = Field(description="why the desired revision has not started yet")
    degraded: list[Degraded]
    traffic: dict[str, int] = Field(description="cluster -> percent of new requests")
    in_flight: dict[str, int] = Field(description="cluster -> requests in flight")
    routes: dict[str, str] = Field(description="application -> route prefix")
    events: list[Event]


class CommandResult(Status):
    """202 to a command: the service's status after it was queued; a rollback adds the
    revision it recorded and the one whose spec it brings back."""

    revision: int | None = None
    rollback_of: int | None = None


class HistoryEntry(_Out):
    revision: int
    spec_hash: str
    pushed_at: float
    result: Literal["pending", "in_progress", "succeeded", "aborted", "superseded",
                    "rolled_back"]  # fmt: skip
    message: str
    finished_at: float | None
    rollback_of: int | None


# ---- writes ------------------------------------------------------------------------------
class PushResult(_Out):
    """202 with a new revision, 200 when identical to the newest (`unchanged`, `message`)."""

    name: str
    revision: int
    phase: PhaseName
    unchanged: bool
    message: str | None = None


class Deleting(_Out):
    name: str
    phase: Literal["deleting"]


# ---- plan preview ------------------------------------------------------------------------
class DeploymentChange(_Out):
    name: str
    change: Literal["added", "removed", "changed"]


class AppChange(_Out):
    name: str
    change: Literal["added", "removed", "changed"]
    deployments: list[DeploymentChange]


class Strategy(_Out):
    name: Literal["bluegreen", "canary", "in_place"] = Field(
        description="in_place: the live cluster's Serve config is updated, then health-gated"
    )
    steps: list[dict[str, Any]] | None = Field(description="a canary's steps")
    consecutive_successes: int
    health_timeout_s: float
    probes: int
    bake_s: float


class PlanResult(_Out):
    """What a push of the spec would do, compared with the live (active) revision."""

    name: str
    change: Literal["none", "in_place", "new_cluster"]
    reasons: list[str] = Field(examples=[["cluster.env.APP_VERSION changed"]])
    live_revision: int | None
    applications: list[AppChange] = Field(description="applications the push changes")
    serve_diff: str = Field(description="unified diff of the live Serve config to the spec's")
    strategy: Strategy | None = Field(description="null when nothing would change")


# ---- probes ------------------------------------------------------------------------------
class Health(_Out):
    status: Literal["ok"]


class Ready(_Out):
    status: Literal["ready", "not ready"]
    reason: str | None = None
