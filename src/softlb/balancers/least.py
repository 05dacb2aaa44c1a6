"""Least connections: the backend with the fewest requests in flight relative to its weight."""

from __future__ import annotations

import heapq
from collections import OrderedDict

from softlb.backend import Backend
from softlb.balancers.base import ONLY_ONE, Balancer, Candidate, candidate, register

__all__ = ["LeastConnections", "load_of"]


def load_of(backend: Backend) -> float:
    """The load least connections compares: ``(in flight + 1) / effective weight``.

    The ``+ 1`` makes weights count among idle backends: with nothing in flight, a weight-3
    backend scores 1/3 and is preferred to a weight-1 backend scoring 1 (nginx's and
    HAProxy's plain ``in flight / weight`` would score both 0 and alternate). In flight counts
    this process's requests and, with shared state, the other processes' as last seen.
    """
    return (backend.active + backend.shared_active + 1) / backend.eff_weight


@register
class LeastConnections(Balancer):
    """Send each request to the eligible backend with the lowest :func:`load_of`.

    Equal loads are served in rotation, never by list order: backends with the same load sit
    in a first-in first-out bucket, and a backend whose load changes moves to the end of its
    new bucket, so equally idle backends take turns. Picks and updates cost O(log k), k being
    the number of distinct loads (HAProxy keeps the same order in an elastic binary tree); no
    pick scans the backends, which matters at thousands of them.
    """

    name = "least_connections"
    indexes_load = True
    rule = "the lowest (in flight + 1) / effective weight wins; equal loads take turns"

    def __init__(self) -> None:
        # load -> backends with that load, oldest arrival first (an ordered set).
        self._buckets: dict[float, OrderedDict[Backend, None]] = {}
        # min-heap of loads; may hold loads whose bucket has emptied (removed lazily).
        self._heap: list[float] = []

    def rebuild(self, eligible: tuple[Backend, ...], now: float) -> None:
        for bucket in self._buckets.values():
            for backend in bucket:
                backend._lc_key = None
        self._buckets = {}
        self._heap = []
        for backend in eligible:
            self._insert(backend, load_of(backend))

    def _insert(self, backend: Backend, load: float) -> None:
        bucket = self._buckets.get(load)
        if bucket is None:
            bucket = self._buckets[load] = OrderedDict()
            heapq.heappush(self._heap, load)
            if len(self._heap) > 2 * len(self._buckets) + 64:
                # Too many stale loads left behind by emptied buckets: start the heap afresh.
                self._heap = list(self._buckets)
                heapq.heapify(self._heap)
        bucket[backend] = None
        backend._lc_key = load

    def _move(self, backend: Backend) -> None:
        old = backend._lc_key
        if old is None:  # not eligible: nothing indexed
            return
        bucket = self._buckets[old]
        del bucket[backend]
        if not bucket:
            del self._buckets[old]
        self._insert(backend, load_of(backend))

    acquired = _move
    released = _move

    def pick(self, key: str | None, now: float) -> Backend | None:
        heap = self._heap
        buckets = self._buckets
        while heap:
            bucket = buckets.get(heap[0])
            if bucket:
                return next(iter(bucket))
            heapq.heappop(heap)
        return None

    def explain(self, key: str | None, now: float, limit: int | None = None) -> list[Candidate]:
        """Score: the load the backend is indexed under, :func:`load_of` as of its last change.
        Backends are listed as picks would take them: lowest load first, and within one load
        in the order of their bucket (the first is next)."""
        buckets = self._buckets
        alone = sum(len(bucket) for bucket in buckets.values()) == 1
        out: list[Candidate] = []
        for load in sorted(k for k, bucket in buckets.items() if bucket):
            for place, backend in enumerate(buckets[load]):
                if limit is not None and len(out) >= limit:
                    return out
                in_flight = backend.active + backend.shared_active
                why = (
                    f"({in_flight} in flight + 1) / effective weight {backend.eff_weight:.4g} "
                    f"= {load:.4g}"
                )
                chosen = not out
                if alone:
                    why += f"; {ONLY_ONE}"
                elif chosen:
                    why += "; the lowest load, first in line"
                elif place:
                    why += f"; {place} ahead of it at this load"
                out.append(candidate(backend, load, why, chosen))
        return out
