"""Tests for softlb.discovery: servers with "resolve": true (SPEC §2).

The backends are real HTTP servers on 127.0.0.1 and 127.0.0.2 (both loopback), on one port,
as the addresses of one name would be; the name is resolved by an injected function, and
once by the real getaddrinfo ("localhost").
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from werkzeug.test import Client

from softlb.backend import Backend
from softlb.discovery import Resolvable, Resolver, address_url
from softlb.pool import Pool
from softlb.wsgi import LoadBalancer

NAME = "http://api.internal:{port}"


class _Handler(BaseHTTPRequestHandler):
    """Answers every GET with the address it listens on and the Host it was sent."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps(
            {"address": self.server.server_address[0], "host": self.headers.get("Host")}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True


def _serve(address: str, port: int) -> _Server:
    server = _Server((address, port), _Handler)
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    return server


@pytest.fixture
def pair() -> Iterator[int]:
    """Two servers on 127.0.0.1:PORT and 127.0.0.2:PORT; yields PORT."""
    servers: list[_Server] = []
    for _ in range(10):  # the port free on .1 may be taken on .2: try another
        first = _serve("127.0.0.1", 0)
        try:
            second = _serve("127.0.0.2", first.server_address[1])
        except OSError:
            first.shutdown()
            first.server_close()
            continue
        servers = [first, second]
        break
    assert servers, "no port free on both 127.0.0.1 and 127.0.0.2"
    yield servers[0].server_address[1]
    for server in servers:
        server.shutdown()
        server.server_close()


class FakeDNS:
    """A getaddrinfo-like function whose answer the test sets; counts its calls."""

    def __init__(self, *addresses: str) -> None:
        self.addresses: Sequence[str] | None = addresses  # None: the lookup fails
        self.calls = 0
        self.asked: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int, *args: Any) -> list[tuple[Any, ...]]:
        self.calls += 1
        self.asked.append((host, port))
        if self.addresses is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in self.addresses
        ]


def urls(pool: Pool) -> dict[str, tuple[str | None, bool]]:
    """Each backend's URL: its origin and whether it is draining."""
    return {b.url: (b.origin, b.draining) for b in pool.backends}


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait (bounded) until ``condition()`` holds."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------ lookups


def test_each_address_is_a_backend_and_traffic_reaches_both(pair: int) -> None:
    """Both addresses become backends listed with "from"; requests reach both, and each
    backend sees the Host the client sent, not an address."""
    spec = NAME.format(port=pair)
    dns = FakeDNS("127.0.0.2", "127.0.0.1", "127.0.0.1")
    pool = Pool([])
    Resolver(pool, [Resolvable(spec, weight=3)], 5.0, resolve=dns).refresh()
    one, two = f"http://127.0.0.1:{pair}", f"http://127.0.0.2:{pair}"
    assert urls(pool) == {one: (spec, False), two: (spec, False)}
    assert dns.asked == [("api.internal", pair)]
    assert pool.get(one).weight == 3
    assert pool.get(one).as_dict()["from"] == spec
    lb = LoadBalancer(pool)
    client = Client(lb)
    seen = set()
    for _ in range(4):
        answer = client.get("/", base_url="http://shop.example/").get_json()
        assert answer["host"] == "shop.example"
        seen.add(answer["address"])
    lb.close()
    assert seen == {"127.0.0.1", "127.0.0.2"}


def test_a_configured_backend_has_no_from() -> None:
    """Only discovered backends carry "from"."""
    assert "from" not in Backend("http://10.0.0.1:80").as_dict()


def test_vanished_address_is_drained_then_removed_when_idle(pair: int) -> None:
    """An address that leaves the answer is drained; while it has a request in flight it
    stays (draining), and the first round after that request ends removes it."""
    spec = NAME.format(port=pair)
    dns = FakeDNS("127.0.0.1", "127.0.0.2")
    pool = Pool([])
    removed: list[str] = []
    pool.subscribe(lambda event: removed.append(event.url or ""), ("removed",))
    resolver = Resolver(pool, [Resolvable(spec)], 5.0, resolve=dns)
    resolver.refresh()
    two = f"http://127.0.0.2:{pair}"
    lease = pool.lease(exclude=[pool.get(f"http://127.0.0.1:{pair}")])
    assert lease.backend.url == two
    dns.addresses = ["127.0.0.1"]
    resolver.refresh()
    assert urls(pool)[two] == (spec, True)
    assert resolver.leaving == (two,)
    for _ in range(5):  # a backend that is draining gets nothing new
        with pool.lease() as picked:
            assert picked.url != two
    resolver.refresh()
    assert two in pool
    lease.release()
    resolver.refresh()
    assert two not in pool
    assert removed == [two]
    assert resolver.leaving == ()


def test_an_idle_vanished_address_goes_at_once(pair: int) -> None:
    """With nothing in flight, the drained backend is removed in the same round."""
    dns = FakeDNS("127.0.0.1", "127.0.0.2")
    pool = Pool([])
    resolver = Resolver(pool, [Resolvable(NAME.format(port=pair))], 5.0, resolve=dns)
    resolver.refresh()
    dns.addresses = ["127.0.0.2"]
    resolver.refresh()
    assert list(urls(pool)) == [f"http://127.0.0.2:{pair}"]


def test_an_address_back_before_removal_is_undrained(pair: int) -> None:
    """An address that returns while its backend still drains is put back in rotation."""
    spec = NAME.format(port=pair)
    dns = FakeDNS("127.0.0.1", "127.0.0.2")
    pool = Pool([])
    resolver = Resolver(pool, [Resolvable(spec)], 5.0, resolve=dns)
    resolver.refresh()
    one = f"http://127.0.0.1:{pair}"
    lease = pool.lease(exclude=[pool.get(f"http://127.0.0.2:{pair}")])
    dns.addresses = ["127.0.0.2"]
    resolver.refresh()
    assert urls(pool)[one] == (spec, True)
    dns.addresses = ["127.0.0.1", "127.0.0.2"]
    resolver.refresh()
    lease.release()
    resolver.refresh()
    assert urls(pool)[one] == (spec, False)
    assert resolver.leaving == ()


def test_failed_lookup_keeps_the_addresses_and_logs_once(
    pair: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing (or empty) lookup changes nothing, and is logged once until it succeeds."""
    dns = FakeDNS("127.0.0.1", "127.0.0.2")
    pool = Pool([])
    resolver = Resolver(pool, [Resolvable(NAME.format(port=pair))], 5.0, resolve=dns)
    resolver.refresh()
    before = urls(pool)
    caplog.set_level(logging.INFO, logger="softlb.discovery")
    caplog.clear()
    dns.addresses = None
    for _ in range(3):
        resolver.refresh()
    dns.addresses = []
    resolver.refresh()
    assert urls(pool) == before
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "api.internal" in warnings[0].getMessage()
    assert "keeping its 2 known addresses" in warnings[0].getMessage()
    dns.addresses = ["127.0.0.1", "127.0.0.2"]
    resolver.refresh()
    assert "resolves again" in caplog.records[-1].getMessage()
    assert dns.calls == 6


def test_servers_without_resolve_and_taken_addresses_are_left_alone(pair: int) -> None:
    """A server without resolve is not looked up; an address already configured as a
    backend of its own stays that backend (no "from", never drained by discovery)."""
    one = f"http://127.0.0.1:{pair}"
    pool = Pool([one])
    dns = FakeDNS("127.0.0.1", "127.0.0.2")
    resolver = Resolver(
        pool,
        [Resolvable(NAME.format(port=pair)), Resolvable("http://static:80", resolve=False)],
        5.0,
        resolve=dns,
    )
    resolver.refresh()
    assert dns.asked == [("api.internal", pair)]
    assert urls(pool)[one] == (None, False)
    dns.addresses = ["127.0.0.2"]
    resolver.refresh()
    assert urls(pool)[one] == (None, False)


def test_the_pool_follows_dns_but_an_operator_drain_stays(pair: int) -> None:
    """A discovered backend removed by hand comes back at the next lookup while its address
    resolves; one drained by hand stays drained."""
    spec = NAME.format(port=pair)
    dns = FakeDNS("127.0.0.1", "127.0.0.2")
    pool = Pool([])
    resolver = Resolver(pool, [Resolvable(spec)], 5.0, resolve=dns)
    resolver.refresh()
    one, two = f"http://127.0.0.1:{pair}", f"http://127.0.0.2:{pair}"
    pool.remove(one)
    pool.drain(two)
    resolver.refresh()
    assert urls(pool) == {one: (spec, False), two: (spec, True)}


def test_a_factory_builds_the_backends() -> None:
    """``factory`` gets each address's URL, the configured server and its URL."""
    seen: list[tuple[str, Any, str]] = []

    def factory(url: str, spec: Any, origin: str) -> Backend:
        seen.append((url, spec, origin))
        return Backend(url, spec.weight * 2, origin=origin)

    spec = Resolvable("http://API.internal:8080/", weight=2)
    pool = Pool([])
    Resolver(pool, [spec], 5.0, resolve=FakeDNS("10.0.0.1"), factory=factory).refresh()
    assert seen == [("http://10.0.0.1:8080", spec, "http://api.internal:8080")]
    assert pool.get("http://10.0.0.1:8080").weight == 4


def test_address_urls() -> None:
    """Scheme, port (explicit, or the scheme's) and base path are kept; IPv6 in brackets."""
    assert address_url("http://api.internal/v1", "10.0.0.7") == "http://10.0.0.7:80/v1"
    assert address_url("https://api.internal", "10.0.0.7") == "https://10.0.0.7:443"
    assert address_url("http://api.internal:8080", "fd00::7") == "http://[fd00::7]:8080"


def test_ipv6_answers_become_bracketed_backends() -> None:
    """An AAAA answer is a backend http://[ADDRESS]:PORT; a link-local one with a zone is
    skipped (it cannot be a URL's host)."""
    pool = Pool([])
    dns = FakeDNS("::1", "fe80::1%lo")
    Resolver(pool, [Resolvable("http://api.internal:8080")], 5.0, resolve=dns).refresh()
    assert list(urls(pool)) == ["http://[::1]:8080"]


def test_bad_interval_is_refused() -> None:
    """An interval that is not positive is a ValueError."""
    with pytest.raises(ValueError, match="interval"):
        Resolver(Pool([]), [Resolvable("http://a:80")], 0)


# ------------------------------------------------------------------------------- the thread


def test_the_thread_follows_changes(pair: int) -> None:
    """start() resolves at once, then every interval until stop()."""
    dns = FakeDNS("127.0.0.1")
    pool = Pool([])
    resolver = Resolver(pool, [Resolvable(NAME.format(port=pair))], 0.05, resolve=dns)
    with resolver:
        assert list(urls(pool)) == [f"http://127.0.0.1:{pair}"]  # before start() returned
        assert resolver.running
        dns.addresses = ["127.0.0.2"]
        wait_for(lambda: list(urls(pool)) == [f"http://127.0.0.2:{pair}"])
    assert not resolver.running
    calls = dns.calls
    time.sleep(0.2)
    assert dns.calls == calls


def test_real_getaddrinfo_on_localhost(pair: int) -> None:
    """With the system resolver, "localhost" gives the loopback address(es), and a request
    through the pool reaches the server on 127.0.0.1."""
    pool = Pool([])
    Resolver(pool, [Resolvable(f"http://localhost:{pair}")], 5.0).refresh()
    found = set(urls(pool))
    assert f"http://127.0.0.1:{pair}" in found
    assert found <= {f"http://127.0.0.1:{pair}", f"http://[::1]:{pair}"}
    if f"http://[::1]:{pair}" in pool:  # nothing listens on ::1 here
        pool.drain(f"http://[::1]:{pair}")
    lb = LoadBalancer(pool)
    answer = Client(lb).get("/", base_url="http://localhost/").get_json()
    lb.close()
    assert answer == {"address": "127.0.0.1", "host": "localhost"}


def test_shared_state_keeps_discovered_backends(pair: int, tmp_path: Any) -> None:
    """With a shared store (several workers), the store's membership does not remove the
    backends this process found by DNS: each worker resolves for itself."""
    from softlb.state.sqlite import SqliteStore
    from softlb.state.sync import SharedState

    static = "http://10.0.0.9:80"
    pool = Pool([static])
    shared = SharedState(
        pool, SqliteStore(str(tmp_path / "state.db"), cluster="t"), seed=[(static, 1)]
    )
    shared.start()
    try:
        Resolver(
            pool, [Resolvable(NAME.format(port=pair))], 5.0, resolve=FakeDNS("127.0.0.1")
        ).refresh()
        shared._next_full_read = 0.0  # the next poll reads the whole membership
        shared.poll()
        assert set(urls(pool)) == {static, f"http://127.0.0.1:{pair}"}
    finally:
        shared.stop()


@pytest.mark.parametrize("state", ["memory", "sqlite"])
def test_a_resolve_server_is_only_its_addresses_in_the_app(
    pair: int, tmp_path: Any, state: str
) -> None:
    """The app's pool holds the addresses a ``resolve`` server resolves to, never the
    configured host-name URL itself (SPEC §2), whatever the state: the shared store is not
    seeded with it either, so its membership does not bring it back."""
    from softlb.app import create_app
    from softlb.config import parse_config

    configured = f"http://localhost:{pair}"
    static = "http://10.0.0.9:80"
    config: dict[str, Any] = {
        "servers": [{"url": configured, "resolve": True}, static],
        "health_check": {"enabled": False},
    }
    if state == "sqlite":
        config["state"] = f"sqlite:///{tmp_path / 'state.db'}"
    app = create_app(parse_config(config))
    try:
        app.start()
        deadline = time.monotonic() + 5
        while f"http://127.0.0.1:{pair}" not in app.pool and time.monotonic() < deadline:
            time.sleep(0.05)
        if app.state is not None:
            app.state._next_full_read = 0.0  # the next poll reads the whole membership
            app.state.poll()
        found = urls(app.pool)
        assert f"http://127.0.0.1:{pair}" in found
        assert configured not in found
        assert static in found
    finally:
        app.stop()


@pytest.mark.parametrize("state", ["memory", "sqlite"])
def test_the_admin_api_on_a_discovered_backend(pair: int, tmp_path: Any, state: str) -> None:
    """A discovered address is a backend the admin API lists, so: POST of it is a 409
    (already present), DELETE a 409 (the next lookup would add it again), PATCH drains it
    where this process is the only one (state memory) and is a 409 where a shared store would
    carry it to one process only; nothing changes on a refusal."""
    from softlb.app import create_app
    from softlb.config import parse_config

    address = f"http://127.0.0.1:{pair}"
    config: dict[str, Any] = {
        "servers": [{"url": f"http://localhost:{pair}", "resolve": True}],
        "health_check": {"enabled": False},
    }
    if state == "sqlite":
        config["state"] = f"sqlite:///{tmp_path / 'state.db'}"
    app = create_app(parse_config(config))
    client = Client(app)
    loopback = {"REMOTE_ADDR": "127.0.0.1"}

    def call(method: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        answer = client.open("/_softlb/servers", method=method, json=body, environ_base=loopback)
        return answer.status_code, json.loads(answer.get_data())

    try:
        app.start()
        deadline = time.monotonic() + 5
        while address not in app.pool and time.monotonic() < deadline:
            time.sleep(0.05)
        status, body = call("POST", {"url": address})
        origin = f"http://localhost:{pair}"
        expected = f"backend {address} is already present, discovered from {origin}"
        assert (status, body["error"]) == (409, expected)
        status, body = call("DELETE", {"url": address})
        assert status == 409 and "the next lookup would add it again" in body["error"]
        status, body = call("PATCH", {"url": address, "draining": True})
        if state == "memory":
            assert status == 200 and body["draining"] is True
            assert app.pool.get(address).draining
        else:
            assert status == 409 and "one process only" in body["error"]
            assert not app.pool.get(address).draining
        assert address in app.pool and app.pool.get(address).origin is not None
    finally:
        app.stop()
