"""Fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.apps import TcpApp, echo
from tests.support.pki import TestPki

pytest_plugins = ["tests.support.waypoint_fixtures"]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    """One mesh PKI for the session: a root and the cacerts folders of cluster1 and cluster2."""
    return TestPki.create(Path(tmp_path_factory.mktemp("pki")))


@pytest.fixture
async def echo_app():
    """A TCP app that echoes what it reads and ends its side when the client does."""
    app = await TcpApp(echo).start()
    yield app
    await app.close()
