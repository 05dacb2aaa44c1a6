"""Health checks: active probes with rise/fall, and passive failure counting.

Two parts, kept apart so each can be tested on its own:

* :class:`HealthState`, a pure state machine with HAProxy's counter semantics;
* :class:`HealthChecker`, which schedules probes on one thread, runs them on a small bounded
  pool of workers, feeds the results (and the pool's failed requests) to the state machines,
  and takes backends in and out of rotation.

The probe and the clock are injected, so tests drive the checker with a fake clock and a fake
probe, and call :meth:`HealthChecker.run_pending` instead of sleeping.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from softlb.backend import Backend
from softlb.pool import Pool, PoolEvent
from softlb.probe import Probe, ProbeResult, StatusRanges, parse_status_ranges
from softlb.retry import failure_reason

__all__ = [
    "DEFAULT_JITTER",
    "BackendReport",
    "HealthChecker",
    "HealthState",
    "Probe",
    "ProbeResult",
    "StatusRanges",
    "parse_status_ranges",
]

log = logging.getLogger("softlb.health")

#: Each interval is stretched or shrunk by up to this fraction at random, so probes of many
#: backends (and of many balancers) do not fire in lockstep — HAProxy's ``spread-checks``.
DEFAULT_JITTER: Final = 0.1

#: Default number of probe worker threads. Probes are I/O-bound and mostly answer in
#: milliseconds; 8 workers probe 1,000 backends every 5 s even when a tenth time out at 2 s.
DEFAULT_WORKERS: Final = 8


@dataclass(frozen=True)
class BackendReport:
    """What an operator wants to know about one backend's health, for the status page.

    ``checked_at`` (wall-clock seconds since the epoch, ``None`` before the first probe here),
    ``check_ok`` and ``check_detail`` describe the last active probe this process ran.
    ``down_since`` (epoch seconds) and ``down_reason`` say when and why the backend last left
    rotation for health (a probe's detail, a passive ejection's or another process's
    verdict); both ``None`` while it is in rotation or when it went down before this checker
    watched it.
    """

    checked_at: float | None = None
    check_ok: bool | None = None
    check_detail: str = ""
    down_since: float | None = None
    down_reason: str | None = None

    def as_dict(self) -> dict[str, object]:
        """The figures as a JSON-ready mapping."""
        return {
            "checked_at": None if self.checked_at is None else round(self.checked_at, 3),
            "check_ok": self.check_ok,
            "check_detail": self.check_detail,
            "down_since": None if self.down_since is None else round(self.down_since, 3),
            "down_reason": self.down_reason,
        }


class HealthState:
    """Rise/fall verdict for one backend, with HAProxy's semantics.

    * ``fall`` consecutive failures take a healthy backend out; ``rise`` consecutive successes
      bring a down backend back. A success resets the failure streak and vice versa.
    * A backend that starts up is *fragile* (HAProxy starts a server's health counter at
      ``rise``, the lowest "up" value): its first failure takes it out at once; its first
      success makes it robust, so that from then on it takes ``fall`` failures.
    * A backend that starts down needs ``rise`` successes.

    :meth:`success` and :meth:`failure` return the new verdict when it changed, else ``None``.
    """

    __slots__ = ("failures", "fall", "fragile", "healthy", "rise", "successes")

    def __init__(self, rise: int = 2, fall: int = 3, *, healthy: bool = True) -> None:
        if rise < 1 or fall < 1:
            raise ValueError(f"rise and fall must be >= 1, got rise={rise} fall={fall}")
        self.rise = rise
        self.fall = fall
        self.healthy = healthy
        self.fragile = healthy
        self.successes = 0
        self.failures = 0

    def success(self) -> bool | None:
        """Record a successful check; return ``True`` if the backend just came back up."""
        self.failures = 0
        if self.healthy:
            self.fragile = False
            return None
        self.successes += 1
        if self.successes >= self.rise:
            self.healthy, self.fragile, self.successes = True, False, 0
            return True
        return None

    def failure(self) -> bool | None:
        """Record a failed check; return ``False`` if the backend just went down."""
        self.successes = 0
        if not self.healthy:
            return None
        self.failures += 1
        if self.fragile or self.failures >= self.fall:
            self.healthy, self.fragile, self.failures = False, False, 0
            return False
        return None

    def __repr__(self) -> str:
        verdict = "up" if self.healthy else "down"
        return (
            f"<HealthState {verdict}{' fragile' if self.fragile else ''} "
            f"successes={self.successes}/{self.rise} failures={self.failures}/{self.fall}>"
        )


class HealthChecker:
    """Probes every backend of a pool and keeps the pool's rotation in line with the results.

    Active: each backend gets ``GET path`` every ``interval`` seconds (± ``jitter``), the first
    one as soon as it joins; an answer within ``timeout`` whose status is in
    ``expected_status`` is a success, anything else a failure. Passive (``passive=True``): a
    request that fails through the pool counts as a failure too, so a dead backend leaves
    rotation before its next probe; it comes back only through ``rise`` successful probes.

    ``initial_state="down"`` keeps every backend out of rotation until it has passed ``rise``
    probes; the default ``"up"`` trusts it until its first failure (HAProxy's rule).

    Each verdict change reaches the pool with its reason — the probe's detail (``"HTTP 500"``,
    ``"timeout"``) or, for a passive ejection, ``"passive: N requests in a row failed, the
    last: could not connect"`` — which :meth:`Pool.explain() <softlb.pool.Pool.explain>`
    shows and the pool's ``health`` and ``ejected`` hooks receive. ``log_changes`` (default
    ``True``) also logs each change to ``softlb.health``.

    One scheduler thread decides what is due; at most ``workers`` probes run at a time. No
    thread exists before :meth:`start`; :meth:`stop` joins them. Both are idempotent. Without
    ``start()``, :meth:`run_pending` runs due probes on the calling thread (tests, or a
    program with its own loop).
    """

    def __init__(
        self,
        pool: Pool,
        *,
        path: str = "/",
        interval: float = 5.0,
        timeout: float = 2.0,
        rise: int = 2,
        fall: int = 3,
        expected_status: str | int | Iterable[int | str] | StatusRanges = "200-399",
        initial_state: str = "up",
        passive: bool = True,
        jitter: float = DEFAULT_JITTER,
        workers: int = DEFAULT_WORKERS,
        probe: Probe | None = None,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
        on_verdict: Callable[[Backend, bool, str], None] | None = None,
        log_changes: bool = True,
    ) -> None:
        if not isinstance(pool, Pool):
            raise TypeError(f"pool must be a softlb Pool, got {type(pool).__name__}")
        for name, value in (("interval", interval), ("timeout", timeout), ("jitter", jitter)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                what = "a fraction of the interval" if name == "jitter" else "seconds"
                raise TypeError(f"{name} must be a number ({what}), got {value!r}")
        if interval <= 0 or timeout <= 0:
            raise ValueError(f"interval and timeout must be > 0, got {interval} and {timeout}")
        if initial_state not in ("up", "down"):
            raise ValueError(f"initial_state must be 'up' or 'down', got {initial_state!r}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not path.startswith("/"):
            raise ValueError(f"health check path must start with '/', got {path!r}")
        HealthState(rise, fall)  # validates rise/fall
        self.pool = pool
        self.path = path
        self.interval = float(interval)
        self.timeout = float(timeout)
        self.rise = rise
        self.fall = fall
        self.expected_status = parse_status_ranges(expected_status)
        self.initial_state = initial_state
        self.passive = passive
        self.jitter = jitter
        self.workers = workers
        self.clock = clock
        self._rng = random.Random(seed)
        self._probe: Probe | None = probe
        #: Called after every active probe with the backend, its verdict (healthy or not, after
        #: rise/fall) and the probe's detail; shared state publishes verdicts through it.
        self.on_verdict = on_verdict
        #: Called after every active probe with the backend and the probe's own result
        #: (before rise/fall); :meth:`softlb.stats.ProxyStats.watch` counts results through it.
        self.on_probe: Callable[[Backend, ProbeResult], None] | None = None
        #: Whether the checker logs each verdict change itself (to ``softlb.health``). The
        #: whole application turns it off: its event log (:mod:`softlb.logs`) says the same.
        self.log_changes = log_changes
        self._active = True  # whether the scheduler runs probes (passive counting always runs)
        self._lock = threading.RLock()  # re-entrant: pool listeners may call back in
        # protected by _lock:
        self._states: dict[Backend, HealthState] = {}
        self._due: list[tuple[float, int, Backend]] = []  # heap of (when, seq, backend)
        self._seq = 0
        self._running: set[Backend] = set()  # probes submitted and not finished
        self._thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._unsubscribe: Callable[[], None] | None = None
        #: Wall clock for :meth:`report` (seconds since the epoch; people read these times).
        self.wall_clock: Callable[[], float] = time.time
        # by backend, for report(): (when, ok, detail) of the last probe; (since, why) down.
        self._last_check: dict[Backend, tuple[float, bool, str]] = {}
        self._down: dict[Backend, tuple[float, str]] = {}
        self._watch()

    # -- bookkeeping ---------------------------------------------------------------------

    def _watch(self) -> None:
        """Track the pool's members from now on; every current member is due at once."""
        if self.initial_state == "down":  # a backend added from now on waits for its probes
            self.pool.admit_healthy = False
        self._unsubscribe = self.pool.subscribe(
            self._on_event, ("added", "removed", "failure", "health")
        )
        now = self.clock()
        for backend in self.pool.backends:
            self._track(backend, now)

    def _track(self, backend: Backend, now: float) -> None:
        down = self.initial_state == "down"
        with self._lock:
            if backend in self._states:
                return
            # Start from the pool's verdict: after a stop()/start() a backend that was down
            # must pass `rise` probes, not be trusted as up while the pool keeps it out.
            healthy = not down and backend.healthy
            self._states[backend] = HealthState(self.rise, self.fall, healthy=healthy)
            self._schedule(backend, now)
        if down:
            self.pool.set_healthy(backend, False, "initial state down")

    def _schedule(self, backend: Backend, when: float) -> None:
        self._seq += 1
        heapq.heappush(self._due, (when, self._seq, backend))
        self._wake.notify()

    def _on_event(self, event: PoolEvent) -> None:
        if event.backend is None:
            return
        if event.kind == "added":
            self._track(event.backend, self.clock())
        elif event.kind == "removed":
            with self._lock:
                self._states.pop(event.backend, None)
                self._last_check.pop(event.backend, None)
                self._down.pop(event.backend, None)
                # Drop its schedule entry too, or re-adding the same Backend leaves two.
                self._due = [e for e in self._due if e[2] is not event.backend]
                heapq.heapify(self._due)
        elif event.kind == "failure" and self.passive:
            # Real traffic counts in a row, as Envoy's consecutive-errors outlier detection
            # does: `fall` failed requests with no success between them take a backend out;
            # scattered failures among good requests do not.
            backend = event.backend
            if backend.consecutive_failures >= self.fall:
                count = backend.consecutive_failures
                self._eject(
                    backend,
                    f"passive: {count} {'request' if count == 1 else 'requests in a row'} "
                    f"failed, the last: {failure_reason(event.reason)}",
                )
        elif event.kind == "health":
            with self._lock:  # every change, whoever decided it, for report()
                if event.backend.healthy:
                    self._down.pop(event.backend, None)
                elif event.backend not in self._down:
                    self._down[event.backend] = (self.wall_clock(), event.reason)
            # A verdict decided elsewhere (another process, an operator): adopt it, so that a
            # backend taken out by someone else needs `rise` successes here too.
            with self._lock:
                state = self._states.get(event.backend)
                if state is not None and state.healthy != event.backend.healthy:
                    state.healthy = event.backend.healthy
                    state.fragile = False
                    state.successes = state.failures = 0

    def _eject(self, backend: Backend, detail: str) -> None:
        """Take a backend out on passive evidence; it returns through `rise` probes."""
        with self._lock:
            state = self._states.get(backend)
            if state is None or not state.healthy:
                return
            state.healthy, state.fragile = False, False
            state.successes = state.failures = 0
            changed = self.pool.set_healthy(backend, False, detail, passive=True)
        if changed and self.log_changes:
            log.warning("backend %s is down: %s", backend.url, detail.removeprefix("passive: "))

    def state_of(self, backend: Backend | str) -> HealthState | None:
        """The rise/fall state kept for a backend (``None`` if it is not tracked)."""
        if isinstance(backend, str):
            backend = self.pool.get(backend)
        with self._lock:
            return self._states.get(backend)

    def report(self, backend: Backend | str) -> BackendReport:
        """The last probe of a backend and since when and why it is down (see
        :class:`BackendReport`); all empty for a backend this checker knows nothing of."""
        if isinstance(backend, str):
            backend = self.pool.get(backend)
        with self._lock:
            last = self._last_check.get(backend)
            down = self._down.get(backend) if not backend.healthy else None
        return BackendReport(
            checked_at=last[0] if last else None,
            check_ok=last[1] if last else None,
            check_detail=last[2] if last else "",
            down_since=down[0] if down else None,
            down_reason=down[1] if down else None,
        )

    def _record(self, backend: Backend, ok: bool, detail: str) -> None:
        with self._lock:
            state = self._states.get(backend)
            if state is None:
                return
            self._last_check[backend] = (self.wall_clock(), ok, detail)
            verdict = state.success() if ok else state.failure()
            # Applied under our lock so two results for one backend cannot land out of order
            # (lock order: checker, then pool; the pool never calls us while holding its own).
            changed = verdict is not None and self.pool.set_healthy(backend, verdict, detail)
        if changed and self.log_changes:
            log.warning("backend %s is %s: %s", backend.url, "up" if verdict else "down", detail)

    # -- probing -------------------------------------------------------------------------

    def _next_interval(self) -> float:
        if not self.jitter:
            return self.interval
        return self.interval * (1 + self.jitter * (2 * self._rng.random() - 1))

    def _default_probe(self) -> Probe:
        if self._probe is None:
            from softlb.http.probe import HttpProbe  # urllib3 only when probing for real

            self._probe = HttpProbe(
                path=self.path,
                timeout=self.timeout,
                expected_status=self.expected_status,
                maxsize=self.workers,
            )
        return self._probe

    def probe_once(self, backend: Backend) -> ProbeResult:
        """Probe one backend now, record the result and return it."""
        probe = self._default_probe()
        try:
            result = probe(backend)
        except Exception as exc:  # a broken probe function must not kill the checker
            log.exception("health probe of %s raised", backend.url)
            result = ProbeResult(False, f"probe error: {type(exc).__name__}")
        self._record(backend, result.ok, result.detail)
        on_probe = self.on_probe
        if on_probe is not None:
            try:
                on_probe(backend, result)
            except Exception:  # counting must never stop the checks
                log.exception("on_probe hook failed for %s", backend.url)
        on_verdict = self.on_verdict
        if on_verdict is not None:
            state = self.state_of(backend)
            if state is not None:
                on_verdict(backend, state.healthy, result.detail)
        return result

    def set_active(self, active: bool) -> None:
        """Run active probes (``True``, the default) or only count passive failures.

        Where several processes share a pool, one of them probes and the others pass; the
        one that takes over probes every backend at once.
        """
        with self._lock:
            if active and not self._active:
                now = self.clock()
                self._due.clear()
                for backend in self._states:
                    self._schedule(backend, now)
            self._active = active
            self._wake.notify_all()

    @property
    def active(self) -> bool:
        """Whether active probes run (see :meth:`set_active`)."""
        return self._active

    def _take_due(self, now: float) -> list[Backend]:
        """Pop every tracked backend due by ``now``; the caller holds the lock."""
        due: list[Backend] = []
        while self._due and self._due[0][0] <= now:
            _, _, backend = heapq.heappop(self._due)
            if backend in self._states and backend not in self._running:
                due.append(backend)
        return due

    def _finish(self, backend: Backend) -> None:
        with self._lock:
            self._running.discard(backend)
            if backend in self._states and not self._stopping:
                self._schedule(backend, self.clock() + self._next_interval())

    def run_pending(self) -> int:
        """Run every probe that is due, on this thread; return how many ran."""
        with self._lock:
            due = self._take_due(self.clock())
            self._running.update(due)
        for backend in due:
            try:
                self.probe_once(backend)
            finally:
                self._finish(backend)
        return len(due)

    def _run_in_worker(self, backend: Backend) -> None:
        try:
            self.probe_once(backend)
        finally:
            self._finish(backend)

    def _loop(self) -> None:
        executor = self._executor
        assert executor is not None
        while True:
            with self._lock:
                if self._stopping:
                    return
                if not self._active:
                    self._wake.wait(timeout=self.interval)
                    continue
                now = self.clock()
                due = self._take_due(now)
                if not due:
                    wait = self._due[0][0] - now if self._due else self.interval
                    self._wake.wait(timeout=max(min(wait, self.interval), 0.001))
                    continue
                self._running.update(due)
            for backend in due:
                try:
                    executor.submit(self._run_in_worker, backend)
                except RuntimeError:  # executor shut down under us: we are stopping
                    return

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> HealthChecker:
        """Start the scheduler thread and the probe workers (once; later calls do nothing)."""
        with self._lock:
            if self._thread is not None:
                return self
            if self._unsubscribe is None:  # restarted after stop(): watch the pool again
                self._stopping = False
                restart = True
            else:
                restart = False
            self._executor = ThreadPoolExecutor(
                max_workers=self.workers, thread_name_prefix="softlb-probe"
            )
            self._thread = threading.Thread(target=self._loop, name="softlb-health", daemon=True)
        if restart:
            self._watch()
        self._default_probe()
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop probing and wait for the threads (probes under way finish first)."""
        with self._lock:
            thread, executor = self._thread, self._executor
            self._stopping = True
            self._thread = self._executor = None
            self._wake.notify_all()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
            if self.initial_state == "down":  # nobody will probe new backends any more
                self.pool.admit_healthy = True
        if thread is not None:
            thread.join(timeout)
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._states.clear()
            self._due.clear()
            self._running.clear()
            self._last_check.clear()
            self._down.clear()
        close = getattr(self._probe, "close", None)
        if callable(close):
            close()

    def after_fork(self) -> None:
        """Make the checker usable in a child process made by ``fork()``.

        The parent's threads do not exist in the child, and its locks may be held by them:
        start from fresh locks, forget probes that were under way, and make every backend
        due at once. Call :meth:`start` afterwards to probe from the child.
        """
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._thread = None
        self._executor = None
        self._running.clear()
        self._due.clear()
        now = self.clock()
        for backend in self._states:
            self._seq += 1
            heapq.heappush(self._due, (now, self._seq, backend))
        reset = getattr(self._probe, "reset", None)
        if callable(reset):
            reset()

    @property
    def running(self) -> bool:
        """Whether :meth:`start` has been called and :meth:`stop` has not."""
        return self._thread is not None

    def __enter__(self) -> HealthChecker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        with self._lock:
            down = sum(1 for s in self._states.values() if not s.healthy)
            total = len(self._states)
        state = "running" if self.running else "stopped"
        return (
            f"<HealthChecker {state} [{total} backends: {down} down] GET {self.path} "
            f"every {self.interval:g}s rise={self.rise} fall={self.fall}>"
        )
