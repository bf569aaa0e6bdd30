"""A spec's webhook secret stays out of the Ray clusters (review of issue 12, part 4).

`secret_env` names a variable of raygate's environment. Ray clusters started here (the local
provider) inherit raygate's environment but for its own `RAYGATE_*` variables: any other
name handed the signing secret to every process of every service's clusters (their Serve
code included) and to HAProxy. The real provider computes the environment `ray start` gets.
"""

from __future__ import annotations

import pytest

from rollout.providers.local import LocalProvider
from rollout.spec import SpecError, parse_spec
from tests.test_local_provider import provider  # noqa: F401  (a fixture)
from tests.test_webhook_config import with_hooks

SECRET = "webhook-signing-secret"


def test_a_secret_env_outside_raygate_s_own_variables_is_refused_naming_the_field() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(with_hooks({"url": "https://hooks.example/x", "secret_env": "HOOK_SECRET"}))
    [(field, why)] = info.value.problems
    assert field == "notifications.webhooks.0.secret_env"
    assert "RAYGATE_" in why


def test_an_accepted_secret_env_never_reaches_a_ray_cluster(
    provider: LocalProvider,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = "RAYGATE_HOOK_SECRET"
    spec = parse_spec(with_hooks({"url": "https://hooks.example/x", "secret_env": name}))
    monkeypatch.setenv(name, SECRET)
    info = provider.allocate("c", "svc", spec.cluster, [])
    assert SECRET not in provider.environment(info, spec.cluster).values()
