"""The provider interface. A provider is stateless: everything it needs to find, check or
delete a cluster is in the ClusterInfo it returned, which the controller persists *before*
the cluster is started. That is what lets a restarted raygate re-adopt or clean up clusters.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from rollout.plan import Liveness
from rollout.spec import ClusterSpec, ServiceSpec


class ProviderError(Exception):
    """A cluster could not be created; `permanent` when trying again cannot help."""

    def __init__(self, message: str, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


def url_host(host: str) -> str:
    """`host` as it goes into a URL: an IPv6 address (a pod IP) in brackets."""
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class ClusterInfo:
    id: str
    service: str
    provider: str
    dashboard_url: str  # Ray dashboard (Serve REST API)
    serve_host: str  # where raygate reaches the Serve HTTP proxy; "" until it is known
    serve_port: int
    created_at: float
    data: dict[str, Any] = field(default_factory=dict)  # provider-specific (ports, pids, ...)
    # Where Serve binds, when that is not `serve_host` (on Kubernetes: every interface of
    # the pod, while raygate dials the head Service's IP).
    bind_host: str = ""

    @property
    def serve_url(self) -> str:
        return f"http://{url_host(self.serve_host)}:{self.serve_port}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> ClusterInfo:
        return ClusterInfo(**json.loads(text))


@dataclass(frozen=True)
class Seen:
    """What a provider sees of a cluster: its liveness; its record as it stands now (a
    provider that learns the address only once the cluster is up, or sees it move, returns
    the new facts and the controller stores them); why it is not up, in the provider's
    words; and a permanent error that no wait can mend (the rollout is aborted with it)."""

    liveness: Liveness
    info: ClusterInfo
    message: str = ""
    error: str | None = None


class ClusterProvider(Protocol):
    name: str
    keeps_clusters: bool  # clusters outlive raygate: stopping it never deletes them

    def check(self, spec: ServiceSpec) -> list[tuple[str, str]]:
        """(field, problem) for each thing in `spec` this provider cannot run: a push of it
        is refused (422) and changes nothing."""

    def allocate(
        self, cluster_id: str, service: str, spec: ClusterSpec, taken: Sequence[ClusterInfo]
    ) -> ClusterInfo:
        """Choose where the cluster will live (no side effects beyond probing ports)."""

    async def start(self, info: ClusterInfo, spec: ClusterSpec) -> ClusterInfo:
        """Start it: wait until its Serve REST API answers (local), or only have it made
        (KubeRay: `observe` says STARTING until it is up). Raises ProviderError."""

    async def observe(self, info: ClusterInfo) -> Seen: ...

    async def delete(self, info: ClusterInfo) -> None:
        """Stop it and free everything it used. Idempotent."""

    async def orphans(self, known: Sequence[ClusterInfo]) -> list[str]:
        """Clusters of ours running that no record knows of; removes them, returns their ids."""
