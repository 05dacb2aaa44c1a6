"""BalancedClient against real local backends, and RetryBudget on a fake clock."""

from __future__ import annotations

import contextlib
import gc
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3

from softlb import Backend, Balancer, HealthChecker, Pool, ProbeResult
from softlb.client import (
    DEFAULT_BUDGET_WINDOW,
    DEFAULT_MIN_RETRIES_PER_SECOND,
    DEFAULT_RETRY_RATIO,
    BalancedClient,
    RetryBudget,
)
from softlb.errors import (
    NoBackendAvailable,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamTimeout,
)
from tests.helpers.servers import RefusingURL, TestBackend

ROOT = Path(__file__).resolve().parent.parent


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class DroppingServer:
    """Accepts connections, reads each request's head and closes without answering."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.requests = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if data:
                    with self._lock:
                        self.requests += 1

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux; close() does not
        self._sock.close()
        self._thread.join(5)


@pytest.fixture
def dropper() -> Iterator[DroppingServer]:
    """A server that drops every request after reading it."""
    server = DroppingServer()
    yield server
    server.stop()


def make(servers: list[Any], **options: Any) -> BalancedClient:
    """A client over a round-robin pool of ``servers``."""
    return BalancedClient(Pool(servers, balancer="round_robin"), **options)


class FirstEligible(Balancer):
    """Always the first backend in rotation: every request starts at the same one."""

    name = "first_eligible"

    def __init__(self) -> None:
        self._eligible: tuple[Backend, ...] = ()

    def rebuild(self, eligible: tuple[Backend, ...], now: float) -> None:
        self._eligible = eligible

    def pick(self, key: str | None, now: float) -> Backend | None:
        return self._eligible[0] if self._eligible else None


def make_first(servers: list[Any], **options: Any) -> BalancedClient:
    """A client whose every request tries ``servers[0]`` first."""
    return BalancedClient(Pool(servers, balancer=FirstEligible()), **options)


# -- spreading, counting, recording --------------------------------------------------------


def test_round_robin_pool_alternates_exactly(backends: list[TestBackend]) -> None:
    """Each request goes to the next backend of a round-robin pool, in order."""
    with make([b.url for b in backends]) as client:
        answered = [client.request("GET", "/").headers["X-Backend"] for _ in range(6)]
    ports = [str(b.port) for b in backends]
    assert answered == ports + ports
    assert [b.request_count for b in backends] == [2, 2, 2]


def test_response_is_a_urllib3_response(backend: TestBackend) -> None:
    """The answer is a urllib3 response with status, headers, data, json() and the URL used."""
    with make([backend.url]) as client:
        resp = client.request("GET", "/echo?x=1")
    assert isinstance(resp, urllib3.BaseHTTPResponse)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.json()["target"] == "/echo?x=1"
    assert resp.data == resp.data  # kept after the first read
    assert resp.url == f"{backend.url}/echo?x=1"
    assert resp.closed


def test_streamed_response_is_counted_in_flight_until_read(backend: TestBackend) -> None:
    """With preload_content=False the lease lasts until the body has been read to the end."""
    with make([backend.url]) as client:
        resp = client.request("GET", "/big/300000", preload_content=False)
        member = client.pool.backends[0]
        assert member.active == 1
        assert client.pool.in_flight == 1
        total = sum(len(chunk) for chunk in resp.stream(65536))
        assert total == 300000
        assert member.active == 0
        assert (member.requests, member.failures) == (1, 0)
        assert member.latency is not None


def test_streamed_response_closed_early_ends_the_lease(backend: TestBackend) -> None:
    """Closing a half-read response ends the lease as a success and drops the connection."""
    with make([backend.url]) as client:
        resp = client.request("GET", "/chunked/500000", preload_content=False)
        assert resp.read(1000)
        resp.close()
        member = client.pool.backends[0]
        assert (member.active, member.requests, member.failures) == (0, 1, 0)
        assert client.request("GET", "/").status == 200  # the pool's connections still work


def test_streamed_response_as_context_manager(backend: TestBackend) -> None:
    """A streamed response used in a with block ends its lease at the end of the block."""
    with make([backend.url]) as client:
        with client.request("GET", "/big/100000", preload_content=False) as resp:
            assert client.pool.in_flight == 1
            assert len(resp.read(10)) == 10
        assert client.pool.in_flight == 0


def test_dropped_streamed_response_still_ends_its_lease(backend: TestBackend) -> None:
    """A streamed response that is garbage-collected unread does not stay in flight."""
    with make([backend.url]) as client:
        resp = client.request("GET", "/big/100000", preload_content=False)
        del resp
        gc.collect()
        assert client.pool.in_flight == 0


def test_bodiless_answer_is_done_at_once(backend: TestBackend) -> None:
    """A HEAD answer is complete without reading: nothing stays in flight."""
    with make([backend.url]) as client:
        for _ in range(2):  # the connection is reused cleanly
            resp = client.request("HEAD", "/", preload_content=False)
            assert resp.status == 200
            assert client.pool.in_flight == 0


def test_latency_is_recorded(backend: TestBackend) -> None:
    """A successful request feeds the backend's peak-EWMA latency."""
    with make([backend.url]) as client:
        assert client.pool.backends[0].latency is None
        client.request("GET", "/slow/0.05")
        latency = client.pool.backends[0].latency
    assert latency is not None
    assert latency >= 0.05


def test_gzip_body_is_decoded_unless_told(backend: TestBackend) -> None:
    """Bodies are decoded like urllib3's, and left alone with decode_content=False."""
    with make([backend.url]) as client:
        assert client.request("GET", "/gzip").data.startswith(b"softlb gzip test body")
        raw = client.request("GET", "/gzip", decode_content=False).data
    assert raw[:2] == b"\x1f\x8b"


# -- what is sent --------------------------------------------------------------------------


def test_headers_and_body_reach_the_backend(backend: TestBackend) -> None:
    """Client headers, request headers (which win, in any case) and the body are sent."""
    with make([backend.url], headers={"X-Team": "a", "X-Env": "prod"}) as client:
        resp = client.request(
            "PUT", "/echo", body=b"payload", headers={"x-env": "test", "X-Id": "7"}
        )
    assert resp.status == 200
    seen = backend.last
    assert seen.method == "PUT"
    assert seen.body == b"payload"
    assert seen.header("X-Team") == "a"
    assert seen.header_values("X-Env") == ["test"]
    assert seen.header("X-Id") == "7"
    assert seen.header("Host") == f"127.0.0.1:{backend.port}"
    assert (seen.header("User-Agent") or "").startswith("python-urllib3/")


def test_json_and_fields_are_encoded_like_urllib3(backend: TestBackend) -> None:
    """json= sends JSON, fields= goes in the query for GET and as multipart for POST."""
    with make([backend.url]) as client:
        client.request("POST", "/echo", json={"a": [1, 2]})
        assert backend.last.body == b'{"a":[1,2]}'
        assert backend.last.header("Content-Type") == "application/json"
        client.request("GET", "/echo?x=1", fields={"q": "a b"})
        assert backend.last.target == "/echo?x=1&q=a+b"
        client.request("POST", "/echo", fields={"name": "value"})
        assert (backend.last.header("Content-Type") or "").startswith("multipart/form-data")
        assert b'name="name"' in backend.last.body


@pytest.mark.parametrize(
    "path", ["http://example.com/x", "https://example.com", "users", "//example.com/x", "/a b"]
)
def test_only_paths_are_accepted(backend: TestBackend, path: str) -> None:
    """A full URL (or anything not starting with one '/') is a ValueError that says why."""
    with make([backend.url]) as client, pytest.raises(ValueError, match="path"):
        client.request("GET", path)
    assert backend.request_count == 0


def test_redirects_are_not_followed(backend: TestBackend) -> None:
    """A 3xx comes back as it is, and redirect=True is refused."""
    with make([backend.url]) as client:
        resp = client.request("GET", "/status/302")
        assert resp.status == 302
        assert resp.get_redirect_location()
        with pytest.raises(ValueError, match="redirect"):
            client.request("GET", "/", redirect=True)


# -- retries -------------------------------------------------------------------------------


def test_connect_refused_fails_over_for_post(backend: TestBackend, refused_url: str) -> None:
    """A POST that could not be connected is sent to another backend (nothing was sent)."""
    with make([refused_url, backend.url]) as client:
        resp = client.request("POST", "/echo", body=b"once")
        refused, good = client.pool.backends
    assert resp.status == 200
    assert backend.request_count == 1
    assert backend.last.body == b"once"
    assert (refused.failures, good.failures) == (1, 0)


def test_streamed_body_fails_over_when_nothing_was_sent(
    backend: TestBackend, refused_url: str
) -> None:
    """An iterator body not yet started can still go to another backend."""
    with make([refused_url, backend.url]) as client:
        resp = client.request("POST", "/echo", body=iter([b"a", b"b"]))
    assert resp.status == 200
    assert backend.last.body == b"ab"


def test_all_refused_is_a_connect_error(refused_url: str) -> None:
    """When no backend could be connected the last connect error is raised."""
    with make([refused_url, RefusingURL()]) as client, pytest.raises(UpstreamConnectError):
        client.request("GET", "/")


def test_post_is_not_retried_after_drop(dropper: DroppingServer, backend: TestBackend) -> None:
    """A POST that reached a backend which then closed is not sent again."""
    with make([dropper.url, backend.url]) as client, pytest.raises(UpstreamBroken):
        client.request("POST", "/", body=b"x")
    assert dropper.requests == 1
    assert backend.request_count == 0


def test_get_is_retried_after_drop(dropper: DroppingServer, backend: TestBackend) -> None:
    """A GET whose connection was closed without an answer is sent to another backend."""
    with make([dropper.url, backend.url]) as client:
        resp = client.request("GET", "/")
        dropped = client.pool.backends[0]
    assert resp.status == 200
    assert (dropper.requests, backend.request_count) == (1, 1)
    assert dropped.failures == 1


def test_idempotency_key_makes_post_retryable(
    dropper: DroppingServer, backend: TestBackend
) -> None:
    """A POST with an Idempotency-Key header is retried like a GET."""
    with make([dropper.url, backend.url]) as client:
        resp = client.request("POST", "/echo", body=b"x", headers={"idempotency-key": "k1"})
    assert resp.status == 200
    assert backend.last.body == b"x"


def test_started_stream_body_is_not_retried(dropper: DroppingServer, backend: TestBackend) -> None:
    """A streamed body that was sent cannot be sent again, even with an Idempotency-Key."""
    with make([dropper.url, backend.url]) as client, pytest.raises(UpstreamBroken):
        client.request("POST", "/", body=iter([b"x"] * 3), headers={"Idempotency-Key": "k"})
    assert backend.request_count == 0


def test_get_drop_tries_retries_plus_one_backends(backends: list[TestBackend]) -> None:
    """/drop on every backend: a GET is tried 1 + retries times, then UpstreamBroken."""
    with make([b.url for b in backends], retries=1) as client, pytest.raises(UpstreamBroken):
        client.request("GET", "/drop")
    assert sorted(b.request_count for b in backends) == [0, 1, 1]


def test_broken_preloaded_body_is_retried_only_when_safe(backends: list[TestBackend]) -> None:
    """A body cut short while preloading counts as after-send: GET retried, POST not."""
    with make([b.url for b in backends]) as client:
        with pytest.raises(UpstreamBroken):
            client.request("GET", "/reset-mid-body")
        assert sum(b.request_count for b in backends) == 3
        with pytest.raises(UpstreamBroken):
            client.request("POST", "/reset-mid-body")
        assert sum(b.request_count for b in backends) == 4


def test_broken_streamed_body_is_a_failure(backend: TestBackend) -> None:
    """A streamed body cut short raises UpstreamBroken and records a failure."""
    with make([backend.url]) as client:
        resp = client.request("GET", "/reset-mid-body", preload_content=False)
        with pytest.raises(UpstreamBroken):
            resp.read()
        member = client.pool.backends[0]
        assert (member.active, member.failures) == (0, 1)


def test_read_timeout_is_upstream_timeout(backend: TestBackend) -> None:
    """No answer within the read timeout raises UpstreamTimeout (the proxy's 504)."""
    with make([backend.url], read_timeout=0.2, retries=0) as client:
        with pytest.raises(UpstreamTimeout) as caught:
            client.request("GET", "/slow/5")
        assert caught.value.status == 504
        assert client.pool.backends[0].failures == 1
        with pytest.raises(UpstreamTimeout):  # a per-request timeout overrides the client's
            client.request("GET", "/slow/5", timeout=(1.0, 0.1))


def test_no_backend_available() -> None:
    """An empty pool, or one with every backend out of rotation, raises NoBackendAvailable."""
    with make([]) as client, pytest.raises(NoBackendAvailable):
        client.request("GET", "/")
    with make(["http://127.0.0.1:9"]) as client:
        client.pool.drain("http://127.0.0.1:9")
        with pytest.raises(NoBackendAvailable) as caught:
            client.request("GET", "/")
    assert caught.value.status == 503


def test_passive_health_check_ejects_after_fall_failures(
    backend: TestBackend, refused_url: str
) -> None:
    """Failures seen by the client count: `fall` of them in a row take a backend out."""
    with make([refused_url, backend.url]) as client:
        checker = HealthChecker(client.pool, fall=3, probe=lambda b: ProbeResult(True, "ok"))
        try:
            refused = client.pool.backends[0]
            for expected in (1, 2):
                client.request("GET", "/")
                assert (refused.consecutive_failures, refused.healthy) == (expected, True)
            client.request("GET", "/")
            assert not refused.healthy
            before = backend.request_count
            for _ in range(4):
                client.request("GET", "/")
            assert backend.request_count == before + 4
            assert refused.failures == 3
        finally:
            checker.stop()


# -- the retry budget ----------------------------------------------------------------------


def test_budget_defaults_come_from_finagle_and_envoy() -> None:
    """20 % of requests plus 3 retries a second over 10 s: 30 retries for a new client."""
    assert (DEFAULT_RETRY_RATIO, DEFAULT_MIN_RETRIES_PER_SECOND, DEFAULT_BUDGET_WINDOW) == (
        0.2,
        3.0,
        10.0,
    )
    assert RetryBudget(clock=FakeClock()).balance == 30


def test_budget_floor_allows_min_per_second() -> None:
    """With no traffic, min_per_second retries are allowed per second, then none."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_second=3, window=1.0, clock=clock)
    assert [budget.try_withdraw() for _ in range(4)] == [True, True, True, False]
    clock.advance(0.5)
    assert not budget.try_withdraw()
    clock.advance(0.5)
    assert [budget.try_withdraw() for _ in range(4)] == [True, True, True, False]


def test_budget_ratio_earns_retries_from_requests() -> None:
    """Every five requests earn one retry at ratio 0.2, on top of the floor."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=0, window=10, clock=clock)
    assert not budget.try_withdraw()
    for _ in range(4):
        budget.deposit()
    assert budget.balance == 0
    budget.deposit()
    assert budget.balance == 1
    for _ in range(95):
        budget.deposit()
    assert budget.balance == 20
    assert sum(budget.try_withdraw() for _ in range(25)) == 20


def test_budget_deposits_expire_after_the_window() -> None:
    """Credit from old requests is gone one window later; withdrawals are forgotten too."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, min_per_second=0.1, window=10, clock=clock)
    for _ in range(10):
        budget.deposit()
    assert budget.balance == 1 + 5
    clock.advance(5)
    assert budget.balance == 6
    assert sum(budget.try_withdraw() for _ in range(10)) == 6
    clock.advance(5)  # the deposits leave the window; the withdrawals, 5 s younger, stay
    assert budget.balance == 0
    clock.advance(5)
    assert budget.balance == 1  # the floor alone


def test_budget_ratio_above_one() -> None:
    """ratio=2 allows two retries per request (Finagle allows up to 1000)."""
    budget = RetryBudget(ratio=2.0, min_per_second=0, clock=FakeClock())
    budget.deposit()
    assert [budget.try_withdraw() for _ in range(3)] == [True, True, False]


def test_budget_zero_allows_nothing() -> None:
    """ratio=0 and min_per_second=0 never allow a retry."""
    budget = RetryBudget(ratio=0, min_per_second=0, clock=FakeClock())
    for _ in range(100):
        budget.deposit()
    assert not budget.try_withdraw()


@pytest.mark.parametrize(
    "options",
    [
        {"ratio": -0.1},
        {"ratio": 1001},
        {"ratio": float("nan")},
        {"min_per_second": -1},
        {"min_per_second": float("inf")},
        {"window": 0},
        {"window": float("inf")},
    ],
)
def test_budget_rejects_bad_settings(options: dict[str, float]) -> None:
    """Out-of-range settings are a ValueError."""
    with pytest.raises(ValueError):
        RetryBudget(**options)


def test_budget_is_thread_safe() -> None:
    """Withdrawals from many threads never exceed the balance."""
    budget = RetryBudget(ratio=0, min_per_second=50, window=1, clock=FakeClock())
    granted: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(100):
            ok = budget.try_withdraw()
            with lock:
                granted.append(ok)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == 50


def test_budget_repr_shows_settings_and_balance() -> None:
    """The repr says the settings and how many retries are left."""
    assert repr(RetryBudget(clock=FakeClock())) == (
        "<RetryBudget 20% of requests + 3/s over 10s | 30 retries available>"
    )


def test_spent_budget_stops_retries(backend: TestBackend, refused_url: str) -> None:
    """Once the budget is spent a failed request is not retried: the backend sees nothing."""
    budget = RetryBudget(ratio=0, min_per_second=0.2, window=10, clock=FakeClock())  # 2 retries
    with make_first([refused_url, backend.url], budget=budget) as client:
        assert client.request("GET", "/").status == 200
        assert client.request("GET", "/").status == 200
        with pytest.raises(UpstreamConnectError):
            client.request("GET", "/")
    assert backend.request_count == 2


def test_budget_floor_allows_n_retries_per_second_through_the_client(
    backend: TestBackend, refused_url: str
) -> None:
    """With a 3/s floor, three requests a second may fail over; the fourth may not."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0, min_per_second=3, window=1, clock=clock)
    with make_first([refused_url, backend.url], budget=budget) as client:
        for _ in range(3):
            assert client.request("GET", "/").status == 200
        with pytest.raises(UpstreamConnectError):
            client.request("GET", "/")
        clock.advance(1)
        assert client.request("GET", "/").status == 200
    assert backend.request_count == 4


def test_ratio_budget_keeps_retries_to_a_share_of_requests(
    backend: TestBackend, refused_url: str
) -> None:
    """At ratio 0.5 and no floor, every second request earns the retry it needs."""
    budget = RetryBudget(ratio=0.5, min_per_second=0, clock=FakeClock())
    with make_first([refused_url, backend.url], budget=budget) as client:
        outcomes = []
        for _ in range(6):
            try:
                outcomes.append(client.request("GET", "/").status)
            except UpstreamConnectError:
                outcomes.append(502)
    assert outcomes == [502, 200, 502, 200, 502, 200]
    assert backend.request_count == 3


# -- life cycle ----------------------------------------------------------------------------


def test_repr_shows_pool_and_budget(backend: TestBackend) -> None:
    """The client's repr shows its pool, retries and the budget left."""
    with make([backend.url]) as client:
        text = repr(client)
    assert text.startswith("<BalancedClient <Pool [1 backends: 1 healthy | 0 in flight]")
    assert "retries=2" in text
    assert "30 retries available" in text


def test_bad_settings_are_refused() -> None:
    """Negative retries or a zero maxsize are a ValueError."""
    with pytest.raises(ValueError, match="retries"):
        BalancedClient(Pool(), retries=-1)
    with pytest.raises(ValueError, match="maxsize"):
        BalancedClient(Pool(), maxsize=0)


def test_removed_backend_is_not_used(backends: list[TestBackend]) -> None:
    """A backend removed from the pool gets no more requests from the client."""
    with make([b.url for b in backends]) as client:
        client.request("GET", "/")
        client.pool.remove(backends[0].url)
        for _ in range(4):
            client.request("GET", "/")
    assert backends[0].request_count == 1


def test_public_names_are_pinned() -> None:
    """softlb.client exports exactly the documented names."""
    import softlb.client

    assert set(softlb.client.__all__) == {
        "DEFAULT_BUDGET_WINDOW",
        "DEFAULT_MIN_RETRIES_PER_SECOND",
        "DEFAULT_RETRY_RATIO",
        "BalancedClient",
        "ClientResponse",
        "RetryBudget",
    }


def test_example_runs() -> None:
    """examples/client_side.py runs to the end and exits 0."""
    run = subprocess.run(
        [sys.executable, "examples/client_side.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "answered" in run.stdout
