"""Tests for softlb.health: the rise/fall state machine, the checker on a fake clock, the probe."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from softlb.backend import Backend
from softlb.errors import NoBackendAvailable
from softlb.health import (
    DEFAULT_JITTER,
    HealthChecker,
    HealthState,
    ProbeResult,
    parse_status_ranges,
)
from softlb.pool import Pool, PoolEvent

A, B, C = "http://a:1", "http://b:1", "http://c:1"
OK = ProbeResult(True, "HTTP 200")
FAIL = ProbeResult(False, "HTTP 500")


class FakeClock:
    """A clock that moves only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeProbe:
    """A probe whose answer per URL the test sets, and which logs every call."""

    def __init__(self, default: ProbeResult = OK) -> None:
        self.default = default
        self.results: dict[str, ProbeResult] = {}
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, backend: Backend) -> ProbeResult:
        with self._lock:
            self.calls.append(backend.url)
        return self.results.get(backend.url, self.default)

    def count(self) -> Counter[str]:
        """How many times each URL was probed."""
        with self._lock:
            return Counter(self.calls)


@pytest.fixture
def clock() -> FakeClock:
    """A fake monotonic clock starting at 1000 s."""
    return FakeClock()


@pytest.fixture
def probe() -> FakeProbe:
    """A fake probe answering OK unless told otherwise."""
    return FakeProbe()


def checker_for(pool: Pool, probe: FakeProbe, clock: FakeClock, **options: Any) -> HealthChecker:
    """A HealthChecker on the fake clock and probe, without jitter unless asked."""
    options.setdefault("jitter", 0.0)
    options.setdefault("interval", 5.0)
    return HealthChecker(pool, probe=probe, clock=clock, seed=7, **options)


# -- HealthState -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start_healthy", "rise", "fall", "events", "verdicts"),
    [
        # Starts up and fragile: the first failure takes it out at once (HAProxy).
        (True, 2, 3, "f", [False]),
        # A success first makes it robust: then it takes `fall` failures.
        (True, 2, 3, "sfff", [None, None, None, False]),
        # A success in between resets the failure streak.
        (True, 2, 3, "sffsff", [None] * 6),
        # Out, then `rise` successes bring it back.
        (True, 2, 3, "fss", [False, None, True]),
        # Back after going down, it is robust: one failure is not enough.
        (True, 2, 3, "fssf", [False, None, True, None]),
        # A failure resets the success streak.
        (True, 2, 3, "fsfss", [False, None, None, None, True]),
        # Failures while down change nothing.
        (True, 2, 3, "fff", [False, None, None]),
        # Successes while up change nothing.
        (True, 2, 3, "sss", [None, None, None]),
        # Starts down: needs `rise` successes.
        (False, 2, 3, "s", [None]),
        (False, 2, 3, "ss", [None, True]),
        (False, 3, 3, "ssfsss", [None, None, None, None, None, True]),
        # Once up from an initial down, it is robust.
        (False, 1, 2, "sff", [True, None, False]),
        # rise=1 fall=1 flips on every change.
        (True, 1, 1, "sfsfs", [None, False, True, False, True]),
    ],
)
def test_health_state_transitions(
    start_healthy: bool, rise: int, fall: int, events: str, verdicts: list[bool | None]
) -> None:
    """success()/failure() return the new verdict exactly when it changes."""
    state = HealthState(rise, fall, healthy=start_healthy)
    got = [state.success() if e == "s" else state.failure() for e in events]
    assert got == verdicts
    last = next((v for v in reversed(verdicts) if v is not None), start_healthy)
    assert state.healthy is last


def test_health_state_starts_fragile_only_when_up() -> None:
    """A state that starts up is fragile until its first success; one that starts down is not."""
    up, down = HealthState(), HealthState(healthy=False)
    assert up.healthy and up.fragile
    assert not down.healthy and not down.fragile
    up.success()
    assert not up.fragile


@pytest.mark.parametrize(("rise", "fall"), [(0, 3), (2, 0), (-1, -1)])
def test_health_state_rejects_bad_counts(rise: int, fall: int) -> None:
    """rise and fall below 1 are refused."""
    with pytest.raises(ValueError, match="rise and fall must be >= 1"):
        HealthState(rise, fall)


def test_health_state_repr() -> None:
    """The repr shows the verdict, fragility and both streaks against their limits."""
    state = HealthState(2, 3)
    assert repr(state) == "<HealthState up fragile successes=0/2 failures=0/3>"
    state.success()
    state.failure()
    assert repr(state) == "<HealthState up successes=0/2 failures=1/3>"
    state.failure()
    state.failure()
    state.success()
    assert repr(state) == "<HealthState down successes=1/2 failures=0/3>"


# -- status ranges ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "ranges"),
    [
        ("200-399", ((200, 399),)),
        ("200", ((200, 200),)),
        (" 200 , 204,300-399 ", ((200, 200), (204, 204), (300, 399))),
        (204, ((204, 204),)),
        ([200, "300-302"], ((200, 200), (300, 302))),
        (((200, 299),), ((200, 299),)),
    ],
)
def test_parse_status_ranges_accepts(spec: Any, ranges: tuple[tuple[int, int], ...]) -> None:
    """Codes, LOW-HIGH ranges, comma lists and lists of those become (low, high) pairs."""
    assert parse_status_ranges(spec) == ranges


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("399-200", "is an empty range; write the lower code first"),
        ("99", "is not a status code or range"),
        ("200-600", "600 is not an HTTP status; use codes from 100 to 599"),
        ([], "is empty"),
        ([True], "true is not a status code or range"),
        ("abc", '"abc" is not a status code or range'),
    ],
)
def test_parse_status_ranges_rejects(spec: Any, message: str) -> None:
    """Out-of-range, reversed, empty or non-numeric specs are ValueErrors."""
    with pytest.raises(ValueError, match=message):
        parse_status_ranges(spec)


# -- HealthChecker: construction -------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"interval": 0}, "interval and timeout must be > 0"),
        ({"timeout": -1}, "interval and timeout must be > 0"),
        ({"initial_state": "maybe"}, "initial_state must be 'up' or 'down'"),
        ({"jitter": 1.0}, r"jitter must be in \[0, 1\)"),
        ({"jitter": -0.1}, r"jitter must be in \[0, 1\)"),
        ({"workers": 0}, "workers must be >= 1"),
        ({"path": "health"}, "health check path must start with '/'"),
        ({"rise": 0}, "rise and fall must be >= 1"),
        ({"fall": 0}, "rise and fall must be >= 1"),
        ({"expected_status": "600"}, "600 is not an HTTP status"),
        ({"expected_status": "2yy"}, "is not a status code or range"),
    ],
)
def test_checker_rejects_bad_settings(options: dict[str, Any], message: str) -> None:
    """Every bad setting is a ValueError that names it."""
    with pytest.raises(ValueError, match=message):
        HealthChecker(Pool([A]), **options)


@pytest.mark.parametrize(
    ("pool", "options", "message"),
    [
        ([A], {}, "pool must be a softlb Pool, got list"),
        (None, {"timeout": "2s"}, r"timeout must be a number \(seconds\), got '2s'"),
        (None, {"interval": True}, r"interval must be a number \(seconds\), got True"),
        (None, {"jitter": "0.1"}, r"jitter must be a number \(a fraction of the interval\)"),
    ],
)
def test_checker_refuses_wrong_types_clearly(
    pool: Any, options: dict[str, Any], message: str
) -> None:
    """A wrong type is a TypeError that says what goes there (it was an AttributeError or a
    TypeError from a comparison deep inside)."""
    with pytest.raises(TypeError, match=message):
        HealthChecker(Pool([A]) if pool is None else pool, **options)


def test_checker_starts_no_thread(probe: FakeProbe, clock: FakeClock) -> None:
    """Building a checker neither starts threads nor probes anything."""
    before = threading.active_count()
    checker = checker_for(Pool([A, B]), probe, clock)
    assert threading.active_count() == before
    assert probe.calls == []
    assert not checker.running


def test_checker_repr(probe: FakeProbe, clock: FakeClock) -> None:
    """The repr shows running state, backends tracked and down, the request and the limits."""
    pool = Pool([A, B, C])
    checker = checker_for(pool, probe, clock, path="/health", rise=2, fall=3)
    probe.results[B] = FAIL
    checker.run_pending()
    assert repr(checker) == (
        "<HealthChecker stopped [3 backends: 1 down] GET /health every 5s rise=2 fall=3>"
    )


# -- HealthChecker: scheduling on a fake clock -----------------------------------------------


def test_first_probe_runs_at_once(probe: FakeProbe, clock: FakeClock) -> None:
    """Every backend is due as soon as the checker exists."""
    checker = checker_for(Pool([A, B, C]), probe, clock)
    assert checker.run_pending() == 3
    assert sorted(probe.calls) == [A, B, C]
    assert checker.run_pending() == 0


def test_probes_repeat_every_interval_without_jitter(probe: FakeProbe, clock: FakeClock) -> None:
    """With jitter 0, each backend is probed exactly once per interval."""
    checker = checker_for(Pool([A, B]), probe, clock, interval=5.0)
    checker.run_pending()
    clock.now += 4.999
    assert checker.run_pending() == 0
    clock.now += 0.001
    assert checker.run_pending() == 2
    clock.now += 50.0  # a long pause does not cause a burst of catch-up probes
    assert checker.run_pending() == 2
    assert checker.run_pending() == 0
    assert probe.count() == Counter({A: 3, B: 3})


def test_jitter_keeps_intervals_within_bounds(probe: FakeProbe, clock: FakeClock) -> None:
    """With jitter j, the next probe comes between (1 - j) and (1 + j) intervals later."""
    urls = [f"http://b{i}:1" for i in range(200)]
    checker = checker_for(Pool(urls), probe, clock, interval=10.0, jitter=DEFAULT_JITTER)
    assert checker.run_pending() == 200
    start = clock.now
    clock.now = start + 10.0 * (1 - DEFAULT_JITTER) - 1e-6
    assert checker.run_pending() == 0
    clock.now = start + 10.0
    early = checker.run_pending()
    clock.now = start + 10.0 * (1 + DEFAULT_JITTER)
    late = checker.run_pending()
    assert early + late == 200
    assert 60 < early < 140, "jitter spreads the probes around the interval"


def test_added_backend_is_probed_at_once(probe: FakeProbe, clock: FakeClock) -> None:
    """A backend added mid-interval is due at once, not at the next round."""
    pool = Pool([A])
    checker = checker_for(pool, probe, clock)
    checker.run_pending()
    clock.now += 1.0
    added = pool.add(B)
    assert checker.state_of(added) is not None
    assert checker.run_pending() == 1
    assert probe.calls == [A, B]


def test_removed_backend_is_dropped(probe: FakeProbe, clock: FakeClock) -> None:
    """A removed backend is no longer tracked nor probed."""
    pool = Pool([A, B])
    checker = checker_for(pool, probe, clock)
    checker.run_pending()
    removed = pool.remove(A)
    assert checker.state_of(removed) is None
    clock.now += 5.0
    assert checker.run_pending() == 1
    assert probe.count() == Counter({A: 1, B: 2})


def test_readded_backend_is_probed_once_per_interval(probe: FakeProbe, clock: FakeClock) -> None:
    """Removing a Backend and adding the same object back does not double its probes.

    Regression: the stale schedule entry of the first membership stayed in the heap, so the
    backend was probed twice per interval from then on.
    """
    pool = Pool([A])
    checker = checker_for(pool, probe, clock)
    checker.run_pending()
    backend = pool.remove(A)
    pool.add(backend)
    assert checker.run_pending() == 1
    for _ in range(4):
        clock.now += 5.0
        assert checker.run_pending() == 1


def test_state_of_accepts_a_url(probe: FakeProbe, clock: FakeClock) -> None:
    """state_of takes a Backend or a URL; an unknown URL raises UnknownBackend."""
    pool = Pool([A])
    checker = checker_for(pool, probe, clock)
    assert checker.state_of(A) is checker.state_of(pool.get(A))
    assert checker.state_of(Backend(B)) is None
    with pytest.raises(KeyError):
        checker.state_of(B)


def test_probe_once_records_and_returns_the_result(probe: FakeProbe, clock: FakeClock) -> None:
    """probe_once probes now, whatever the schedule, and records the result."""
    pool = Pool([A])
    checker = checker_for(pool, probe, clock)
    probe.results[A] = FAIL
    assert checker.probe_once(pool.get(A)) == FAIL
    assert not pool.get(A).healthy


# -- HealthChecker: verdicts -----------------------------------------------------------------


def test_new_backend_is_out_after_its_first_failed_probe(
    probe: FakeProbe, clock: FakeClock
) -> None:
    """A backend starts in rotation, but its first failed probe takes it out (HAProxy)."""
    pool = Pool([A, B])
    checker = checker_for(pool, probe, clock, rise=2, fall=3)
    probe.results[A] = FAIL
    assert pool.get(A).healthy
    checker.run_pending()
    assert not pool.get(A).healthy
    assert pool.eligible == (pool.get(B),)


def test_fall_failures_take_out_and_rise_successes_bring_back(
    probe: FakeProbe, clock: FakeClock
) -> None:
    """After a first success, it takes `fall` failed probes to go out and `rise` to come back."""
    pool = Pool([A, B])
    events: list[PoolEvent] = []
    pool.subscribe(events.append)
    checker = checker_for(pool, probe, clock, rise=2, fall=3)
    a = pool.get(A)
    history = []
    for result in [OK, FAIL, FAIL, FAIL, OK, OK, OK]:
        probe.results[A] = result
        checker.run_pending()
        history.append(a.healthy)
        clock.now += 5.0
    assert history == [True, True, True, False, False, True, True]
    assert [(e.kind, e.reason) for e in events] == [("health", "HTTP 500"), ("health", "HTTP 200")]


def test_passive_failures_take_a_backend_out(probe: FakeProbe, clock: FakeClock) -> None:
    """`fall` failed requests through the pool take a backend out before its next probe."""
    pool = Pool([A, B], balancer="round_robin")
    checker = checker_for(pool, probe, clock, rise=2, fall=3)
    checker.run_pending()  # both pass their first probe and stop being fragile
    a = pool.get(A)
    others = {pool.get(B)}
    for _ in range(2):
        pool.lease(exclude=others).release("connect refused")
    assert a.healthy
    pool.lease(exclude=others).release("connect refused")
    assert not a.healthy
    for _ in range(4):
        with pool.lease() as backend:
            assert backend.url == B
    state = checker.state_of(a)
    assert state is not None and not state.healthy


def test_passive_ejection_comes_back_after_rise_probes(probe: FakeProbe, clock: FakeClock) -> None:
    """A passively ejected backend returns only through `rise` successful probes."""
    pool = Pool([A])
    checker = checker_for(pool, probe, clock, rise=2, fall=1)
    checker.run_pending()
    pool.lease().release("timeout")
    assert not pool.get(A).healthy
    with pytest.raises(NoBackendAvailable):
        pool.lease()
    clock.now += 5.0
    checker.run_pending()
    assert not pool.get(A).healthy
    clock.now += 5.0
    checker.run_pending()
    assert pool.get(A).healthy


def test_passive_off_ignores_failed_requests(probe: FakeProbe, clock: FakeClock) -> None:
    """With passive=False, failed requests do not affect health."""
    pool = Pool([A])
    checker = checker_for(pool, probe, clock, fall=1, passive=False)
    checker.run_pending()
    for _ in range(5):
        pool.lease().release("refused")
    assert pool.get(A).healthy


def test_initial_state_down_keeps_backends_out_until_rise(
    probe: FakeProbe, clock: FakeClock
) -> None:
    """With initial_state "down", members wait for `rise` good probes, and so do new ones."""
    pool = Pool([A])
    checker = checker_for(pool, probe, clock, rise=2, initial_state="down")
    assert not pool.get(A).healthy
    assert not pool.admit_healthy
    with pytest.raises(NoBackendAvailable):
        pool.lease()
    checker.run_pending()
    assert not pool.get(A).healthy
    added = pool.add(B)
    assert not added.healthy
    assert pool.eligible == ()
    clock.now += 5.0
    checker.run_pending()
    assert pool.get(A).healthy
    assert not added.healthy
    clock.now += 5.0
    checker.run_pending()
    assert added.healthy
    assert len(pool.eligible) == 2


def test_probe_that_raises_counts_as_failure(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception from the probe is logged and recorded as a failure; the checker goes on."""

    def broken(backend: Backend) -> ProbeResult:
        raise RuntimeError("probe bug")

    pool = Pool([A])
    checker = HealthChecker(pool, probe=broken, clock=clock, jitter=0)
    with caplog.at_level(logging.ERROR, logger="softlb.health"):
        result = checker.probe_once(pool.get(A))
    assert result == ProbeResult(False, "probe error: RuntimeError")
    assert "health probe of http://a:1 raised" in caplog.text
    assert not pool.get(A).healthy
    assert checker.run_pending() == 1  # still scheduled


def test_verdict_changes_are_logged(
    probe: FakeProbe, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Going down and coming back each log one warning naming the backend and why."""
    pool = Pool([A])
    checker = checker_for(pool, probe, clock, rise=1)
    probe.results[A] = FAIL
    with caplog.at_level(logging.WARNING, logger="softlb.health"):
        checker.run_pending()
        probe.results[A] = OK
        clock.now += 5.0
        checker.run_pending()
    assert caplog.messages == [
        "backend http://a:1 is down: HTTP 500",
        "backend http://a:1 is up: HTTP 200",
    ]


# -- HealthChecker: threads ------------------------------------------------------------------


def _wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def _softlb_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("softlb-")]


def test_start_and_stop_are_idempotent(probe: FakeProbe, clock: FakeClock) -> None:
    """start() twice starts one set of threads; stop() twice is harmless; no thread remains."""
    pool = Pool([A, B])
    checker = checker_for(pool, probe, clock)
    assert checker.start() is checker
    checker.start()
    assert checker.running
    _wait_for(lambda: len(probe.calls) == 2)
    assert len([t for t in _softlb_threads() if t.name == "softlb-health"]) == 1
    checker.stop()
    checker.stop()
    assert not checker.running
    assert _softlb_threads() == []


def test_stop_without_start(probe: FakeProbe, clock: FakeClock) -> None:
    """stop() on a checker that never started does nothing harmful and stops tracking."""
    pool = Pool([A])
    checker = checker_for(pool, probe, clock)
    checker.stop()
    assert checker.run_pending() == 0
    pool.add(B)
    assert checker.state_of(B) is None


def test_context_manager_starts_and_stops(probe: FakeProbe, clock: FakeClock) -> None:
    """`with HealthChecker(...)` probes in the background and stops on exit."""
    pool = Pool([A, B])
    probe.results[B] = FAIL
    with checker_for(pool, probe, clock) as checker:
        assert checker.running
        _wait_for(lambda: not pool.get(B).healthy)
    assert not checker.running
    assert _softlb_threads() == []
    assert pool.get(A).healthy


def test_background_checker_probes_added_backends(probe: FakeProbe, clock: FakeClock) -> None:
    """While running, a backend added to the pool is probed at once."""
    pool = Pool([A])
    with checker_for(pool, probe, clock):
        _wait_for(lambda: probe.count()[A] == 1)
        pool.add(B)
        _wait_for(lambda: probe.count()[B] == 1)


def test_restart_after_stop_reconciles_health(probe: FakeProbe, clock: FakeClock) -> None:
    """After stop() and start(), a backend that was down comes back once its probes pass.

    Regression: the restarted checker assumed every backend was up, so a backend left down by
    the first run stayed out of rotation forever.
    """
    pool = Pool([A, B])
    checker = checker_for(pool, probe, clock, rise=1)
    probe.results[A] = FAIL
    checker.run_pending()
    assert not pool.get(A).healthy
    checker.stop()
    probe.results[A] = OK
    with checker:
        _wait_for(lambda: probe.count()[A] == 2)
        _wait_for(lambda: pool.get(A).healthy, timeout=2.0)


def test_thread_count_is_bounded(clock: FakeClock) -> None:
    """1,000 backends with a fast probe are probed by at most 1 + workers threads."""
    workers = 4
    seen = 0
    done = threading.Event()
    lock = threading.Lock()
    probed: set[str] = set()

    def fast(backend: Backend) -> ProbeResult:
        nonlocal seen
        with lock:
            seen = max(seen, len(_softlb_threads()))
            probed.add(backend.url)
            if len(probed) == 1000:
                done.set()
        return OK

    pool = Pool([f"http://10.1.{i // 250}.{i % 250}:80" for i in range(1000)])
    before = threading.active_count()
    checker = HealthChecker(pool, probe=fast, clock=clock, workers=workers, seed=1)
    with checker:
        assert done.wait(10.0)
        assert threading.active_count() - before <= 1 + workers
    assert 1 < seen <= 1 + workers
    assert _softlb_threads() == []


# -- the default HTTP probe against a real server --------------------------------------------


@pytest.fixture
def http_probe_class() -> Any:
    """softlb.http.probe.HttpProbe (imported here so only these tests need urllib3)."""
    from softlb.http.probe import HttpProbe

    return HttpProbe


@pytest.fixture
def release_sleepers() -> Iterator[threading.Event]:
    """An event that sleeping handlers wait on; set at teardown so the server can stop."""
    event = threading.Event()
    yield event
    event.set()


def _probe_result(probe_class: Any, url: str, **options: Any) -> ProbeResult:
    probe = probe_class(**options)
    try:
        result: ProbeResult = probe(Backend(url))
    finally:
        probe.close()
    return result


def test_http_probe_ok(httpserver: Any, http_probe_class: Any) -> None:
    """A 200 answer to GET path is a success, and the request went to that path."""
    httpserver.expect_request("/health", method="GET").respond_with_data("ok")
    result = _probe_result(http_probe_class, httpserver.url_for(""), path="/health")
    assert result == ProbeResult(True, "HTTP 200")
    assert [req.path for req, _ in httpserver.log] == ["/health"]


def test_http_probe_server_error_fails(httpserver: Any, http_probe_class: Any) -> None:
    """A 500 answer is a failure that says which status came back."""
    httpserver.expect_request("/").respond_with_data("broken", status=500)
    result = _probe_result(http_probe_class, httpserver.url_for(""))
    assert result == ProbeResult(False, "HTTP 500")


@pytest.mark.parametrize(
    ("expected", "status", "ok"),
    [
        ("200-399", 204, True),
        ("200-399", 302, True),
        ("200-399", 404, False),
        ("200", 204, False),
        ("200,204", 204, True),
        ("200-299,404", 404, True),
        ("200-299,404", 302, False),
        ("500-599", 503, True),
    ],
)
def test_http_probe_expected_status(
    httpserver: Any, http_probe_class: Any, expected: str, status: int, ok: bool
) -> None:
    """Success is a status inside expected_status; redirects are not followed."""
    headers = {"Location": "/elsewhere"} if 300 <= status < 400 else None
    httpserver.expect_request("/").respond_with_data("", status=status, headers=headers)
    result = _probe_result(http_probe_class, httpserver.url_for(""), expected_status=expected)
    assert result == ProbeResult(ok, f"HTTP {status}")


def test_http_probe_times_out(
    httpserver: Any, http_probe_class: Any, release_sleepers: threading.Event
) -> None:
    """A server slower than the timeout makes the probe fail as a timeout, promptly."""

    def sleepy(request: Any) -> Any:
        from werkzeug import Response

        release_sleepers.wait(5.0)
        return Response("late")

    httpserver.expect_request("/").respond_with_handler(sleepy)
    started = time.monotonic()
    result = _probe_result(http_probe_class, httpserver.url_for(""), timeout=0.2)
    elapsed = time.monotonic() - started
    assert not result.ok
    assert result.detail.startswith("timeout")
    assert elapsed < 2.0
    # Let the handler finish now: logged after the server's log is cleared, its request would
    # turn up in the next test's log.
    release_sleepers.set()
    deadline = time.monotonic() + 5.0
    while not httpserver.log and time.monotonic() < deadline:
        time.sleep(0.01)


def test_http_probe_connection_refused(http_probe_class: Any, refused_url: str) -> None:
    """Nothing listening is a failure that says the connection failed."""
    result = _probe_result(http_probe_class, str(refused_url), timeout=1.0)
    assert not result.ok
    assert result.detail.startswith("connect failed")


def test_checker_uses_the_http_probe_by_default(
    httpserver: Any, http_probe_class: Any, clock: FakeClock, refused_url: str
) -> None:
    """Without a probe, the checker sends GET path to each backend and judges the status."""
    httpserver.expect_request("/healthz").respond_with_data("ok")
    pool = Pool([httpserver.url_for(""), str(refused_url)])
    checker = HealthChecker(pool, path="/healthz", timeout=1.0, clock=clock, jitter=0)
    try:
        assert checker.run_pending() == 2
    finally:
        checker.stop()
    good, bad = pool.backends
    assert good.healthy
    assert not bad.healthy
    assert [req.path for req, _ in httpserver.log] == ["/healthz"]


def test_scattered_passive_failures_do_not_eject(probe: FakeProbe, clock: FakeClock) -> None:
    """Failed requests count only in a row: a success between them resets the streak."""
    pool = Pool([A, B], balancer="round_robin")
    checker = checker_for(pool, probe, clock, rise=2, fall=3)
    checker.run_pending()
    a = pool.get(A)
    others = {pool.get(B)}
    for _ in range(10):
        pool.lease(exclude=others).release("connect refused")
        pool.lease(exclude=others).release("connect refused")
        pool.lease(exclude=others).release()
    assert a.healthy
    assert a.failures == 20


def test_backend_back_from_passive_ejection_starts_a_fresh_run(
    probe: FakeProbe, clock: FakeClock
) -> None:
    """After rise probes bring an ejected backend back, one failed request does not eject it."""
    pool = Pool([A, B], balancer="round_robin")
    checker = checker_for(pool, probe, clock, rise=1, fall=3)
    checker.run_pending()
    a = pool.get(A)
    others = {pool.get(B)}
    for _ in range(3):
        pool.lease(exclude=others).release("connect refused")
    assert not a.healthy
    clock.now += 5.0
    checker.run_pending()
    assert a.healthy and a.consecutive_failures == 0
    pool.lease(exclude=others).release("connect refused")
    assert a.healthy
