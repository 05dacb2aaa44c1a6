"""The StateStore contract, run over every implementation (memory, sqlite, redis)."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from multiprocessing.synchronize import Barrier

import pytest

from softlb.errors import BackendExists, InvalidBackend, UnknownBackend
from softlb.state import MAX_SLOTS, HealthVerdict, Membership, StateStore
from tests.state.conftest import StoreSpec, open_spec

#: Short enough to keep the suite fast, long enough for a round trip to a store under load.
TTL = 0.3
#: Longest a test waits for something to expire.
WAIT = 5.0

SEED = [("http://a:1", 1), ("http://b:2", 2), ("http://c:3", 3)]


def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; return whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def assert_slots_unique(membership: Membership) -> None:
    slots = [m.slot for m in membership.members]
    assert len(set(slots)) == len(slots)
    assert all(0 <= s < MAX_SLOTS for s in slots)


# -- membership ---------------------------------------------------------------------------


def test_kind_names_the_implementation(store: StateStore, store_spec: StoreSpec) -> None:
    """Each store says which kind it is."""
    assert store.kind == store_spec[0]


def test_empty_store_has_no_membership(store: StateStore) -> None:
    """A store never written has no membership, no version, no verdicts."""
    assert store.membership() is None
    assert store.version() is None
    assert dict(store.health()) == {}


def test_seed_writes_members_in_order_with_unique_slots(store: StateStore) -> None:
    """Seeding an empty store writes the members in order, at version 1."""
    membership = store.seed(SEED)
    assert membership.version == 1
    assert [(m.url, m.weight) for m in membership.members] == SEED
    assert_slots_unique(membership)
    assert store.membership() == membership
    assert store.version() == 1


def test_seed_is_a_no_op_once_there_is_a_membership(store: StateStore) -> None:
    """A second seed changes nothing and returns what is there."""
    first = store.seed(SEED)
    again = store.seed([("http://other:9", 5)])
    assert again == first
    assert store.membership() == first
    assert store.version() == 1


def test_seed_with_no_members_still_writes_a_membership(store: StateStore) -> None:
    """An empty seed is a membership (version 1, no members), so it is not seeded again."""
    assert store.seed([]) == Membership(1, ())
    assert store.seed(SEED) == Membership(1, ())


def test_seed_keeps_the_first_of_duplicate_urls(store: StateStore) -> None:
    """A URL listed twice in a seed is written once, with its first weight."""
    membership = store.seed([("http://a:1", 1), ("http://b:2", 2), ("http://a:1", 7)])
    assert [(m.url, m.weight) for m in membership.members] == [("http://a:1", 1), ("http://b:2", 2)]


def test_add_and_remove_bump_the_version_by_one_and_keep_order(store: StateStore) -> None:
    """Each change bumps the version by exactly one; members stay in the order added."""
    store.seed(SEED)
    added = store.add("http://d:4", 4)
    assert added.version == 2
    assert added.urls() == ["http://a:1", "http://b:2", "http://c:3", "http://d:4"]
    assert added.members[-1].weight == 4
    removed = store.remove("http://b:2")
    assert removed.version == 3
    assert removed.urls() == ["http://a:1", "http://c:3", "http://d:4"]
    readded = store.add("http://b:2", 5)
    assert readded.urls() == ["http://a:1", "http://c:3", "http://d:4", "http://b:2"]
    assert store.version() == 4
    assert store.membership() == readded
    assert_slots_unique(readded)


def test_add_to_an_empty_store_starts_at_version_1(store: StateStore) -> None:
    """Adding to a store with no membership creates one."""
    membership = store.add("http://a:1", 1)
    assert membership.version == 1
    assert membership.urls() == ["http://a:1"]


def test_add_of_a_present_url_raises_and_changes_nothing(store: StateStore) -> None:
    """BackendExists (a KeyError) for a URL already present; the version stays."""
    store.seed(SEED)
    with pytest.raises(BackendExists) as caught:
        store.add("http://a:1", 9)
    assert isinstance(caught.value, KeyError)
    assert "http://a:1" in str(caught.value)
    assert store.version() == 1
    membership = store.membership()
    assert membership is not None
    assert [(m.url, m.weight) for m in membership.members] == SEED


def test_remove_of_an_unknown_url_raises_and_changes_nothing(store: StateStore) -> None:
    """UnknownBackend (a KeyError) for a URL not present, on an empty store too."""
    with pytest.raises(UnknownBackend):
        store.remove("http://nowhere:1")
    store.seed(SEED)
    with pytest.raises(UnknownBackend) as caught:
        store.remove("http://nowhere:1")
    assert isinstance(caught.value, KeyError)
    assert store.version() == 1


def test_update_changes_weight_and_draining_in_place(store: StateStore) -> None:
    """update() changes only what it is given, keeps the member's slot and place, and bumps
    the version by one each time."""
    seeded = store.seed(SEED)
    slot_b = seeded.members[1].slot
    weighted = store.update("http://b:2", weight=7)
    assert weighted.version == 2
    assert [(m.url, m.weight, m.draining) for m in weighted.members] == [
        ("http://a:1", 1, False),
        ("http://b:2", 7, False),
        ("http://c:3", 3, False),
    ]
    assert weighted.members[1].slot == slot_b
    drained = store.update("http://b:2", draining=True)
    assert drained.version == 3
    assert (drained.members[1].weight, drained.members[1].draining) == (7, True)
    assert store.membership() == drained
    both = store.update("http://b:2", weight=2, draining=False)
    assert (both.members[1].weight, both.members[1].draining) == (2, False)
    assert both.members[1].slot == slot_b
    assert store.version() == 4


def test_update_of_an_unknown_url_raises_and_changes_nothing(store: StateStore) -> None:
    """UnknownBackend for a URL not present, on an empty store too (which stays empty)."""
    with pytest.raises(UnknownBackend):
        store.update("http://nowhere:1", weight=2)
    assert store.version() is None
    store.seed(SEED)
    with pytest.raises(UnknownBackend):
        store.update("http://nowhere:1", draining=True)
    assert store.version() == 1


def test_seed_after_a_version_and_with_draining_members(store: StateStore) -> None:
    """seed(after=N) writes version N + 1 (a write-back past every version still known),
    and (url, weight, draining) triples keep the draining flag."""
    membership = store.seed([("http://a:1", 1, True), ("http://b:2", 2)], after=1005)
    assert membership.version == 1006
    assert [(m.url, m.weight, m.draining) for m in membership.members] == [
        ("http://a:1", 1, True),
        ("http://b:2", 2, False),
    ]
    assert store.membership() == membership
    assert store.add("http://c:3", 3).version == 1007


def test_a_freed_slot_is_reused_last(store: StateStore) -> None:
    """Slots go round the table: a new member gets a slot nobody used lately."""
    seeded = store.seed(SEED)
    slot_of_b = seeded.members[1].slot
    store.remove("http://b:2")
    added = store.add("http://d:4", 1)
    assert added.members[-1].slot not in {m.slot for m in seeded.members}
    assert_slots_unique(added)
    assert slot_of_b not in {m.slot for m in added.members}


def test_slots_wrap_round_the_table_and_run_out(store: StateStore) -> None:
    """After the last slot the search wraps to the lowest free one; a full table refuses."""
    urls = [(f"http://h{i}:80", 1) for i in range(MAX_SLOTS - 1)]
    seeded = store.seed(urls)
    assert_slots_unique(seeded)
    freed = seeded.members[5]
    store.remove(freed.url)
    after_last = store.add("http://x:1", 1).members[-1].slot
    assert after_last not in {m.slot for m in seeded.members}  # the one never used
    wrapped = store.add("http://y:1", 1)
    assert wrapped.members[-1].slot == freed.slot
    assert len(wrapped.members) == MAX_SLOTS
    assert_slots_unique(wrapped)
    with pytest.raises(InvalidBackend):
        store.add("http://z:1", 1)
    assert store.version() == wrapped.version


def test_remove_forgets_the_health_verdict(store: StateStore) -> None:
    """A removed member's verdict goes with it."""
    store.seed(SEED)
    store.set_health("http://a:1", HealthVerdict(False, "down"), 60)
    store.remove("http://a:1")
    assert "http://a:1" not in store.health()


# -- health -------------------------------------------------------------------------------


def test_health_verdicts_are_read_back_until_they_expire(store: StateStore) -> None:
    """A verdict is there after set_health, and gone once its ttl has passed."""
    store.set_health("http://a:1", HealthVerdict(False, "3 failed probes"), TTL)
    store.set_health("http://b:2", HealthVerdict(True), 60)
    assert dict(store.health()) == {
        "http://a:1": HealthVerdict(False, "3 failed probes"),
        "http://b:2": HealthVerdict(True, ""),
    }
    assert wait_until(lambda: "http://a:1" not in store.health())
    assert dict(store.health()) == {"http://b:2": HealthVerdict(True, "")}


def test_a_new_verdict_replaces_the_old_and_renews_it(store: StateStore) -> None:
    """Writing a verdict again replaces it and restarts its ttl."""
    store.set_health("http://a:1", HealthVerdict(False, "down"), 60)
    store.set_health("http://a:1", HealthVerdict(True, "up again"), 60)
    assert dict(store.health()) == {"http://a:1": HealthVerdict(True, "up again")}


# -- the prober lease ---------------------------------------------------------------------


def test_prober_lease_is_exclusive_and_renewable(store: StateStore) -> None:
    """One owner at a time; the holder renews; another gets it after release."""
    assert store.claim_prober("node-a:1", 60)
    assert not store.claim_prober("node-b:2", 60)
    assert store.claim_prober("node-a:1", 60)
    store.release_prober("node-b:2")  # not the holder: nothing happens
    assert not store.claim_prober("node-b:2", 60)
    store.release_prober("node-a:1")
    assert store.claim_prober("node-b:2", 60)
    assert not store.claim_prober("node-a:1", 60)


def test_prober_lease_is_free_once_it_expires(store: StateStore) -> None:
    """A holder that stops renewing loses the lease after its ttl."""
    assert store.claim_prober("node-a:1", TTL)
    assert not store.claim_prober("node-b:2", 60)
    assert wait_until(lambda: store.claim_prober("node-b:2", 60))
    assert not store.claim_prober("node-a:1", 60)


# -- load between hosts -------------------------------------------------------------------


def test_remote_load_sums_the_other_nodes(store: StateStore) -> None:
    """A multi-host store adds up every other node's published in-flight counts."""
    if not store.multi_host:
        pytest.skip(f"{store.kind} stores do not exchange load between hosts")
    store.publish_load("n1", {"http://a:1": 2, "http://b:2": 1}, 60)
    store.publish_load("n2", {"http://a:1": 3}, 60)
    assert store.remote_load("n1") == {"http://a:1": 3}
    assert store.remote_load("n3") == {"http://a:1": 5, "http://b:2": 1}


# -- sharing ------------------------------------------------------------------------------


def test_two_store_objects_on_one_backing_see_each_others_writes(
    open_store: Callable[[], StateStore],
) -> None:
    """What one store object writes, another on the same backing reads."""
    one, two = open_store(), open_store()
    one.seed(SEED)
    assert two.version() == 1
    two.add("http://d:4", 1)
    assert one.version() == 2
    membership = one.membership()
    assert membership is not None
    assert membership.urls()[-1] == "http://d:4"
    one.set_health("http://a:1", HealthVerdict(False, "down"), 60)
    assert two.health()["http://a:1"] == HealthVerdict(False, "down")
    assert two.claim_prober("two", 60)
    assert not one.claim_prober("one", 60)
    two.clear()
    assert one.membership() is None


def test_clear_forgets_everything(store: StateStore) -> None:
    """After clear() the store is as if never written, and the lease is free."""
    store.seed(SEED)
    store.set_health("http://a:1", HealthVerdict(False, "down"), 60)
    assert store.claim_prober("node-a:1", 60)
    store.clear()
    assert store.membership() is None
    assert store.version() is None
    assert dict(store.health()) == {}
    assert store.claim_prober("node-b:2", 60)
    assert store.seed(SEED).version == 1


def test_repr_names_the_store(store: StateStore) -> None:
    """repr() says which store it is without touching the backing."""
    assert repr(store).startswith(f"<{type(store).__name__}")


# -- concurrency --------------------------------------------------------------------------

THREADS = 8
ADDS = 5


def test_concurrent_adds_from_threads_are_all_kept(store: StateStore) -> None:
    """Adds racing in 8 threads each land once, each bumping the version once."""
    store.seed([("http://seed:1", 1)])
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def adder(n: int) -> None:
        try:
            start.wait()
            for i in range(ADDS):
                store.add(f"http://t{n}-{i}:80", 1)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=adder, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    membership = store.membership()
    assert membership is not None
    urls = membership.urls()
    assert len(urls) == len(set(urls)) == 1 + THREADS * ADDS
    assert membership.version == 1 + THREADS * ADDS
    assert_slots_unique(membership)


PROCESSES = 4


def _add_in_child(spec: StoreSpec, n: int, together: Barrier) -> None:
    """In a spawned process: open the store, wait for the others, add ADDS members."""
    store = open_spec(spec)
    try:
        store.version()  # connected before the race starts
        together.wait(30)
        for i in range(ADDS):
            store.add(f"http://p{n}-{i}:80", 1)
    finally:
        store.close()


def test_concurrent_adds_from_processes_are_all_kept(
    store: StateStore, store_spec: StoreSpec
) -> None:
    """Adds racing in 4 processes each land once, each bumping the version once."""
    if store_spec[0] == "memory":
        pytest.skip("a memory store is not shared between processes")
    store.seed([("http://seed:1", 1)])
    ctx = multiprocessing.get_context("spawn")
    together = ctx.Barrier(PROCESSES)
    children = [
        ctx.Process(target=_add_in_child, args=(store_spec, n, together)) for n in range(PROCESSES)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0] * PROCESSES
    membership = store.membership()
    assert membership is not None
    urls = membership.urls()
    assert len(urls) == len(set(urls)) == 1 + PROCESSES * ADDS
    assert membership.version == 1 + PROCESSES * ADDS
    assert_slots_unique(membership)
