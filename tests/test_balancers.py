"""Tests for softlb.balancers: one contract suite over every strategy, then each strategy's own.

The contract tests run through a real :class:`~softlb.pool.Pool`, the only caller a balancer
has; strategies that draw at random are seeded so every run sees the same sequence.
"""

from __future__ import annotations

import inspect
import itertools
import math
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from softlb.backend import Backend
from softlb.balancers import (
    BALANCERS,
    Balancer,
    ConsistentHash,
    LeastConnections,
    PeakEwma,
    PowerOfTwoChoices,
    Random,
    RoundRobin,
    WeightedRoundRobin,
    balancer_by_name,
    hashing,
    parse_hash_key,
    register,
)
from softlb.balancers.ewma import DEFAULT_RTT, peak_ewma_cost
from softlb.balancers.hashing import key_position
from softlb.balancers.least import SCAN_MAX, least_load
from softlb.balancers.rotation import SMOOTH_EXACT_LIMIT
from softlb.errors import NoBackendAvailable
from softlb.pool import Lease, Pool

SEED = 20240601

#: The config names SPEC.md §2 promises, mapped to their classes.
EXPECTED = {
    "least_connections": LeastConnections,
    "round_robin": RoundRobin,
    "weighted_round_robin": WeightedRoundRobin,
    "random": Random,
    "power_of_two_choices": PowerOfTwoChoices,
    "consistent_hash": ConsistentHash,
    "peak_ewma": PeakEwma,
}

#: Strategies that give every backend the same share whatever its weight.
WEIGHT_BLIND = {"round_robin"}

ALL = sorted(BALANCERS)


class FakeClock:
    """A clock that moves only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(name: str, seed: int = SEED) -> Balancer:
    """A new balancer of strategy ``name``, seeded when the strategy takes a seed."""
    cls = BALANCERS[name]
    if "seed" in inspect.signature(cls).parameters:
        return balancer_by_name(name, seed=seed)
    return balancer_by_name(name)


def urls(n: int) -> list[str]:
    """``n`` distinct backend URLs."""
    return [f"http://10.0.{i // 250}.{i % 250 + 1}:8000" for i in range(n)]


def keys(n: int) -> Iterator[str]:
    """``n`` distinct request keys, such as client addresses."""
    return (f"192.168.{i // 256}.{i % 256}" for i in range(n))


def spread(pool: Pool, n: int, clock: FakeClock | None = None) -> Counter[str]:
    """URL -> picks over ``n`` sequential leases with distinct keys, each lasting 1 ms."""
    counts: Counter[str] = Counter()
    for key in keys(n):
        with pool.lease(key) as backend:
            counts[backend.url] += 1
            if clock is not None:
                clock.now += 0.001
    return counts


def warm(pool: Pool, clock: FakeClock, backends: Iterable[Backend] | None = None) -> None:
    """Send one 1 ms request to each backend, so peak_ewma has measured every one of them.

    The contract tests measure everyone first so that they test peak EWMA's steady state, not
    its treatment of newcomers (see test_peak_ewma_newcomer_gets_its_share_at_once).
    """
    for backend in pool.backends if backends is None else backends:
        _measure(pool, backend, 0.001, clock)


def _measure(pool: Pool, backend: Backend, seconds: float, clock: FakeClock) -> None:
    """Send one request to ``backend`` that takes ``seconds`` on the fake clock."""
    others = {b for b in pool.backends if b is not backend}
    with pool.lease(exclude=others) as chosen:
        assert chosen is backend
        clock.now += seconds


# -- registry --------------------------------------------------------------------------------


def test_registry_holds_exactly_the_documented_strategies() -> None:
    """BALANCERS maps every config name of the spec to its class, and nothing else."""
    assert BALANCERS == EXPECTED


@pytest.mark.parametrize("name", ALL)
def test_balancer_by_name_returns_a_new_instance(name: str) -> None:
    """balancer_by_name builds a fresh balancer whose name is the config name."""
    first, second = balancer_by_name(name), balancer_by_name(name)
    assert isinstance(first, EXPECTED[name])
    assert first is not second
    assert first.name == name
    assert repr(first) == f"<{EXPECTED[name].__name__} {name}>"


def test_balancer_by_name_rejects_unknown_names() -> None:
    """An unknown name is a ValueError listing every known name."""
    with pytest.raises(ValueError, match="unknown balancing algorithm 'fastest'") as info:
        balancer_by_name("fastest")
    for name in EXPECTED:
        assert name in str(info.value)


def test_balancer_by_name_passes_options() -> None:
    """Options go to the strategy's constructor; an option it does not take is a TypeError."""
    assert isinstance(balancer_by_name("random", seed=1), Random)
    with pytest.raises(TypeError):
        balancer_by_name("round_robin", seed=1)


def test_only_consistent_hash_uses_the_key() -> None:
    """uses_key is set exactly on the hashing strategy."""
    assert {name for name, cls in BALANCERS.items() if cls.uses_key} == {"consistent_hash"}


def test_register_adds_a_strategy_by_name() -> None:
    """A class decorated with register() can be built by name."""

    class First(Balancer):
        name = "test_first"

        def rebuild(self, eligible: tuple[Backend, ...], now: float) -> None:
            self.eligible = eligible

        def pick(self, key: str | None, now: float) -> Backend | None:
            return self.eligible[0] if self.eligible else None

    try:
        assert register(First) is First
        pool = Pool(["http://a:1", "http://b:1"], balancer="test_first")
        assert all(pool.lease().backend.url == "http://a:1" for _ in range(3))
    finally:
        del BALANCERS["test_first"]


# -- the contract every strategy keeps --------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_contract_empty_pool(name: str) -> None:
    """With no backend, pick returns None and a lease raises NoBackendAvailable."""
    balancer = make(name)
    balancer.rebuild((), 0.0)
    assert balancer.pick(None, 0.0) is None
    assert balancer.pick("key", 0.0) is None
    pool = Pool(balancer=make(name))
    with pytest.raises(NoBackendAvailable):
        pool.lease("key")


@pytest.mark.parametrize("name", ALL)
def test_contract_one_backend_gets_everything(name: str) -> None:
    """With one backend in rotation every request goes to it, with or without a key."""
    pool = Pool(["http://only:1"], balancer=make(name))
    only = pool.get("http://only:1")
    for key in [None, *keys(50)]:
        with pool.lease(key) as backend:
            assert backend is only
    assert only.requests == 51


@pytest.mark.parametrize("name", ALL)
def test_contract_one_backend_left_in_rotation(name: str) -> None:
    """When all but one backend are out of rotation, that one gets every request."""
    pool = Pool(urls(5), balancer=make(name))
    for url in urls(5)[1:4]:
        pool.set_healthy(url, False)
    pool.drain(urls(5)[4])
    assert Counter(spread(pool, 100)) == Counter({urls(5)[0]: 100})


@pytest.mark.parametrize("name", ALL)
def test_contract_all_down(name: str) -> None:
    """With every backend down a lease raises NoBackendAvailable; one recovery restores service."""
    pool = Pool(urls(3), balancer=make(name))
    for url in urls(3):
        pool.set_healthy(url, False)
    with pytest.raises(NoBackendAvailable):
        pool.lease("key")
    pool.set_healthy(urls(3)[2], True)
    assert spread(pool, 20) == Counter({urls(3)[2]: 20})


@pytest.mark.parametrize("name", ALL)
def test_contract_every_backend_serves(name: str) -> None:
    """With equal weights, every backend gets a fair share of sequential requests."""
    clock = FakeClock()
    pool = Pool(urls(3), balancer=make(name), clock=clock)
    warm(pool, clock)
    counts = spread(pool, 3000, clock)
    assert set(counts) == set(urls(3))
    for url in urls(3):
        assert counts[url] / 3000 == pytest.approx(1 / 3, abs=0.05), counts


@pytest.mark.parametrize("name", ALL)
def test_contract_weights(name: str) -> None:
    """With requests held open, a weight-3 backend carries about three times a weight-1 one."""
    clock = FakeClock()
    pool = Pool(
        [Backend("http://heavy:1", weight=3), "http://light:1"], balancer=make(name), clock=clock
    )
    warm(pool, clock)
    leases = [pool.lease(key) for key in keys(400)]
    share = Counter(lease.backend.url for lease in leases)["http://heavy:1"] / 400
    if name in WEIGHT_BLIND:
        assert share == 0.5
    else:
        assert share == pytest.approx(0.75, abs=0.07)
    for lease in leases:
        lease.release()
    assert pool.in_flight == 0


@pytest.mark.parametrize("name", ALL)
def test_contract_out_of_rotation_is_never_picked(name: str) -> None:
    """Backends that are down or draining get no request while any other is in rotation."""
    clock = FakeClock()
    pool = Pool(urls(6), balancer=make(name), clock=clock)
    warm(pool, clock)
    pool.set_healthy(urls(6)[1], False)
    pool.drain(urls(6)[4])
    counts = spread(pool, 600, clock)
    assert urls(6)[1] not in counts
    assert urls(6)[4] not in counts
    pool.set_healthy(urls(6)[1], True)
    assert urls(6)[1] in spread(pool, 600, clock)


@pytest.mark.parametrize("name", ALL)
def test_contract_membership_changes(name: str) -> None:
    """Added backends join the rotation (once measured, for peak_ewma) and removed ones leave."""
    clock = FakeClock()
    pool = Pool(urls(4), balancer=make(name), clock=clock)
    warm(pool, clock)
    pool.remove(urls(4)[0])
    new = pool.add("http://new:1")
    warm(pool, clock, [new])
    counts = spread(pool, 800, clock)
    assert urls(4)[0] not in counts
    assert set(counts) == {*urls(4)[1:], "http://new:1"}


@pytest.mark.parametrize("name", ALL)
def test_contract_exclude(name: str) -> None:
    """A retry that excludes the backends already tried gets another one when there is one."""
    pool = Pool(urls(4), balancer=make(name))
    for key in keys(50):
        first = pool.lease(key)
        second = pool.lease(key, exclude={first.backend})
        third = pool.lease(key, exclude={first.backend, second.backend})
        assert len({first.backend, second.backend, third.backend}) == 3
        for lease in (first, second, third):
            lease.release()
    with pytest.raises(NoBackendAvailable):
        pool.lease("key", exclude=set(pool.backends))


@pytest.mark.parametrize("name", ALL)
def test_contract_same_seed_same_sequence(name: str) -> None:
    """Two pools built alike, with the same seed, make the same choices."""
    runs = []
    for _ in range(2):
        clock = FakeClock()
        pool = Pool(urls(7), balancer=make(name), clock=clock)
        picks = []
        for key in keys(200):
            with pool.lease(key) as backend:
                picks.append(backend.url)
                clock.now += 0.001
        runs.append(picks)
    assert runs[0] == runs[1]


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
@pytest.mark.parametrize("name", ALL)
def test_contract_thread_hammer(name: str) -> None:
    """16 threads x 2,000 leases leave every in-flight count at 0 and the totals exact."""
    threads, per_thread = 16, 2000
    # A fake clock: with real time, peak_ewma's estimates would depend on thread scheduling.
    clock = FakeClock()
    pool = Pool(
        [Backend(url, weight=1 + i % 3) for i, url in enumerate(urls(5))],
        balancer=make(name),
        clock=clock,
    )
    warm(pool, clock)
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []
    failed = [0] * threads
    max_in_flight = [0]

    def hammer(index: int) -> None:
        try:
            barrier.wait()
            held = []
            for i in range(per_thread):
                held.append(pool.lease(f"client-{index}-{i % 97}"))
                if len(held) == 3 or i == per_thread - 1:  # keep a few in flight at once
                    max_in_flight[0] = max(max_in_flight[0], pool.in_flight)
                    for lease in held:
                        if i % 10 == 0:
                            lease.fail("refused")
                            failed[index] += 1
                        lease.release()
                    held.clear()
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=hammer, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert errors == []
    assert max_in_flight[0] > 3, "leases overlapped between threads"
    assert [b.active for b in pool.backends] == [0] * 5
    assert pool.in_flight == 0
    assert sum(b.requests for b in pool.backends) == threads * per_thread + 5  # 5 to warm up
    assert sum(b.failures for b in pool.backends) == sum(failed) > 0
    # The strategy's own state survived: held leases still reach every backend.
    held = [pool.lease(key) for key in keys(100)]
    assert {lease.backend.url for lease in held} == set(urls(5))
    for lease in held:
        lease.release()
    assert pool.in_flight == 0


# -- round robin -----------------------------------------------------------------------------


def test_round_robin_cycles_in_membership_order() -> None:
    """Round robin serves the backends one after the other, ignoring weights."""
    pool = Pool(
        ["http://a:1", Backend("http://b:1", weight=9), "http://c:1"], balancer="round_robin"
    )
    assert "".join(pool.lease().backend.url[7] for _ in range(7)) == "abcabca"


def test_round_robin_position_survives_a_rebuild() -> None:
    """A membership change does not send the next request back to the first backend."""
    pool = Pool(["http://a:1", "http://b:1", "http://c:1"], balancer="round_robin")
    assert pool.lease().backend.url == "http://a:1"
    pool.add("http://d:1")
    assert "".join(pool.lease().backend.url[7] for _ in range(5)) == "bcdab"


# -- weighted round robin --------------------------------------------------------------------


def test_weighted_round_robin_is_nginx_smooth() -> None:
    """Weights {a: 5, b: 1, c: 1} give nginx's smooth sequence a a b a c a a, cycle after cycle."""
    pool = Pool(
        [Backend("http://a:1", 5), "http://b:1", "http://c:1"], balancer="weighted_round_robin"
    )
    assert "".join(pool.lease().backend.url[7] for _ in range(21)) == "aabacaa" * 3


def test_weighted_round_robin_keeps_scores_across_rebuilds() -> None:
    """A health change of one backend does not restart the others' cycle from scratch."""
    pool = Pool(
        [Backend("http://a:1", 2), "http://b:1", "http://c:1"], balancer="weighted_round_robin"
    )
    first = "".join(pool.lease().backend.url[7] for _ in range(2))
    pool.set_healthy("http://c:1", False)
    rest = "".join(pool.lease().backend.url[7] for _ in range(6))
    assert first == "ab"
    assert Counter(rest) == Counter({"a": 4, "b": 2})


@pytest.mark.parametrize(
    "n", [SMOOTH_EXACT_LIMIT - 1, SMOOTH_EXACT_LIMIT, SMOOTH_EXACT_LIMIT + 1, 40, 257]
)
def test_weighted_round_robin_shares_are_exact(n: int) -> None:
    """Below and above the nginx/EDF limit, every cycle of sum(weights) picks is exact."""
    weights = [1 + (i * 7) % 5 for i in range(n)]
    pool = Pool(
        [Backend(url, w) for url, w in zip(urls(n), weights, strict=True)],
        balancer="weighted_round_robin",
    )
    cycle = sum(weights)
    for _ in range(3):
        counts = Counter(pool.lease().backend.url for _ in range(cycle))
        assert [counts[url] for url in urls(n)] == weights


@pytest.mark.parametrize("n", [SMOOTH_EXACT_LIMIT - 2, SMOOTH_EXACT_LIMIT + 8, 500])
def test_weighted_round_robin_interleaves(n: int) -> None:
    """A weight-10 backend among weight-1 ones gets its turns spread out, not in a burst.

    Regression: above SMOOTH_EXACT_LIMIT every EDF deadline started at 1/weight, so the heavy
    backend took its 10 turns in a row at the start of each cycle, then none for n - 1 picks.
    """
    pool = Pool([Backend(urls(n)[0], 10), *urls(n)[1:]], balancer="weighted_round_robin")
    cycle = n - 1 + 10
    picks = "".join(
        "H" if pool.lease().backend.url == urls(n)[0] else "." for _ in range(3 * cycle)
    )
    assert picks.count("H") == 30
    assert "HHH" not in picks
    positions = [i for i, mark in enumerate(picks) if mark == "H"]
    assert max(b - a for a, b in itertools.pairwise(positions)) <= cycle // 10 + 2


# -- least connections -----------------------------------------------------------------------


def test_least_connections_ties_rotate() -> None:
    """Sequential leases over three idle backends hit each in turn, not always the first."""
    pool = Pool(["http://a:1", "http://b:1", "http://c:1"], balancer="least_connections")
    picked = ""
    for _ in range(9):
        with pool.lease() as backend:
            picked += backend.url[7]
    assert picked == "abcabcabc"


def test_least_connections_picks_the_least_loaded() -> None:
    """A backend with requests in flight is passed over for an idle one."""
    pool = Pool(["http://a:1", "http://b:1", "http://c:1"], balancer="least_connections")
    busy = [pool.lease(), pool.lease()]
    assert {lease.backend.url for lease in busy} == {"http://a:1", "http://b:1"}
    for _ in range(3):
        with pool.lease() as backend:
            assert backend.url == "http://c:1"
    busy[0].release()
    with pool.lease() as backend:
        assert backend.url in ("http://a:1", "http://c:1")
    busy[1].release()


def test_least_connections_many_loads_stay_bounded_and_correct() -> None:
    """A backend coming down through many loads leaves emptied buckets above the lowest load
    behind; they are dropped (the index stays bounded) and every pick is still the least
    loaded backend."""
    balancer = LeastConnections(scan_max=0)  # the index's buckets, even at two backends
    pool = Pool(["http://a:1", "http://b:1"], balancer=balancer)
    held = [pool.lease() for _ in range(400)]
    assert [b.active for b in pool.backends] == [200, 200]
    most = 0
    for lease in held[::2]:  # one backend's leases: it comes down from 200 to 0
        lease.release()
        most = max(most, len(balancer._buckets))
    assert most <= 2 * 2 + 64 + 1
    down, up = pool.backends
    assert (down.active, up.active) == (0, 200)
    for n in range(200):
        lease = pool.lease()
        assert lease.backend is down, n  # the least loaded, until they are level
    assert Counter(pool.lease().backend.url for _ in range(4)) == {"http://a:1": 2, "http://b:1": 2}


def test_least_connections_prefers_weight() -> None:
    """Idle, one request at a time splits 3 to 1 by weight; with leases held, load divides
    as 3 to 1 too."""
    pool = Pool([Backend("http://a:1", weight=3), "http://b:1"], balancer="least_connections")
    seen = []
    for _ in range(12):
        with pool.lease() as backend:
            seen.append(backend.url)
    assert seen.count("http://a:1") == 9
    held = [pool.lease() for _ in range(8)]
    assert sorted(lease.backend.url[7] for lease in held) == list("aaaaaabb")
    assert least_load(pool.get("http://a:1")) == pytest.approx(6 / 3)
    assert least_load(pool.get("http://b:1")) == pytest.approx(2 / 1)


def test_least_connections_sequential_traffic_splits_by_weight() -> None:
    """Regression (hardening issue): with weights 1 and 2 and one request at a time, the
    weight-1 backend got nothing; now it gets a third, interleaved as nginx's smooth rotation
    (b a b, b a b, ...)."""
    pool = Pool(
        [Backend("http://a:1", weight=1), Backend("http://b:1", weight=2)],
        balancer="least_connections",
    )
    order = ""
    for _ in range(30):
        with pool.lease() as backend:
            order += backend.url[7]
    assert order == "bab" * 10


def test_least_connections_busy_backend_gets_no_catch_up_burst() -> None:
    """A backend that was busy while the others took turns rejoins the rotation where it
    stands, not with a run of picks owed to it."""
    pool = Pool(["http://a:1", "http://b:1", "http://c:1"], balancer="least_connections")
    stuck = pool.lease()  # one backend busy while 30 requests go to the others
    busy = stuck.backend.url
    for _ in range(30):
        with pool.lease() as backend:
            assert backend.url != busy
    stuck.release()
    order = []
    for _ in range(9):
        with pool.lease() as backend:
            order.append(backend.url)
    assert order.count(busy) == 3
    assert all(order[i] != order[i + 1] for i in range(8))


def test_least_connections_follows_slow_start_weight() -> None:
    """Loads are divided by the effective weight, so a ramping backend takes less."""
    clock = FakeClock()
    pool = Pool(["http://a:1"], balancer="least_connections", slow_start=10.0, clock=clock)
    pool.add("http://b:1")
    held = [pool.lease() for _ in range(11)]
    counts = Counter(lease.backend.url for lease in held)
    assert counts == Counter({"http://a:1": 10, "http://b:1": 1})


def test_least_connections_switches_between_scan_and_index() -> None:
    """At most SCAN_MAX eligible backends are scanned, more are indexed; draining across the
    threshold switches the mode both ways, and every pick is still the least loaded."""
    pool = Pool(urls(SCAN_MAX + 2), balancer="least_connections")
    balancer = pool.balancer
    assert isinstance(balancer, LeastConnections)
    assert balancer._buckets and not balancer._rank  # indexed
    held = [pool.lease() for _ in range(2 * (SCAN_MAX + 2))]
    assert [b.active for b in pool.backends] == [2] * (SCAN_MAX + 2)
    first, second, third, fourth = pool.backends[:4]

    pool.drain(first)
    assert len(pool.eligible) == SCAN_MAX + 1
    assert balancer._buckets and not balancer._rank  # still indexed
    pool.drain(second)
    assert len(pool.eligible) == SCAN_MAX
    assert balancer._rank and not balancer._buckets  # scanned
    assert all(b._lc_key is None for b in pool.backends)
    next(lease for lease in held if lease.backend is third).release()
    picks = [pool.lease() for _ in range(2)]
    assert picks[0].backend is third  # the only one at 1 in flight
    assert picks[1].backend is not third  # a tie at 2: the rotation takes the next
    picks[1].release()
    next(lease for lease in held if lease.backend is first).release()  # drained: not picked
    with pool.lease() as backend:
        assert backend not in (first, second)

    pool.drain(first, draining=False)  # back to SCAN_MAX + 1, at 1 in flight
    assert balancer._buckets and not balancer._rank  # indexed again
    with pool.lease() as backend:
        assert backend is first
    for lease in held:
        if lease.backend is fourth:
            lease.release()
    for _ in range(3):  # fourth is idle now: one request at a time, all go to it
        with pool.lease() as backend:
            assert backend is fourth
    pool.drain(third)
    assert balancer._rank and not balancer._buckets  # scanned again
    with pool.lease() as backend:
        assert backend is fourth


#: A step of :func:`test_least_connections_scan_and_index_pick_alike`.
_LC_STEPS = st.one_of(
    st.tuples(st.just("lease"), st.just(0), st.just(0)),
    st.tuples(st.just("retry"), st.integers(0, 99), st.just(0)),  # lease excluding one
    st.tuples(st.just("release"), st.integers(0, 99), st.just(0)),
    st.tuples(st.just("weight"), st.integers(0, 99), st.integers(1, 5)),
    st.tuples(st.just("drain"), st.integers(0, 99), st.just(0)),  # in or out of rotation
    st.tuples(st.just("add"), st.integers(1, 5), st.just(0)),
    st.tuples(st.just("remove"), st.integers(0, 99), st.just(0)),
    st.tuples(st.just("shared"), st.integers(0, 99), st.integers(0, 3)),  # no refresh yet
    st.tuples(st.just("refresh"), st.just(0), st.just(0)),
    st.tuples(st.just("tick"), st.integers(1, 4), st.just(0)),  # slow start ramps
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Two idle backends at the same pass: the one released first (the earlier arrival) goes first.
@example(weights=[1, 1], steps=[("lease", 0, 0)] * 2 + [("release", 1, 0), ("release", 0, 0)])
# Another process's count read but not yet refreshed: both still rank b0 at load 0.
@example(weights=[1, 1], steps=[("shared", 0, 1)])
@given(
    weights=st.lists(st.integers(1, 5), min_size=1, max_size=SCAN_MAX),
    steps=st.lists(
        st.one_of(st.tuples(st.just("lease"), st.just(0), st.just(0)), _LC_STEPS),
        min_size=20,
        max_size=100,
    ),
)
def test_least_connections_scan_and_index_pick_alike(
    weights: list[int], steps: list[tuple[str, int, int]]
) -> None:
    """Scanning a small pool and indexing it choose the same backends in the same order, and
    explain them alike, whatever happens between picks: leases and releases, retries, weight
    changes, drains, backends added (up to SCAN_MAX + 2, so the scanned pool switches to the
    index and back) and removed, other processes' counts (read before the refresh that hands
    them to the balancer) and slow-start ramps. A third pool scans too but leases with
    ``try_lease`` (the event loop's call), whose usual lease picks and counts in one step
    (``LeastConnections.take``): it must choose as the other two do."""
    clock = FakeClock()
    scanned = LeastConnections()
    indexed = LeastConnections(scan_max=0)
    taking = LeastConnections()
    pools = [
        Pool(
            [Backend(f"http://b{i}:1", weight) for i, weight in enumerate(weights)],
            balancer=balancer,
            slow_start=5.0,
            clock=clock,
        )
        for balancer in (scanned, indexed, taking)
    ]
    leases: list[list[Lease]] = []  # [the scanned pool's, the indexed pool's, the third's]
    added = len(weights)

    def urls_of(pool: Pool) -> list[str]:
        return [b.url for b in pool.backends]

    def lease_each(exclude: str | None = None) -> None:
        taken: list[Lease | None] = []
        for pool in pools:
            skip = [pool.get(exclude)] if exclude is not None else []
            try:
                if pool.balancer is taking:
                    taken.append(pool.try_lease(exclude=skip))
                else:
                    taken.append(pool.lease(exclude=skip))
            except NoBackendAvailable:
                taken.append(None)
        scan, index, take = (None if lease is None else lease.backend.url for lease in taken)
        assert scan == index == take
        if scan is not None:
            leases.append([lease for lease in taken if lease is not None])

    for op, n, value in steps:
        members = urls_of(pools[0])
        assert members == urls_of(pools[1]) == urls_of(pools[2])
        member = members[n % len(members)] if members else None
        if op == "lease":
            lease_each()
        elif op == "retry" and member is not None:
            lease_each(exclude=member)
        elif op == "release" and leases:
            for lease in leases.pop(n % len(leases)):
                lease.release()
        elif op == "weight" and member is not None:
            for pool in pools:
                pool.set_weight(member, value)
        elif op == "drain" and member is not None:
            for pool in pools:
                pool.drain(member, draining=not pool.get(member).draining)
        elif op == "add" and len(members) < SCAN_MAX + 2:
            for pool in pools:
                pool.add(Backend(f"http://b{added}:1", n))
            added += 1
        elif op == "remove" and member is not None:
            for pool in pools:
                pool.remove(member)
        elif op == "shared" and member is not None:
            for pool in pools:
                pool.get(member).shared_active = value
        elif op == "refresh":
            for pool in pools:
                pool.refresh()
        elif op == "tick":
            clock.now += n
        scanning = len(pools[0].eligible) <= SCAN_MAX
        assert bool(scanned._rank) == (scanning and bool(pools[0].eligible))
        assert not scanned._buckets or not scanning
        assert not indexed._rank
        explained = [[(c.url, c.score, c.why) for c in pool.explain().candidates] for pool in pools]
        assert explained[0] == explained[1] == explained[2]
    lease_each()  # one more pick after the last step
    for taken in leases:
        for lease in taken:
            lease.release()


# -- random and power of two choices ---------------------------------------------------------


def test_random_follows_weights() -> None:
    """Weighted random gives each backend its weight's share within a small tolerance."""
    pool = Pool(
        [Backend(url, w) for url, w in zip(urls(3), [1, 2, 3], strict=True)],
        balancer=Random(seed=SEED),
    )
    counts = spread(pool, 12_000)
    for url, weight in zip(urls(3), [1, 2, 3], strict=True):
        assert counts[url] / 12_000 == pytest.approx(weight / 6, abs=0.02)


def test_random_uniform_spread() -> None:
    """With equal weights each of ten backends gets about a tenth."""
    pool = Pool(urls(10), balancer=Random(seed=SEED))
    counts = spread(pool, 10_000)
    assert min(counts.values()) > 850
    assert max(counts.values()) < 1150


def test_random_accepts_an_rng() -> None:
    """An injected random.Random drives the choices."""
    import random

    picks = []
    for _ in range(2):
        pool = Pool(urls(5), balancer=Random(rng=random.Random(3)))
        picks.append([pool.lease().backend.url for _ in range(50)])
    assert picks[0] == picks[1]


def test_power_of_two_choices_avoids_the_loaded_backend() -> None:
    """With two backends, the one with fewer requests in flight always wins."""
    pool = Pool(["http://a:1", "http://b:1"], balancer=PowerOfTwoChoices(seed=SEED))
    held = pool.lease()
    for _ in range(50):
        with pool.lease() as backend:
            assert backend is not held.backend
    held.release()


def test_power_of_two_choices_keeps_load_even() -> None:
    """With leases held open, loads stay within a few requests of each other."""
    pool = Pool(urls(10), balancer=PowerOfTwoChoices(seed=SEED))
    held = [pool.lease() for _ in range(1000)]
    loads = [b.active for b in pool.backends]
    assert sum(loads) == 1000
    assert max(loads) - min(loads) <= 6
    for lease in held:
        lease.release()


def test_power_of_two_choices_sequential_spread() -> None:
    """With idle backends the first draw wins, so sequential requests spread like random."""
    pool = Pool(urls(4), balancer=PowerOfTwoChoices(seed=SEED))
    counts = spread(pool, 8000)
    for url in urls(4):
        assert counts[url] / 8000 == pytest.approx(0.25, abs=0.03)


def test_power_of_two_choices_follows_weights() -> None:
    """With leases held open, weight 4 carries about four times weight 1."""
    pool = Pool(
        [Backend("http://a:1", 4), "http://b:1", "http://c:1"],
        balancer=PowerOfTwoChoices(seed=SEED),
    )
    held = [pool.lease() for _ in range(600)]
    counts = Counter(lease.backend.url for lease in held)
    assert counts["http://a:1"] / 600 == pytest.approx(4 / 6, abs=0.03)


# -- consistent hash -------------------------------------------------------------------------


def test_consistent_hash_same_key_same_backend() -> None:
    """A key maps to one backend, request after request."""
    pool = Pool(urls(10), balancer=ConsistentHash(seed=SEED))
    for key in keys(200):
        first = pool.lease(key).backend
        for _ in range(3):
            assert pool.lease(key).backend is first


def test_consistent_hash_is_independent_of_the_instance() -> None:
    """Two rings built from the same backends map every key the same way."""
    mapping = []
    for seed in (1, 2):
        pool = Pool(urls(10), balancer=ConsistentHash(seed=seed))
        mapping.append([pool.lease(key).backend.url for key in keys(500)])
    assert mapping[0] == mapping[1]


def test_consistent_hash_is_stable_across_processes() -> None:
    """The mapping does not depend on Python's per-process string hash seed."""
    code = (
        "from softlb.pool import Pool\n"
        "from softlb.balancers import ConsistentHash\n"
        f"pool = Pool({urls(10)!r}, balancer=ConsistentHash())\n"
        "print(','.join(pool.lease(f'k{i}').backend.url[-6:] for i in range(100)))\n"
    )
    pool = Pool(urls(10), balancer=ConsistentHash())
    here = ",".join(pool.lease(f"k{i}").backend.url[-6:] for i in range(100))
    for hash_seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": hash_seed, "PATH": ""},
        ).stdout.strip()
        assert out == here


def test_consistent_hash_removal_moves_only_the_removed_share() -> None:
    """Removing 1 of 10 backends moves only the keys it owned, about a tenth of 10,000."""
    pool = Pool(urls(10), balancer=ConsistentHash(seed=SEED))
    before = {key: pool.lease(key).backend.url for key in keys(10_000)}
    removed = urls(10)[3]
    pool.remove(removed)
    after = {key: pool.lease(key).backend.url for key in keys(10_000)}
    moved = [key for key in before if before[key] != after[key]]
    assert all(before[key] == removed for key in moved)
    assert len(moved) == sum(1 for url in before.values() if url == removed)
    assert 0.05 < len(moved) / 10_000 < 0.15
    pool.add(removed)
    assert {key: pool.lease(key).backend.url for key in keys(10_000)} == before


def test_consistent_hash_addition_moves_about_one_in_n() -> None:
    """Adding an 11th backend moves keys only to it, about a eleventh of them."""
    pool = Pool(urls(10), balancer=ConsistentHash(seed=SEED))
    before = {key: pool.lease(key).backend.url for key in keys(10_000)}
    pool.add("http://newcomer:1")
    after = {key: pool.lease(key).backend.url for key in keys(10_000)}
    moved = [key for key in before if before[key] != after[key]]
    assert all(after[key] == "http://newcomer:1" for key in moved)
    assert 0.04 < len(moved) / 10_000 < 0.15


def test_consistent_hash_unhealthy_backend_keys_move_and_come_back() -> None:
    """Taking a backend out of rotation moves only its keys, and they return with it."""
    pool = Pool(urls(5), balancer=ConsistentHash(seed=SEED))
    before = {key: pool.lease(key).backend.url for key in keys(2000)}
    pool.set_healthy(urls(5)[0], False)
    during = {key: pool.lease(key).backend.url for key in keys(2000)}
    assert all(during[k] == before[k] for k in before if before[k] != urls(5)[0])
    assert urls(5)[0] not in during.values()
    pool.set_healthy(urls(5)[0], True)
    assert {key: pool.lease(key).backend.url for key in keys(2000)} == before


def test_consistent_hash_honours_weights() -> None:
    """A weight-3 backend among three of weight 1 owns about half of the keys."""
    pool = Pool([Backend(urls(4)[0], 3), *urls(4)[1:]], balancer=ConsistentHash(seed=SEED))
    counts = spread(pool, 20_000)
    assert counts[urls(4)[0]] / 20_000 == pytest.approx(0.5, abs=0.08)


def test_consistent_hash_ring_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_RING_POINTS the points are scaled down together, and every backend keeps some."""
    limit = 4096
    monkeypatch.setattr(hashing, "MAX_RING_POINTS", limit)
    weights = [1 + i % 20 for i in range(300)]
    pool = Pool(
        [Backend(url, w) for url, w in zip(urls(300), weights, strict=True)],
        balancer=ConsistentHash(seed=SEED),
    )
    balancer = pool.balancer
    assert isinstance(balancer, ConsistentHash)
    assert len(balancer._points) <= limit * 1.05
    owned = Counter(balancer._owners)
    assert set(owned) == set(pool.backends)
    heavy, light = pool.backends[19], pool.backends[0]  # weights 20 and 1
    assert owned[heavy] > 10 * owned[light]


def test_consistent_hash_without_key_spreads_at_random() -> None:
    """A request without a key goes to a random backend (as in Envoy)."""
    pool = Pool(urls(4), balancer=ConsistentHash(seed=SEED))
    counts = Counter(pool.lease(None).backend.url for _ in range(4000))
    for url in urls(4):
        assert counts[url] / 4000 == pytest.approx(0.25, abs=0.03)


def test_key_position_is_a_32_bit_number() -> None:
    """Key positions lie on the 32-bit ring and differ between keys."""
    positions = {key_position(key) for key in keys(1000)}
    assert len(positions) == 1000
    assert all(0 <= p < 2**32 for p in positions)


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("client_ip", ("client_ip", None)),
        ("path", ("path", None)),
        ("header:X-User", ("header", "X-User")),
        ("cookie:session", ("cookie", "session")),
    ],
)
def test_parse_hash_key_accepts(spec: str, parsed: tuple[str, str | None]) -> None:
    """The four documented forms parse into (kind, name)."""
    assert parse_hash_key(spec) == parsed


@pytest.mark.parametrize("spec", ["", "ip", "header", "path:x", "client_ip:x", "Path"])
def test_parse_hash_key_rejects(spec: str) -> None:
    """Anything else is a ValueError listing the allowed forms."""
    with pytest.raises(
        ValueError, match=r"is not one of client_ip, path, header:NAME, cookie:NAME"
    ):
        parse_hash_key(spec)


@pytest.mark.parametrize(
    "spec", ["header:", "header:  ", "header: X-User", "cookie:", "cookie:a=b", "header:X User"]
)
def test_parse_hash_key_rejects_bad_names(spec: str) -> None:
    """The name is a token written right after the colon: the config's rule, the same one."""
    with pytest.raises(ValueError, match=r"does not name a (header|cookie)"):
        parse_hash_key(spec)


# -- peak EWMA -------------------------------------------------------------------------------


def test_peak_ewma_prefers_the_fast_backend() -> None:
    """When one backend is ten times slower than the others, it gets (almost) no traffic."""
    clock = FakeClock()
    pool = Pool(urls(3), balancer=PeakEwma(seed=SEED), clock=clock)
    slow, fast1, fast2 = pool.backends
    _measure(pool, slow, 0.1, clock)
    _measure(pool, fast1, 0.01, clock)
    _measure(pool, fast2, 0.01, clock)
    counts: Counter[str] = Counter()
    for _ in range(300):
        with pool.lease() as backend:
            counts[backend.url] += 1
            clock.now += 0.01 if backend is not slow else 0.1
    assert counts[slow.url] == 0
    assert counts[fast1.url] + counts[fast2.url] == 300


def test_peak_ewma_weighs_load_against_latency() -> None:
    """A fast backend with many requests in flight loses to a slower idle one."""
    clock = FakeClock()
    pool = Pool(urls(2), balancer=PeakEwma(seed=SEED), clock=clock)
    slow, fast = pool.backends
    _measure(pool, slow, 0.1, clock)
    _measure(pool, fast, 0.01, clock)
    held = [pool.lease() for _ in range(11)]
    assert Counter(lease.backend for lease in held) == Counter({fast: 10, slow: 1})


def test_peak_ewma_decays_so_a_slow_backend_is_tried_again() -> None:
    """A backend slow once gets traffic again once its unrefreshed estimate has decayed."""
    clock = FakeClock()
    pool = Pool(urls(2), balancer=PeakEwma(seed=SEED), clock=clock)
    slow, fast = pool.backends
    _measure(pool, slow, 1.0, clock)
    _measure(pool, fast, 0.01, clock)
    assert pool.lease().backend is fast
    clock.now += 60.0  # six time constants: the slow estimate is 1 s x e^-6 = 2.5 ms
    _measure(pool, fast, 0.01, clock)
    assert peak_ewma_cost(slow, clock.now) < peak_ewma_cost(fast, clock.now)
    assert pool.lease().backend is slow


def test_peak_ewma_new_backend_is_free_while_idle_and_penalised_while_pending() -> None:
    """An unmeasured backend costs 0 while idle, DEFAULT_RTT decaying from its join while busy."""
    clock = FakeClock()
    pool = Pool(urls(1), balancer=PeakEwma(seed=SEED), clock=clock)
    _measure(pool, pool.backends[0], 0.05, clock)
    newcomer = pool.add("http://new:1")
    assert peak_ewma_cost(newcomer, clock.now) == 0.0
    lease = pool.lease()
    assert lease.backend is newcomer  # the newcomer is tried at once, and so gets measured
    balancer = pool.balancer
    assert isinstance(balancer, PeakEwma)
    joined = balancer._seeded[newcomer]
    assert peak_ewma_cost(newcomer, clock.now, seeded_at=joined) == 2 * DEFAULT_RTT
    assert pool.lease().backend is not newcomer  # no pile-up before its first answer
    clock.now += 10.0
    assert peak_ewma_cost(newcomer, clock.now, seeded_at=joined) == pytest.approx(
        2 * DEFAULT_RTT * math.exp(-1)
    )
    lease.release()


def test_peak_ewma_cost_divides_by_weight() -> None:
    """Cost is estimate x (in flight + 1) / effective weight."""
    backend = Backend("http://a:1", weight=4)
    backend.observe_latency(0.2, now=100.0)
    backend.active = 3
    assert peak_ewma_cost(backend, 100.0) == pytest.approx(0.2 * 4 / 4)


def test_peak_ewma_newcomer_gets_its_share_at_once() -> None:
    """A backend added to a busy pool is measured by its first request and then shares."""
    clock = FakeClock()
    pool = Pool(urls(2), balancer=PeakEwma(seed=SEED), clock=clock)
    warm(pool, clock)
    newcomer = pool.add("http://new:1")
    hits = 0
    for _ in range(300):
        with pool.lease() as backend:
            hits += backend is newcomer
            clock.now += 0.001
    assert 60 <= hits <= 140
