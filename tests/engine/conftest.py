"""Fixtures for the engine tests: `softlb serve --engine E` as an outside user runs it.

``engine`` is parametrized over both engines (module scope, so a module's tests share one
balancer per engine where they can). ``balancer`` starts ``softlb serve --engine E --bind
127.0.0.1:PORT`` with a config written to tmp_path; every process it starts is stopped by PID
at teardown (tests/integration/conftest.py's Launcher).

Tests that only the event loop can pass carry ``@pytest.mark.eventloop_only("why")``: they
are skipped, with that reason, for the threaded engine. Until the event-loop engine is on
this branch (``softlb serve`` has no ``--engine``), the eventloop runs are skipped and the
threads runs start ``softlb serve`` without the flag (gthread was the only engine).
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import softlb
from tests.helpers.hostile import RawClient
from tests.helpers.servers import free_port
from tests.integration.conftest import SOFTLB, Launcher, Running, memory_kib

ENGINES = ("eventloop", "threads")

#: The directory this process imports softlb from. Subprocesses run in tmp directories, where
#: a relative PYTHONPATH (``PYTHONPATH=src``) would find nothing and let them import whatever
#: softlb is installed instead: they get this one, absolute.
SOFTLB_SRC = str(Path(softlb.__file__).resolve().parents[1])
SUBPROCESS_ENV = {
    "PYTHONPATH": os.pathsep.join([SOFTLB_SRC, *filter(None, [os.environ.get("PYTHONPATH")])])
}

#: No health probes unless a test asks: hostile backends do not answer /health.
NO_PROBES: dict[str, Any] = {"health_check": {"enabled": False}}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "eventloop_only(reason): only the event-loop engine can pass this test"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip ``eventloop_only`` tests for the threaded engine, with the marker's reason."""
    for item in items:
        marker = item.get_closest_marker("eventloop_only")
        callspec = getattr(item, "callspec", None)
        if marker is None or callspec is None or callspec.params.get("engine") != "threads":
            continue
        reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
        item.add_marker(pytest.mark.skip(reason=f"event loop only: {reason}"))


@functools.cache
def engine_flag_supported() -> bool:
    """Whether this softlb's ``serve`` has ``--engine`` (the event-loop engine is merged)."""
    result = subprocess.run(
        [*SOFTLB, "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **SUBPROCESS_ENV},
    )
    return "--engine" in result.stdout


@pytest.fixture(scope="module", params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """The engine under test: "eventloop" or "threads"."""
    name: str = request.param
    if name == "eventloop" and not engine_flag_supported():
        pytest.skip("softlb serve has no --engine yet: the event-loop engine is not merged")
    return name


@dataclass
class Balancer:
    """A running ``softlb serve`` and what a test needs to talk to it."""

    running: Running
    port: int
    engine: str
    config: dict[str, Any]
    ssl_context: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def worker(self) -> int:
        """The PID of the (single) worker process."""
        return self.running.workers(1)[0]

    def rss_kib(self) -> int:
        """The worker's resident set size, in KiB."""
        return memory_kib(self.worker())["VmRSS"]

    def connection(self, timeout: float = 10.0) -> http.client.HTTPConnection:
        """A fresh http.client connection to the balancer (https if it serves TLS)."""
        if self.ssl_context is not None:
            return http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=timeout, context=self.ssl_context
            )
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(
        self,
        method: str,
        target: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        *,
        timeout: float = 10.0,
        encode_chunked: bool = False,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request on a fresh connection: status, headers, whole body."""
        conn = self.connection(timeout)
        try:
            conn.request(
                method, target, body=body, headers=headers or {}, encode_chunked=encode_chunked
            )
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        finally:
            conn.close()

    def get(self, target: str = "/", **kwargs: Any) -> tuple[int, http.client.HTTPMessage, bytes]:
        return self.request("GET", target, **kwargs)

    def raw(self, **kwargs: Any) -> RawClient:
        """A :class:`RawClient` connected to the balancer."""
        kwargs.setdefault("ssl_context", self.ssl_context)
        return RawClient(self.port, **kwargs)

    def servers(self) -> dict[str, dict[str, Any]]:
        """``GET /_softlb/servers``, keyed by URL."""
        status, _, body = self.get("/_softlb/servers")
        assert status == 200, body
        return {server["url"]: server for server in json.loads(body)["servers"]}


def start_balancer(
    launcher: Launcher,
    directory: Path,
    engine: str,
    config: dict[str, Any],
    *args: str,
    env: dict[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> Balancer:
    """Write ``config`` (health checks off unless it says) and start softlb serve on it."""
    config = {**NO_PROBES, **config}
    port = free_port()
    path = directory / f"config-{len(launcher.started)}.json"
    path.write_text(json.dumps(config))
    argv = [*SOFTLB, "serve", "--config", str(path), "--bind", f"127.0.0.1:{port}"]
    if engine_flag_supported():
        argv += ["--engine", engine]
    running = launcher([*argv, *args], port=port, env={**SUBPROCESS_ENV, **(env or {})})
    return Balancer(running, port, engine, config, ssl_context)


StartBalancer = Callable[..., Balancer]


@pytest.fixture
def balancer(tmp_path: Path, engine: str) -> Iterator[StartBalancer]:
    """Factory: ``balancer(config, *extra_args, env=..., ssl_context=...)`` -> Balancer."""
    launcher = Launcher(tmp_path)

    def start(config: dict[str, Any], *args: str, **kwargs: Any) -> Balancer:
        return start_balancer(launcher, tmp_path, engine, config, *args, **kwargs)

    try:
        yield start
    finally:
        launcher.close()


@pytest.fixture(scope="module")
def module_balancer(
    tmp_path_factory: pytest.TempPathFactory, engine: str
) -> Iterator[StartBalancer]:
    """The same factory, for balancers shared by a module's tests (one per engine)."""
    directory = tmp_path_factory.mktemp(f"balancer-{engine}")
    launcher = Launcher(directory)

    def start(config: dict[str, Any], *args: str, **kwargs: Any) -> Balancer:
        return start_balancer(launcher, directory, engine, config, *args, **kwargs)

    try:
        yield start
    finally:
        launcher.close()
