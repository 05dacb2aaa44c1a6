"""softlb demo's backends (softlb.demo): real servers on 127.0.0.1 that can be broken and healed.

The whole demo as a process, with its failover story, runs in tests/test_readme.py (the README's
commands) and tests/integration/test_serve.py.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest

from softlb.demo import DemoBackend, demo_config, instructions
from tests.helpers.servers import free_port


def call(port: int, method: str, target: str) -> tuple[int, str]:
    """One request on a fresh connection; the status and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, target)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


@pytest.fixture
def demo_backend() -> Iterator[DemoBackend]:
    backend = DemoBackend(2)
    try:
        yield backend
    finally:
        backend.stop()


def test_break_and_heal(demo_backend: DemoBackend) -> None:
    """POST /break makes the backend drop every request (health included) with no answer,
    as a crashed server would; POST /heal makes it answer again (issue #14, item 4)."""
    port = demo_backend.port
    assert call(port, "GET", "/") == (200, f"Hello from demo backend 2 (port {port}): GET /\n")
    status, text = call(port, "POST", "/break")
    assert status == 200
    assert text.startswith(f"demo backend 2 (port {port}) is broken")
    assert f"curl -X POST http://127.0.0.1:{port}/heal" in text
    assert demo_backend.broken
    for target in ("/", "/health"):
        with pytest.raises(http.client.RemoteDisconnected):
            call(port, "GET", target)
    status, text = call(port, "POST", "/heal")
    assert (status, text.split(":")[0]) == (200, f"demo backend 2 (port {port}) is healed")
    assert not demo_backend.broken
    assert call(port, "GET", "/health") == (200, "ok\n")


def test_break_needs_post(demo_backend: DemoBackend) -> None:
    """GET /break changes nothing and says to use POST."""
    status, text = call(demo_backend.port, "GET", "/break")
    assert status == 405
    assert "use POST" in text
    assert not demo_backend.broken


def test_break_and_heal_methods(demo_backend: DemoBackend) -> None:
    """break_() and heal() do what the two paths do; the repr shows the state."""
    demo_backend.break_()
    assert "broken" in repr(demo_backend)
    with pytest.raises(http.client.RemoteDisconnected):
        call(demo_backend.port, "GET", "/")
    demo_backend.heal()
    assert call(demo_backend.port, "GET", "/")[0] == 200


def test_preferred_port_and_fallback() -> None:
    """A demo backend takes the port it is given when free, and any free port when not."""
    wanted = free_port()
    first = DemoBackend(1, wanted)
    try:
        assert first.port == wanted
        second = DemoBackend(2, wanted)  # taken by the first
        try:
            assert second.port not in (wanted, 0)
            assert call(second.port, "GET", "/")[0] == 200
        finally:
            second.stop()
    finally:
        first.stop()


def test_instructions_name_break_and_heal() -> None:
    """What the demo prints says how to break and heal a backend, with its real port."""
    backends = [DemoBackend(n) for n in (1, 2, 3)]
    try:
        text = instructions(demo_config(8080, [b.url for b in backends]), backends)
    finally:
        for backend in backends:
            backend.stop()
    assert f"curl -X POST {backends[1].url}/break" in text
    assert f"curl -X POST {backends[1].url}/heal" in text
