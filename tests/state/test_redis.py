"""What only the Redis store has: URLs, key layout, clusters sharing a Redis, the Lua lease,
load snapshots between nodes, a Redis that dies or pauses, fork, and data loss.

The behaviour every store shares is pinned by the contract suite (test_contract.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from softlb.errors import BackendExists, ConfigError, InvalidBackend, UnknownBackend
from softlb.state import MAX_SLOTS, HealthVerdict, MemoryStore, StoreUnavailable

if TYPE_CHECKING:  # here, so the import order is the same whether tests/state is a package
    from tests.helpers.redis_server import RedisServer

if os.environ.get("CI"):  # CI installs the redis extra: a missing client is a failure there
    import redis
else:
    redis = pytest.importorskip("redis", reason="needs the redis extra: pip install softlb[redis]")

from softlb.state.redis import RedisStore  # needs redis-py, so after the check above

#: A call with Redis down must fail fast: refused connections answer at once.
DOWN_BUDGET = 0.25

#: Seconds a value meant to expire lives: long enough for the checks made before it expires,
#: even on a busy CI machine.
SHORT_TTL = 0.3


def unique_cluster() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def cluster() -> str:
    return unique_cluster()


@pytest.fixture
def make_store(redis_url: str) -> Iterator[Callable[..., RedisStore]]:
    """Build stores on the session's Redis; each is cleared and closed at teardown."""
    made: list[RedisStore] = []

    def make(cluster: str, url: str = redis_url, **kwargs: Any) -> RedisStore:
        store = RedisStore.from_url(url, cluster=cluster, **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        with contextlib.suppress(StoreUnavailable):
            store.clear()
        store.close()


@pytest.fixture
def store(make_store: Callable[..., RedisStore], cluster: str) -> RedisStore:
    return make_store(cluster)


def raw_client(url: str) -> Any:
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=2)


@pytest.fixture
def raw(redis_url: str) -> Iterator[Any]:
    """A plain redis-py client on the session's Redis, to look at keys directly."""
    client = raw_client(redis_url)
    yield client
    client.close()


def timed(call: Callable[[], object]) -> tuple[float, BaseException | None]:
    """Seconds ``call`` took, and what it raised."""
    start = time.perf_counter()
    try:
        call()
    except Exception as exc:
        return time.perf_counter() - start, exc
    return time.perf_counter() - start, None


# -- URLs, repr, the optional dependency --------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://localhost",
        "redis://localhost:6380",
        "redis://localhost:6380/",
        "redis://localhost/15",
        "redis://:secret@redis.internal:6379/2",
        "redis://user:secret@redis.internal:6379/2",
        "rediss://redis.internal:6380/0",
        "redis://[::1]:6379/0",
    ],
)
def test_from_url_accepts_every_redis_url_form_without_connecting(url: str) -> None:
    """Valid URLs build a store without touching the network."""
    store = RedisStore.from_url(url, cluster="c")
    assert store.kind == "redis"
    assert store.multi_host is True
    assert "not connected" in repr(store)
    store.close()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://localhost:6379/0", "not a Redis URL"),
        ("unix:///tmp/redis.sock", "not a Redis URL"),
        ("redis://localhost:99999/0", "invalid port"),
        ("redis://localhost:0/0", "invalid port"),
        ("redis://:6379/0", "no host"),
        ("redis://localhost:6379/db", "not a number"),
    ],
)
def test_from_url_rejects_other_forms_with_a_clear_message(url: str, problem: str) -> None:
    """A malformed URL is a ValueError naming what is wrong."""
    with pytest.raises(ValueError, match=problem):
        RedisStore.from_url(url, cluster="c")


def test_repr_hides_the_password_and_shows_state(redis_url: str, cluster: str) -> None:
    """repr names URL (password masked), cluster, connection and the version last seen."""
    hidden = RedisStore.from_url("redis://:hunter2@localhost:6379/0", cluster="c")
    assert "hunter2" not in repr(hidden)
    assert "***" in repr(hidden)
    store = RedisStore.from_url(redis_url, cluster=cluster)
    try:
        assert repr(store) == (
            f"<RedisStore [{redis_url}, cluster {cluster!r}, not connected, no membership seen]>"
        )
        store.seed([("http://a:1", 1)])
        assert (
            repr(store)
            == f"<RedisStore [{redis_url}, cluster {cluster!r}, connected, v1 last seen]>"
        )
    finally:
        store.clear()
        store.close()


def test_a_client_factory_is_called_once_per_process(redis_url: str, cluster: str) -> None:
    """RedisStore(factory) uses the caller's client, made on first use."""
    calls: list[int] = []

    def factory() -> Any:
        calls.append(os.getpid())
        return raw_client(redis_url)

    store = RedisStore(factory, cluster=cluster)
    assert calls == []
    store.add("http://a:1", 1)
    assert store.version() == 1
    assert calls == [os.getpid()]
    store.clear()
    store.close()


def test_missing_redis_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without redis-py, building a store says to pip install softlb[redis]."""
    monkeypatch.setitem(sys.modules, "redis", None)  # makes `import redis` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install \"softlb\[redis\]\""):
        RedisStore.from_url("redis://localhost:6379/0", cluster="c")


def test_importing_softlb_and_its_state_package_does_not_import_redis() -> None:
    """redis-py is an optional extra: only building a RedisStore imports it."""
    code = (
        "import sys, softlb, softlb.state\n"
        "from softlb.state import open_store\n"
        "open_store('memory')\n"
        "assert 'redis' not in sys.modules, 'redis imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- key layout and the Lua membership scripts --------------------------------------------


def test_keys_follow_the_documented_layout(store: RedisStore, raw: Any, cluster: str) -> None:
    """Membership, version, slots, verdicts, lease and loads live under '{cluster}:'."""
    store.seed([("http://a:1", 2), ("http://b:1", 1)])
    store.set_health("http://a:1", HealthVerdict(False, "3 failures"), ttl=30)
    assert store.claim_prober("host-1", ttl=30)
    store.publish_load("host-1", {"http://a:1": 4}, ttl=30)

    assert raw.type(f"{cluster}:members") == "hash"
    assert json.loads(raw.hget(f"{cluster}:members", "http://a:1")) == {
        "weight": 2,
        "slot": 0,
        "seq": 1,
    }
    assert raw.get(f"{cluster}:version") == "1"
    assert raw.get(f"{cluster}:last_slot") == "1"
    assert json.loads(raw.get(f"{cluster}:health:http://a:1")) == {
        "healthy": False,
        "reason": "3 failures",
    }
    assert 0 < raw.pttl(f"{cluster}:health:http://a:1") <= 30_000
    assert raw.smembers(f"{cluster}:health_urls") == {"http://a:1"}
    assert raw.get(f"{cluster}:prober") == "host-1"
    assert json.loads(raw.get(f"{cluster}:load:host-1")) == {"http://a:1": 4}
    assert raw.smembers(f"{cluster}:nodes") == {"host-1"}
    assert all(key.startswith(f"{cluster}:") for key in raw.scan_iter(match=f"{cluster}*"))


def test_membership_keeps_insertion_order_and_slots_like_memory_store(store: RedisStore) -> None:
    """The Lua slot rule and ordering give exactly what MemoryStore gives for the same steps."""
    memory = MemoryStore()
    steps: list[tuple[str, Any]] = [
        ("seed", [("http://c:1", 1), ("http://a:1", 3), ("http://b:1", 1)]),
        ("remove", "http://a:1"),
        ("add", ("http://d:1", 2)),
        ("add", ("http://a:1", 1)),
        ("remove", "http://c:1"),
        ("add", ("http://e:1", 5)),
    ]
    for op, arg in steps:
        for s in (memory, store):
            if op == "seed":
                s.seed(arg)
            elif op == "add":
                s.add(*arg)
            else:
                s.remove(arg)
        assert store.membership() == memory.membership(), (op, arg)
    assert store.membership().urls() == ["http://b:1", "http://d:1", "http://a:1", "http://e:1"]


def test_a_full_table_refuses_a_member_then_reuses_a_freed_slot_round_the_table(
    store: RedisStore,
) -> None:
    """At MAX_SLOTS members add() is refused; a freed slot is then found by wrapping round."""
    urls = [f"http://h{i}:80" for i in range(MAX_SLOTS)]
    full = store.seed([(url, 1) for url in urls])
    assert [m.slot for m in full.members] == list(range(MAX_SLOTS))
    with pytest.raises(InvalidBackend, match=str(MAX_SLOTS)):
        store.add("http://one-too-many:80", 1)
    assert store.version() == 1  # the refusal changed nothing
    store.remove(urls[5])
    after = store.add("http://new:80", 1)
    assert after.members[-1].slot == 5
    assert after.version == 3


def test_seed_with_too_many_or_duplicate_urls(store: RedisStore) -> None:
    """seed() refuses more than MAX_SLOTS urls and keeps the first of duplicates."""
    with pytest.raises(InvalidBackend):
        store.seed((f"http://h{i}:80", 1) for i in range(MAX_SLOTS + 1))
    assert store.membership() is None
    seeded = store.seed([("http://a:1", 2), ("http://a:1", 5), ("http://b:1", 1)])
    assert [(m.url, m.weight) for m in seeded.members] == [("http://a:1", 2), ("http://b:1", 1)]


def test_add_and_remove_raise_the_pool_errors(store: RedisStore) -> None:
    """BackendExists and UnknownBackend come through unchanged and bump nothing."""
    store.seed([("http://a:1", 1)])
    with pytest.raises(BackendExists, match="http://a:1"):
        store.add("http://a:1", 1)
    with pytest.raises(UnknownBackend, match="http://z:1"):
        store.remove("http://z:1")
    assert store.version() == 1


def test_members_without_a_version_key_are_not_a_membership(
    store: RedisStore, raw: Any, cluster: str
) -> None:
    """A members hash left behind without its version (a partial loss) is ignored by add()."""
    store.seed([("http://a:1", 1)])
    raw.delete(f"{cluster}:version")
    assert store.membership() is None
    assert store.add("http://b:1", 1).urls() == ["http://b:1"]


def test_a_change_publishes_the_new_version_as_a_hint(store: RedisStore, raw: Any) -> None:
    """Subscribers of '{cluster}:changes' get the version after each membership change."""
    pubsub = raw.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(store.channel)
        pubsub.get_message(timeout=1.0)  # the subscribe confirmation
        store.add("http://a:1", 1)
        store.remove("http://a:1")
        got = []
        deadline = time.monotonic() + 2
        while len(got) < 2 and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.2)
            if message is not None:
                got.append(message["data"])
        assert got == ["1", "2"]
    finally:
        pubsub.close()


def test_scripts_are_reloaded_after_script_flush(store: RedisStore, raw: Any) -> None:
    """EVALSHA falls back to EVAL when Redis forgot the scripts (SCRIPT FLUSH, a restart)."""
    store.add("http://a:1", 1)
    raw.script_flush()
    assert store.add("http://b:1", 1).version == 2
    assert store.membership().urls() == ["http://a:1", "http://b:1"]


def test_unreadable_data_is_store_unavailable(store: RedisStore, raw: Any, cluster: str) -> None:
    """A member that is not our JSON makes the store unavailable, not a crash elsewhere."""
    store.seed([("http://a:1", 1)])
    raw.hset(f"{cluster}:members", "http://a:1", "not json")
    with pytest.raises(StoreUnavailable, match="unreadable"):
        store.membership()
    with pytest.raises(StoreUnavailable):
        store.add("http://b:1", 1)


# -- clusters sharing one Redis -----------------------------------------------------------


def test_two_clusters_on_one_redis_stay_apart(make_store: Callable[..., RedisStore]) -> None:
    """Membership, verdicts, the lease, loads and clear() of one cluster leave the other alone."""
    one, two = make_store(unique_cluster()), make_store(unique_cluster())
    one.seed([("http://a:1", 1)])
    two.seed([("http://b:1", 1), ("http://c:1", 1)])
    one.add("http://d:1", 1)
    one.set_health("http://a:1", HealthVerdict(False), ttl=30)
    assert one.claim_prober("host-1", ttl=30)
    assert two.claim_prober("host-2", ttl=30)  # each cluster has its own prober
    one.publish_load("host-1", {"http://a:1": 3}, ttl=30)

    assert one.membership().urls() == ["http://a:1", "http://d:1"]
    assert two.membership().urls() == ["http://b:1", "http://c:1"]
    assert (one.version(), two.version()) == (2, 1)
    assert two.health() == {}
    assert two.remote_load("host-2") == {}

    one.clear()
    assert one.membership() is None
    assert two.membership().urls() == ["http://b:1", "http://c:1"]
    assert not two.claim_prober("host-3", ttl=30)


@pytest.mark.parametrize("name", ["a", "glob*[x]?"])
def test_clear_leaves_a_cluster_whose_name_extends_this_one(
    make_store: Callable[..., RedisStore], name: str
) -> None:
    """clear() of cluster 'a' keeps 'a:b' and 'ab' (they share the SCAN pattern or a prefix)."""
    base = f"{unique_cluster()}-{name}"
    this, below, beside = make_store(base), make_store(f"{base}:b"), make_store(f"{base}b")
    for store in (this, below, beside):
        store.seed([("http://a:1", 1)])
        store.set_health("http://a:1", HealthVerdict(True), ttl=30)
        store.publish_load("n", {"http://a:1": 1}, ttl=30)
    this.clear()
    assert this.membership() is None
    assert this.remote_load("other") == {}
    for store in (below, beside):
        assert store.version() == 1
        assert store.health() == {"http://a:1": HealthVerdict(True)}
        assert store.remote_load("other") == {"http://a:1": 1}


# -- the prober lease ---------------------------------------------------------------------


def test_a_stale_owner_can_neither_renew_nor_release_the_new_owners_lease(
    store: RedisStore, raw: Any, cluster: str
) -> None:
    """The Lua scripts check the token: after A's lease expired and B took it, A has no power."""
    assert store.claim_prober("A", ttl=SHORT_TTL)
    assert not store.claim_prober("B", ttl=10)
    store.release_prober("B")  # not B's to release
    assert raw.get(f"{cluster}:prober") == "A"

    time.sleep(SHORT_TTL + 0.05)  # A stops renewing; its lease expires
    assert store.claim_prober("B", ttl=10)
    assert not store.claim_prober("A", ttl=10)  # A wakes up: cannot renew B's lease
    store.release_prober("A")
    assert raw.get(f"{cluster}:prober") == "B"
    assert raw.pttl(f"{cluster}:prober") > 9_000

    raw.pexpire(f"{cluster}:prober", 1_000)
    assert store.claim_prober("B", ttl=10)  # the holder renews: the TTL is back
    assert raw.pttl(f"{cluster}:prober") > 9_000
    store.release_prober("B")
    assert raw.get(f"{cluster}:prober") is None
    assert store.claim_prober("A", ttl=10)


# -- load snapshots between nodes ---------------------------------------------------------


def test_load_snapshots_expire_and_remote_load_excludes_own_node(
    store: RedisStore, raw: Any, cluster: str
) -> None:
    """remote_load sums every other live node; a snapshot not refreshed within its TTL is gone."""
    store.publish_load("host-1", {"http://a:1": 3, "http://b:1": 1}, ttl=SHORT_TTL)
    store.publish_load("host-2", {"http://a:1": 2}, ttl=30)
    store.publish_load("host-3", {"http://b:1": 5}, ttl=30)

    assert store.remote_load("host-1") == {"http://a:1": 2, "http://b:1": 5}
    assert store.remote_load("host-2") == {"http://a:1": 3, "http://b:1": 6}
    assert store.remote_load("elsewhere") == {"http://a:1": 5, "http://b:1": 6}

    time.sleep(SHORT_TTL + 0.05)
    assert store.remote_load("host-2") == {"http://b:1": 5}
    assert raw.smembers(f"{cluster}:nodes") == {"host-2", "host-3"}  # the index was pruned

    store.publish_load("host-3", {}, ttl=0)  # a TTL of zero withdraws the snapshot
    assert store.remote_load("host-2") == {}


def test_health_verdicts_expire_and_leave_the_index(
    store: RedisStore, raw: Any, cluster: str
) -> None:
    """A verdict lives for its TTL; health() drops expired urls from the index."""
    store.set_health("http://a:1", HealthVerdict(False, "refused"), ttl=SHORT_TTL)
    store.set_health("http://b:1", HealthVerdict(True), ttl=30)
    assert store.health() == {
        "http://a:1": HealthVerdict(False, "refused"),
        "http://b:1": HealthVerdict(True, ""),
    }
    time.sleep(SHORT_TTL + 0.05)
    assert store.health() == {"http://b:1": HealthVerdict(True, "")}
    assert raw.smembers(f"{cluster}:health_urls") == {"http://b:1"}


# -- Redis down, paused, restarted, flushed -----------------------------------------------


def every_call(store: RedisStore) -> dict[str, Callable[[], object]]:
    return {
        "membership": store.membership,
        "version": store.version,
        "seed": lambda: store.seed([("http://a:1", 1)]),
        "add": lambda: store.add("http://b:1", 1),
        "remove": lambda: store.remove("http://a:1"),
        "health": store.health,
        "set_health": lambda: store.set_health("http://a:1", HealthVerdict(True), 5),
        "claim_prober": lambda: store.claim_prober("me", 5),
        "release_prober": lambda: store.release_prober("me"),
        "publish_load": lambda: store.publish_load("me", {"http://a:1": 1}, 1),
        "remote_load": lambda: store.remote_load("me"),
        "clear": store.clear,
    }


def test_every_call_fails_fast_with_store_unavailable_while_redis_is_stopped(
    redis_isolated: RedisServer, cluster: str
) -> None:
    """With Redis stopped each call raises a one-line StoreUnavailable in well under a second,
    and the same store object works again once Redis is back."""
    store = RedisStore.from_url(redis_isolated.url, cluster=cluster)
    try:
        store.seed([("http://a:1", 1)])  # connected and pooled before Redis goes away
        redis_isolated.stop()
        for name, call in every_call(store).items():
            took, error = timed(call)
            assert isinstance(error, StoreUnavailable), (name, error)
            assert took < DOWN_BUDGET, (name, took)
            message = str(error)
            assert "\n" not in message
            assert redis_isolated.url in message
            assert error.status == 503

        redis_isolated.restart()  # back, and empty: nothing was saved
        assert store.membership() is None
        assert store.seed([("http://a:1", 1)]).version == 1
    finally:
        store.close()


def test_a_store_that_never_reached_redis_fails_fast(cluster: str) -> None:
    """Nothing listening on the port: the first call is refused at once."""
    from tests.helpers.servers import closed_port

    port = closed_port()
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", cluster=cluster)
    took, error = timed(store.version)
    assert isinstance(error, StoreUnavailable)
    assert "connecting" in str(error).lower()
    assert took < DOWN_BUDGET
    store.close()


def test_a_paused_redis_costs_a_call_at_most_the_timeout(
    redis_isolated: RedisServer, cluster: str
) -> None:
    """A Redis that accepts but never answers (SIGSTOP) fails a call after ``timeout``, then
    the store recovers by itself when Redis resumes."""
    store = RedisStore.from_url(redis_isolated.url, cluster=cluster, timeout=0.2)
    try:
        store.add("http://a:1", 1)
        redis_isolated.pause()
        try:
            took, error = timed(store.version)
        finally:
            redis_isolated.resume()
        assert isinstance(error, StoreUnavailable)
        assert "timeout" in str(error).lower()
        assert 0.15 < took < 0.6
        assert store.version() == 1
    finally:
        store.close()


def test_membership_survives_a_new_store_object(
    make_store: Callable[..., RedisStore], cluster: str
) -> None:
    """The truth is in Redis: a new store object (a restarted process) reads what was written."""
    first = make_store(cluster)
    first.seed([("http://a:1", 1)])
    first.add("http://b:1", 3)
    written = first.membership()
    first.close()
    second = make_store(cluster)
    assert second.membership() == written
    assert second.version() == 2


def test_flushall_leaves_no_membership_and_seed_writes_it_back(
    redis_isolated: RedisServer, cluster: str
) -> None:
    """After Redis lost its data membership() is None, and seed() writes the last known set."""
    store = RedisStore.from_url(redis_isolated.url, cluster=cluster)
    raw = raw_client(redis_isolated.url)
    try:
        known = store.seed([("http://a:1", 1), ("http://b:1", 2)])
        store.set_health("http://a:1", HealthVerdict(False), ttl=30)
        raw.flushall()
        assert store.membership() is None
        assert store.version() is None
        assert store.health() == {}
        again = store.seed([(m.url, m.weight) for m in known.members])
        assert again.urls() == known.urls()
        assert again.version == 1
    finally:
        raw.close()
        store.close()


# -- fork ---------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_after_fork_the_child_opens_its_own_connection(store: RedisStore) -> None:
    """A forked child never uses the parent's socket: it connects anew, under its own pid,
    and the parent's connection is untouched when the child exits."""
    store.seed([("http://a:1", 1)])
    parent_id = store._client().client_id()
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads; this child only talks
        # to Redis and exits with os._exit.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            report = {
                "version": store.version(),
                "urls": store.add("http://child:1", 1).urls(),
                "client_id": store._client().client_id(),
                "name": store._client().client_getname(),
            }
            os.write(write_end, json.dumps(report).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read() or b"{}")
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    assert report["version"] == 1
    assert report["urls"] == ["http://a:1", "http://child:1"]
    assert report["client_id"] != parent_id
    assert report["name"] == f"softlb:{store.cluster}:{pid}"
    # The parent's pooled connection still works and is the same one.
    assert store.version() == 2
    assert store._client().client_id() == parent_id
