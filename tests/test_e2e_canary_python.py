"""The canary's two analysis stories on the Python engine: its counts come from the ASGI hot
path, HAProxy's from its log lines (tests/test_e2e_canary.py runs the whole story there)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Raygate, live_cluster, running_raygate
from tests.test_e2e_canary import bad_canary_aborts, good_canary_walks

pytestmark = pytest.mark.ray

ENGINE = "python"


@pytest.fixture(scope="module")
def rg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Raygate]:
    with running_raygate(tmp_path_factory.mktemp("canary-py") / "state", ENGINE) as gate:
        live_cluster(gate, 1)
        yield gate


def test_a_good_canary_walks_its_steps(rg: Raygate, tmp_path: Path) -> None:
    shares = good_canary_walks(rg, tmp_path, 2)
    print(f"\n{ENGINE}: shares per step (weight, share %, answers): {shares}")


def test_a_bad_canary_is_aborted_by_analysis(rg: Raygate, tmp_path: Path) -> None:
    took, failed, message = bad_canary_aborts(rg, tmp_path, 3)
    print(f"\n{ENGINE}: abort -> last canary answer {took:.2f}s, {failed} failed; {message}")
