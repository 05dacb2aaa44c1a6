"""Where pool state lives: one process (memory), one host (SQLite), several hosts (Redis).

:func:`open_store` turns the config's ``state`` value into a :class:`StateStore`.
"""

from __future__ import annotations

from softlb.state.base import (
    MAX_SLOTS,
    HealthVerdict,
    Member,
    Membership,
    StateStore,
    StoreUnavailable,
)
from softlb.state.memory import MemoryStore

__all__ = [
    "MAX_SLOTS",
    "HealthVerdict",
    "Member",
    "Membership",
    "MemoryStore",
    "StateStore",
    "StoreUnavailable",
    "open_store",
]


def open_store(url: str | None, *, cluster: str = "softlb") -> StateStore:
    """Open the store a ``state`` setting names: ``"memory"`` (or ``None``),
    ``"sqlite:///relative/path"``, ``"sqlite:////absolute/path"`` or
    ``"redis://HOST:PORT/DB"``. Nothing is connected until first use."""
    if url is None or url == "memory":
        return MemoryStore()
    if url.startswith("sqlite:"):
        from softlb.state.sqlite import SqliteStore

        return SqliteStore.from_url(url, cluster=cluster)
    if url.startswith(("redis://", "rediss://")):
        from softlb.state.redis import RedisStore

        return RedisStore.from_url(url, cluster=cluster)
    raise ValueError(f"unknown state store {url!r}; use memory, sqlite:///PATH or redis://...")
