"""The queue of requests waiting for a backend below its ``max_connections``.

A backend with :attr:`~softlb.backend.Backend.max_connections` never has more requests in
flight from this host than that (HAProxy's ``maxconn``). A pick skips a full backend; when
every eligible backend is full, the request takes a :class:`Ticket` and waits in the pool's
FIFO queue (HAProxy's ``timeout queue``). Tickets are served in order of arrival by direct
hand-off: the thread that releases a lease (or brings capacity back: a backend added, healthy
again, or another process's requests finished) leases the freed backend *for* the oldest
waiting ticket, under the pool's lock, so a newcomer can never take it first and no wake-up
is lost.

Three ways to wait, one queue:

* threads: ``pool.lease(key, wait=seconds)`` blocks and returns a :class:`~softlb.pool.Lease`
  or raises :class:`~softlb.errors.QueueTimeout`;
* asyncio: ``await lease_async(pool, key, wait=seconds)`` (below), which never blocks the loop;
* any other engine: ``pool.try_lease()`` and ``pool.enqueue(callback)``; ``callback(ticket)``
  runs on the releasing thread once the ticket is resolved, and ``ticket.cancel()`` gives up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from softlb.backend import Backend
from softlb.errors import NoBackendAvailable, QueueTimeout

if TYPE_CHECKING:
    from softlb.pool import Lease, Pool

__all__ = ["QueueStats", "Ticket", "WaitQueue", "lease_async", "queue_timeout"]

log = logging.getLogger("softlb.pool")


def queue_timeout(wait: float) -> QueueTimeout:
    """The error for a request that waited ``wait`` seconds without a backend getting free."""
    if wait <= 0:
        return QueueTimeout("every backend in rotation is at its max_connections")
    return QueueTimeout(
        f"every backend in rotation stayed at its max_connections for {wait:g}s (queue timeout)"
    )


@dataclass(frozen=True)
class QueueStats:
    """A snapshot of a pool's queue, for metrics and the status page.

    ``waiting`` requests wait now, the oldest for ``oldest_wait`` seconds (0 when none).
    Counters since the pool was made: ``queued`` requests had to wait, ``timed_out`` of them
    gave up after their timeout, and ``wait_seconds`` is the time spent waiting by every request
    that has left the queue (served, timed out or cancelled).
    """

    waiting: int = 0
    oldest_wait: float = 0.0
    queued: int = 0
    timed_out: int = 0
    wait_seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        """The figures as a JSON-ready mapping."""
        return {
            "waiting": self.waiting,
            "oldest_wait": round(self.oldest_wait, 6),
            "queued": self.queued,
            "timed_out": self.timed_out,
            "wait_seconds": round(self.wait_seconds, 6),
        }


Resolved = Callable[["Ticket"], None]


class Ticket:
    """One request's place in a pool's queue.

    Resolved once, by the pool: then :attr:`done` is true and either :attr:`lease` holds the
    lease taken for it (the holder must release it) or :attr:`error` says why none will come
    (:class:`~softlb.errors.NoBackendAvailable` when nothing it may use is in rotation any
    more). :meth:`result` returns the one or raises the other.
    """

    __slots__ = (
        "_callback",
        "_pool",
        "done",
        "error",
        "exclude",
        "key",
        "lease",
        "prefer",
        "queued_at",
    )

    def __init__(
        self,
        pool: Pool,
        key: str | None,
        *,
        exclude: Collection[Backend],
        prefer: Backend | None,
        callback: Resolved | None,
        queued_at: float,
    ) -> None:
        self._pool = pool
        self._callback = callback
        self.key = key
        self.exclude = exclude
        self.prefer = prefer
        self.queued_at = queued_at
        self.done = False
        self.lease: Lease | None = None
        self.error: NoBackendAvailable | None = None

    def result(self) -> Lease:
        """The lease taken for this ticket; raises its error, or :class:`RuntimeError` while
        it still waits."""
        if self.lease is not None:
            return self.lease
        if self.error is not None:
            raise self.error
        raise RuntimeError("the ticket is still waiting")

    def cancel(self, *, timed_out: bool = False) -> bool:
        """Leave the queue; ``True`` if the ticket was still waiting (it will never be
        resolved), ``False`` if it was resolved already (then the caller owns :attr:`lease`
        and must release it). ``timed_out`` counts it in :attr:`QueueStats.timed_out`."""
        return self._pool._cancel(self, timed_out)

    def _resolve(self, lease: Lease | None, error: NoBackendAvailable | None) -> None:
        """Called by the pool under its lock, once: hand over the outcome."""
        self.lease = lease
        self.error = error
        self.done = True
        callback = self._callback
        if callback is not None:
            try:
                callback(self)
            except Exception:  # a broken callback must not break the releasing thread
                log.exception("queue callback %r failed", callback)

    def __repr__(self) -> str:
        state = "waiting" if not self.done else ("leased" if self.lease else "failed")
        return f"<Ticket {state}>"


class WaitQueue:
    """The FIFO of :class:`Ticket` objects and its counters; every method is called under the
    owning pool's lock (the pool does the picking, this only keeps order and figures)."""

    __slots__ = ("queued", "tickets", "timed_out", "wait_seconds")

    def __init__(self) -> None:
        #: The waiting tickets, oldest first (an insertion-ordered set: O(1) removal). The
        #: pool tests it for emptiness on every lease and release; keep it a plain dict.
        self.tickets: dict[Ticket, None] = {}
        self.queued = 0
        self.timed_out = 0
        self.wait_seconds = 0.0

    def __bool__(self) -> bool:
        return bool(self.tickets)

    def __len__(self) -> int:
        return len(self.tickets)

    def push(self, ticket: Ticket) -> None:
        """Add a ticket at the back."""
        self.tickets[ticket] = None
        self.queued += 1

    def waiting(self) -> list[Ticket]:
        """The waiting tickets, oldest first (a copy: the caller may remove while iterating)."""
        return list(self.tickets)

    def remove(self, ticket: Ticket, now: float, *, timed_out: bool = False) -> bool:
        """Take ``ticket`` out, counting its wait; ``False`` if it was not waiting."""
        if ticket not in self.tickets:
            return False
        del self.tickets[ticket]
        self.wait_seconds += max(now - ticket.queued_at, 0.0)
        if timed_out:
            self.timed_out += 1
        return True

    def stats(self, now: float) -> QueueStats:
        """A snapshot of the figures."""
        head = next(iter(self.tickets), None)
        return QueueStats(
            waiting=len(self.tickets),
            oldest_wait=0.0 if head is None else max(now - head.queued_at, 0.0),
            queued=self.queued,
            timed_out=self.timed_out,
            wait_seconds=self.wait_seconds,
        )


async def lease_async(
    pool: Pool,
    key: str | None = None,
    *,
    exclude: Collection[Backend] = (),
    prefer: Backend | None = None,
    wait: float = 0.0,
) -> Lease:
    """:meth:`Pool.lease <softlb.pool.Pool.lease>` for an asyncio event loop: waits in the
    pool's queue, up to ``wait`` seconds, without blocking the loop.

    Returns at once when a backend has room. Raises :class:`~softlb.errors.NoBackendAvailable`
    when nothing is in rotation, :class:`~softlb.errors.QueueTimeout` when every eligible
    backend stayed full for ``wait`` seconds. If the awaiting task is cancelled, the request
    leaves the queue, and a lease granted in the meantime is abandoned (counted neither as a
    request nor as a failure). Leases may be released on any thread: a release on another
    thread wakes this loop with ``call_soon_threadsafe``.
    """
    if wait <= 0:
        lease = pool.try_lease(key, exclude=exclude, prefer=prefer)
        if lease is None:
            raise queue_timeout(0)
        return lease
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Ticket] = loop.create_future()

    def deliver(ticket: Ticket) -> None:  # on the loop
        if not future.done():
            future.set_result(ticket)

    def resolved(ticket: Ticket) -> None:  # on the releasing thread, under the pool's lock
        loop.call_soon_threadsafe(deliver, ticket)

    ticket = pool.enqueue(resolved, key, exclude=exclude, prefer=prefer)
    if ticket.done:
        return ticket.result()

    def expire() -> None:
        if ticket.cancel(timed_out=True) and not future.done():
            future.set_exception(queue_timeout(wait))

    timer = loop.call_later(wait, expire)
    try:
        return (await future).result()
    except asyncio.CancelledError:
        if not ticket.cancel() and ticket.lease is not None:
            ticket.lease.abandon()  # granted while we were being cancelled
        raise
    finally:
        timer.cancel()
