"""A small client for the Ray Serve REST API on a cluster's dashboard port.

httpx errors are translated here, once, into ServeApiError with `permanent` set when
retrying the same request cannot help (a 4xx: the config itself was refused).
"""

from __future__ import annotations

from typing import Any

import httpx

APPLICATIONS = "/api/serve/applications/"


async def dashboard_answers(client: httpx.AsyncClient, dashboard_url: str) -> bool:
    """The dashboard answers its version: the cheap sign a Ray cluster's head is there."""
    try:
        resp = await client.get(dashboard_url + "/api/version", timeout=2)
    except httpx.HTTPError:
        return False
    return resp.status_code == 200


class ServeApiError(Exception):
    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class ServeClient:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def deploy(self, dashboard_url: str, config: dict[str, Any]) -> None:
        """PUT a whole ServeDeploySchema config. Declarative: apps left out are deleted."""
        try:
            resp = await self._client.put(dashboard_url + APPLICATIONS, json=config, timeout=60.0)
        except httpx.HTTPError as exc:
            raise ServeApiError(
                f"Serve API at {dashboard_url} unreachable: {exc!r}", False
            ) from exc
        if resp.status_code >= 400:
            permanent = 400 <= resp.status_code < 500
            raise ServeApiError(
                f"Serve API refused the config ({resp.status_code}): {resp.text[:2000]}", permanent
            )

    async def status(self, dashboard_url: str) -> dict[str, Any]:
        try:
            resp = await self._client.get(dashboard_url + APPLICATIONS, timeout=5.0)
            resp.raise_for_status()
            body: dict[str, Any] = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ServeApiError(f"Serve status at {dashboard_url}: {exc!r}", False) from exc
        return body
