"""Route prefix ownership: one prefix, one service.

The admin API checks a push against the stored services, and `raygate up SPEC...` checks its
specs against each other and against the store, with the same rule. It sits beside spec.py at
the bottom of rollout/'s layers, so both the API and the composition root can import it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rollout.spec import ServiceSpec


def route_conflicts(spec: ServiceSpec, others: Mapping[str, ServiceSpec]) -> list[str]:
    """Each route prefix of `spec` that a service other than `spec.name` already owns."""
    mine = set(spec.app_routes().values())
    found = []
    for name, other in others.items():
        if name == spec.name:
            continue
        for prefix in sorted(set(other.app_routes().values()) & mine):
            found.append(f"route_prefix {prefix!r} is owned by service {name!r}")
    return found


def startup_conflicts(specs: Sequence[ServiceSpec], stored: Mapping[str, ServiceSpec]) -> list[str]:
    """Why the specs given to `raygate up` cannot all be pushed: a service given twice, two of
    them claiming one prefix, or one claiming a prefix of a stored service it does not replace.
    """
    problems: list[str] = []
    given: dict[str, ServiceSpec] = {}
    for spec in specs:
        if spec.name in given:
            problems.append(f"service {spec.name!r} is given twice")
            continue
        for other in given.values():
            for prefix in sorted(
                set(spec.app_routes().values()) & set(other.app_routes().values())
            ):
                problems.append(
                    f"route_prefix {prefix!r} is claimed by both {other.name!r} and {spec.name!r}"
                )
        given[spec.name] = spec
    untouched = {name: spec for name, spec in stored.items() if name not in given}
    for spec in given.values():
        problems.extend(f"{spec.name}: {p}" for p in route_conflicts(spec, untouched))
    return problems
