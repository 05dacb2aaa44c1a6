"""Tests for softlb.pool: membership, rotation, leases, slow start, events and thread safety."""

from __future__ import annotations

import logging
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from softlb.backend import Backend
from softlb.balancers import LeastConnections, RoundRobin, WeightedRoundRobin
from softlb.errors import BackendExists, InvalidBackend, NoBackendAvailable, UnknownBackend
from softlb.pool import SHARED_READ_MAX, SLOW_START_FLOOR, SLOW_START_STEPS, Lease, Pool, PoolEvent

A, B, C = "http://a:1", "http://b:1", "http://c:1"


class FakeClock:
    """A clock that moves only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    """A fake monotonic clock starting at 1000 s."""
    return FakeClock()


@pytest.fixture
def events() -> list[PoolEvent]:
    """A list to collect pool events into."""
    return []


def _urls(backends: Iterator[Backend] | tuple[Backend, ...]) -> list[str]:
    return [b.url for b in backends]


# -- construction and membership -------------------------------------------------------------


def test_pool_takes_urls_and_backends_in_order() -> None:
    """Servers may be URLs or Backend objects; members keep the order they were given."""
    heavy = Backend("http://b:1", weight=3)
    pool = Pool(["http://A:1/", heavy, C])
    assert _urls(pool.backends) == [A, B, C]
    assert pool.backends[1] is heavy
    assert len(pool) == 3
    assert list(pool) == list(pool.backends)
    assert pool.eligible == pool.backends


def test_default_balancer_is_least_connections() -> None:
    """Without a balancer the pool uses least connections, as the config's default does."""
    assert isinstance(Pool().balancer, LeastConnections)


def test_balancer_may_be_given_by_name() -> None:
    """A strategy name builds that strategy."""
    assert isinstance(Pool(balancer="round_robin").balancer, RoundRobin)


def test_unknown_balancer_name_lists_the_known_ones() -> None:
    """An unknown strategy name is a ValueError naming the known strategies."""
    with pytest.raises(ValueError, match=r"unknown balancing algorithm 'fastest'; known: .*random"):
        Pool(balancer="fastest")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"servers": "http://10.0.0.1:80"}, r"write Pool\(\['http://10.0.0.1:80'\]\)"),
        ({"balancer": RoundRobin}, r"got the class RoundRobin: write RoundRobin\(\)"),
        ({"slow_start": "30s"}, "slow_start must be a number of seconds, got '30s'"),
    ],
)
def test_wrong_types_are_refused_clearly(arguments: dict[str, Any], message: str) -> None:
    """A string for the list of servers, a strategy's class for an instance: a TypeError
    that says what to write (a string was read as one backend per character)."""
    with pytest.raises(TypeError, match=message):
        Pool(**arguments)


def test_negative_slow_start_is_refused() -> None:
    """slow_start below zero is a ValueError."""
    with pytest.raises(ValueError, match="slow_start must be >= 0"):
        Pool(slow_start=-1)


def test_duplicate_server_in_constructor_names_it() -> None:
    """Listing one URL twice (in any spelling) raises BackendExists naming it."""
    with pytest.raises(BackendExists, match=r"backend http://a:1 is listed twice"):
        Pool([A, "HTTP://A:1/"])


def test_invalid_server_in_constructor_names_it() -> None:
    """A bad URL in the constructor raises InvalidBackend naming it."""
    with pytest.raises(InvalidBackend, match="'ftp://x'"):
        Pool([A, "ftp://x"])


def test_add_returns_the_new_backend_in_rotation() -> None:
    """add() returns the backend, which is a healthy member in rotation at once."""
    pool = Pool([A], balancer="round_robin")
    added = pool.add(B, weight=4)
    assert added.url == B
    assert added.weight == 4
    assert added.healthy
    assert pool.get(B) is added
    assert pool.eligible == (pool.get(A), added)


def test_add_existing_url_raises_backend_exists_naming_it() -> None:
    """Adding a member again, spelled differently or not, raises BackendExists with its URL."""
    pool = Pool([A])
    with pytest.raises(BackendExists) as info:
        pool.add("http://A:1/")
    assert str(info.value) == "backend http://a:1 is already in the pool"
    with pytest.raises(BackendExists):
        pool.add(pool.get(A))
    assert len(pool) == 1


def test_backend_exists_and_unknown_backend_are_key_errors() -> None:
    """Both membership errors are KeyErrors whose str() is the plain message."""
    pool = Pool([A])
    with pytest.raises(KeyError):
        pool.add(A)
    with pytest.raises(KeyError) as info:
        pool.remove(B)
    assert str(info.value) == "no backend http://b:1 in the pool"


def test_add_invalid_url_raises_invalid_backend_naming_it() -> None:
    """add() of a bad URL raises InvalidBackend quoting the URL and changes nothing."""
    pool = Pool([A])
    with pytest.raises(InvalidBackend, match=r"'gopher://x' must start with http://"):
        pool.add("gopher://x")
    assert len(pool) == 1


@pytest.mark.parametrize("weight", [0, -3, True, 1.5])
def test_add_invalid_weight(weight: object) -> None:
    """add() refuses a bad weight and changes nothing."""
    pool = Pool()
    with pytest.raises(InvalidBackend, match="weight must be an integer"):
        pool.add(A, weight=weight)  # type: ignore[arg-type]
    assert len(pool) == 0


def test_add_backend_with_a_second_weight_is_refused() -> None:
    """A Backend object carries its weight; giving a different one to add() is an error."""
    with pytest.raises(InvalidBackend, match="give the weight on the Backend"):
        Pool().add(Backend(A, weight=2), weight=3)
    assert Pool().add(Backend(A, weight=2), weight=2).weight == 2


def test_remove_returns_the_backend_in_any_spelling() -> None:
    """remove() accepts the URL in any accepted spelling or the Backend and returns it."""
    pool = Pool([A, B, C])
    a, b = pool.get(A), pool.get(B)
    assert pool.remove("HTTP://a:1/") is a
    assert pool.remove(b) is b
    assert _urls(pool.backends) == [C]
    assert _urls(pool.eligible) == [C]


def test_remove_unknown_raises_unknown_backend_naming_it() -> None:
    """Removing a non-member raises UnknownBackend with the URL in the message."""
    pool = Pool([A])
    with pytest.raises(UnknownBackend, match=r"no backend http://zzz:9 in the pool"):
        pool.remove("http://zzz:9")
    with pytest.raises(UnknownBackend, match="no backend not a url in the pool"):
        pool.remove("not a url")


def test_get_and_contains_accept_any_spelling() -> None:
    """get() and `in` find a member by URL in any accepted spelling, or by the Backend itself."""
    pool = Pool([A])
    a = pool.get(A)
    assert pool.get("HTTP://A:1/") is a
    assert A in pool
    assert "http://A:1/" in pool
    assert a in pool
    assert Backend(A) not in pool  # same URL, different object
    assert B not in pool
    assert "not a url" not in pool
    assert 42 not in pool
    with pytest.raises(UnknownBackend, match="no backend http://b:1 in the pool"):
        pool.get(B)


def test_backend_cannot_join_two_pools() -> None:
    """A Backend belongs to one pool at a time; once removed it may join another."""
    backend = Backend(A)
    first = Pool([backend])
    second = Pool()
    with pytest.raises(InvalidBackend, match="backend http://a:1 already belongs to another pool"):
        second.add(backend)
    with pytest.raises(InvalidBackend, match="already belongs to another pool"):
        Pool([backend])
    first.remove(backend)
    assert second.add(backend) is backend


def test_failed_duplicate_add_does_not_claim_the_new_backend() -> None:
    """A Backend refused as a duplicate stays free to join another pool."""
    pool = Pool([A])
    twin = Backend(A)
    with pytest.raises(BackendExists):
        pool.add(twin)
    assert Pool([twin]).get(A) is twin


# -- leases ----------------------------------------------------------------------------------


def test_lease_counts_in_flight_until_the_block_ends() -> None:
    """Inside the block the backend has one request active; after it, one request completed."""
    pool = Pool([A])
    with pool.lease() as backend:
        assert backend.url == A
        assert backend.active == 1
        assert pool.in_flight == 1
    assert (backend.active, backend.requests, backend.failures) == (0, 1, 0)
    assert pool.in_flight == 0


def test_lease_records_failure_when_the_block_raises() -> None:
    """An exception in the block propagates and is recorded as a failure named after it."""
    pool = Pool([A])
    seen: list[PoolEvent] = []
    pool.subscribe(seen.append, ("failure",))
    with pytest.raises(ConnectionResetError), pool.lease() as backend:
        raise ConnectionResetError("boom")
    assert (backend.active, backend.requests, backend.failures) == (0, 1, 1)
    assert backend.consecutive_failures == 1
    assert seen == [
        PoolEvent("failure", backend, "ConnectionResetError", "ConnectionResetError", A)
    ]


def test_success_resets_consecutive_failures() -> None:
    """A successful request clears the failure streak but not the failure total."""
    pool = Pool([A])
    for _ in range(3):
        pool.lease().release("refused")
    backend = pool.get(A)
    assert backend.consecutive_failures == 3
    with pool.lease():
        pass
    assert backend.consecutive_failures == 0
    assert (backend.requests, backend.failures) == (4, 3)


def test_lease_fail_marks_failure_without_an_exception() -> None:
    """lease.fail(reason) makes the release record a failure with that reason."""
    pool = Pool([A])
    seen: list[PoolEvent] = []
    pool.subscribe(seen.append, ("failure",))
    with pool.lease() as backend:
        pass
    lease = pool.lease()
    lease.fail("HTTP 502")
    lease.release()
    assert (backend.requests, backend.failures) == (2, 1)
    assert [e.detail for e in seen] == ["HTTP 502"]


def test_fail_inside_block_wins_over_the_exception_name() -> None:
    """A reason given with fail() is kept even if the block then raises."""
    pool = Pool([A])
    seen: list[PoolEvent] = []
    pool.subscribe(seen.append, ("failure",))
    lease = pool.lease()
    with pytest.raises(TimeoutError), lease:
        lease.fail("read timeout")
        raise TimeoutError
    assert [e.detail for e in seen] == ["read timeout"]


def test_explicit_release_counts_once() -> None:
    """release() ends the lease; a second release (or leaving a block) does nothing more."""
    pool = Pool([A])
    lease = pool.lease()
    assert isinstance(lease, Lease)
    assert not lease.released
    lease.release(failure="timeout")
    lease.release()
    with lease:
        pass
    backend = pool.get(A)
    assert lease.released
    assert (backend.active, backend.requests, backend.failures) == (0, 1, 1)


def test_lease_updates_latency_ewma_on_success_only(clock: FakeClock) -> None:
    """A successful lease feeds its duration to the backend's latency; a failed one does not."""
    pool = Pool([A], clock=clock)
    backend = pool.get(A)
    with pool.lease():
        clock.now += 0.2
    assert backend.latency == pytest.approx(0.2)
    with pytest.raises(RuntimeError), pool.lease():
        clock.now += 5.0
        raise RuntimeError
    assert backend.latency == pytest.approx(0.2)
    with pool.lease():
        clock.now += 0.5
    assert backend.latency == pytest.approx(0.5)
    lease = pool.lease()
    assert lease.started == clock.now
    lease.release()


def test_exclude_steers_a_retry_elsewhere() -> None:
    """exclude= names backends already tried; the lease picks another one."""
    pool = Pool([A, B, C], balancer="least_connections")
    a, b, c = pool.backends
    for _ in range(5):
        with pool.lease(exclude={a, b}) as backend:
            assert backend is c
    with pool.lease(exclude=[a]) as backend:
        assert backend is not a


def test_exclude_everything_raises_no_backend_available() -> None:
    """When every backend in rotation was tried, the lease says so."""
    pool = Pool([A, B])
    with pytest.raises(NoBackendAvailable) as info:
        pool.lease(exclude=set(pool.backends))
    assert str(info.value) == "no backend in rotation that this request has not tried already"
    assert info.value.status == 503
    assert pool.in_flight == 0


def test_no_backend_available_on_empty_pool() -> None:
    """An empty pool raises NoBackendAvailable (HTTP 503)."""
    with pytest.raises(NoBackendAvailable, match=r"^no backend available$") as info:
        Pool().lease()
    assert info.value.status == 503


def test_no_backend_available_when_all_down() -> None:
    """With every member unhealthy the lease fails, and succeeds again once one recovers."""
    pool = Pool([A, B])
    for backend in pool.backends:
        pool.set_healthy(backend, False)
    assert pool.eligible == ()
    with pytest.raises(NoBackendAvailable, match=r"^no backend in rotation$"):
        pool.lease()
    pool.set_healthy(B, True)
    with pool.lease() as backend:
        assert backend.url == B


def test_no_backend_available_when_all_draining() -> None:
    """With every member draining the lease fails."""
    pool = Pool([A, B])
    pool.drain(A)
    pool.drain(B)
    with pytest.raises(NoBackendAvailable, match="no backend in rotation"):
        pool.lease()


def test_remove_while_leases_are_in_flight() -> None:
    """A removed backend's requests finish and are counted; the pool's totals stay right."""
    pool = Pool([A, B], balancer="round_robin")
    first, second = pool.lease(), pool.lease()
    a = first.backend
    assert a.url == A
    pool.remove(a)
    assert pool.in_flight == 1  # only members count
    assert a.active == 1
    first.release()
    assert (a.active, a.requests) == (0, 1)
    for _ in range(4):
        with pool.lease() as backend:
            assert backend.url == B
    second.release()
    assert pool.in_flight == 0
    assert pool.get(B).requests == 5


def test_release_after_removal_then_readd_keeps_counts() -> None:
    """Removing a backend with a lease in flight and adding it back keeps its counts exact."""
    pool = Pool([A, B])
    lease = pool.lease(exclude={pool.get(B)})
    a = lease.backend
    pool.remove(a)
    pool.add(a)
    assert a.active == 1
    lease.release()
    assert (a.active, a.requests) == (0, 1)
    with pool.lease() as backend:  # least connections still works on its index
        assert backend.active == 1
    assert pool.in_flight == 0


def test_release_after_moving_to_another_pool() -> None:
    """A lease taken in one pool can be released after its backend moved to another pool.

    Regression: the old pool's least-connections index was updated with the new pool's bucket
    key and raised KeyError from release().
    """
    old, new = Pool([A, B]), Pool([C])
    lease = old.lease(exclude={old.get(B)})
    moved = lease.backend
    old.remove(moved)
    new.add(moved)
    lease.release()
    assert (moved.active, moved.requests) == (0, 1)
    with new.lease(exclude={new.get(C)}) as backend:
        assert backend is moved
    assert new.in_flight == 0


def test_drain_takes_out_of_rotation_and_undrain_puts_back(events: list[PoolEvent]) -> None:
    """A draining backend stays a member, gets no new request, and returns when undrained."""
    pool = Pool([A, B], balancer="round_robin")
    pool.subscribe(events.append)
    lease = pool.lease()
    a = lease.backend
    assert pool.drain(A) is a
    assert a.draining
    assert a in pool
    assert pool.eligible == (pool.get(B),)
    for _ in range(3):
        with pool.lease() as backend:
            assert backend.url == B
    lease.release()
    assert a.requests == 1
    pool.drain(A)  # already draining: no event
    pool.drain(a, draining=False)
    assert not a.draining
    assert _urls(pool.eligible) == [A, B]
    assert [(e.kind, e.url, e.detail) for e in events] == [
        ("drained", A, "draining"),
        ("drained", A, "ready"),
    ]


def test_drain_unknown_raises_unknown_backend() -> None:
    """Draining a non-member raises UnknownBackend naming it."""
    with pytest.raises(UnknownBackend, match="http://q:1"):
        Pool([A]).drain("http://q:1")


def test_set_weight_changes_the_split_and_keeps_the_counters() -> None:
    """set_weight() changes a member in place: same object, same counters and lease, and
    sequential traffic splits by the new weights at once."""
    pool = Pool([A, B], balancer=WeightedRoundRobin())
    a = pool.get(A)
    with pool.lease():
        pass
    lease = pool.lease()
    before = (a.requests + pool.get(B).requests, a.active + pool.get(B).active)
    assert pool.set_weight(A, 3) is a
    assert (a.weight, a.eff_weight) == (3, 3.0)
    assert pool.get(A) is a
    assert (a.requests + pool.get(B).requests, a.active + pool.get(B).active) == before
    lease.release()
    picks = Counter()
    for _ in range(40):
        with pool.lease() as backend:
            picks[backend.url] += 1
    assert picks == {A: 30, B: 10}


def test_set_weight_refuses_bad_weights_and_unknown_backends() -> None:
    """A bad weight raises InvalidBackend and an unknown URL UnknownBackend; nothing changes."""
    pool = Pool([A])
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InvalidBackend):
            pool.set_weight(A, bad)  # type: ignore[arg-type]
    with pytest.raises(UnknownBackend):
        pool.set_weight("http://q:1", 2)
    assert pool.get(A).weight == 1


def test_set_healthy_reports_changes(events: list[PoolEvent]) -> None:
    """set_healthy returns whether the verdict changed and tells listeners why."""
    pool = Pool([A, B])
    pool.subscribe(events.append)
    assert pool.set_healthy(A, False, "HTTP 500")
    assert not pool.set_healthy("HTTP://a:1", False)
    assert not pool.get(A).healthy
    assert pool.eligible == (pool.get(B),)
    assert pool.set_healthy(pool.get(A), True)
    assert [(e.kind, e.detail, e.reason) for e in events] == [
        ("health", "down: HTTP 500", "HTTP 500"),
        ("health", "up", "up"),
    ]


def test_set_healthy_ignores_non_members() -> None:
    """set_healthy on an unknown URL or a removed Backend changes nothing and returns False."""
    pool = Pool([A])
    stranger = Backend(B)
    assert not pool.set_healthy("http://nowhere:1", False)
    assert not pool.set_healthy(stranger, False)
    assert stranger.healthy
    removed = pool.remove(A)
    assert not pool.set_healthy(removed, False)
    assert removed.healthy


def test_unhealthy_backend_gets_no_request_while_another_is_up() -> None:
    """A backend out of rotation is never picked while any backend is in rotation."""
    pool = Pool([A, B, C], balancer="round_robin")
    pool.set_healthy(B, False)
    picked = Counter(pool.lease().backend.url for _ in range(30))
    assert picked == Counter({A: 15, C: 15})


def test_admit_healthy_false_adds_backends_out_of_rotation() -> None:
    """With admit_healthy off (a health checker in "down" mode), new members start down."""
    pool = Pool([A])
    pool.admit_healthy = False
    added = pool.add(B)
    assert not added.healthy
    assert pool.eligible == (pool.get(A),)


# -- slow start ------------------------------------------------------------------------------


def test_slow_start_ramps_an_added_backend_in_steps(clock: FakeClock) -> None:
    """A backend added with slow start goes from 10 % of its weight to all of it, in steps."""
    window = 10.0
    pool = Pool([A], slow_start=window, clock=clock)
    added = pool.add(B, weight=10)
    assert added.eff_weight == pytest.approx(10 * SLOW_START_FLOOR)
    step = window / SLOW_START_STEPS
    clock.now += step / 2
    pool.lease().release()
    assert added.eff_weight == pytest.approx(1.0), "recomputed at most once per step"
    seen = [added.eff_weight]
    for _ in range(SLOW_START_STEPS + 2):
        clock.now += step
        pool.lease().release()
        seen.append(added.eff_weight)
    assert seen == sorted(seen)
    assert len(set(seen)) == SLOW_START_STEPS + 1
    assert seen[-1] == 10.0
    assert pool.get(A).eff_weight == 1.0, "the initial server never ramped"


def test_slow_start_halfway_share(clock: FakeClock) -> None:
    """Halfway through the ramp a backend has 10 % + 90 % / 2 of its weight."""
    pool = Pool([A], slow_start=20.0, clock=clock)
    added = pool.add(B, weight=4)
    clock.now += 10.0
    pool.lease().release()
    assert added.eff_weight == pytest.approx(4 * (SLOW_START_FLOOR + (1 - SLOW_START_FLOOR) / 2))


def test_initial_servers_do_not_ramp(clock: FakeClock) -> None:
    """Servers given to the constructor start at their full weight."""
    pool = Pool([Backend(A, weight=5), B], slow_start=30.0, clock=clock)
    assert [b.eff_weight for b in pool.backends] == [5.0, 1.0]


def test_recovered_and_undrained_backends_ramp(clock: FakeClock) -> None:
    """A backend coming back to health or out of drain starts a new ramp."""
    pool = Pool([Backend(A, weight=10), Backend(B, weight=10)], slow_start=10.0, clock=clock)
    pool.set_healthy(A, False)
    pool.set_healthy(A, True)
    pool.drain(B)
    pool.drain(B, draining=False)
    assert [b.eff_weight for b in pool.backends] == [1.0, 1.0]
    clock.now += 10.0
    pool.lease().release()
    assert [b.eff_weight for b in pool.backends] == [10.0, 10.0]


def test_slow_start_shifts_traffic_gradually(clock: FakeClock) -> None:
    """During a ramp, weighted round robin gives the newcomer a growing share."""
    pool = Pool([A], balancer=WeightedRoundRobin(), slow_start=10.0, clock=clock)
    pool.add(B)
    shares = []
    for _ in range(4):
        picked = Counter(pool.lease().backend.url for _ in range(1000))
        shares.append(picked[B] / 1000)
        clock.now += 2.5
    assert shares == sorted(shares)
    assert shares[0] == pytest.approx(0.1 / 1.1, abs=0.01)
    assert shares[-1] == pytest.approx(0.5, abs=0.1)


def test_slow_start_off_means_full_weight_at_once() -> None:
    """With slow_start 0 an added backend has its whole weight at once."""
    assert Pool().add(A, weight=6).eff_weight == 6.0


# -- events ----------------------------------------------------------------------------------


def test_events_for_add_and_remove(events: list[PoolEvent]) -> None:
    """Listeners hear of added and removed backends, after the change is visible."""
    pool = Pool()
    seen_members: list[int] = []

    def listener(event: PoolEvent) -> None:
        events.append(event)
        seen_members.append(len(pool))

    pool.subscribe(listener)
    a = pool.add(A)
    pool.remove(A)
    assert events == [
        PoolEvent("added", a, "weight 1", "weight 1", A),
        PoolEvent("removed", a, "nothing in flight", "nothing in flight", A),
    ]
    assert seen_members == [1, 0]


def test_subscribe_names_its_kinds() -> None:
    """subscribe() with kinds gets only those; the per-request "failure" only when named; an
    unknown kind and "no_backend" (published under the pool's lock) are refused."""
    pool = Pool([A])
    everything: list[str] = []
    failures: list[str] = []
    pool.subscribe(lambda e: everything.append(e.kind))
    pool.subscribe(lambda e: failures.append(e.reason), ("failure",))
    pool.lease().release("timeout")
    pool.drain(A)
    assert everything == ["drained"]
    assert failures == ["timeout"]
    with pytest.raises(ValueError, match="unknown event 'drain'"):
        pool.subscribe(everything.append, ("drain",))
    with pytest.raises(ValueError, match=r"Pool\.on"):
        pool.subscribe(everything.append, ("no_backend",))


def test_hooks_and_listeners_see_one_stream() -> None:
    """A hook (on()) and a listener (subscribe()) get the same events in the same order: the
    dispatcher is one subscriber of the stream."""
    pool = Pool([A, B])
    listened: list[tuple[str, str | None, str]] = []
    hooked: list[tuple[str, str | None, str]] = []
    pool.subscribe(lambda e: listened.append((e.kind, e.url, e.detail)))
    pool.on("*", lambda e: hooked.append((e.kind, e.backend, e.detail)))
    pool.drain(A)
    pool.set_healthy(B, False, "HTTP 500")
    pool.remove(A)
    pool.publish("retried", B, "GET /: timeout")
    assert pool.flush_events()
    assert (
        hooked
        == listened
        == [
            ("drained", A, "draining"),
            ("health", B, "down: HTTP 500"),
            ("removed", A, "nothing in flight"),
            ("retried", B, "GET /: timeout"),
        ]
    )


def test_unsubscribe_stops_events(events: list[PoolEvent]) -> None:
    """The function subscribe() returns removes the listener."""
    pool = Pool()
    unsubscribe = pool.subscribe(events.append)
    pool.add(A)
    unsubscribe()
    pool.add(B)
    assert [e.url for e in events] == [A]


def test_failing_listener_is_logged_and_does_not_break_the_pool(
    caplog: pytest.LogCaptureFixture, events: list[PoolEvent]
) -> None:
    """An exception in one listener is logged; the change happens and later listeners run."""
    pool = Pool()

    def broken(event: PoolEvent) -> None:
        raise RuntimeError("listener bug")

    pool.subscribe(broken)
    pool.subscribe(events.append)
    with caplog.at_level(logging.ERROR, logger="softlb.pool"):
        pool.add(A)
    assert A in pool
    assert len(events) == 1
    assert "pool listener" in caplog.text
    assert "listener bug" in caplog.text


def test_listener_may_call_back_into_the_pool(events: list[PoolEvent]) -> None:
    """Listeners run outside the pool's lock, so they can lease or change membership."""
    pool = Pool([A])

    def on_failure(event: PoolEvent) -> None:
        if event.kind == "failure" and event.backend is not None:
            pool.set_healthy(event.backend, False, "ejected by listener")

    pool.subscribe(on_failure, ("failure",))
    pool.lease().release("refused")
    assert not pool.get(A).healthy


# -- repr ------------------------------------------------------------------------------------


def test_pool_repr() -> None:
    """The pool's repr counts backends, healthy ones and requests in flight, and the strategy."""
    pool = Pool([A, B, C], balancer="round_robin")
    assert repr(pool) == "<Pool [3 backends: 3 healthy | 0 in flight] round_robin>"
    lease = pool.lease()
    pool.set_healthy(B, False)
    pool.drain(C)
    assert repr(pool) == "<Pool [3 backends: 1 healthy | 1 in flight] round_robin>"
    lease.release()


def test_lease_repr() -> None:
    """A lease's repr names its backend and whether it is still active."""
    lease = Pool([A]).lease()
    assert repr(lease) == "<Lease http://a:1 active>"
    lease.release()
    assert repr(lease) == "<Lease http://a:1 released>"


def test_pool_event_is_frozen() -> None:
    """PoolEvents are immutable values."""
    event = PoolEvent("added", Backend(A))
    with pytest.raises(AttributeError):
        event.kind = "removed"  # type: ignore[misc]


# -- threads ---------------------------------------------------------------------------------


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Make the interpreter switch threads very often, so races have a chance to show."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


@pytest.mark.usefixtures("busy_switching")
def test_membership_changes_during_leases_keep_totals_exact() -> None:
    """Threads leasing while another adds, removes, drains and ejects backends lose no count."""
    pool = Pool([A, B, C, "http://d:1"])
    created = list(pool.backends)  # every Backend that was ever a member
    threads, per_thread = 8, 1000
    barrier = threading.Barrier(threads + 1)
    stop = threading.Event()
    errors: list[BaseException] = []

    def lease_loop() -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                lease = pool.lease()
                lease.release("bad" if i % 5 == 0 else None)
        except BaseException as exc:
            errors.append(exc)

    def churn() -> None:
        barrier.wait()
        n = 0
        while not stop.is_set():
            n += 1
            url = f"http://extra{n % 3}:1"
            if url in pool:
                pool.remove(url)
            else:
                created.append(pool.add(url))
            pool.drain(C, draining=n % 2 == 0)
            pool.set_healthy("http://d:1", n % 3 != 0)

    workers = [threading.Thread(target=lease_loop) for _ in range(threads)]
    churner = threading.Thread(target=churn)
    for thread in [*workers, churner]:
        thread.start()
    for thread in workers:
        thread.join()
    stop.set()
    churner.join()
    assert errors == []
    assert pool.in_flight == 0
    assert all(b.active == 0 for b in created)
    assert sum(b.requests for b in created) == threads * per_thread
    assert sum(b.failures for b in created) == threads * per_thread // 5
    assert len(created) > 4, "the churn thread got to run"


def test_retry_goes_to_the_least_loaded_backend_left() -> None:
    """When least connections keeps choosing the tried backend, a retry takes the least
    loaded of the others, not the first in the list (found by the simulator)."""
    pool = Pool(["http://a:1", "http://b:1", "http://c:1"])
    a, b, c = pool.backends
    held = [pool.lease(exclude={b, c}) for _ in range(3)] + [pool.lease(exclude={a, c})]
    assert (a.active, b.active, c.active) == (3, 1, 0)
    first = pool.lease()
    assert first.backend is c
    first.release("connect")
    retry = pool.lease(exclude={c})
    assert retry.backend is b
    for lease in [*held, retry]:
        lease.release()


def test_consistent_hash_retry_moves_to_the_next_owner_on_the_ring() -> None:
    """A retried key goes where it would go if its backend left, not to the first backend."""
    urls = [f"http://h{i}:1" for i in range(8)]
    pool = Pool(urls, balancer="consistent_hash")
    for n in range(50):
        key = f"user{n}"
        owner = pool.lease(key)
        owner.release()
        retry = pool.lease(key, exclude={owner.backend})
        retry.release()
        survivors = Pool([u for u in urls if u != owner.backend.url], balancer="consistent_hash")
        expected = survivors.lease(key)
        expected.release()
        assert retry.backend.url == expected.backend.url


@pytest.mark.parametrize("leasing", ["lease", "try_lease"])
def test_shared_in_flight_is_read_at_each_pick(leasing: str) -> None:
    """With ``shared_in_flight`` set (shared state's in-flight table), every pick reads the
    other processes' counts as they are now: least connections avoids a backend only while
    another process really has requests on it, with no refresh in between."""
    a, b = Backend("http://a:1"), Backend("http://b:1")
    pool = Pool([a, b], balancer=LeastConnections())
    others = {a.url: 0, b.url: 0}
    pool.shared_in_flight = lambda backends: [others[backend.url] for backend in backends]

    def pick() -> str:
        lease = getattr(pool, leasing)()
        assert lease is not None
        lease.release()
        return lease.backend.url

    others[a.url] = 2
    assert [pick() for _ in range(3)] == [b.url] * 3
    assert a.shared_active == 2
    others[a.url], others[b.url] = 0, 1  # a's requests ended, one began on b
    assert [pick() for _ in range(3)] == [a.url] * 3
    others[b.url] = 0
    assert sorted(pick() for _ in range(4)) == [a.url, a.url, b.url, b.url]


def test_shared_in_flight_is_not_read_per_pick_above_the_bound() -> None:
    """Above SHARED_READ_MAX backends in rotation a pick does not read every backend's count
    (that would cost O(backends) per request); the state thread's refresh still does."""
    pool = Pool([f"http://b{i}:1" for i in range(SHARED_READ_MAX + 1)])
    reads: list[int] = []

    def read(backends: tuple[Backend, ...]) -> list[int]:
        reads.append(len(backends))
        return [0] * len(backends)

    pool.shared_in_flight = read
    pool.lease().release()
    assert reads == []
    pool.remove("http://b0:1")
    pool.lease().release()
    assert reads == [SHARED_READ_MAX]


def test_a_failing_shared_read_leaves_the_pick_to_the_last_counts() -> None:
    """A read of the other processes' counts that fails (the table gone) never fails the
    lease: the pick uses the counts last read."""
    a, b = Backend("http://a:1"), Backend("http://b:1")
    pool = Pool([a, b], balancer=LeastConnections())
    a.shared_active = 5
    pool.refresh()

    def broken(backends: tuple[Backend, ...]) -> list[int]:
        raise OSError("in-flight table gone")

    pool.shared_in_flight = broken
    lease = pool.try_lease()
    assert lease is not None and lease.backend is b
    lease.release()
