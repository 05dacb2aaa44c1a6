"""SharedState over a real store: PATCH-style updates keep counters, and hosts sharing a Redis
converge again after it restarted empty (SPEC §7; hardening item 8).

Each test drives two :class:`SharedState` objects ("hosts") by calling :meth:`poll` itself
instead of starting their threads, so the order of events is the test's, not the scheduler's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from softlb.pool import Pool
from softlb.state import MemoryStore, StoreUnavailable
from softlb.state.sync import SEED_DEFER, WRITE_BACK_GAP, SharedState
from tests.helpers.redis_server import RedisServer

U1 = "http://10.0.0.1:8001"
U2 = "http://10.0.0.2:8002"
U3 = "http://10.0.0.3:8003"

#: Polls a test makes at most while a restarted Redis is reconnected to (the first call on a
#: pooled connection to the old server fails once).
RECONNECT_POLLS = 10


def urls(state: SharedState) -> list[str]:
    return [b.url for b in state.pool.backends]


def poll_until_fresh(state: SharedState) -> None:
    """Poll until one poll reached the store (bounded in count and time)."""
    deadline = time.monotonic() + 5
    for _ in range(RECONNECT_POLLS):
        state.poll()
        if not state.stale:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"the store stayed unavailable: {state.last_error}")


@pytest.fixture
def hosts(redis_isolated: RedisServer) -> Iterator[tuple[SharedState, SharedState]]:
    """Two hosts on one Redis of the test's own, seeded with U1; no background threads."""
    pytest.importorskip("redis", reason="redis-py is not installed (pip install softlb[redis])")
    from softlb.state.redis import RedisStore

    made = []
    for node in ("host-a", "host-b"):
        store = RedisStore.from_url(redis_isolated.url, cluster="sync")
        made.append(SharedState(Pool(), store, seed=[(U1, 1)], node=node))
    a, b = made
    a.poll()
    b.poll()
    yield a, b
    for state in made:
        state.store.close()


def test_a_change_after_redis_restarted_empty_reaches_the_other_host(
    hosts: tuple[SharedState, SharedState], redis_isolated: RedisServer
) -> None:
    """Regression (hardening item 8): host A writes back the membership after Redis lost it
    and makes a change at once; host B, which knew version 2, must see it at its next poll.
    The write-back used to restart at version 1, so A's change made the store's version 2
    again, B took it for the one it had seen, and missed the change (for 5 s, until a full
    read)."""
    a, b = hosts
    a.add(U2, 1)  # version 2
    b.poll()
    assert urls(b) == [U1, U2]

    redis_isolated.restart()  # the same port, no data
    poll_until_fresh(a)  # notices the empty store and writes back what it knew
    a.add(U3, 1)
    poll_until_fresh(b)
    assert urls(b) == [U1, U2, U3]
    assert urls(a) == [U1, U2, U3]
    version = a.store.version()
    assert version is not None and version > 2 + WRITE_BACK_GAP


def test_an_admin_change_to_an_emptied_store_keeps_the_other_backends(
    hosts: tuple[SharedState, SharedState], redis_isolated: RedisServer
) -> None:
    """Regression: an admin add that reaches a store emptied by a restart before any poll
    noticed used to create a membership of that one backend, which every host then applied,
    dropping all the others. Now the last known membership is written back first."""
    a, b = hosts
    a.add(U2, 3)
    b.poll()
    redis_isolated.restart()
    for _ in range(RECONNECT_POLLS):  # the first call on the old connection fails once
        try:
            a.add(U3, 1)
            break
        except StoreUnavailable:
            time.sleep(0.05)
    else:
        raise AssertionError("Redis did not come back")
    assert urls(a) == [U1, U2, U3]
    assert [b_.weight for b_ in a.pool.backends] == [1, 3, 1]
    poll_until_fresh(b)
    assert urls(b) == [U1, U2, U3]


def test_a_process_started_in_an_outage_does_not_undo_what_others_write_back(
    hosts: tuple[SharedState, SharedState], redis_isolated: RedisServer
) -> None:
    """Regression: host A restarts while Redis is down (it knows only the config's U1), and
    Redis comes back empty. A used to seed the config's membership at once, before host B
    wrote back the one it knew (U1 and the admin-added U2), and every host then dropped U2.
    A now leaves an empty store to the hosts that knew it for SEED_DEFER, and adopts what
    they write back; alone, it seeds the config's after that."""
    from softlb.state.redis import RedisStore

    a_before, b = hosts
    a_before.add(U2, 2)
    b.poll()
    assert urls(b) == [U1, U2]
    redis_isolated.stop()
    a = SharedState(Pool(), RedisStore.from_url(redis_isolated.url, cluster="sync"),
                    seed=[(U1, 1)], node="host-a")  # fmt: skip
    try:
        a.poll()
        assert a.stale and urls(a) == []  # (softlb adds the config's servers to the pool)
        redis_isolated.restart()  # empty
        for _ in range(RECONNECT_POLLS):  # A notices the empty store first: it waits
            a.poll()
            if a.last_error and "never read it" in a.last_error:
                break
            time.sleep(0.05)
        assert a.stale and a.store.version() is None
        poll_until_fresh(b)  # B writes back what it knew
        poll_until_fresh(a)
        assert urls(a) == urls(b) == [U1, U2]
        assert [backend.weight for backend in a.pool.backends] == [1, 2]

        redis_isolated.restart()  # empty again, and no host that knew it polls this time
        c = SharedState(Pool(), RedisStore.from_url(redis_isolated.url, cluster="sync"),
                        seed=[(U1, 1)], node="host-c")  # fmt: skip
        redis_isolated.stop()
        c.poll()
        assert c.stale
        redis_isolated.restart()
        started = time.monotonic()
        deadline = started + 5
        while c.stale and time.monotonic() < deadline:
            c.poll()
            time.sleep(0.05)
        assert not c.stale and urls(c) == [U1]  # the config's, after the wait
        assert time.monotonic() - started >= SEED_DEFER * 0.9
        c.store.close()
    finally:
        a.store.close()


def test_update_is_shared_and_keeps_the_backends_counters(
    hosts: tuple[SharedState, SharedState],
) -> None:
    """A weight or draining change made on one host reaches the other at its next poll and
    is applied in place there: the backend keeps its counters and requests in flight."""
    a, b = hosts
    on_b = b.pool.get(U1)
    with b.pool.lease():
        pass
    lease = b.pool.lease()
    try:
        changed = a.update(U1, weight=5, draining=True)
        assert (changed.weight, changed.draining) == (5, True)
        b.poll()
        assert b.pool.get(U1) is on_b
        assert (on_b.weight, on_b.draining, on_b.requests, on_b.active) == (5, True, 1, 1)
        assert b.pool.eligible == ()
        a.update(U1, draining=False)
        b.poll()
        assert (on_b.weight, on_b.draining) == (5, False)
        assert b.pool.eligible == (on_b,)
    finally:
        lease.release()


def test_a_write_back_keeps_weights_and_draining() -> None:
    """A store that lost its data gets back every member's weight and draining flag."""
    store = MemoryStore()
    state = SharedState(Pool(), store, seed=[(U1, 2), (U2, 1)])
    state.poll()
    state.update(U2, draining=True)
    store.clear()
    state.poll()
    membership = store.membership()
    assert membership is not None
    assert [(m.url, m.weight, m.draining) for m in membership.members] == [
        (U1, 2, False),
        (U2, 1, True),
    ]
    assert membership.version == 2 + WRITE_BACK_GAP + 1
