"""The engines as processes (SPEC §1): the event loop as a plain gunicorn worker class, and a
graceful stop that refuses new connections while the one in flight finishes."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engine.conftest import NO_PROBES, SUBPROCESS_ENV, StartBalancer, engine_flag_supported
from tests.helpers.hostile import UPGRADE_REQUEST, RawClient, UpgradeEchoBackend
from tests.helpers.servers import TestBackend, free_port
from tests.integration.conftest import BIN, SOFTLB, Launcher

pytestmark = pytest.mark.integration


@pytest.fixture
def backend() -> Iterator[TestBackend]:
    with TestBackend() as server:
        yield server


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.close()


def in_flight(backend: TestBackend, send: Callable[[], None]) -> threading.Thread:
    """Run ``send`` (a request) on a thread of its own; return once the backend has the
    request (5 s at most), the thread still waiting for the answer."""
    client = threading.Thread(target=send)
    client.start()
    deadline = time.monotonic() + 5
    while backend.request_count == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    return client


def test_gunicorn_runs_the_event_loop_worker(
    launch: Launcher, backend: TestBackend, tmp_path: Path
) -> None:
    """gunicorn -k softlb.aio.Worker 'softlb.wsgi:create_app("cfg.json")' proxies, and stops
    cleanly on SIGTERM."""
    if importlib.util.find_spec("softlb.aio") is None:
        pytest.skip("softlb.aio (the event-loop engine) is not on this branch yet")
    (tmp_path / "cfg.json").write_text(json.dumps({"servers": [backend.url], **NO_PROBES}))
    port = free_port()
    # gunicorn >= 25.1 opens a control socket under $HOME or $XDG_RUNTIME_DIR: keep it here.
    env = {**SUBPROCESS_ENV, "HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path)}
    argv = [
        str(BIN / "gunicorn"),
        "-k",
        "softlb.aio.Worker",
        "-b",
        f"127.0.0.1:{port}",
        'softlb.wsgi:create_app("cfg.json")',
    ]
    running = launch(argv, port=port, env=env)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /via-gunicorn HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        sock.settimeout(5)
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(f"ok from {backend.port}".encode())
    assert backend.last.target == "/via-gunicorn"
    assert "softlb.aio.Worker" in running.output()
    running.signal(signal.SIGTERM)
    assert running.wait() == 0
    assert "Traceback" not in running.output()


def test_sigterm_refuses_new_connections_and_finishes_the_one_in_flight(
    balancer: StartBalancer, backend: TestBackend
) -> None:
    """SIGTERM during a 2.5 s request: new connections are refused at once (never left
    hanging), the request completes with 200, and the process exits 0."""
    lb = balancer({"servers": [backend.url]})
    lb.worker()  # the worker is up before the signal
    result: dict[str, Any] = {}

    def slow() -> None:
        try:
            status, _, body = lb.get("/slow/2.5", timeout=10.0)
            result["answer"] = (status, body)
        except Exception as exc:  # reported by the assertion below
            result["error"] = repr(exc)

    client = in_flight(backend, slow)
    try:
        assert backend.request_count == 1, lb.running.output()
        signalled = time.monotonic()
        lb.running.signal(signal.SIGTERM)
        refused_after = None
        while time.monotonic() - signalled < 1.0:
            try:
                socket.create_connection(("127.0.0.1", lb.port), timeout=0.5).close()
            except (ConnectionRefusedError, ConnectionResetError):
                # Refused, or reset: a connection caught in the backlog as the listener
                # closed. Either way it is not left hanging.
                refused_after = time.monotonic() - signalled
                break
            except TimeoutError:
                # A SYN that met the listener in the middle of closing is dropped and would
                # be sent again in 1 s (seen once under a loaded CI run): not accepted; the
                # next attempt must be refused.
                continue
            time.sleep(0.02)
        still_in_flight = client.is_alive()
    finally:
        client.join(15)
    assert refused_after is not None, "a new connection was still accepted 1 s after SIGTERM"
    assert still_in_flight, "the slow request ended before the refusal was seen"
    assert result == {"answer": (200, b"slow")}
    assert lb.running.wait() == 0
    assert "Traceback" not in lb.running.output()


@pytest.mark.parametrize("group", [False, True], ids=["master", "process-group"])
def test_a_second_sigint_during_the_drain_stops_at_once(
    balancer: StartBalancer, backend: TestBackend, group: bool
) -> None:
    """A second Ctrl-C while an 8 s request drains stops at once (docs/deployment.rst), sent
    to the master alone or, as a terminal does, to the whole process group; exit 0."""
    lb = balancer({"servers": [backend.url]})
    lb.worker()

    def slow() -> None:
        with contextlib.suppress(Exception):  # cut off: that is the point
            lb.get("/slow/8", timeout=15.0)

    client = in_flight(backend, slow)
    try:
        signalled = time.monotonic()
        lb.running.signal(signal.SIGINT, group=group)
        time.sleep(0.3)
        lb.running.signal(signal.SIGINT, group=group)
        assert lb.running.wait() == 0
        assert time.monotonic() - signalled < 2.0, time.monotonic() - signalled  # not 8 s
    finally:
        client.join(15)
    assert "Traceback" not in lb.running.output()


def test_event_loop_is_the_default_engine(launch: Launcher, tmp_path: Path) -> None:
    """softlb serve without --engine runs the event loop (an Upgrade is joined through), and
    accepts --threads, which only the threaded engine uses."""
    if not engine_flag_supported():
        pytest.skip("softlb serve has no --engine yet: the event-loop engine is not merged")
    with UpgradeEchoBackend() as echo:
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"servers": [echo.url], **NO_PROBES}))
        port = free_port()
        argv = [*SOFTLB, "serve", "--config", str(config), "--bind", f"127.0.0.1:{port}"]
        running = launch([*argv, "--threads", "4"], port=port, env=SUBPROCESS_ENV)
        with RawClient(port) as client:
            client.send(UPGRADE_REQUEST)
            assert client.read_head().status == 101
            greeting = UpgradeEchoBackend.greeting
            assert client.recv_exactly(len(greeting)) == greeting
            client.send(b"ping")
            assert client.recv_exactly(4) == b"ping"
        running.signal(signal.SIGTERM)
        assert running.wait() == 0
