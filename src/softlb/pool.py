"""The pool: backend membership, rotation, and leases that count requests in flight."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from softlb.backend import Backend, normalize_url
from softlb.balancers.base import Balancer, balancer_by_name
from softlb.balancers.least import LeastConnections
from softlb.errors import BackendExists, InvalidBackend, NoBackendAvailable, UnknownBackend

__all__ = ["SLOW_START_FLOOR", "Lease", "Pool", "PoolEvent"]

log = logging.getLogger("softlb.pool")

#: Share of its weight a backend gets at the start of a slow-start ramp (HAProxy's
#: ``slowstart`` starts near zero; we start at 10 % so a recovering backend is not idle).
SLOW_START_FLOOR: Final = 0.1

#: Number of steps a slow-start ramp is taken in: effective weights are recomputed (and the
#: balancer rebuilt) at most this many times per ramp. HAProxy updates its weights about
#: every second of the ramp; 20 steps keep a 1-minute ramp within 5 % of a smooth line.
SLOW_START_STEPS: Final = 20

#: How many times a retry asks the balancer again before scanning for a backend not yet tried.
_REPICKS: Final = 3


@dataclass(frozen=True)
class PoolEvent:
    """Something that happened to a pool's backends, given to :meth:`Pool.subscribe` listeners.

    ``kind`` is one of ``"added"``, ``"removed"``, ``"drain"``, ``"health"`` (``detail`` says
    why) and ``"failure"`` (a request through a lease failed; ``detail`` names the failure).
    """

    kind: str
    backend: Backend
    detail: str = ""


Listener = Callable[[PoolEvent], None]


class Pool:
    """A thread-safe set of backends and the balancer that chooses among them.

    ``servers`` are URLs or :class:`Backend` objects; ``balancer`` a :class:`Balancer`, a
    strategy name, or ``None`` for :class:`~softlb.balancers.LeastConnections`.
    ``slow_start`` (seconds, 0 = off) ramps a backend that joins later or comes back to
    health from 10 % of its weight to all of it.

    Request routing::

        with pool.lease() as backend:   # picks, and counts the request in flight
            call(backend.url)           # an exception here records a failure

    Locking: ``_lock`` protects the membership, the eligible tuple, every backend's statistics
    and the balancer's state. Picks never wait on I/O: listeners run after the lock is released.
    """

    def __init__(
        self,
        servers: Iterable[str | Backend] = (),
        *,
        balancer: Balancer | str | None = None,
        slow_start: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slow_start < 0:
            raise ValueError(f"slow_start must be >= 0 seconds, got {slow_start}")
        if balancer is None:
            balancer = LeastConnections()
        elif isinstance(balancer, str):
            balancer = balancer_by_name(balancer)
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
        self._listeners: list[Listener] = []
        #: Called under the lock with a backend whose counts just changed (a lease taken or
        #: released); shared state points it at the host's in-flight table.
        self.count_sink: Callable[[Backend], None] | None = None
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
            self._start_ramp(backend, now)
            self._rebuild(now)
        self._emit(PoolEvent("added", backend))
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
        self._emit(PoolEvent("removed", backend))
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
        self._emit(PoolEvent("drain", backend, "draining" if draining else "ready"))
        return backend

    def set_healthy(self, url: str | Backend, healthy: bool, reason: str = "") -> bool:
        """Put a backend in or out of rotation for health reasons; return whether it changed.

        Health checkers call this; ``reason`` is passed on to listeners.
        """
        with self._lock:
            backend = url if isinstance(url, Backend) else self._members.get(_normalized(url))
            if backend is None or self._members.get(backend.url) is not backend:
                return False
            if backend.healthy == healthy:
                return False
            backend.healthy = healthy
            now = self.clock()
            if healthy:
                self._start_ramp(backend, now)
            self._rebuild(now)
        self._emit(PoolEvent("health", backend, reason or ("up" if healthy else "down")))
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
        self.balancer.rebuild(self._eligible, now)

    def refresh(self) -> None:
        """Hand the balancer a fresh snapshot, after loads changed outside the pool's view
        (another process's in-flight counts)."""
        with self._lock:
            self._rebuild(self.clock())

    # -- leases --------------------------------------------------------------------------

    def lease(self, key: str | None = None, *, exclude: Collection[Backend] = ()) -> Lease:
        """Pick a backend and count one request in flight on it until the lease is released.

        Use it as a context manager: the block gets the :class:`Backend`; leaving the block
        releases the lease and records success, or failure if the block raised. ``key`` feeds
        the hashing strategies (a client address, a path, a header value). ``exclude`` lists
        backends already tried by this request, so a retry goes elsewhere when it can.

        Raises :class:`~softlb.errors.NoBackendAvailable` when nothing is in rotation (or
        everything in rotation is excluded).
        """
        with self._lock:
            now = self.clock()
            if self._ramp_next is not None and now >= self._ramp_next:
                self._rebuild(now)
            backend = self.balancer.pick(key, now)
            if exclude and backend is not None and backend in exclude:
                backend = self._pick_excluding(key, now, exclude)
            if backend is None:
                raise NoBackendAvailable(
                    "no backend available"
                    if not self._members
                    else "no backend in rotation"
                    + (" that this request has not tried already" if exclude else "")
                )
            backend.active += 1
            self.balancer.acquired(backend)
            if self.count_sink is not None:
                self.count_sink(backend)
        return Lease(self, backend, now)

    def _pick_excluding(
        self, key: str | None, now: float, exclude: Collection[Backend]
    ) -> Backend | None:
        for _ in range(_REPICKS):
            backend = self.balancer.pick(key, now)
            if backend is not None and backend not in exclude:
                return backend
        for backend in self._eligible:
            if backend not in exclude:
                return backend
        return None

    def _release(self, lease: Lease, failure: str | None) -> None:
        backend = lease.backend
        with self._lock:
            now = self.clock()
            backend.active -= 1
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
        if failure is not None and self._listeners:
            self._emit(PoolEvent("failure", backend, failure))

    @property
    def in_flight(self) -> int:
        """Requests in flight across every member."""
        return sum(b.active for b in self._members.values())

    def _after_fork(self) -> None:
        """Make the pool usable in a child process made by ``fork()``.

        A lock another thread held at the moment of the fork stays locked in the child for
        ever; the child gets a fresh one (the logging module does the same for its handlers).
        """
        self._lock = threading.Lock()

    # -- events --------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event)`` for every :class:`PoolEvent`; returns an unsubscribe function.

        Listeners run on the thread that caused the event, after the pool's lock is released;
        keep them quick. An exception in one is not propagated.
        """
        with self._lock:
            self._listeners = [*self._listeners, listener]

        def unsubscribe() -> None:
            with self._lock:
                self._listeners = [x for x in self._listeners if x is not listener]

        return unsubscribe

    def _emit(self, event: PoolEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a listener must never break the pool
                log.exception("pool listener %r failed", listener)

    def __repr__(self) -> str:
        members = self.backends
        healthy = sum(1 for b in members if b.healthy and not b.draining)
        return (
            f"<Pool [{len(members)} backends: {healthy} healthy | "
            f"{sum(b.active for b in members)} in flight] {self.balancer.name}>"
        )


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
