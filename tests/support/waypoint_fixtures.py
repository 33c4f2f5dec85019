"""Fixtures of the waypoint tests: one waypoint process per test module, stand-in endpoints per test.

A module sets `BAGGAGE_ENABLED = True` to run its waypoint (and endpoints) with AMBIENT_ENABLE_BAGGAGE on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.pki import TestPki
from tests.support.waypoint_mesh import Endpoints, Topology
from tests.support.waypoint_proc import WaypointProcess


def _baggage(request: pytest.FixtureRequest) -> bool:
    return bool(getattr(request.module, "BAGGAGE_ENABLED", False))


@pytest.fixture(scope="module")
def topo() -> Topology:
    return Topology()


@pytest.fixture(scope="module")
def waypoint(
    topo: Topology, pki: TestPki, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[WaypointProcess]:
    proc = topo.start_waypoint(pki, Path(tmp_path_factory.mktemp("waypoint")), baggage=_baggage(request))
    yield proc
    proc.stop()


@pytest.fixture
async def endpoints(
    topo: Topology, pki: TestPki, waypoint: WaypointProcess, request: pytest.FixtureRequest
) -> AsyncIterator[Endpoints]:
    eps = await Endpoints(topo, pki, response_baggage=_baggage(request)).start()
    yield eps
    await eps.close()
