"""Fixtures for the state stores: one ``store`` per implementation, each in its own cluster.

``store`` is parametrized with ids ``memory``, ``sqlite`` and ``redis``; ``open_store`` opens
another store object on the same backing (a second SqliteStore on the file, a second Redis
client; the memory store is its own only object), and ``store_spec`` names the backing so that
another process can open it too (:func:`open_spec`). Every store opened is cleared and closed
at teardown. The redis param skips, with the reason, when redis-py, the Redis store or
``redis-server`` is missing.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from softlb.state import MemoryStore, StateStore
from softlb.state.sqlite import SqliteStore

# The redis-server fixtures (redis_url, redis_isolated) come from tests/conftest.py's plugin.
_NO_REDIS_HELPER: str | None = None

#: ``(kind, where, cluster)``: enough for another process to open the same store.
StoreSpec = tuple[str, str, str]

KINDS = ["memory", "sqlite", "redis"]


def open_spec(spec: StoreSpec) -> StateStore:
    """A new store object on the backing ``spec`` names (sqlite and redis only)."""
    kind, where, cluster = spec
    if kind == "sqlite":
        return SqliteStore(where, cluster=cluster)
    if kind == "redis":
        from softlb.state.redis import RedisStore

        return RedisStore.from_url(where, cluster=cluster)
    raise ValueError(f"a {kind} store cannot be shared between processes")


@pytest.fixture
def cluster() -> str:
    """A cluster name of this test's own, so that tests sharing a backing never meet."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=KINDS)
def store_spec(request: pytest.FixtureRequest, tmp_path: Path, cluster: str) -> StoreSpec:
    kind: str = request.param
    if kind == "memory":
        return (kind, "", cluster)
    if kind == "sqlite":
        return (kind, str(tmp_path / "state.db"), cluster)
    if _NO_REDIS_HELPER is not None:
        pytest.skip(_NO_REDIS_HELPER)
    pytest.importorskip("redis", reason="redis-py is not installed (pip install softlb[redis])")
    try:
        import softlb.state.redis  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"softlb.state.redis cannot be imported: {exc}")
    url: str = request.getfixturevalue("redis_url")
    return (kind, url, cluster)


@pytest.fixture
def open_store(store_spec: StoreSpec) -> Iterator[Callable[[], StateStore]]:
    """Opens another store object on the backing of this test's ``store``."""
    opened: list[StateStore] = []
    memory: list[MemoryStore] = []

    def open_() -> StateStore:
        if store_spec[0] == "memory":
            if not memory:
                memory.append(MemoryStore())
                opened.append(memory[0])
            return memory[0]
        store = open_spec(store_spec)
        opened.append(store)
        return store

    yield open_
    if opened:
        try:
            opened[0].clear()
        finally:
            for store in opened:
                store.close()


@pytest.fixture
def store(open_store: Callable[[], StateStore]) -> StateStore:
    """An empty store of each kind, in a cluster of this test's own."""
    return open_store()
