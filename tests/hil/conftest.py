from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from tests.hil.fleet import Fleet, FleetSpec, load_fleet, unavailable_reason


@pytest.fixture(scope="session")
def hil_available() -> None:
    """Skip (with the reason) where network namespaces, tc or cgroups are not allowed."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def make_fleet(hil_available: None, tmp_path: Path, fmnist_dir: Path) -> Iterator[Callable[[str | FleetSpec], Fleet]]:
    """``make_fleet("small")``: an emulated fleet in this test's folder, removed again afterwards."""
    fleets: list[Fleet] = []

    def make(spec: str | FleetSpec) -> Fleet:
        fleet = Fleet(spec if isinstance(spec, FleetSpec) else load_fleet(spec), tmp_path / f"fleet{len(fleets)}")
        fleets.append(fleet)
        return fleet.__enter__()

    yield make
    for fleet in fleets:
        fleet.close()
