"""Proxy-wide counters and the request duration histogram, cheap enough for every request.

Per-backend figures live on :class:`~softlb.backend.Backend`; these are the ones that belong
to the proxy as a whole. :mod:`softlb.metrics` renders both in Prometheus' text format.
"""

from __future__ import annotations

import bisect
import threading
from typing import Final

__all__ = ["DURATION_BUCKETS", "ProxyStats"]

#: Upper bounds of the duration histogram in seconds: prometheus_client's default buckets,
#: which cover 5 ms to 10 s, the range an HTTP proxy's answers fall in.
DURATION_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip


class ProxyStats:
    """Counters kept by the proxy. ``_lock`` protects every field."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.retries = 0
        self.requests = 0
        self.errors_by_status: dict[int, int] = {}
        self.bucket_counts = [0] * (len(DURATION_BUCKETS) + 1)  # last one is +Inf
        self.duration_sum = 0.0

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
