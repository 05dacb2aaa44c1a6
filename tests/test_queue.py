"""Tests for per-backend max_connections and the pool's FIFO queue (softlb.queueing)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from softlb.backend import Backend
from softlb.balancers import BALANCERS
from softlb.errors import InvalidBackend, NoBackendAvailable, QueueTimeout
from softlb.pool import Lease, Pool
from softlb.queueing import QueueStats, Ticket, lease_async

A, B, C = "http://a:1", "http://b:1", "http://c:1"
STRATEGIES = sorted(BALANCERS)


def limited(url: str, limit: int | None) -> Backend:
    return Backend(url, max_connections=limit)


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` every millisecond until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.001)


class Waiter(threading.Thread):
    """A thread that calls ``pool.lease(wait=...)`` and keeps the outcome."""

    def __init__(self, pool: Pool, wait: float = 5.0, **kwargs: object) -> None:
        super().__init__(daemon=True)
        self.pool, self.wait, self.kwargs = pool, wait, kwargs
        self.lease: Lease | None = None
        self.error: Exception | None = None
        self.seconds = 0.0

    def run(self) -> None:
        start = time.monotonic()
        try:
            self.lease = self.pool.lease(wait=self.wait, **self.kwargs)  # type: ignore[arg-type]
        except Exception as exc:
            self.error = exc
        self.seconds = time.monotonic() - start

    def outcome(self) -> Lease:
        self.join(5)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error
        assert self.lease is not None
        return self.lease


# -- the limit ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "2"])
def test_max_connections_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(InvalidBackend, match="max_connections must be an integer >= 1"):
        Backend(A, max_connections=bad)  # type: ignore[arg-type]


def test_max_connections_defaults_to_no_limit() -> None:
    assert Backend(A).max_connections is None
    assert Backend(A, max_connections=3).max_connections == 3


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_skips_full_backends_and_never_exceeds_a_limit(strategy: str) -> None:
    a, b = limited(A, 1), limited(B, 2)
    pool = Pool([a, b, C], balancer=strategy)
    held = [pool.lease(f"key{i}") for i in range(30)]
    assert (a.active, b.active) == (1, 2)
    assert pool.get(C).active == 27
    for lease in held:
        lease.release()
    pool.remove(C)
    held = [pool.lease(f"key{i}") for i in range(3)]
    assert sorted(lease.backend.url for lease in held) == [A, B, B]
    with pytest.raises(QueueTimeout, match="every backend in rotation is at its max_connections"):
        pool.lease("another")
    held[0].release()
    with pool.lease("again") as backend:
        assert backend is held[0].backend


def test_queue_timeout_is_a_503_no_backend_available() -> None:
    assert issubclass(QueueTimeout, NoBackendAvailable)
    assert QueueTimeout.status == 503


def test_excluded_and_full_backends_are_all_skipped() -> None:
    a = limited(A, 1)
    pool = Pool([a, B], balancer="round_robin")
    with pool.lease(exclude=[pool.get(B)]) as first:
        assert first is a
        with pytest.raises(QueueTimeout):  # B excluded, A full: wait for A (here: no wait)
            pool.lease(exclude=[pool.get(B)])
        with pytest.raises(NoBackendAvailable, match="not tried already"):
            pool.lease(exclude=[a, pool.get(B)])


@pytest.mark.parametrize("strategy", ["least_connections", "round_robin"])
def test_others_in_flight_count_against_the_limit(strategy: str) -> None:
    others = {A: 1}
    a = limited(A, 2)
    pool = Pool([a], balancer=strategy)  # one indexes loads (refresh rebuilds), one not
    pool.others_in_flight = lambda backend: others[backend.url]
    held = pool.lease()
    assert pool.try_lease() is None  # 1 here + 1 in another worker of the host
    waiter = Waiter(pool)
    waiter.start()
    wait_until(lambda: pool.queue_length == 1)
    others[A] = 0
    pool.refresh()  # what shared state calls when it reads the other processes' counts
    assert waiter.outcome().backend is a
    assert a.active == 2
    held.release()


# -- waiting -----------------------------------------------------------------------------


def test_a_waiter_gets_the_backend_released_and_times_out_otherwise() -> None:
    pool = Pool([limited(A, 1)])
    held = pool.lease()
    start = time.monotonic()
    with pytest.raises(QueueTimeout, match=r"for 0.05s \(queue timeout\)"):
        pool.lease(wait=0.05)
    assert 0.04 <= time.monotonic() - start < 2.0
    waiter = Waiter(pool)
    waiter.start()
    wait_until(lambda: pool.queue_length == 1)
    held.release()
    lease = waiter.outcome()
    assert lease.backend.active == 1 and pool.queue_length == 0
    lease.release()
    stats = pool.queue_stats()
    assert (stats.waiting, stats.queued, stats.timed_out) == (0, 2, 1)
    assert stats.wait_seconds >= 0.04


def test_waiters_are_served_in_order_of_arrival() -> None:
    pool = Pool([limited(A, 1)], balancer="random")
    held = pool.lease()
    order: list[int] = []

    def waiter(index: int) -> None:
        with pool.lease(wait=5.0):
            order.append(index)  # one lease at a time: appends happen in the order of grants

    threads = []
    for i in range(6):
        thread = threading.Thread(target=waiter, args=(i,), daemon=True)
        threads.append(thread)
        thread.start()
        wait_until(lambda n=i + 1: pool.queue_length == n)  # type: ignore[misc]
    held.release()
    for thread in threads:
        thread.join(5)
    assert order == list(range(6))
    assert pool.queue_length == 0


def test_enqueue_with_room_leases_at_once_without_calling_back() -> None:
    pool = Pool([limited(A, 1)])
    called: list[Ticket] = []
    ticket = pool.enqueue(called.append)
    assert ticket.done and ticket.result().backend.url == A
    assert called == [] and pool.queue_length == 0 and pool.queue_stats().queued == 0
    ticket.result().release()
    pool.drain(A)
    with pytest.raises(NoBackendAvailable):
        pool.enqueue(called.append)


def test_a_newcomer_does_not_take_the_room_a_waiter_is_owed() -> None:
    a = limited(A, 1)
    pool = Pool([a])
    held = pool.lease()
    granted: list[Ticket] = []
    ticket = pool.enqueue(granted.append)
    assert not ticket.done and pool.queue_length == 1
    held.release()  # hands A over to the ticket, under the pool's lock
    assert granted == [ticket] and ticket.done
    assert ticket.result().backend is a and a.active == 1
    assert pool.try_lease() is None
    assert not ticket.cancel()  # resolved: the holder owns the lease
    ticket.result().release()
    assert a.active == 0


def test_no_lost_wake_ups_under_contention() -> None:
    a, b = limited(A, 2), limited(B, 1)
    pool = Pool([a, b])
    peak = {A: 0, B: 0}
    failures: list[Exception] = []
    guard = threading.Lock()

    def worker() -> None:
        try:
            for _ in range(200):
                with pool.lease(wait=5.0) as backend:
                    with guard:
                        peak[backend.url] = max(peak[backend.url], backend.active)
                    time.sleep(0)  # let the others run while this one holds its lease
        except Exception as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(8)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert not any(t.is_alive() for t in threads), "a waiter was never woken"
    assert failures == []
    assert peak[A] <= 2 and peak[B] <= 1
    assert a.requests + b.requests == 1600
    assert (a.active, b.active, pool.queue_length) == (0, 0, 0)
    stats = pool.queue_stats()
    assert stats.timed_out == 0 and stats.queued > 0  # requests did wait, and all got in
    assert time.monotonic() - start < 20


def test_waiters_fail_at_once_when_nothing_is_left_in_rotation() -> None:
    pool = Pool([limited(A, 1)])
    held = pool.lease()
    waiter = Waiter(pool, wait=10.0)
    waiter.start()
    wait_until(lambda: pool.queue_length == 1)
    pool.drain(A)
    with pytest.raises(NoBackendAvailable) as info:
        waiter.outcome()
    assert not isinstance(info.value, QueueTimeout)
    assert waiter.seconds < 5.0 and pool.queue_length == 0
    held.release()


def test_a_backend_added_while_requests_wait_serves_them() -> None:
    pool = Pool([limited(A, 1)])
    held = pool.lease()
    waiter = Waiter(pool)
    waiter.start()
    wait_until(lambda: pool.queue_length == 1)
    pool.add(B)
    assert waiter.outcome().backend.url == B
    held.release()


def test_a_waiter_excluding_the_freed_backend_keeps_waiting_and_others_pass() -> None:
    a, b = limited(A, 1), limited(B, 1)
    pool = Pool([a, b])
    on_a, on_b = pool.lease(exclude=[b]), pool.lease(exclude=[a])
    picky = Waiter(pool, exclude=[a])  # a retry that already tried A
    picky.start()
    wait_until(lambda: pool.queue_length == 1)
    plain = Waiter(pool)
    plain.start()
    wait_until(lambda: pool.queue_length == 2)
    on_a.release()
    assert plain.outcome().backend is a  # the first waiter that may use A gets it
    assert pool.queue_length == 1
    on_b.release()
    assert picky.outcome().backend is b


def test_a_granted_lease_given_up_is_not_counted_as_a_request() -> None:
    a = limited(A, 1)
    pool = Pool([a])
    held = pool.lease()
    ticket = pool.enqueue(lambda _: None)
    held.release()
    ticket.result().abandon()
    assert (a.active, a.requests, a.failures) == (0, 1, 0)


def test_queue_stats_report_the_oldest_wait() -> None:
    now = [100.0]
    pool = Pool([limited(A, 1)], clock=lambda: now[0])
    held = pool.lease()
    ticket = pool.enqueue(lambda _: None)
    now[0] = 102.5
    stats = pool.queue_stats()
    assert stats == QueueStats(waiting=1, oldest_wait=2.5, queued=1)
    assert stats.as_dict()["oldest_wait"] == 2.5
    assert ticket.cancel(timed_out=True)
    assert not ticket.cancel()
    assert pool.queue_stats() == QueueStats(queued=1, timed_out=1, wait_seconds=2.5)
    with pytest.raises(RuntimeError, match="still waiting"):
        ticket.result()
    held.release()


def test_a_failing_callback_is_logged_and_the_release_completes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = Pool([limited(A, 1)])
    held = pool.lease()

    def broken(ticket: Ticket) -> None:
        raise RuntimeError("boom")

    ticket = pool.enqueue(broken)
    held.release()
    assert ticket.done and "queue callback" in caplog.text
    ticket.result().release()


# -- prefer ------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_prefer_is_leased_with_every_strategy(strategy: str) -> None:
    pool = Pool([A, B, C], balancer=strategy)
    b = pool.get(B)
    for i in range(20):
        with pool.lease(f"k{i}", prefer=b) as backend:
            assert backend is b


def test_prefer_is_ignored_when_excluded_out_of_rotation_full_or_foreign() -> None:
    pool = Pool([A, limited(B, 1)], balancer="round_robin")
    a, b = pool.get(A), pool.get(B)
    with pool.lease(exclude=[b], prefer=b) as backend:
        assert backend is a
    with pool.lease(exclude=[a], prefer=b), pool.lease(prefer=b) as backend:  # b is full
        assert backend is a
    pool.drain(B)
    with pool.lease(prefer=b) as backend:
        assert backend is a
    pool.drain(B, False)
    stranger = Backend(B)
    with pool.lease(prefer=stranger) as backend:
        assert backend is not stranger
    removed = pool.remove(B)
    with pool.lease(prefer=removed) as backend:
        assert backend is a


def test_a_queued_request_gets_its_preferred_backend_when_it_frees() -> None:
    a, b = limited(A, 1), limited(B, 1)
    pool = Pool([a, b])
    on_a, on_b = pool.lease(exclude=[b]), pool.lease(exclude=[a])
    waiter = Waiter(pool, prefer=b)
    waiter.start()
    wait_until(lambda: pool.queue_length == 1)
    on_b.release()
    assert waiter.outcome().backend is b
    on_a.release()


# -- asyncio -----------------------------------------------------------------------------


def test_lease_async_waits_without_blocking_the_loop_and_is_woken_from_a_thread() -> None:
    a = limited(A, 1)
    pool = Pool([a])

    async def main() -> None:
        first = await lease_async(pool, wait=1.0)  # room: at once
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        tick_task = asyncio.create_task(ticker())
        threading.Timer(0.1, first.release).start()  # a release on another thread
        second = await lease_async(pool, wait=5.0)
        tick_task.cancel()
        assert second.backend is a and ticks >= 5  # the loop ran while we waited
        with pytest.raises(QueueTimeout, match=r"0\.05s"):
            await lease_async(pool, wait=0.05)
        with pytest.raises(QueueTimeout):
            await lease_async(pool)  # wait 0: no queueing
        second.release()

    asyncio.run(main())
    stats = pool.queue_stats()
    assert (stats.queued, stats.timed_out, stats.waiting) == (2, 1, 0)


def test_lease_async_cancelled_leaves_the_queue() -> None:
    a = limited(A, 1)
    pool = Pool([a])
    held = pool.lease()

    async def main() -> None:
        task = asyncio.create_task(lease_async(pool, wait=5.0))
        for _ in range(100):
            if pool.queue_length:
                break
            await asyncio.sleep(0.001)
        assert pool.queue_length == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert pool.queue_length == 0
    held.release()
    assert a.active == 0


def test_lease_async_raises_no_backend_when_nothing_is_in_rotation() -> None:
    pool = Pool([A])
    pool.drain(A)

    async def main() -> None:
        with pytest.raises(NoBackendAvailable, match="no backend in rotation"):
            await lease_async(pool, wait=1.0)

    asyncio.run(main())


def test_set_max_connections_changes_the_limit_and_serves_waiters() -> None:
    pool = Pool([A])
    a = pool.set_max_connections(A, 1)
    held = pool.lease()
    with pytest.raises(QueueTimeout):
        pool.lease()
    with pytest.raises(InvalidBackend, match="max_connections must be an integer >= 1"):
        pool.set_max_connections(A, 0)
    assert a.max_connections == 1  # a refused change changes nothing
    waiter = Waiter(pool)
    waiter.start()
    wait_until(lambda: pool.queue_length == 1)
    pool.set_max_connections(A, 2)  # room for one more: the waiter gets it
    second = waiter.outcome()
    assert a.active == 2
    pool.set_max_connections(a, None)
    extra = [pool.lease() for _ in range(5)]
    for lease in [held, second, *extra]:
        lease.release()
    assert a.active == 0


def test_lease_async_waiters_are_served_in_order_of_arrival() -> None:
    pool = Pool([limited(A, 1)])
    held = pool.lease()
    order: list[int] = []

    async def waiter(index: int) -> None:
        lease = await lease_async(pool, wait=5.0)
        order.append(index)
        await asyncio.sleep(0)
        lease.release()

    async def main() -> None:
        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(waiter(i)))
            for _ in range(100):
                await asyncio.sleep(0)
                if pool.queue_length == i + 1:
                    break
            assert pool.queue_length == i + 1
        held.release()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)

    asyncio.run(main())
    assert order == list(range(5))
    assert pool.queue_length == 0 and pool.get(A).active == 0
