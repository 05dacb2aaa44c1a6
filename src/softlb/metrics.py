"""The balancer's figures in Prometheus' text exposition format (SPEC §5).

Nothing here runs on the proxy's hot path: the proxy only bumps plain counters on
:class:`~softlb.backend.Backend` and :class:`~softlb.stats.ProxyStats`, and
:class:`SoftLBCollector` reads them when Prometheus scrapes (prometheus_client's "custom
collector" pattern), so a request costs no prometheus_client call at all.

Exposed series (``backend`` is the backend's URL):

=====================================  =========  =========================================
name                                   type       what
=====================================  =========  =========================================
``softlb_backend_requests_total``      counter    client requests forwarded to the backend
``softlb_backend_failures_total``      counter    those of them that failed
``softlb_backend_in_flight``           gauge      requests in flight on the backend
``softlb_backend_healthy``             gauge      1 if health checks pass, else 0
``softlb_backend_draining``            gauge      1 if an operator is draining it, else 0
``softlb_backend_weight``              gauge      configured weight
``softlb_backend_latency_seconds``     gauge      peak-EWMA of its answer latency
``softlb_backends``                    gauge      members of the pool
``softlb_state_stale``                 gauge      1 while the shared state store is unreachable
``softlb_retries_total``               counter    requests tried again on another backend
``softlb_proxy_errors_total``          counter    error answers made by the proxy, by status
``softlb_request_duration_seconds``    histogram  time until the backend's answer started
``softlb_backend_responses_total``     counter    answers from the backend, by status class
                                                  (``code``: ``"1xx"`` ... ``"5xx"``)
``softlb_backend_response_seconds``    histogram  time from the backend's pick to its answer's
                                                  head (``phase="first_byte"``) and end
                                                  (``phase="last_byte"``)
``softlb_health_checks_total``         counter    active probes, by ``result`` (pass, fail)
``softlb_backend_transitions_total``   counter    health changes, by new state (``to``: up,
                                                  down)
``softlb_info``                        gauge      always 1; ``version`` and ``algorithm``
``process_*``                                     prometheus_client's process collector:
                                                  ``process_resident_memory_bytes``,
                                                  ``process_cpu_seconds_total``,
                                                  ``process_open_fds``... (Linux)
=====================================  =========  =========================================

Requests, failures and in-flight counts, the retries, the proxy's errors and the request
duration histogram are summed over every worker process of the host (through the shared
state's slot table). The four families from ``softlb_backend_responses_total`` to
``softlb_backend_transitions_total`` (answers by class, the first/last byte histograms,
probes and transitions; kept by :class:`~softlb.stats.ProxyStats`) and the
``process_*`` series are those of the worker that answers the scrape. Probe results count in
the process that runs the probes (with shared state: the elected prober).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Final, cast

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from softlb.backend import Backend
from softlb.pool import Pool
from softlb.stats import DURATION_BUCKETS, STATUS_CLASSES, BackendFigures, ProxyStats

__all__ = ["CONTENT_TYPE", "Metrics", "SoftLBCollector", "cumulative_buckets", "render_metrics"]

#: Content type of the Prometheus text format 0.0.4, which :func:`generate_latest` writes for
#: metric names like ours. Spelled out because prometheus_client >= 0.22 moved its
#: ``CONTENT_TYPE_LATEST`` to ``version=1.0.0`` while older releases say ``0.0.4``.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

_BACKEND: Final = ["backend"]


class SoftLBCollector:
    """A prometheus_client collector that reads a pool and proxy stats at scrape time."""

    def __init__(
        self,
        pool: Pool,
        stats: ProxyStats,
        *,
        version: str = "",
        figures: Callable[[], list[dict[str, object]]] | None = None,
        stale: Callable[[], bool] | None = None,
        snapshot: Callable[[], dict[str, object]] | None = None,
    ) -> None:
        self.pool = pool
        self.snapshot = snapshot if snapshot is not None else stats.snapshot
        self.stats = stats
        self.version = version
        self.figures = figures
        self.stale = stale

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family, built from the figures as they are now."""
        backends = self.pool.backends
        requests = CounterMetricFamily(
            "softlb_backend_requests_total",
            "Client requests forwarded to the backend (health probes not counted).",
            labels=_BACKEND,
        )
        failures = CounterMetricFamily(
            "softlb_backend_failures_total",
            "Forwarded requests that failed (connect error, timeout, broken connection).",
            labels=_BACKEND,
        )
        in_flight = GaugeMetricFamily(
            "softlb_backend_in_flight", "Requests in flight on the backend.", labels=_BACKEND
        )
        healthy = GaugeMetricFamily(
            "softlb_backend_healthy",
            "1 if the backend passes its health checks, else 0.",
            labels=_BACKEND,
        )
        draining = GaugeMetricFamily(
            "softlb_backend_draining",
            "1 if an operator took the backend out of rotation, else 0.",
            labels=_BACKEND,
        )
        weight = GaugeMetricFamily(
            "softlb_backend_weight", "Configured weight of the backend.", labels=_BACKEND
        )
        latency = GaugeMetricFamily(
            "softlb_backend_latency_seconds",
            "Peak-EWMA of the backend's answer latency (absent before its first answer).",
            labels=_BACKEND,
        )
        shared = {f["url"]: f for f in self.figures()} if self.figures is not None else {}
        for backend in backends:
            label = [backend.url]
            figure = shared.get(backend.url)
            if figure is not None:  # host-wide counts, summed over the processes sharing state
                requests.add_metric(label, cast(int, figure["requests"]))
                failures.add_metric(label, cast(int, figure["failures"]))
                in_flight.add_metric(label, cast(int, figure["active"]))
            else:
                requests.add_metric(label, backend.requests)
                failures.add_metric(label, backend.failures)
                in_flight.add_metric(label, backend.active)
            healthy.add_metric(label, 1 if backend.healthy else 0)
            draining.add_metric(label, 1 if backend.draining else 0)
            weight.add_metric(label, backend.weight)
            seconds = backend.latency
            if seconds is not None:
                latency.add_metric(label, seconds)
        yield from (requests, failures, in_flight, healthy, draining, weight)
        if latency.samples:
            yield latency
        yield GaugeMetricFamily("softlb_backends", "Backends in the pool.", value=len(backends))
        yield GaugeMetricFamily(
            "softlb_state_stale",
            "1 while the shared state store cannot be reached (the last known state is used).",
            value=1 if self.stale is not None and self.stale() else 0,
        )

        snap = self.snapshot()
        yield CounterMetricFamily(
            "softlb_retries_total",
            "Requests tried again on another backend after a failure.",
            value=cast(int, snap["retries"]),
        )
        errors = CounterMetricFamily(
            "softlb_proxy_errors_total",
            "Error answers made by the proxy itself (502, 503, 504), by status.",
            labels=["status"],
        )
        for status, count in sorted(cast(dict[int, int], snap["errors_by_status"]).items()):
            errors.add_metric([str(status)], count)
        yield errors
        yield HistogramMetricFamily(
            "softlb_request_duration_seconds",
            "Time from a request's arrival until its backend's answer started.",
            buckets=cumulative_buckets(cast(list[int], snap["bucket_counts"])),
            sum_value=cast(float, snap["duration_sum"]),
        )
        yield from self._backend_families(backends)
        info = GaugeMetricFamily(
            "softlb_info",
            "Always 1; the labels describe this balancer.",
            labels=["version", "algorithm"],
        )
        info.add_metric([self.version, self.pool.balancer.name], 1)
        yield info

    def _backend_families(self, backends: Sequence[Backend]) -> Iterator[Metric]:
        """The per-backend figures of :meth:`ProxyStats.backend_snapshot`, for the pool's
        current members (every status class from 2xx to 5xx always, 1xx once seen)."""
        figures = self.stats.backend_snapshot()
        responses = CounterMetricFamily(
            "softlb_backend_responses_total",
            "Answers from the backend, by status class (this worker's).",
            labels=["backend", "code"],
        )
        seconds = HistogramMetricFamily(
            "softlb_backend_response_seconds",
            "Time from the backend's pick to its answer's first byte (head) and last byte "
            "(end), by phase (this worker's).",
            labels=["backend", "phase"],
        )
        checks = CounterMetricFamily(
            "softlb_health_checks_total",
            "Active health probes of the backend, by result (pass, fail).",
            labels=["backend", "result"],
        )
        transitions = CounterMetricFamily(
            "softlb_backend_transitions_total",
            "Health changes of the backend, by the state it went to (up, down).",
            labels=["backend", "to"],
        )
        for backend in backends:
            url = backend.url
            mine = figures.get(url) or BackendFigures()
            for kind, count in zip(STATUS_CLASSES, mine.responses, strict=True):
                if count or kind != "1xx":
                    responses.add_metric([url, kind], count)
            seconds.add_metric(
                [url, "first_byte"], cumulative_buckets(mine.first_byte), mine.first_byte_sum
            )
            seconds.add_metric(
                [url, "last_byte"], cumulative_buckets(mine.last_byte), mine.last_byte_sum
            )
            for result in ("pass", "fail"):
                checks.add_metric([url, result], mine.checks.get(result, 0))
            for state in ("up", "down"):
                transitions.add_metric([url, state], mine.transitions.get(state, 0))
        yield from (responses, seconds, checks, transitions)


def cumulative_buckets(counts: Sequence[int]) -> list[tuple[str, float]]:
    """Turn per-bucket counts (the last one above every bound) into Prometheus' ``le`` buckets.

    ProxyStats counts each observation once, in the first bucket whose bound holds it; the
    exposition wants, for each bound, how many observations were at most that bound.
    """
    if len(counts) != len(DURATION_BUCKETS) + 1:
        raise ValueError(f"expected {len(DURATION_BUCKETS) + 1} bucket counts, got {len(counts)}")
    buckets: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip((*DURATION_BUCKETS, float("inf")), counts, strict=True):
        total += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
    return buckets


class Metrics:
    """A private registry holding one :class:`SoftLBCollector`, rendered on demand.

    Private, so that two balancers in one process (or tests) never mix their series, and the
    process-wide default registry is left to the application.
    """

    def __init__(
        self,
        pool: Pool,
        stats: ProxyStats,
        *,
        version: str = "",
        figures: Callable[[], list[dict[str, object]]] | None = None,
        stale: Callable[[], bool] | None = None,
        snapshot: Callable[[], dict[str, object]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = SoftLBCollector(
            pool, stats, version=version, figures=figures, stale=stale, snapshot=snapshot
        )
        self.registry.register(self.collector)
        #: process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds... of
        #: the process that answers the scrape (nothing on systems without /proc).
        self.process = ProcessCollector(registry=self.registry)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """Return the exposition and its content type.

        The classic text format 0.0.4 unless ``accept`` (the scraper's ``Accept`` header)
        asks for OpenMetrics, as Prometheus does when it can; then prometheus_client chooses.
        """
        if accept and "application/openmetrics-text" in accept:
            encoder, content_type = choose_encoder(accept)
            return encoder(self.registry), content_type
        return generate_latest(self.registry), CONTENT_TYPE


def render_metrics(pool: Pool, stats: ProxyStats, *, version: str = "") -> tuple[bytes, str]:
    """Return the text exposition of ``pool`` and ``stats`` and its content type."""
    return Metrics(pool, stats, version=version).render()
