"""The in-process store: the default for one worker and for library use."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping

from softlb.errors import BackendExists, UnknownBackend
from softlb.state.base import (
    HealthVerdict,
    Member,
    Membership,
    SeedEntry,
    StateStore,
    next_free_slot,
    seed_entries,
)

__all__ = ["MemoryStore"]


class MemoryStore(StateStore):
    """Everything in this process's memory. ``_lock`` protects every field.

    It is the reference implementation of the contract, and what a single process uses: no
    other process shares it, so it needs no polling and never fails.
    """

    kind = "memory"

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._membership: Membership | None = None
        self._last_slot = -1
        self._health: dict[str, tuple[HealthVerdict, float]] = {}
        self._prober: tuple[str, float] | None = None
        self._loads: dict[str, tuple[dict[str, int], float]] = {}

    def membership(self) -> Membership | None:
        return self._membership

    def version(self) -> int | None:
        membership = self._membership
        return None if membership is None else membership.version

    def _write(self, members: tuple[Member, ...], after: int = 0) -> Membership:
        version = after + 1 if self._membership is None else self._membership.version + 1
        self._membership = Membership(version, members)
        return self._membership

    def seed(self, members: Iterable[SeedEntry], *, after: int = 0) -> Membership:
        with self._lock:
            if self._membership is not None:
                return self._membership
            seeded: list[Member] = []
            for url, weight, draining in seed_entries(members):
                self._last_slot = next_free_slot((m.slot for m in seeded), self._last_slot)
                seeded.append(Member(url, weight, self._last_slot, draining))
            return self._write(tuple(seeded), after)

    def add(self, url: str, weight: int) -> Membership:
        with self._lock:
            current = self._membership.members if self._membership else ()
            if any(m.url == url for m in current):
                raise BackendExists(f"backend {url} is already in the pool")
            self._last_slot = next_free_slot((m.slot for m in current), self._last_slot)
            return self._write((*current, Member(url, weight, self._last_slot)))

    def remove(self, url: str) -> Membership:
        with self._lock:
            current = self._membership.members if self._membership else ()
            if not any(m.url == url for m in current):
                raise UnknownBackend(f"no backend {url} in the pool")
            self._health.pop(url, None)
            return self._write(tuple(m for m in current if m.url != url))

    def update(
        self, url: str, *, weight: int | None = None, draining: bool | None = None
    ) -> Membership:
        with self._lock:
            current = self._membership.members if self._membership else ()
            if not any(m.url == url for m in current):
                raise UnknownBackend(f"no backend {url} in the pool")
            changed = tuple(
                Member(
                    m.url,
                    m.weight if weight is None else weight,
                    m.slot,
                    m.draining if draining is None else draining,
                )
                if m.url == url
                else m
                for m in current
            )
            return self._write(changed)

    def health(self) -> Mapping[str, HealthVerdict]:
        now = self.clock()
        with self._lock:
            return {url: v for url, (v, until) in self._health.items() if until > now}

    def set_health(self, url: str, verdict: HealthVerdict, ttl: float) -> None:
        with self._lock:
            self._health[url] = (verdict, self.clock() + ttl)

    def claim_prober(self, owner: str, ttl: float) -> bool:
        now = self.clock()
        with self._lock:
            if self._prober is None or self._prober[0] == owner or self._prober[1] <= now:
                self._prober = (owner, now + ttl)
                return True
            return False

    def release_prober(self, owner: str) -> None:
        with self._lock:
            if self._prober is not None and self._prober[0] == owner:
                self._prober = None

    def publish_load(self, node: str, loads: Mapping[str, int], ttl: float) -> None:
        with self._lock:
            self._loads[node] = (dict(loads), self.clock() + ttl)

    def remote_load(self, node: str) -> dict[str, int]:
        now = self.clock()
        total: dict[str, int] = {}
        with self._lock:
            for other, (loads, until) in self._loads.items():
                if other == node or until <= now:
                    continue
                for url, count in loads.items():
                    total[url] = total.get(url, 0) + count
        return total

    def clear(self) -> None:
        with self._lock:
            self._membership = None
            self._health.clear()
            self._prober = None
            self._loads.clear()

    def __repr__(self) -> str:
        m = self._membership
        members = "no membership" if m is None else f"v{m.version}, {len(m.members)} members"
        return f"<MemoryStore [{members}]>"
