"""Proxy-wide counters and the request duration histogram, cheap enough for every request.

The pool's own per-backend figures (in flight, requests, failures) live on
:class:`~softlb.backend.Backend`; these are the ones the proxy and the health checker see:
the proxy-wide counters, and per backend (by URL) the answers by status class, the times to
the first and last byte of its answers, and its health-check results and transitions.
:mod:`softlb.metrics` renders them in Prometheus' text format.

The proxy-wide counters are summed over a host's worker processes by
:mod:`softlb.state.sync`; the per-backend figures kept here are this process's own.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from softlb.backend import Backend
    from softlb.health import HealthChecker, ProbeResult
    from softlb.pool import Pool, PoolEvent

__all__ = ["DURATION_BUCKETS", "STATUS_CLASSES", "BackendFigures", "ProxyStats"]

#: Upper bounds of the duration histogram in seconds: prometheus_client's default buckets,
#: which cover 5 ms to 10 s, the range an HTTP proxy's answers fall in.
DURATION_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip


_FIRST_BOUND: Final = DURATION_BUCKETS[0]

#: Status classes counted per backend, in order (index = first digit - 1).
STATUS_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")
_CLASS_COUNT: Final = len(STATUS_CLASSES)


class BackendFigures:
    """What one backend's answers and probes came to in this process (a plain record,
    written under :class:`ProxyStats`' lock; :meth:`ProxyStats.backend_snapshot` copies it).

    ``responses`` counts answers by status class (:data:`STATUS_CLASSES`); ``first_byte`` and
    ``last_byte`` are histograms (per-bucket counts, the last one above every bound of
    :data:`DURATION_BUCKETS`, and their sums in seconds) of the time from the backend's pick
    to its answer's head and to its answer's end; ``checks`` counts health probes by result
    (``"pass"``, ``"fail"``); ``transitions`` counts health changes by new state (``"up"``,
    ``"down"``).
    """

    __slots__ = (
        "checks",
        "first_byte",
        "first_byte_sum",
        "last_byte",
        "last_byte_sum",
        "responses",
        "transitions",
    )

    def __init__(self) -> None:
        self.responses = [0] * len(STATUS_CLASSES)
        self.first_byte = [0] * (len(DURATION_BUCKETS) + 1)
        self.first_byte_sum = 0.0
        self.last_byte = [0] * (len(DURATION_BUCKETS) + 1)
        self.last_byte_sum = 0.0
        self.checks: dict[str, int] = {}
        self.transitions: dict[str, int] = {}

    def copy(self) -> BackendFigures:
        """An independent copy."""
        other = BackendFigures()
        other.responses = list(self.responses)
        other.first_byte, other.first_byte_sum = list(self.first_byte), self.first_byte_sum
        other.last_byte, other.last_byte_sum = list(self.last_byte), self.last_byte_sum
        other.checks, other.transitions = dict(self.checks), dict(self.transitions)
        return other


class ProxyStats:
    """Counters kept by the proxy. ``_lock`` protects every field."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.retries = 0
        self.requests = 0
        self.errors_by_status: dict[int, int] = {}
        self.bucket_counts = [0] * (len(DURATION_BUCKETS) + 1)  # last one is +Inf
        self.duration_sum = 0.0
        self._backends: dict[str, BackendFigures] = {}  # by backend URL

    def _figures(self, url: str) -> BackendFigures:
        """The record of ``url``, created on first use; the caller holds the lock."""
        figures = self._backends.get(url)
        if figures is None:
            figures = self._backends[url] = BackendFigures()
        return figures

    def response(
        self,
        backend_url: str,
        status: int,
        first_byte: float,
        last_byte: float | None = None,
        request_seconds: float | None = None,
    ) -> None:
        """Count one answer from a backend: its status and the seconds from the backend's
        pick to the answer's head (``first_byte``) and to its end (``last_byte``; ``None``
        when the answer did not end, e.g. the client went away, or is not known yet).

        Call it once per answer; :meth:`response_end` adds a ``last_byte`` time later, for
        a streamed answer whose end comes after its head was counted. ``request_seconds``
        also counts the request as :meth:`observe` does, under the same lock (for an answer
        counted whole, once it has gone out).
        """
        # Most answers of a proxy take under 5 ms, the first bucket: a comparison is a tenth
        # of a bisect call. The lock is taken with acquire/release rather than ``with``,
        # which costs as much again as the counting (the engine counts every request here).
        first = (
            0 if first_byte <= _FIRST_BOUND else bisect.bisect_left(DURATION_BUCKETS, first_byte)
        )
        kind = status // 100 - 1
        lock = self._lock
        lock.acquire()
        try:
            if request_seconds is not None:
                self.requests += 1
                self.bucket_counts[
                    0
                    if request_seconds <= _FIRST_BOUND
                    else bisect.bisect_left(DURATION_BUCKETS, request_seconds)
                ] += 1
                self.duration_sum += request_seconds
            figures = self._backends.get(backend_url)  # (_figures, inline: per request)
            if figures is None:
                figures = self._backends[backend_url] = BackendFigures()
            if 0 <= kind < _CLASS_COUNT:
                figures.responses[kind] += 1
            figures.first_byte[first] += 1
            figures.first_byte_sum += first_byte
            if last_byte is not None:
                figures.last_byte[
                    0
                    if last_byte <= _FIRST_BOUND
                    else bisect.bisect_left(DURATION_BUCKETS, last_byte)
                ] += 1
                figures.last_byte_sum += last_byte
        finally:
            lock.release()

    def response_end(self, backend_url: str, last_byte: float) -> None:
        """Add the time to the last byte of an answer counted by :meth:`response` without
        one (a streamed answer, whose end is known only once its body went out)."""
        i = bisect.bisect_left(DURATION_BUCKETS, last_byte)
        with self._lock:
            figures = self._figures(backend_url)
            figures.last_byte[i] += 1
            figures.last_byte_sum += last_byte

    def health_check(self, backend_url: str, ok: bool) -> None:
        """Count one active health probe of a backend, passed (``ok``) or failed."""
        result = "pass" if ok else "fail"
        with self._lock:
            checks = self._figures(backend_url).checks
            checks[result] = checks.get(result, 0) + 1

    def transition(self, backend_url: str, to: str) -> None:
        """Count one health change of a backend: ``to`` is ``"up"`` or ``"down"``."""
        with self._lock:
            transitions = self._figures(backend_url).transitions
            transitions[to] = transitions.get(to, 0) + 1

    def forget(self, backend_url: str) -> None:
        """Drop a backend's figures (it left the pool), so that a balancer whose backends
        come and go (DNS discovery) does not keep a record for every address it ever saw."""
        with self._lock:
            self._backends.pop(backend_url, None)

    def backend_snapshot(self) -> dict[str, BackendFigures]:
        """A consistent copy of every backend's figures, by URL."""
        with self._lock:
            return {url: figures.copy() for url, figures in self._backends.items()}

    def watch(self, pool: Pool, checker: HealthChecker | None = None) -> Callable[[], None]:
        """Count ``pool``'s health transitions (and forget backends that leave it), and
        ``checker``'s probe results when given; returns a function that stops both.

        The transitions come from :meth:`Pool.subscribe <softlb.pool.Pool.subscribe>`, so
        every change counts, whoever decided it (probes, passive ejection, another process
        through shared state); probe results come from :attr:`HealthChecker.on_probe
        <softlb.health.HealthChecker.on_probe>` and count in the process that probes.
        """

        def on_event(event: PoolEvent) -> None:
            backend = event.backend
            if backend is None:
                return
            if event.kind == "health":
                self.transition(backend.url, "up" if backend.healthy else "down")
            else:
                self.forget(backend.url)

        def on_probe(backend: Backend, result: ProbeResult) -> None:
            self.health_check(backend.url, result.ok)

        unsubscribe = pool.subscribe(on_event, ("health", "removed"))
        if checker is not None:
            checker.on_probe = on_probe

        def stop() -> None:
            unsubscribe()
            if checker is not None and checker.on_probe is on_probe:
                checker.on_probe = None

        return stop

    def observe(self, seconds: float) -> None:
        """Count one request that took ``seconds`` until its answer started."""
        i = bisect.bisect_left(DURATION_BUCKETS, seconds)
        with self._lock:
            self.requests += 1
            self.bucket_counts[i] += 1
            self.duration_sum += seconds

    def retried(self) -> None:
        """Count one retry on another backend."""
        with self._lock:
            self.retries += 1

    def error(self, status: int) -> None:
        """Count one error answer made by the proxy itself (502, 503, 504...)."""
        with self._lock:
            self.errors_by_status[status] = self.errors_by_status.get(status, 0) + 1

    def snapshot(self) -> dict[str, object]:
        """A consistent copy of every figure."""
        with self._lock:
            return {
                "retries": self.retries,
                "requests": self.requests,
                "errors_by_status": dict(self.errors_by_status),
                "bucket_counts": list(self.bucket_counts),
                "duration_sum": self.duration_sum,
            }
