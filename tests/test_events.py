"""Tests for the pool's event hooks (Pool.on), their dispatcher thread, and the event log."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from werkzeug.test import Client

from softlb import Backend, ConfigError, HealthChecker, NoBackendAvailable, Pool, ProbeResult
from softlb import events as ev
from softlb.config import parse_config
from softlb.events import Dispatcher, Event
from softlb.logs import NO_BACKEND_INTERVAL, EventLogger, install_event_logging
from softlb.wsgi import Application, LoadBalancer
from tests.helpers.servers import TestBackend

A, B, C = "http://a:1", "http://b:1", "http://c:1"


class Recorder:
    """A callback that keeps every event it gets and the thread it got it on."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.threads: set[int] = set()
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)
            self.threads.add(threading.get_ident())

    def seen(self) -> list[tuple[str, str | None, str]]:
        """(kind, backend, detail) of every event so far."""
        with self._lock:
            return [(e.kind, e.backend, e.detail) for e in self.events]


@pytest.fixture
def make_pool() -> Iterator[Callable[..., Pool]]:
    """A factory of pools whose dispatcher threads are stopped at teardown."""
    pools: list[Pool] = []

    def make(*args: Any, **kwargs: Any) -> Pool:
        pool = Pool(*args, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def softlb_event_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "softlb-events"]


# -- each change once ---------------------------------------------------------------------------


def test_membership_and_drain_each_fire_once(make_pool: Callable[..., Pool]) -> None:
    """add, remove, drain and undrain each fire one event with a detail; no-ops fire none."""
    pool = make_pool([A])
    recorder = Recorder()
    pool.on("*", recorder)
    pool.add(Backend(B, 3))
    pool.drain(B)
    pool.drain(B)  # already draining
    pool.drain(B, draining=False)
    lease = pool.lease()
    pool.remove(lease.backend)
    assert pool.flush_events()
    assert recorder.seen() == [
        ("added", B, "weight 3"),
        ("drained", B, "draining"),
        ("drained", B, "ready"),
        ("removed", lease.backend.url, "1 request in flight finishes"),
    ]
    lease.release()


def test_health_changes_fire_once_with_the_reason(make_pool: Callable[..., Pool]) -> None:
    """A health change fires one event saying up or down and why; a repeat fires nothing."""
    pool = make_pool([A, B])
    recorder = Recorder()
    pool.on("health", recorder)
    pool.set_healthy(A, False, "HTTP 500")
    pool.set_healthy(A, False, "timeout")
    pool.set_healthy(A, True, "HTTP 200")
    pool.set_healthy(B, False)
    assert pool.flush_events()
    assert recorder.seen() == [
        ("health", A, "down: HTTP 500"),
        ("health", A, "up: HTTP 200"),
        ("health", B, "down"),
    ]


def test_probe_timeout_reaches_health_hooks(make_pool: Callable[..., Pool]) -> None:
    """A health checker's verdicts arrive as health events with the probe's detail."""
    pool = make_pool([A])
    recorder = Recorder()
    pool.on("health", recorder)
    checker = HealthChecker(pool, probe=lambda b: ProbeResult(False, "timeout"), jitter=0)
    checker.run_pending()
    checker.stop()
    assert pool.flush_events()
    assert recorder.seen() == [("health", A, "down: timeout")]


def test_passive_ejection_fires_health_and_ejected_once(make_pool: Callable[..., Pool]) -> None:
    """Failed requests that eject a backend fire one health and one ejected event."""
    pool = make_pool([A, B], balancer="round_robin")
    health, ejected = Recorder(), Recorder()
    pool.on("health", health)
    pool.on("ejected", ejected)
    checker = HealthChecker(pool, probe=lambda b: ProbeResult(True, "ok"), fall=2)
    for _ in range(2):  # two failed requests in a row on a: ejected
        pool.lease(exclude={pool.get(B)}).release("connect")
    assert not pool.set_healthy(A, False, "again", passive=True)  # no change, no event
    checker.stop()
    assert pool.flush_events()
    reason = "passive: 2 requests in a row failed, the last: could not connect"
    assert health.seen() == [("health", A, f"down: {reason}")]
    assert ejected.seen() == [("ejected", A, reason)]


def test_no_backend_fires_once_per_request(make_pool: Callable[..., Pool]) -> None:
    """Each lease that finds nothing in rotation fires one no_backend event."""
    pool = make_pool([A])
    recorder = Recorder()
    pool.on("no_backend", recorder)
    pool.drain(A)
    for _ in range(3):
        with pytest.raises(NoBackendAvailable):
            pool.lease()
    assert pool.flush_events()  # two pools, two dispatchers: no order between them
    empty = make_pool()
    empty.on("no_backend", recorder)
    with pytest.raises(NoBackendAvailable):
        empty.lease()
    assert empty.flush_events()
    assert recorder.seen() == [("no_backend", None, "1 members, none in rotation")] * 3 + [
        ("no_backend", None, "the pool is empty")
    ]


def test_no_backend_is_not_fired_when_a_retry_has_tried_everything(
    make_pool: Callable[..., Pool],
) -> None:
    """A retry that excluded every backend in rotation is not a "nothing in rotation" event."""
    pool = make_pool([A])
    recorder = Recorder()
    pool.on("no_backend", recorder)
    with pytest.raises(NoBackendAvailable, match="not tried already"):
        pool.lease(exclude={pool.get(A)})
    assert pool.flush_events()
    assert recorder.seen() == []


def test_retried_is_fired_by_the_proxy(
    make_pool: Callable[..., Pool], backend: TestBackend, refused_url: str
) -> None:
    """The proxy fires one retried event naming the backend that failed, off its thread."""
    pool = make_pool([refused_url, backend.url], balancer="round_robin")
    recorder = Recorder()
    pool.on("retried", recorder)
    proxy = LoadBalancer(pool)
    try:
        assert Client(proxy).get("/hello").status_code == 200
    finally:
        proxy.close()
    assert pool.flush_events()
    [(kind, url, detail)] = recorder.seen()
    assert (kind, url) == ("retried", refused_url)
    assert detail == "GET /hello: connection refused"  # the URL is the event's backend
    assert threading.get_ident() not in recorder.threads


def test_star_hears_every_kind(make_pool: Callable[..., Pool]) -> None:
    """A "*" hook hears every kind; a kind hook hears only its own."""
    pool = make_pool([A])
    everything, adds = Recorder(), Recorder()
    pool.on("*", everything)
    pool.on("added", adds)
    pool.add(B)
    pool.drain(B)
    pool.set_healthy(A, False, "HTTP 500", passive=True)
    with pytest.raises(NoBackendAvailable):
        pool.lease()
    pool.publish("retried", B, "GET /: refused")
    pool.remove(B)
    assert pool.flush_events()
    assert [kind for kind, _, _ in everything.seen()] == [
        "added",
        "drained",
        "health",
        "ejected",
        "no_backend",
        "retried",
        "removed",
    ]
    assert adds.seen() == [("added", B, "weight 1")]


def test_event_fields(make_pool: Callable[..., Pool]) -> None:
    """An event carries its kind, the backend's URL, the detail and the wall-clock time."""
    pool = make_pool()
    recorder = Recorder()
    pool.on("added", recorder)
    before = time.time()
    pool.add("HTTP://A:1/")
    assert pool.flush_events()
    [event] = recorder.events
    assert (event.kind, event.backend, event.detail) == ("added", A, "weight 1")
    assert before <= event.time <= time.time()
    assert event.as_dict() == {
        "event": "added",
        "backend": A,
        "detail": "weight 1",
        "time": event.time,
    }
    with pytest.raises(AttributeError):
        event.kind = "removed"  # type: ignore[misc]


# -- threads ------------------------------------------------------------------------------------


def test_callbacks_run_on_the_dispatcher_thread(make_pool: Callable[..., Pool]) -> None:
    """Callbacks run on the pool's one dispatcher thread, never on the thread that changed it."""
    pool = make_pool([A])
    recorder = Recorder()
    pool.on("*", recorder)
    pool.add(B)
    pool.set_healthy(B, False)
    pool.drain(A)
    with pytest.raises(NoBackendAvailable):
        pool.lease()
    assert pool.flush_events()
    assert len(recorder.events) == 4
    dispatcher = pool._dispatcher
    assert dispatcher is not None
    assert recorder.threads == {dispatcher.thread_ident}
    assert threading.get_ident() not in recorder.threads


def test_events_keep_their_order(make_pool: Callable[..., Pool]) -> None:
    """Events reach a callback in the order they happened."""
    pool = make_pool()
    recorder = Recorder()
    pool.on("added", recorder)
    urls = [f"http://10.0.0.{i}:80" for i in range(200)]
    for url in urls:
        pool.add(url)
    assert pool.flush_events()
    assert [e.backend for e in recorder.events] == urls


def test_no_thread_before_the_first_hook() -> None:
    """Creating and using a pool starts no thread; on() starts exactly one, named
    softlb-events."""
    before = threading.enumerate()
    pool = Pool([A])
    pool.add(B)
    pool.set_healthy(B, False)
    pool.lease().release()
    pool.publish("retried", A, "x")
    assert pool._dispatcher is None
    assert pool.flush_events()
    try:
        pool.on("added", lambda e: None)
        pool.on("removed", lambda e: None)
        new = [t for t in threading.enumerate() if t not in before]
        assert [t.name for t in new] == ["softlb-events"]
        assert new[0].daemon
    finally:
        pool.close()


def test_close_delivers_then_stops_and_events_restart_it(make_pool: Callable[..., Pool]) -> None:
    """close() delivers what is queued and ends the thread; a later event starts it again."""
    pool = make_pool()
    recorder = Recorder()
    pool.on("added", recorder)
    for i in range(50):
        pool.add(f"http://10.0.1.{i}:80")
    pool.close()
    assert len(recorder.events) == 50
    assert not softlb_event_threads()
    pool.close()  # idempotent
    pool.add(A)
    assert pool.flush_events()
    assert recorder.events[-1].backend == A
    pool.close()
    assert not softlb_event_threads()


def test_collected_pool_stops_its_thread() -> None:
    """A pool dropped without close() does not leave its dispatcher thread behind."""
    pool = Pool([A])
    pool.on("added", lambda e: None)
    dispatcher = pool._dispatcher
    assert dispatcher is not None and dispatcher.running
    del pool
    deadline = time.monotonic() + 5
    while dispatcher.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not dispatcher.running


def test_forked_child_restarts_the_dispatcher(make_pool: Callable[..., Pool]) -> None:
    """After fork(), the child's events are delivered by a thread of its own."""
    pool = make_pool([A])
    recorder = Recorder()
    pool.on("added", recorder)
    pool.add(B)
    assert pool.flush_events()
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():  # Python 3.12+ warns when a threaded process forks
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            os.close(read_end)
            pool.after_fork()
            pool.add(C)
            assert pool.flush_events(5)
            urls = [e.backend for e in recorder.events]
            os.write(write_end, json.dumps(urls).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        reported = os.read(read_end, 4096)
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert json.loads(reported) == [B, C]
    assert [e.backend for e in recorder.events] == [B]  # the parent saw only its own


def test_dispatcher_notices_a_fork_by_itself() -> None:
    """A dispatcher used in a forked child without after_fork() starts afresh there."""
    dispatcher = Dispatcher()
    got: list[str] = []
    hook = ev.Hook("*", lambda e: got.append(e.kind))
    dispatcher.put(Event("added", A), (hook,))
    assert dispatcher.flush()
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            dispatcher.put(Event("removed", A), (hook,))
            assert dispatcher.flush(5)
            os.write(write_end, ",".join(got).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        reported = os.read(read_end, 4096)
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert reported == b"added,removed"
    assert dispatcher.stop()


# -- failures, unsubscribing, a full queue -------------------------------------------------------


def test_raising_callback_is_logged_and_later_callbacks_run(
    make_pool: Callable[..., Pool], caplog: pytest.LogCaptureFixture
) -> None:
    """An exception in a callback is logged to softlb.events; the others, and later events,
    are still delivered."""
    pool = make_pool()
    recorder = Recorder()

    def broken(event: Event) -> None:
        raise RuntimeError("hook bug")

    pool.on("added", broken)
    pool.on("added", recorder)
    with caplog.at_level(logging.ERROR, logger="softlb.events"):
        pool.add(A)
        pool.add(B)
        assert pool.flush_events()
    assert [e.backend for e in recorder.events] == [A, B]
    assert [r.name for r in caplog.records] == ["softlb.events", "softlb.events"]
    assert "event hook" in caplog.text
    assert "hook bug" in caplog.text
    assert A in pool and B in pool


def test_unsubscribe_stops_delivery_even_of_queued_events(make_pool: Callable[..., Pool]) -> None:
    """After unsubscribe(), a callback gets nothing more, not even events already queued."""
    pool = make_pool()
    gate = threading.Event()
    recorder = Recorder()
    pool.on("added", lambda e: gate.wait(5))
    off = pool.on("added", recorder)
    pool.add(A)  # the first callback holds the dispatcher on this one
    pool.add(B)  # queued behind it
    off()
    off()  # twice is harmless
    gate.set()
    assert pool.flush_events()
    assert recorder.events == []  # checked when each callback's turn comes
    pool.add(C)
    assert pool.flush_events()
    assert recorder.events == []


def test_full_queue_drops_and_never_blocks(make_pool: Callable[..., Pool]) -> None:
    """With a callback stuck, events beyond the queue's size are dropped and counted, and
    neither changes nor leases wait for it."""
    pool = make_pool([A, B])
    gate = threading.Event()
    pool.on("*", lambda e: gate.wait(30))
    started = time.perf_counter()
    for _ in range(ev.QUEUE_SIZE + 100):
        pool.drain(B)
        pool.drain(B, draining=False)
    toggling = time.perf_counter() - started
    assert pool.events_dropped >= 2 * (ev.QUEUE_SIZE + 100) - ev.QUEUE_SIZE - 1
    assert toggling < 5.0
    drained = make_pool([A])
    drained.on("no_backend", lambda e: gate.wait(30))
    drained.drain(A)
    started = time.perf_counter()
    for _ in range(ev.QUEUE_SIZE + 100):  # requests finding nothing publish on their thread
        with pytest.raises(NoBackendAvailable):
            drained.lease()
    assert time.perf_counter() - started < 5.0
    assert drained.events_dropped > 0
    gate.set()
    assert pool.flush_events()


def lease_batch_seconds(pool: Pool, batch: int = 500) -> float:
    """Seconds for ``batch`` leases taken and released one after the other."""
    started = time.perf_counter()
    for _ in range(batch):
        pool.lease().release()
    return time.perf_counter() - started


def test_blocked_hook_does_not_slow_leases(make_pool: Callable[..., Pool]) -> None:
    """pool.lease() costs the same with a stuck "*" hook and a full queue as with no hook."""
    plain = make_pool([A, B, C])
    hooked = make_pool([A, B, C])
    gate = threading.Event()
    hooked.on("*", lambda e: gate.wait(30))
    for _ in range(ev.QUEUE_SIZE + 10):  # fill the queue behind the stuck callback
        hooked.publish("retried", A, "x")
    assert hooked.events_dropped > 0
    try:
        baseline = blocked = float("inf")
        for _ in range(60):  # interleaved, so that a busy moment of the machine hits both
            baseline = min(baseline, lease_batch_seconds(plain))
            blocked = min(blocked, lease_batch_seconds(hooked))
        assert blocked < 1.5 * baseline + 0.001, (blocked, baseline)
    finally:
        gate.set()


def test_callback_may_change_the_pool_but_not_wait_for_itself(
    make_pool: Callable[..., Pool],
) -> None:
    """A callback may change the pool (its events are delivered after it); flush_events()
    from inside a callback returns False at once instead of waiting for itself."""
    pool = make_pool([A])
    recorder = Recorder()
    flushed: list[bool] = []

    def on_added(event: Event) -> None:
        if event.backend == B:
            pool.drain(B)
            started = time.monotonic()
            flushed.append(pool.flush_events(timeout=5))
            flushed.append(time.monotonic() - started < 1)

    pool.on("added", on_added)
    pool.on("*", recorder)
    pool.add(B)
    assert pool.flush_events()
    assert pool.flush_events()  # the drain's event was queued by the callback
    assert flushed == [False, True]
    assert [kind for kind, _, _ in recorder.seen()] == ["added", "drained"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dispatcher_survives_a_callback_that_exits_its_thread(
    make_pool: Callable[..., Pool],
) -> None:
    """A callback raising SystemExit ends the thread; the next event starts a new one."""
    pool = make_pool()
    recorder = Recorder()

    def exits(event: Event) -> None:
        if event.backend == A:
            raise SystemExit

    pool.on("added", exits)
    pool.on("added", recorder)
    pool.add(A)
    dispatcher = pool._dispatcher
    assert dispatcher is not None
    deadline = time.monotonic() + 5
    while dispatcher.running and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.add(B)
    assert pool.flush_events()
    assert [e.backend for e in recorder.events] == [B]


def test_bad_subscriptions_are_refused(make_pool: Callable[..., Pool]) -> None:
    """An unknown event name or a non-callable is refused at once; so is publishing nonsense."""
    pool = make_pool()
    with pytest.raises(ValueError, match=r"unknown event 'add'.*added"):
        pool.on("add", lambda e: None)
    with pytest.raises(TypeError, match="callable"):
        pool.on("added", "print")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown event"):
        pool.publish("nonsense")


def test_event_names_are_constants() -> None:
    """The event names are the documented constants."""
    assert ev.KINDS == (
        "added",
        "removed",
        "drained",
        "health",
        "ejected",
        "retried",
        "no_backend",
    )
    assert ev.ALL == "*"
    assert ev.KINDS[:4] == (ev.ADDED, ev.REMOVED, ev.DRAINED, ev.HEALTH)
    assert ev.KINDS[4:] == (ev.EJECTED, ev.RETRIED, ev.NO_BACKEND)


def test_subscribe_stays_synchronous(make_pool: Callable[..., Pool]) -> None:
    """The internal subscribe() still runs listeners on the calling thread, before on() hooks."""
    pool = make_pool()
    threads: list[int] = []
    pool.subscribe(lambda e: threads.append(threading.get_ident()))
    pool.on("added", lambda e: None)
    pool.add(A)
    assert threads == [threading.get_ident()]


def test_dispatcher_repr_and_counters() -> None:
    """The dispatcher's repr shows its state and counters."""
    dispatcher = Dispatcher(maxsize=1)
    assert repr(dispatcher) == "<Dispatcher idle [0 queued | 0 delivered, 0 dropped]>"
    with pytest.raises(ValueError, match="maxsize"):
        Dispatcher(maxsize=0)
    gate = threading.Event()
    hook = ev.Hook("*", lambda e: gate.wait(5))
    for _ in range(3):
        dispatcher.put(Event("added", A), (hook,))
    gate.set()
    assert dispatcher.flush()
    assert dispatcher.dropped >= 1
    assert dispatcher.delivered + dispatcher.dropped == 3
    assert dispatcher.stop()
    assert not dispatcher.running


# -- the event log --------------------------------------------------------------------------------


def test_event_log_text(make_pool: Callable[..., Pool], caplog: pytest.LogCaptureFixture) -> None:
    """install_event_logging writes one line per state change to softlb.events."""
    pool = make_pool([A])
    install_event_logging(pool)
    with caplog.at_level(logging.INFO, logger="softlb.events"):
        pool.add(B)
        pool.drain(B)
        pool.drain(B, draining=False)
        pool.set_healthy(B, False, "passive: 3 requests in a row failed", passive=True)
        pool.set_healthy(B, True, "HTTP 200")
        pool.publish("retried", A, "not logged by default")
        pool.remove(B)
        pool.drain(A)
        with pytest.raises(NoBackendAvailable):
            pool.lease()
        assert pool.flush_events()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", f"backend {B} added (weight 1)"),
        ("INFO", f"backend {B} draining"),
        ("INFO", f"backend {B} undrained"),
        # one change, one line: the health event of an ejection is not logged on its own
        ("WARNING", f"backend {B} is down: 3 requests in a row failed"),
        ("INFO", f"backend {B} is up: HTTP 200"),
        ("INFO", f"backend {B} removed (nothing in flight)"),
        ("INFO", f"backend {A} draining"),
        ("ERROR", "no backend available: 1 members, none in rotation"),
    ]
    assert caplog.records[0].softlb_event["event"] == "added"  # type: ignore[attr-defined]


def test_event_log_json(make_pool: Callable[..., Pool], caplog: pytest.LogCaptureFixture) -> None:
    """With json=True every message is one JSON object with the event's fields."""
    pool = make_pool([A])
    uninstall = install_event_logging(pool, json=True)
    with caplog.at_level(logging.INFO, logger="softlb.events"):
        pool.set_healthy(A, False, "HTTP 503")
        assert pool.flush_events()
    [record] = caplog.records
    document = json.loads(record.getMessage())
    assert document["event"] == "health"
    assert document["backend"] == A
    assert document["detail"] == "down: HTTP 503"
    assert document["level"] == "warning"
    assert document["time"].endswith("Z")
    uninstall()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="softlb.events"):
        pool.set_healthy(A, True, "HTTP 200")
        assert pool.flush_events()
    assert caplog.records == []


def test_event_log_includes_retries_when_asked(
    make_pool: Callable[..., Pool], caplog: pytest.LogCaptureFixture
) -> None:
    """kinds= chooses the events logged; retried lines are warnings."""
    pool = make_pool([A])
    install_event_logging(pool, kinds=["retried"])
    with caplog.at_level(logging.INFO, logger="softlb.events"):
        pool.add(B)
        pool.publish("retried", A, "GET /x: connection refused")
        assert pool.flush_events()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            f"request retried on another backend after {A} failed: GET /x: connection refused",
        )
    ]


def test_no_backend_lines_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    """During an outage no_backend is logged once a second, saying how many were not."""
    hook = EventLogger(logging.getLogger("softlb.events"))
    with caplog.at_level(logging.INFO, logger="softlb.events"):
        for t in (100.0, 100.1, 100.5, 100.9):
            hook(Event("no_backend", None, "the pool is empty", t))
        hook(Event("no_backend", None, "the pool is empty", 100.0 + NO_BACKEND_INTERVAL))
        hook(Event("added", A, "weight 1", 101.2))
    assert caplog.messages == [
        "no backend available: the pool is empty",
        "no backend available: the pool is empty (3 more since the last line)",
        f"backend {A} added (weight 1)",
    ]


# -- the application ------------------------------------------------------------------------------


@pytest.fixture
def make_app() -> Iterator[Callable[..., Application]]:
    """A factory of Applications (health checks off), stopped at teardown."""
    apps: list[Application] = []

    def make(log_format: str | None = None, **config: Any) -> Application:
        config.setdefault("health_check", {"enabled": False})
        app = Application(parse_config(config), log_format=log_format)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.stop()


def test_application_logs_state_changes(
    make_app: Callable[..., Application], caplog: pytest.LogCaptureFixture
) -> None:
    """The application logs admin changes through the event hooks; stop() ends the thread."""
    app = make_app(servers=[A])
    client = Client(app)
    with caplog.at_level(logging.INFO, logger="softlb.events"):
        assert client.post("/_softlb/servers", json={"url": B}).status_code == 201
        assert client.delete("/_softlb/servers", json={"url": B}).status_code == 200
        assert app.pool.flush_events()
    messages = [r.getMessage() for r in caplog.records if r.name == "softlb.events"]
    assert messages == [
        f"backend {B} added (weight 1)",
        f"backend {B} removed (nothing in flight)",
    ]
    app.stop()
    assert not softlb_event_threads()


def test_application_json_logs(
    make_app: Callable[..., Application],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SOFTLB_LOG_FORMAT=json makes the application's event log JSON."""
    monkeypatch.setenv("SOFTLB_LOG_FORMAT", "json")
    app = make_app(servers=[A])
    with caplog.at_level(logging.INFO, logger="softlb.events"):
        app.pool.drain(A)
        assert app.pool.flush_events()
    [record] = [r for r in caplog.records if r.name == "softlb.events"]
    assert json.loads(record.getMessage())["event"] == "drained"


def test_application_refuses_an_unknown_log_format(
    make_app: Callable[..., Application], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A log format other than text or json is refused as a config error naming its source."""
    with pytest.raises(ConfigError, match="log_format: 'xml' is not a log format"):
        make_app(log_format="xml", servers=[A])
    monkeypatch.setenv("SOFTLB_LOG_FORMAT", "yaml")
    with pytest.raises(ConfigError, match=r"SOFTLB_LOG_FORMAT: 'yaml'.*allowed: text, json"):
        make_app(servers=[A])


def test_application_health_changes_are_logged_once(
    make_app: Callable[..., Application],
    caplog: pytest.LogCaptureFixture,
    refused_url: str,
) -> None:
    """With the event log on, a backend going down is logged once, by the event log."""
    with caplog.at_level(logging.INFO):
        app = make_app(servers=[refused_url], health_check={"enabled": True, "interval": "1h"})
        assert app.checker is not None and not app.checker.log_changes
        deadline = time.monotonic() + 10
        while app.pool.get(refused_url).healthy and time.monotonic() < deadline:
            time.sleep(0.01)  # the first probe runs at once, and is refused
        assert app.pool.flush_events()
    downs = [(r.name, r.getMessage()) for r in caplog.records if "is down" in r.getMessage()]
    assert len(downs) == 1
    assert downs[0][0] == "softlb.events"
    assert downs[0][1].startswith(f"backend {refused_url} is down: ")


def test_access_events_reach_only_hooks_that_ask_for_them(backends: list) -> None:
    """The proxy publishes one 'access' event per answered request, to hooks subscribed to
    'access' by name; '*' does not include them."""
    from werkzeug.test import Client

    from softlb import Pool
    from softlb.events import ACCESS
    from softlb.wsgi import LoadBalancer

    pool = Pool([b.url for b in backends], balancer="round_robin")
    access: list[ev.Event] = []
    everything: list[ev.Event] = []
    pool.on(ACCESS, access.append)
    pool.on("*", everything.append)
    client = Client(LoadBalancer(pool))
    assert client.get("/x?y=1").status_code == 200
    assert client.get("/status/404").status_code == 404
    assert pool.flush_events()
    assert [e.kind for e in access] == [ACCESS, ACCESS]
    assert access[0].detail.startswith("GET /x?y=1 200 ") and access[0].detail.endswith(" ms")
    assert access[1].detail.startswith("GET /status/404 404 ")
    assert {e.backend for e in access} == {backends[0].url, backends[1].url}
    assert all(e.kind != ACCESS for e in everything)
    pool.close()
