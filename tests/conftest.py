"""Fixtures shared by every test: real backends to proxy to."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from softlb.app import Application
from softlb.config import parse_config
from tests.helpers.servers import RefusingURL, TestBackend

#: The real redis-server fixtures (redis_server, redis_url, redis_isolated), for every test.
pytest_plugins = ["tests.helpers.redis_server"]


@pytest.fixture
def backend() -> Iterator[TestBackend]:
    """One running TestBackend, stopped at teardown."""
    with TestBackend() as server:
        yield server


@pytest.fixture
def backends() -> Iterator[list[TestBackend]]:
    """Three running TestBackends on distinct ports, stopped at teardown."""
    servers = [TestBackend() for _ in range(3)]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def refused_url() -> str:
    """``http://127.0.0.1:PORT`` where nothing listens: connecting is refused."""
    return RefusingURL()


@pytest.fixture
def make_app() -> Iterator[Any]:
    """A factory of Applications from config dicts (health checks off), stopped at teardown."""
    apps: list[Application] = []

    def make(**config: Any) -> Application:
        config.setdefault("health_check", {"enabled": False})
        app = Application(parse_config(config))
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.stop()
