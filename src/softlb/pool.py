"""The pool: backend membership, rotation, and leases that count requests in flight."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from softlb import events
from softlb.backend import Backend, normalize_url, validate_max_connections, validate_weight
from softlb.balancers.base import Balancer, Candidate, balancer_by_name, candidate
from softlb.balancers.least import LeastConnections, load_of
from softlb.errors import BackendExists, InvalidBackend, NoBackendAvailable, UnknownBackend
from softlb.events import Dispatcher, Event, Hook
from softlb.queueing import QueueStats, Resolved, Ticket, WaitQueue, queue_timeout

__all__ = [
    "SHARED_READ_MAX",
    "SLOW_START_FLOOR",
    "Candidate",
    "Explanation",
    "Lease",
    "Pool",
    "PoolEvent",
    "Skipped",
]

log = logging.getLogger("softlb.pool")

#: Share of its weight a backend gets at the start of a slow-start ramp (HAProxy's
#: ``slowstart`` starts near zero; we start at 10 % so a recovering backend is not idle).
SLOW_START_FLOOR: Final = 0.1

#: Number of steps a slow-start ramp is taken in: effective weights are recomputed (and the
#: balancer rebuilt) at most this many times per ramp. HAProxy updates its weights about
#: every second of the ramp; 20 steps keep a 1-minute ramp within 5 % of a smooth line.
SLOW_START_STEPS: Final = 20

#: Most backends in rotation for which every pick reads the other processes' in-flight
#: counts (:attr:`Pool.shared_in_flight`): the read costs a request about 16,000 instructions
#: more at two backends (a tenth of the event loop's whole request) and some 5,000 more per
#: further backend, so a larger pool keeps the state thread's refresh, every 0.1 s. Least
#: connections scans up to as many (its ``SCAN_MAX``).
SHARED_READ_MAX: Final = 8

#: How many times a retry asks the balancer again before scanning for a backend not yet tried.
_REPICKS: Final = 3

#: Removed backends with requests still in flight that :meth:`Pool.explain` keeps listing (as
#: "removed"), in the order they were removed. Beyond it the oldest are forgotten; one that has
#: finished its requests is dropped at the next explain.
_REMOVED_KEPT: Final = 64


@dataclass(frozen=True)
class PoolEvent:
    """Something that happened to a pool, as :meth:`Pool.subscribe` listeners get it: the one
    event stream of a pool, of which :meth:`Pool.on` hooks get the :class:`~softlb.events.Event`
    view on the dispatcher's thread.

    ``kind`` is one of :data:`softlb.events.KNOWN` (``"added"``, ``"removed"``, ``"drained"``,
    ``"health"``, ``"ejected"``, ``"retried"``, ``"no_backend"``, and the per-request
    ``"access"`` and ``"failure"``); ``backend`` the :class:`Backend` concerned (``None`` for
    ``no_backend``, or a URL that is no longer a member); ``url`` its URL; ``detail`` the text
    hooks get (``"down: HTTP 500"``); ``reason`` the bare reason a ``health`` or ``failure``
    event carries (``"HTTP 500"``, ``"up"``, ``"timeout"``), else the same as ``detail``.
    """

    kind: str
    backend: Backend | None
    detail: str = ""
    reason: str = ""
    url: str | None = None


Listener = Callable[[PoolEvent], None]

#: What :meth:`Pool.subscribe` listens to when no kinds are named.
_DEFAULT_KINDS: Final = frozenset(events.KINDS) - {events.NO_BACKEND}
#: Kinds published while the pool's lock is held (a request that found nothing in rotation):
#: they go to the dispatcher only, as a listener called there could not use the pool.
_HOOKS_ONLY: Final = frozenset({events.NO_BACKEND})


@dataclass(frozen=True)
class Skipped:
    """A backend :meth:`Pool.explain` found out of rotation, and why.

    ``reason`` is ``"draining"``, ``"ejected (passive): <detail>"`` (taken out by failed
    requests), ``"unhealthy: <detail>"`` (the reason it left rotation: a probe's status, a
    timeout, another process's verdict) or ``"removed"`` (no longer a member, with requests
    still in flight). ``in_flight`` counts its requests in flight, as for a candidate.
    """

    url: str
    reason: str
    in_flight: int = 0

    def as_dict(self) -> dict[str, object]:
        """The skipped backend as a JSON-ready mapping."""
        return {"url": self.url, "reason": self.reason, "in_flight": self.in_flight}


@dataclass(frozen=True)
class Explanation:
    """What :meth:`Pool.explain` found: the backend the next request would get, and why.

    ``choice`` is the URL the next :meth:`Pool.lease` with the same key would pick (``None``
    when nothing is in rotation); ``strategy`` the balancer's name; ``candidates`` every
    backend in rotation with its score, ``choice`` first; ``skipped`` every member out of
    rotation, and recently removed backends still serving requests, with the reason.
    ``summary`` says the strategy's rule in one line; ``key`` is the request key explained;
    ``omitted`` counts candidates left out by a ``limit``.
    """

    choice: str | None
    strategy: str
    candidates: tuple[Candidate, ...]
    skipped: tuple[Skipped, ...]
    summary: str = ""
    key: str | None = None
    omitted: int = 0

    def as_dict(self) -> dict[str, object]:
        """The explanation as a JSON-ready mapping (what ``GET /_softlb/explain`` answers)."""
        return {
            "choice": self.choice,
            "strategy": self.strategy,
            "summary": self.summary,
            "key": self.key,
            "candidates": [c.as_dict() for c in self.candidates],
            "omitted": self.omitted,
            "skipped": [s.as_dict() for s in self.skipped],
        }


class Pool:
    """A thread-safe set of backends and the balancer that chooses among them.

    ``servers`` are URLs or :class:`Backend` objects; ``balancer`` a :class:`Balancer`, a
    strategy name, or ``None`` for :class:`~softlb.balancers.LeastConnections`.
    ``slow_start`` (seconds, 0 = off) ramps a backend that joins later or comes back to
    health from 10 % of its weight to all of it.

    Request routing::

        with pool.lease() as backend:   # picks, and counts the request in flight
            call(backend.url)           # an exception here records a failure

    Backends with a ``max_connections`` are skipped while full; when every eligible one is,
    ``lease(wait=seconds)`` waits in the pool's FIFO queue (:mod:`softlb.queueing`; also
    :meth:`try_lease`, :meth:`enqueue` and :func:`~softlb.queueing.lease_async`).

    Observing::

        pool.explain()                  # what the next pick would be, and why (an Explanation)
        pool.on("health", callback)     # callback(Event) on a background thread, see on()

    Locking: ``_lock`` protects the membership, the eligible tuple, every backend's statistics,
    the balancer's state and the explain() records (``_notes``, ``_removed``). Picks never wait
    on I/O: listeners run after the lock is released, and hooks on the dispatcher's thread.
    """

    def __init__(
        self,
        servers: Iterable[str | Backend] = (),
        *,
        balancer: Balancer | str | None = None,
        slow_start: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(servers, (str, bytes)):
            raise TypeError(
                f"servers must be a list of URLs or Backends, not one {type(servers).__name__}:"
                f" write Pool([{servers!r}])"
            )
        if isinstance(slow_start, bool) or not isinstance(slow_start, (int, float)):
            raise TypeError(f"slow_start must be a number of seconds, got {slow_start!r}")
        if slow_start < 0:
            raise ValueError(f"slow_start must be >= 0 seconds, got {slow_start}")
        if balancer is None:
            balancer = LeastConnections()
        elif isinstance(balancer, str):
            balancer = balancer_by_name(balancer)
        elif isinstance(balancer, type):
            raise TypeError(
                f"balancer must be a strategy or its name, got the class {balancer.__name__}:"
                f" write {balancer.__name__}()"
            )
        self.balancer: Balancer = balancer
        self.slow_start = float(slow_start)
        self.clock = clock
        #: Health a backend gets when it is added; a health checker whose initial state is
        #: "down" sets this to False so that a new backend waits for its probes.
        self.admit_healthy = True
        self._lock = threading.Lock()
        # protected by _lock:
        self._members: dict[str, Backend] = {}
        self._eligible: tuple[Backend, ...] = ()
        self._ramp_next: float | None = None  # when effective weights must be recomputed
        # The event stream's subscribers, (kinds, listener): replaced, never mutated, so
        # publish() reads them without the lock. The dispatcher of the hooks is one of them.
        self._subscribers: tuple[tuple[frozenset[str], Listener], ...] = ()
        # Why each backend out of rotation for health is out: (detail, passive ejection).
        self._notes: dict[Backend, tuple[str, bool]] = {}
        # Removed backends that still had requests in flight, oldest first (an ordered set).
        self._removed: dict[Backend, None] = {}
        # Hooks (see on()): replaced, never mutated, so emitters read them without the lock.
        self._hooks: tuple[Hook, ...] = ()
        self._hook_kinds: frozenset[str] = frozenset()  # the kinds some hook listens to
        self._wanted: frozenset[str] = frozenset()  # the kinds some subscriber listens to
        self._dispatcher: Dispatcher | None = None
        # The dispatcher's subscription (no reference to the pool: collecting it stops it).
        self._forward: Listener = _forwarder(weakref.ref(self))
        #: Called under the lock with a backend whose counts just changed (a lease taken or
        #: released); shared state points it at the host's in-flight table.
        self.count_sink: Callable[[Backend], None] | None = None
        #: Requests the *other* processes of this host have in flight on a backend, counted
        #: against its ``max_connections`` (``None``: this process alone); shared state points
        #: it at the host's in-flight table. Called under the lock, only for limited backends.
        self.others_in_flight: Callable[[Backend], int] | None = None
        #: Requests every *other* process has in flight on each of some backends, in order
        #: (this host's read now, other hosts' as last polled): read for the eligible
        #: backends at every pick, so that host-wide least connections sees the other
        #: workers' requests as they are, not as a snapshot up to a tick old that would hold
        #: a request that has ended against its backend for the whole tick (SPEC §7: counts
        #: exact within a host). Up to :data:`SHARED_READ_MAX` backends in rotation.
        #: ``None``: this process alone, or loads refreshed by :meth:`refresh` only.
        self.shared_in_flight: Callable[[tuple[Backend, ...]], Sequence[int]] | None = None
        self._queue = WaitQueue()  # requests waiting for a backend below its limit
        self._waiting = self._queue.tickets  # tested on every lease and release
        self._limited = False  # whether a backend in rotation has a max_connections
        for server in servers:
            backend = self._coerce(server)
            if backend.url in self._members:
                raise BackendExists(f"backend {backend.url} is listed twice")
            self._members[backend.url] = backend
        with self._lock:
            self._rebuild(self.clock())

    # -- membership ----------------------------------------------------------------------

    def _coerce(self, server: str | Backend, weight: int | None = None) -> Backend:
        if isinstance(server, Backend):
            if weight is not None and weight != server.weight:
                raise InvalidBackend("give the weight on the Backend, not twice")
            backend = server
        else:
            backend = Backend(server, 1 if weight is None else weight)
        if backend._pool_id is not None and backend._pool_id != id(self):
            raise InvalidBackend(f"backend {backend.url} already belongs to another pool")
        backend._pool_id = id(self)
        return backend

    @property
    def backends(self) -> tuple[Backend, ...]:
        """Every member, in the order they were added (a snapshot)."""
        return tuple(self._members.values())

    @property
    def eligible(self) -> tuple[Backend, ...]:
        """The members in rotation: healthy and not draining (a snapshot)."""
        return self._eligible

    def get(self, url: str) -> Backend:
        """The member with this URL (in any spelling :func:`normalize_url` accepts)."""
        backend = self._members.get(url) or self._members.get(_normalized(url))
        if backend is None:
            raise UnknownBackend(f"no backend {url} in the pool")
        return backend

    def __contains__(self, url: object) -> bool:
        if isinstance(url, Backend):
            return self._members.get(url.url) is url
        return isinstance(url, str) and (url in self._members or _normalized(url) in self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[Backend]:
        return iter(self.backends)

    def add(self, server: str | Backend, weight: int | None = None) -> Backend:
        """Add a backend and return it; it enters rotation at once (ramping if slow start is on).

        Raises :class:`~softlb.errors.BackendExists` if the URL is already a member and
        :class:`~softlb.errors.InvalidBackend` for a bad URL or weight.
        """
        with self._lock:
            backend = self._coerce(server, weight)
            if backend.url in self._members:
                if self._members[backend.url] is not backend:
                    backend._pool_id = None
                raise BackendExists(f"backend {backend.url} is already in the pool")
            now = self.clock()
            backend.healthy = self.admit_healthy
            self._members[backend.url] = backend
            self._removed.pop(backend, None)
            self._start_ramp(backend, now)
            self._rebuild(now)
        self.publish(events.ADDED, backend, f"weight {backend.weight}")
        return backend

    def remove(self, url: str | Backend) -> Backend:
        """Remove a backend and return it. Requests it is serving finish and are counted."""
        with self._lock:
            key = url.url if isinstance(url, Backend) else url
            backend = self._members.pop(key, None) or self._members.pop(_normalized(key), None)
            if backend is None:
                raise UnknownBackend(f"no backend {key} in the pool")
            self._rebuild(self.clock())
            backend._pool_id = None
            self._notes.pop(backend, None)
            in_flight = backend.active
            if in_flight > 0:
                self._removed[backend] = None
                if len(self._removed) > _REMOVED_KEPT:
                    del self._removed[next(iter(self._removed))]
        self.publish(events.REMOVED, backend, _in_flight_text(in_flight))
        return backend

    def drain(self, url: str | Backend, draining: bool = True) -> Backend:
        """Take a backend out of rotation (or put it back with ``draining=False``).

        Like HAProxy's ``drain`` state: it stays a member, its in-flight requests finish and
        it gets no new ones.
        """
        with self._lock:
            backend = self.get(url.url if isinstance(url, Backend) else url)
            if backend.draining == draining:
                return backend
            backend.draining = draining
            now = self.clock()
            if not draining:
                self._start_ramp(backend, now)
            self._rebuild(now)
        detail = "draining" if draining else "ready"
        self.publish(events.DRAINED, backend, detail)
        return backend

    def set_weight(self, url: str | Backend, weight: int) -> Backend:
        """Change a member's weight in place and return it.

        The backend keeps its counters, its requests in flight, its health and its latency
        estimate (removing and re-adding it would lose them); the balancer gets a new
        snapshot, so the next pick uses the new weight. A backend in a slow-start ramp keeps
        ramping, towards the new weight. Raises :class:`~softlb.errors.UnknownBackend` and
        :class:`~softlb.errors.InvalidBackend` for a bad weight.
        """
        weight = validate_weight(weight)
        with self._lock:
            backend = self.get(url.url if isinstance(url, Backend) else url)
            if backend.weight == weight:
                return backend
            backend.weight = weight
            if backend._ramp_from is None:
                backend.eff_weight = float(weight)
            self._rebuild(self.clock())
        return backend

    def set_max_connections(self, url: str | Backend, limit: int | None) -> Backend:
        """Set a member's ``max_connections`` (``None``: no limit) and return it; requests
        waiting in the queue get the room a higher limit makes. Raises
        :class:`~softlb.errors.InvalidBackend` for a limit that is not an integer >= 1."""
        limit = validate_max_connections(limit)
        with self._lock:
            backend = self.get(url.url if isinstance(url, Backend) else url)
            backend.max_connections = limit
            self._rebuild(self.clock())
        return backend

    def set_healthy(
        self, url: str | Backend, healthy: bool, reason: str = "", *, passive: bool = False
    ) -> bool:
        """Put a backend in or out of rotation for health reasons; return whether it changed.

        Health checkers call this; ``reason`` is passed on to listeners and shown by
        :meth:`explain`. ``passive=True`` says the backend is taken out on the evidence of
        failed requests (an ejection): hooks hear an ``ejected`` event besides ``health``.
        """
        with self._lock:
            backend = url if isinstance(url, Backend) else self._members.get(_normalized(url))
            if backend is None or self._members.get(backend.url) is not backend:
                return False
            if backend.healthy == healthy:
                if not healthy and reason and backend not in self._notes:
                    self._notes[backend] = (reason, passive)
                return False
            backend.healthy = healthy
            if healthy:
                self._notes.pop(backend, None)
                # Back in rotation: it starts a fresh run, so passive checks need `fall` new
                # failures in a row, not one more on top of those that took it out.
                backend.consecutive_failures = 0
            else:
                self._notes[backend] = (reason or "down", passive)
            now = self.clock()
            if healthy:
                self._start_ramp(backend, now)
            self._rebuild(now)
        verdict = "up" if healthy else "down"
        self.publish(
            events.HEALTH,
            backend,
            f"{verdict}: {reason}" if reason else verdict,
            reason=reason or verdict,
        )
        if passive and not healthy:
            self.publish(events.EJECTED, backend, reason)
        return True

    # -- snapshots and slow start --------------------------------------------------------

    def _start_ramp(self, backend: Backend, now: float) -> None:
        if self.slow_start > 0:
            backend._ramp_from = now

    def _rebuild(self, now: float) -> None:
        """Recompute effective weights and eligibility and hand them to the balancer."""
        ramp_next: float | None = None
        window = self.slow_start
        eligible = []
        for backend in self._members.values():
            if backend._ramp_from is not None:
                elapsed = now - backend._ramp_from
                if elapsed >= window:
                    backend._ramp_from = None
                    backend.eff_weight = float(backend.weight)
                else:
                    share = SLOW_START_FLOOR + (1 - SLOW_START_FLOOR) * elapsed / window
                    backend.eff_weight = backend.weight * share
                    step = now + window / SLOW_START_STEPS
                    ramp_next = step if ramp_next is None else min(ramp_next, step)
            if backend.healthy and not backend.draining:
                eligible.append(backend)
        self._ramp_next = ramp_next
        self._eligible = tuple(eligible)
        self._limited = any(b.max_connections is not None for b in eligible)
        self.balancer.rebuild(self._eligible, now)
        if self._waiting:  # room may have appeared, or a waiter's last candidate gone
            self._serve(now, rebuilt=True)

    def refresh(self) -> None:
        """Hand the balancer a fresh snapshot, after loads changed outside the pool's view
        (another process's in-flight counts). Only a strategy that indexes loads needs it;
        the others read loads at pick time (rebuilding a hash ring every 100 ms would not)."""
        if not self.balancer.indexes_load:
            if self._waiting:  # another process's requests finished: maybe room for a waiter
                with self._lock:
                    self._serve(self.clock())
            return
        with self._lock:
            self._rebuild(self.clock())

    # -- leases --------------------------------------------------------------------------

    def lease(
        self,
        key: str | None = None,
        *,
        exclude: Collection[Backend] = (),
        prefer: Backend | None = None,
        wait: float = 0.0,
    ) -> Lease:
        """Pick a backend and count one request in flight on it until the lease is released.

        Use it as a context manager: the block gets the :class:`Backend`; leaving the block
        releases the lease and records success, or failure if the block raised. ``key`` feeds
        the hashing strategies (a client address, a path, a header value). ``exclude`` lists
        backends already tried by this request, so a retry goes elsewhere when it can.
        ``prefer`` (a sticky session's backend) is leased when it is in rotation, not
        excluded and not full; otherwise the strategy picks as usual.

        A backend at its ``max_connections`` is skipped. When every eligible backend is
        full, the call waits in the pool's queue, behind the requests that came first, up to
        ``wait`` seconds, then raises :class:`~softlb.errors.QueueTimeout` (at once when
        ``wait`` is 0). Raises :class:`~softlb.errors.NoBackendAvailable` when nothing is in
        rotation (or everything in rotation is excluded), also while waiting.
        """
        with self._lock:
            now = self.clock()
            if self._ramp_next is not None and now >= self._ramp_next:
                self._rebuild(now)
            if self.shared_in_flight is not None:
                self._read_shared_loads(self.shared_in_flight)
            if prefer is None and not self._limited:  # the common case, kept short
                backend = self.balancer.pick(key, now)
                if exclude and backend is not None and backend in exclude:
                    backend = self._pick_excluding(key, now, exclude)
            else:
                if self._waiting:
                    self._serve(now)  # room goes to the requests that came first
                backend = self._choose(key, now, exclude, prefer)
            if backend is not None:
                backend.active += 1
                self.balancer.acquired(backend)
                if self.count_sink is not None:
                    self.count_sink(backend)
                return Lease(self, backend, now)
            members = len(self._members)
            nothing_eligible = not self._eligible
            if not self._has_candidates(exclude):
                ready = None
            elif wait <= 0:
                raise queue_timeout(0)
            else:
                ready = threading.Event()
                ticket = Ticket(
                    self,
                    key,
                    exclude=exclude,
                    prefer=prefer,
                    callback=_setter(ready),
                    queued_at=now,
                )
                self._queue.push(ticket)
        if ready is None:  # raised here, not under the lock: hooks may hear of it
            raise self._unavailable(members, nothing_eligible, bool(exclude))
        ready.wait(wait)
        if ticket.cancel(timed_out=True):
            raise queue_timeout(wait)
        return ticket.result()

    def try_lease(
        self,
        key: str | None = None,
        *,
        exclude: Collection[Backend] = (),
        prefer: Backend | None = None,
    ) -> Lease | None:
        """:meth:`lease` that never waits: ``None`` when every eligible backend is full.
        Requests already waiting in the queue are served first. Raises
        :class:`~softlb.errors.NoBackendAvailable` when nothing is in rotation."""
        lock = self._lock  # acquire/release: a ``with`` costs as much as the pick (per request)
        lock.acquire()
        try:
            now = self.clock()
            if self.shared_in_flight is not None:
                self._read_shared_loads(self.shared_in_flight)
            if (
                prefer is None
                and not exclude
                and not self._limited
                and not self._waiting
                and (self._ramp_next is None or now < self._ramp_next)
            ):  # the usual request (_try's rules, with nothing to skip): one call picks
                backend = self.balancer.take(key, now)
                if backend is not None:
                    if self.count_sink is not None:
                        self.count_sink(backend)
                    return Lease(self, backend, now)
            return self._try(key, exclude, prefer, now)
        finally:
            lock.release()

    def enqueue(
        self,
        callback: Resolved,
        key: str | None = None,
        *,
        exclude: Collection[Backend] = (),
        prefer: Backend | None = None,
    ) -> Ticket:
        """Ask for a lease without blocking, for an engine with its own event loop.

        Returns a :class:`~softlb.queueing.Ticket`. When a backend has room the lease is taken
        at once: the ticket is ``done`` and ``callback`` is not called. Otherwise the ticket
        waits its turn and ``callback(ticket)`` is called once it is resolved (leased, or
        failed because nothing it may use is in rotation any more), on the thread that made
        room, *with the pool's lock held*: it must only hand the ticket on (set an event,
        ``loop.call_soon_threadsafe``), never call the pool. ``ticket.cancel()`` gives up (a
        timeout); see :func:`~softlb.queueing.lease_async`. Raises
        :class:`~softlb.errors.NoBackendAvailable` when nothing is in rotation.
        """
        with self._lock:
            now = self.clock()
            if self.shared_in_flight is not None:
                self._read_shared_loads(self.shared_in_flight)
            lease = self._try(key, exclude, prefer, now)
            ticket = Ticket(
                self, key, exclude=exclude, prefer=prefer, callback=callback, queued_at=now
            )
            if lease is not None:
                ticket.done, ticket.lease = True, lease
            else:
                self._queue.push(ticket)
            return ticket

    def _try(
        self, key: str | None, exclude: Collection[Backend], prefer: Backend | None, now: float
    ) -> Lease | None:
        """The lease if a backend has room, else ``None``; the caller holds the lock."""
        if self._ramp_next is not None and now >= self._ramp_next:
            self._rebuild(now)
        if self._waiting:
            self._serve(now)  # room goes to the requests that came first
        if prefer is None and not exclude:  # the usual request: _choose's rules, fewer calls
            backend = self.balancer.pick(key, now)
            if backend is not None and backend.max_connections is not None and self._full(backend):
                backend = self._pick_free(key, now, exclude)
        else:
            backend = self._choose(key, now, exclude, prefer)
        if backend is not None:
            return self._take(backend, now)
        if not self._has_candidates(exclude):
            raise self._unavailable(len(self._members), not self._eligible, bool(exclude))
        return None

    @property
    def queue_length(self) -> int:
        """Requests waiting now for a backend below its ``max_connections``."""
        return len(self._queue)

    def queue_stats(self) -> QueueStats:
        """The queue's figures: waiting now, the oldest wait, and counters (see
        :class:`~softlb.queueing.QueueStats`)."""
        with self._lock:
            return self._queue.stats(self.clock())

    # The queue and the limits; every method below is called with the lock held.

    def _read_shared_loads(self, read: Callable[[tuple[Backend, ...]], Sequence[int]]) -> None:
        """Read the other processes' in-flight counts of every eligible backend (see
        :attr:`shared_in_flight`); the strategy re-ranks those that changed."""
        eligible = self._eligible
        if len(eligible) > SHARED_READ_MAX:
            return  # a large pool: the state thread's refresh, every tick (a read per pick
            # would cost O(backends) where least connections' index picks in O(log n))
        try:
            counts = read(eligible)
        except Exception:  # the table unreadable (a store gone): the last counts serve on
            log.debug("reading the other processes' in-flight counts failed", exc_info=True)
            return
        changed = self.balancer.load_changed
        for backend, others in zip(eligible, counts, strict=True):
            if others != backend.shared_active:
                backend.shared_active = others
                changed(backend)

    def _full(self, backend: Backend) -> bool:
        """Whether ``backend`` is at its ``max_connections`` (counting this host's other
        processes when :attr:`others_in_flight` is set)."""
        limit = backend.max_connections
        if limit is None:
            return False
        used = backend.active
        if used < limit and self.others_in_flight is not None:
            used += self.others_in_flight(backend)
        return used >= limit

    def _has_candidates(self, exclude: Collection[Backend]) -> bool:
        """Whether a backend in rotation and not excluded exists (full, when no pick found it)."""
        return any(b not in exclude for b in self._eligible)

    def _choose(
        self,
        key: str | None,
        now: float,
        exclude: Collection[Backend],
        prefer: Backend | None,
    ) -> Backend | None:
        """``prefer`` if it may take the request, else the strategy's pick among the backends
        not excluded and not full; ``None`` when there is none."""
        if (
            prefer is not None
            and prefer.healthy
            and not prefer.draining
            and prefer._pool_id == id(self)
            and prefer not in exclude
            and not self._full(prefer)
        ):
            return prefer
        backend = self.balancer.pick(key, now)
        if backend is not None and (
            (exclude and backend in exclude)
            or (backend.max_connections is not None and self._full(backend))
        ):
            return self._pick_free(key, now, exclude)
        return backend

    def _pick_free(
        self, key: str | None, now: float, exclude: Collection[Backend]
    ) -> Backend | None:
        """The strategy's pick among the backends neither excluded nor full."""
        skip = {b for b in self._eligible if b in exclude or self._full(b)}
        if len(skip) >= len(self._eligible):
            return None
        return self._pick_excluding(key, now, skip)

    def _take(self, backend: Backend, now: float) -> Lease:
        backend.active += 1
        self.balancer.acquired(backend)
        if self.count_sink is not None:
            self.count_sink(backend)
        return Lease(self, backend, now)

    def _serve(self, now: float, *, rebuilt: bool = False) -> None:
        """Lease the backends with room to the waiting tickets, oldest first; after a rebuild
        also fail the tickets left with no backend in rotation."""
        room = any(not self._full(b) for b in self._eligible)
        if not room and not rebuilt:
            return
        for ticket in self._queue.waiting():
            if not room and not rebuilt:
                break
            backend = self._choose(ticket.key, now, ticket.exclude, ticket.prefer) if room else None
            if backend is not None:
                self._queue.remove(ticket, now)
                ticket._resolve(self._take(backend, now), None)
                room = any(not self._full(b) for b in self._eligible)
            elif rebuilt and not self._has_candidates(ticket.exclude):
                self._queue.remove(ticket, now)
                error = self._unavailable(len(self._members), not self._eligible, True)
                ticket._resolve(None, error)

    def _cancel(self, ticket: Ticket, timed_out: bool) -> bool:
        with self._lock:
            return self._queue.remove(ticket, self.clock(), timed_out=timed_out)

    def _unavailable(
        self, members: int, nothing_eligible: bool, excluded: bool
    ) -> NoBackendAvailable:
        """The error for a lease that found no backend; hooks hear ``no_backend`` when nothing
        at all was in rotation (not when this request had tried everything there was)."""
        if not members:
            message = "no backend available"
        else:
            message = "no backend in rotation" + (
                " that this request has not tried already"
                if excluded and not nothing_eligible
                else ""
            )
        if nothing_eligible and events.NO_BACKEND in self._wanted:
            detail = f"{members} members, none in rotation" if members else "the pool is empty"
            self._forward(PoolEvent(events.NO_BACKEND, None, detail, detail))  # hooks only
        return NoBackendAvailable(message)

    def _pick_excluding(
        self, key: str | None, now: float, exclude: Collection[Backend]
    ) -> Backend | None:
        failover = getattr(self.balancer, "pick_excluding", None)
        if failover is not None:  # a strategy with its own rule (consistent hashing's ring)
            chosen: Backend | None = failover(key, now, exclude)
            if chosen is not None:
                return chosen
        for _ in range(_REPICKS):
            backend = self.balancer.pick(key, now)
            if backend is not None and backend not in exclude:
                return backend
        # The strategy keeps choosing tried backends (least connections' least loaded one):
        # take the least loaded of the rest, never merely the first in the list.
        rest = [b for b in self._eligible if b not in exclude]
        return min(rest, key=load_of) if rest else None

    def _release(self, lease: Lease, failure: str | None, used: bool = True) -> None:
        backend = lease.backend
        lock = self._lock  # acquire/release rather than ``with``: this runs per request
        lock.acquire()
        try:
            now = self.clock()
            backend.active -= 1
            if used:  # not a lease given up before its request went out
                backend.requests += 1
                if failure is None:
                    backend.consecutive_failures = 0
                    backend.observe_latency(now - lease.started, now)
                else:
                    backend.failures += 1
                    backend.consecutive_failures += 1
            if backend._pool_id == id(self):  # not if it was removed (and maybe joined another)
                self.balancer.released(backend)
            if self.count_sink is not None:
                self.count_sink(backend)
            if self._waiting:
                self._serve(now)
        finally:
            lock.release()
        if failure is not None and events.FAILURE in self._wanted:
            self.publish(events.FAILURE, backend, failure)

    @property
    def in_flight(self) -> int:
        """Requests in flight across every member."""
        return sum(b.active for b in self._members.values())

    def after_fork(self) -> None:
        """Make the pool usable in a child process made by ``fork()``.

        A lock another thread held at the moment of the fork stays locked in the child for
        ever; the child gets a fresh one (the logging module does the same for its handlers).
        """
        self._lock = threading.Lock()
        self._queue = WaitQueue()  # the parent's waiters are not this process's
        self._waiting = self._queue.tickets
        if self._dispatcher is not None:
            self._dispatcher.after_fork()

    # -- events --------------------------------------------------------------------------

    def subscribe(
        self, listener: Listener, kinds: Iterable[str] | None = None
    ) -> Callable[[], None]:
        """Call ``listener(event)`` with each :class:`PoolEvent` of ``kinds`` (default: every
        kind of :data:`softlb.events.KINDS`; the per-request ``"access"`` and ``"failure"``
        only when named); returns an unsubscribe function.

        This is the pool's one event stream: its own changes and what adapters
        :meth:`publish` reach every subscriber, in the order they happened. Listeners run on
        the thread that caused the event, after the pool's lock is released; keep them quick
        (the health checker, shared state and the proxy's transport subscribe here). An
        exception in one is logged and not propagated. :meth:`on` hooks are delivered by one
        such subscriber, the dispatcher, on a thread of its own; ``"no_backend"``, which
        happens under the pool's lock, goes to hooks only.
        """
        wanted = _DEFAULT_KINDS if kinds is None else frozenset(kinds)
        unknown = sorted(wanted - set(events.KNOWN))
        if unknown:
            raise ValueError(f"unknown event {unknown[0]!r}; known: {', '.join(events.KNOWN)}")
        if wanted & _HOOKS_ONLY:
            raise ValueError(
                "no_backend is published under the pool's lock: listen with Pool.on(), "
                "whose callbacks run on the dispatcher's thread"
            )
        entry = (wanted, listener)
        with self._lock:
            self._set_subscribers((*self._subscribers, entry))

        def unsubscribe() -> None:
            with self._lock:
                self._set_subscribers(tuple(e for e in self._subscribers if e is not entry))

        return unsubscribe

    def _set_subscribers(self, subscribers: tuple[tuple[frozenset[str], Listener], ...]) -> None:
        """Install a new subscriber tuple; the caller holds the lock."""
        self._subscribers = subscribers
        kinds: set[str] = set()
        for wanted, _ in subscribers:
            kinds |= wanted
        self._wanted = frozenset(kinds)

    # -- hooks ---------------------------------------------------------------------------

    def on(self, event: str, callback: Callable[[Event], object]) -> Callable[[], None]:
        """Call ``callback(Event)`` for every event of kind ``event``; return an unsubscribe
        function.

        ``event`` is one of :data:`softlb.events.KNOWN` — ``"added"``, ``"removed"``,
        ``"drained"``, ``"health"``, ``"ejected"``, ``"retried"``, ``"no_backend"``, and the
        per-request ``"access"`` and ``"failure"`` — or ``"*"`` for all but the per-request
        ones. Callbacks run one at a time, in the order events happened, on the pool's
        dispatcher thread (started here, once), never on the thread that caused the event;
        an exception in one is logged to ``softlb.events`` and the others still run. When
        :data:`~softlb.events.QUEUE_SIZE` events wait for a slow callback, newer ones are
        dropped and counted in :attr:`events_dropped`, so nothing waits for a callback. After
        unsubscribing, the callback gets no event, even one already queued.

        The dispatcher is one subscriber of the pool's event stream (:meth:`subscribe`, the
        synchronous interface the health checker and shared state use).
        """
        if event != events.ALL and event not in events.KNOWN:
            raise ValueError(
                f"unknown event {event!r}; known: {', '.join(events.KNOWN)}, or '*' for all"
            )
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        hook = Hook(event, callback)
        with self._lock:
            dispatcher = self._dispatcher
            if dispatcher is None:
                dispatcher = self._dispatcher = Dispatcher()
                # Stop the thread when the pool is collected; it holds no reference to the pool.
                weakref.finalize(self, dispatcher.stop, 0).atexit = False
            self._set_hooks((*self._hooks, hook))
        dispatcher.start()

        def unsubscribe() -> None:
            hook.active = False
            with self._lock:
                self._set_hooks(tuple(h for h in self._hooks if h is not hook))

        return unsubscribe

    def _set_hooks(self, hooks: tuple[Hook, ...]) -> None:
        """Install a new hook tuple, and the dispatcher's subscription to the kinds they want;
        the caller holds the lock."""
        kinds = {h.kind for h in hooks}
        if events.ALL in kinds:  # every kind but the per-request ones named explicitly
            kinds = (kinds - {events.ALL}) | set(events.KINDS)
        self._hooks = hooks
        self._hook_kinds = frozenset(kinds)
        forward = self._forward
        others = tuple(e for e in self._subscribers if e[1] is not forward)
        self._set_subscribers((*others, (self._hook_kinds, forward)) if kinds else others)

    def wants(self, kind: str) -> bool:
        """Whether a subscriber or hook listens to ``kind``: an adapter checks it before
        building an event it would publish per request."""
        return kind in self._wanted

    def publish(
        self,
        kind: str,
        backend: Backend | str | None = None,
        detail: str = "",
        *,
        reason: str = "",
    ) -> None:
        """Put an event on the pool's stream (see :meth:`subscribe` and :meth:`on`); never
        waits for a hook.

        The pool publishes its own changes; adapters publish what only they see — the proxy
        ``"retried"`` and ``"access"``. ``backend`` is a member or its URL. Costs one set
        lookup when nothing listens to ``kind``.
        """
        if kind not in self._wanted:
            if kind not in events.KNOWN:
                raise ValueError(f"unknown event {kind!r}; known: {', '.join(events.KNOWN)}")
            return
        if isinstance(backend, str):
            url: str | None = backend
            backend = self._members.get(backend) or self._members.get(_normalized(backend))
        else:
            url = backend.url if backend is not None else None
        event = PoolEvent(kind, backend, detail, reason or detail, url)
        for wanted, listener in self._subscribers:
            if kind in wanted:
                try:
                    listener(event)
                except Exception:  # a listener must never break the pool
                    log.exception("pool listener %r failed", listener)

    def flush_events(self, timeout: float | None = 5.0) -> bool:
        """Wait until every event published so far has reached its hooks; ``False`` if that
        took longer than ``timeout`` seconds (a callback is stuck)."""
        dispatcher = self._dispatcher
        return True if dispatcher is None else dispatcher.flush(timeout)

    @property
    def events_dropped(self) -> int:
        """Events dropped because hooks fell :data:`~softlb.events.QUEUE_SIZE` behind."""
        dispatcher = self._dispatcher
        return 0 if dispatcher is None else dispatcher.dropped

    def close(self, timeout: float | None = 5.0) -> None:
        """Deliver the events queued for hooks, then stop the dispatcher thread (waiting up to
        ``timeout`` seconds). Hooks stay subscribed: a later event starts the thread again.
        The pool itself keeps working; idempotent."""
        dispatcher = self._dispatcher
        if dispatcher is not None:
            dispatcher.stop(timeout)

    # -- explain -------------------------------------------------------------------------

    def explain(self, key: str | None = None, *, limit: int | None = None) -> Explanation:
        """What the balancer would pick for a request now, and why; changes nothing.

        Every backend in rotation is a candidate with its score (what the strategy compares:
        load, running score, turn, probability, cost or ring distance; each candidate's
        ``why`` says it in words), the one the next :meth:`lease` with this ``key`` would get
        first and ``chosen``. Every member out of rotation is listed as skipped, with the
        reason; so are removed backends still finishing requests. ``limit`` caps the number
        of candidates listed (the choice is always among them).

        The next pick is the same whether or not explain() ran: a strategy's position, running
        scores and random generator are read, or saved and put back, never advanced.
        """
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        balancer = self.balancer
        with self._lock:
            now = self.clock()
            if self._ramp_next is not None and now >= self._ramp_next:
                self._rebuild(now)  # as the next lease would, so that it explains that lease
            eligible = self._eligible
            try:
                candidates = balancer.explain(key if balancer.uses_key else None, now, limit)
                summary = f"{balancer.name}: {balancer.rule}" if balancer.rule else balancer.name
            except NotImplementedError:
                shown = eligible if limit is None else eligible[:limit]
                candidates = [candidate(b, None, "not scored by this strategy") for b in shown]
                summary = f"{balancer.name}: this strategy does not explain its choices"
            skipped = self._skipped()
        if not eligible:
            why = "every backend is skipped" if skipped else "the pool is empty"
            summary = f"nothing in rotation: {why}"
        choice = next((c.url for c in candidates if c.chosen), None)
        return Explanation(
            choice=choice,
            strategy=balancer.name,
            candidates=tuple(candidates),
            skipped=skipped,
            summary=summary,
            key=key,
            omitted=max(len(eligible) - len(candidates), 0),
        )

    def _skipped(self) -> tuple[Skipped, ...]:
        """Members out of rotation and removed backends still busy, with why; under the lock."""
        out = []
        for backend in self._members.values():
            if backend.healthy and not backend.draining:
                continue
            if backend.draining:
                reason = "draining"
            else:
                detail, passive = self._notes.get(backend, ("", False))
                if passive:
                    reason = "ejected (passive): " + detail.removeprefix("passive: ")
                else:
                    reason = "unhealthy: " + (detail or "no successful health check yet")
            out.append(Skipped(backend.url, reason, backend.active + backend.shared_active))
        for backend in list(self._removed):
            if backend.active <= 0 or backend._pool_id is not None:  # done, or joined a pool
                del self._removed[backend]
            else:
                out.append(Skipped(backend.url, "removed", backend.active))
        return tuple(out)

    def __repr__(self) -> str:
        members = self.backends
        healthy = sum(1 for b in members if b.healthy and not b.draining)
        return (
            f"<Pool [{len(members)} backends: {healthy} healthy | "
            f"{sum(b.active for b in members)} in flight] {self.balancer.name}>"
        )


def _forwarder(pool_ref: weakref.ref[Pool]) -> Listener:
    """The subscription through which :meth:`Pool.on` hooks get events: each event's
    :class:`~softlb.events.Event` view, handed to the pool's dispatcher (never waits)."""

    def forward(event: PoolEvent) -> None:
        pool = pool_ref()
        dispatcher = pool._dispatcher if pool is not None else None
        if pool is not None and dispatcher is not None:
            dispatcher.put(Event(event.kind, event.url, event.detail, time.time()), pool._hooks)

    return forward


def _in_flight_text(count: int) -> str:
    """The detail of a ``removed`` event."""
    if count == 0:
        return "nothing in flight"
    if count == 1:
        return "1 request in flight finishes"
    return f"{count} requests in flight finish"


def _setter(event: threading.Event) -> Callable[[Ticket], None]:
    """A ticket callback that wakes the thread waiting on ``event``."""
    return lambda _ticket: event.set()


def _normalized(url: str) -> str:
    try:
        return normalize_url(url)
    except InvalidBackend:
        return url


class Lease:
    """One request's claim on a backend, counted in flight until released.

    Used as a context manager (``with pool.lease() as backend``) or released explicitly with
    :meth:`release` when the request outlives a block (a streamed response). Releasing twice
    is harmless; only the first counts.
    """

    __slots__ = ("_failure", "_pool", "_released", "backend", "started")

    def __init__(self, pool: Pool, backend: Backend, started: float) -> None:
        self._pool = pool
        self.backend = backend
        self.started = started
        self._failure: str | None = None
        self._released = False

    def fail(self, reason: str = "error") -> None:
        """Mark the request as failed; the release will record a failure for ``reason``."""
        self._failure = reason

    def release(self, failure: str | None = None) -> None:
        """End the lease, recording success, or failure when ``failure`` (or :meth:`fail`)
        names one."""
        if self._released:
            return
        self._released = True
        self._pool._release(self, failure if failure is not None else self._failure)

    def abandon(self) -> None:
        """End the lease without recording a request: for a lease granted to a request that
        went away before using it (a queued client that disconnected)."""
        if self._released:
            return
        self._released = True
        self._pool._release(self, None, used=False)

    @property
    def released(self) -> bool:
        """Whether the lease has ended."""
        return self._released

    def __enter__(self) -> Backend:
        return self.backend

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and self._failure is None:
            self._failure = exc_type.__name__
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "active"
        return f"<Lease {self.backend.url} {state}>"
