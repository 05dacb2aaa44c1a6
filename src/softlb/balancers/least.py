"""Least connections: the fewest requests in flight per unit of weight; ties in smooth
weighted rotation (nginx's ``least_conn``)."""

from __future__ import annotations

import heapq
from typing import Final

from softlb.backend import Backend
from softlb.balancers.base import ONLY_ONE, Balancer, Candidate, candidate, register

__all__ = ["SCAN_MAX", "LeastConnections", "least_load", "load_of"]

#: Largest eligible set :class:`LeastConnections` scans at each pick, as nginx's
#: ``least_conn`` scans its peers; above it the backends are indexed by load (heaps), so that
#: a pick costs O(log n) at thousands of them. At 2 to 8 backends the index's upkeep on every
#: lease and release costs more than the scan it saves. Both choose the same backends.
SCAN_MAX: Final = 8


def load_of(backend: Backend) -> float:
    """``(in flight + 1) / effective weight``: the load the two-choices strategies compare,
    and the one a retry uses to choose among the backends not tried yet.

    The ``+ 1`` makes weights count among idle backends. In flight counts this process's
    requests and, with shared state, the other processes' as last seen.
    """
    return (backend.active + backend.shared_active + 1) / backend.eff_weight


def least_load(backend: Backend) -> float:
    """The load least connections compares: ``in flight / effective weight`` (SPEC §3).

    Idle backends all score 0, whatever their weights; which of them goes first is the tie
    rule's business (:class:`LeastConnections`), so that sequential traffic splits by weight.
    """
    return (backend.active + backend.shared_active) / backend.eff_weight


#: ``(pass, arrival, backend)``: the arrival number is unique, so backends are never compared.
_Entry = tuple[float, int, Backend]
#: ``(load, pass, arrival, backend)``, a backend's place in a scanned pool: the lowest is
#: picked; the arrival number is unique, so backends are never compared.
_Rank = tuple[float, float, int, Backend]


class _Bucket:
    """The backends at one load: a min-heap of ``[pass, arrival, backend]`` entries.

    An entry is live while it is its backend's current entry (``LeastConnections._entry``);
    others are dropped when they reach the top, or all at once when they outnumber the live
    ones (so a bucket never holds more than about twice its backends). A bucket that empties
    stays until its load reaches the top of the heap of loads, so that a backend going back
    and forth between two loads (every lease and release) does not make and drop one each
    time; each bucket's load is on that heap exactly once.
    """

    __slots__ = ("heap", "live")

    def __init__(self) -> None:
        self.heap: list[_Entry] = []
        self.live = 0


@register
class LeastConnections(Balancer):
    """Send each request to the eligible backend with the lowest :func:`least_load`.

    Backends at the same load take turns in smooth weighted rotation: among them, a weight-2
    backend is chosen twice as often as a weight-1 one, interleaved (b, a, b, b, a, b, ...),
    so one request at a time over idle backends splits by weight, as nginx's ``least_conn``
    does. The rotation is stride scheduling (Waldspurger's): each backend has a *pass* that
    moves forward by ``1 / effective weight`` each time it is chosen, and the lowest pass at
    the lowest load wins, the earlier arrival on equal passes. A backend that joins a load
    with its pass behind the last chosen one's starts from there, so a backend that was busy
    for a while gets no burst of catch-up picks.

    Up to :data:`SCAN_MAX` eligible backends, a pick scans them for the lowest ``(load,
    pass, arrival)``, as nginx scans its peers: at a few backends that is cheaper than keeping
    an index up to date on every lease and release. Above it, backends are kept in buckets by
    load, a heap of loads over them and a heap of passes inside each: picks and updates cost
    O(log n) and no pick scans the backends, which matters at thousands of them. The mode is
    chosen at each :meth:`rebuild`; both choose the same backends in the same order.

    In both, a backend's load is :func:`least_load` as of its last change (a lease, a release
    or a rebuild), not read at pick time: another process's counts (``shared_active``) are
    written outside the pool's lock and reach the balancer with the rebuild that
    :meth:`Pool.refresh() <softlb.pool.Pool.refresh>` makes after them.

    ``scan_max`` overrides :data:`SCAN_MAX` (tests use 0 to force the index).
    """

    name = "least_connections"
    indexes_load = True
    rule = (
        "the lowest in flight / effective weight wins; ties take turns in smooth weighted rotation"
    )

    def __init__(self, *, scan_max: int = SCAN_MAX) -> None:
        self._scan_max = scan_max
        # Scan mode: every eligible backend's rank (empty in index mode, and when nothing is
        # eligible, where both modes pick nothing). Backends are not indexed: _lc_key is None.
        self._rank: dict[Backend, _Rank] = {}
        # Index mode: load -> backends at that load
        self._buckets: dict[float, _Bucket] = {}
        # min-heap of loads; may hold loads whose bucket has emptied (removed lazily).
        self._heap: list[float] = []
        # each indexed backend's live entry, and every eligible backend's pass
        self._entry: dict[Backend, _Entry] = {}
        self._pass: dict[Backend, float] = {}
        # the pass of the last backend chosen: where a newcomer's rotation starts
        self._vtime = 0.0
        # The last arrival number given: an int attribute, since next() on a counter costs
        # three times as much on every lease and release.
        self._arrival = 0

    def rebuild(self, eligible: tuple[Backend, ...], now: float) -> None:
        if self._rank:
            passes = {backend: rank[1] for backend, rank in self._rank.items()}
        else:
            for backend in self._entry:
                backend._lc_key = None
            passes = self._pass
        self._rank = {}
        self._buckets = {}
        self._heap = []
        self._entry = {}
        self._pass = {}
        vtime = self._vtime
        if len(eligible) <= self._scan_max:
            # What _insert does, without the index: the pass is clamped up to vtime and the
            # arrival numbered in eligible order, so the two modes rank alike.
            ranks = self._rank
            for backend in eligible:
                position = max(passes.get(backend, vtime + 1.0 / backend.eff_weight), vtime)
                self._arrival += 1
                ranks[backend] = (least_load(backend), position, self._arrival, backend)
            return
        for backend in eligible:
            self._pass[backend] = passes.get(backend, vtime + 1.0 / backend.eff_weight)
            self._insert(backend, least_load(backend))

    def _insert(self, backend: Backend, load: float) -> None:
        bucket = self._buckets.get(load)
        if bucket is None:
            if len(self._buckets) > 2 * len(self._entry) + 64:
                # Too many emptied buckets wait for their load to reach the top: drop them
                # and start the heap of loads afresh.
                self._buckets = {k: b for k, b in self._buckets.items() if b.live}
                self._heap = list(self._buckets)
                heapq.heapify(self._heap)
            bucket = self._buckets[load] = _Bucket()
            heapq.heappush(self._heap, load)
        position = self._pass[backend]
        if position < self._vtime:
            position = self._pass[backend] = self._vtime
        self._arrival += 1
        entry = (position, self._arrival, backend)
        heapq.heappush(bucket.heap, entry)
        bucket.live += 1
        self._entry[backend] = entry
        backend._lc_key = load

    def _move(self, backend: Backend) -> None:
        """Take ``backend``'s live entry out of its bucket (lazily) and index it again at its
        load now; runs twice per request (lease and release), as both :meth:`acquired` and
        :meth:`released`, and as :meth:`load_changed` when other processes' counts are read
        at a pick.

        In scan mode no backend is indexed (``_lc_key`` is None), so the index's path costs
        nothing more for the scan's: the backend gets a new rank, its load now, its pass
        clamped up to vtime and a new arrival, as :meth:`_insert` would give its entry.
        """
        old = backend._lc_key
        if old is None:  # scanned, or not eligible: nothing indexed
            ranks = self._rank
            try:
                position = ranks[backend][1]  # (not .get(): a call, twice per request)
            except KeyError:
                return  # not eligible
            vtime = self._vtime
            self._arrival += 1
            ranks[backend] = (
                (backend.active + backend.shared_active) / backend.eff_weight,  # least_load
                position if position >= vtime else vtime,
                self._arrival,
                backend,
            )
            return
        entries = self._entry
        del entries[backend]
        bucket = self._buckets[old]
        bucket.live -= 1
        if len(bucket.heap) > 2 * bucket.live + 16:
            bucket.heap = [e for e in bucket.heap if entries.get(e[2]) is e]
            heapq.heapify(bucket.heap)
        self._insert(backend, least_load(backend))

    acquired = _move
    released = _move
    load_changed = _move

    def _top(self) -> tuple[_Bucket, _Entry] | None:
        """The live entry that the next pick takes, dropping stale heads on the way."""
        heap = self._heap
        buckets = self._buckets
        entries = self._entry
        while heap:
            bucket = buckets.get(heap[0])
            if bucket is None or not bucket.live:
                # An emptied bucket is dropped when its load reaches the top (kept until
                # then, so a backend moving back to that load reuses it).
                load = heapq.heappop(heap)
                if bucket is not None:  # each bucket's load is on the heap once
                    del buckets[load]
                continue
            passes = bucket.heap
            while True:
                entry = passes[0]
                if entries.get(entry[2]) is entry:
                    return bucket, entry
                heapq.heappop(passes)
        return None

    def pick(self, key: str | None, now: float) -> Backend | None:
        ranks = self._rank
        if ranks:  # scan mode: the lowest (load, pass, arrival), as the index's top would be
            load, position, _, backend = min(ranks.values())
            self._vtime = position
            self._arrival += 1
            ranks[backend] = (load, position + 1.0 / backend.eff_weight, self._arrival, backend)
            return backend
        top = self._top()
        if top is None:
            return None
        bucket, (position, _, backend) = top
        self._vtime = position
        # Its turn is taken: it queues again behind the others at this load, one stride on.
        position += 1.0 / backend.eff_weight
        self._pass[backend] = position
        self._arrival += 1
        entry = self._entry[backend] = (position, self._arrival, backend)
        heapq.heapreplace(bucket.heap, entry)  # the old entry is the heap's head
        return backend

    def take(self, key: str | None, now: float) -> Backend | None:
        """:meth:`pick` and :meth:`acquired` in one step in scan mode: the backend picked is
        ranked once, at its load with this request counted and its pass one stride on, as
        the two would rank it (one arrival number instead of two: both are above every
        other's). In index mode, the two as they are."""
        ranks = self._rank
        if not ranks:
            return super().take(key, now)
        _, position, _, backend = min(ranks.values())
        self._vtime = position
        backend.active += 1
        self._arrival += 1
        weight = backend.eff_weight
        ranks[backend] = (
            (backend.active + backend.shared_active) / weight,  # least_load
            position + 1.0 / weight,
            self._arrival,
            backend,
        )
        return backend

    def explain(self, key: str | None, now: float, limit: int | None = None) -> list[Candidate]:
        """Score: the load the backend is ranked under, :func:`least_load` as of its last
        change.
        Backends are listed as picks would take them if no load changed: lowest load first,
        and within one load in rotation order (the first is next)."""
        if self._rank:
            ranked = sorted(self._rank.values())
        else:
            entries = self._entry
            ranked = [
                (load, *entry)
                for load in sorted(self._buckets)
                for entry in sorted(e for e in self._buckets[load].heap if entries.get(e[2]) is e)
            ]
        alone = len(ranked) == 1
        out: list[Candidate] = []
        place = 0
        for n, (load, _, _, backend) in enumerate(ranked):
            if limit is not None and len(out) >= limit:
                break
            place = place + 1 if n and ranked[n - 1][0] == load else 0
            in_flight = backend.active + backend.shared_active
            why = f"{in_flight} in flight / effective weight {backend.eff_weight:.4g} = {load:.4g}"
            chosen = not out
            if alone:
                why += f"; {ONLY_ONE}"
            elif chosen:
                why += "; the lowest load, next in rotation"
            elif place:
                why += f"; {place} ahead of it in rotation at this load"
            out.append(candidate(backend, load, why, chosen))
        return out
