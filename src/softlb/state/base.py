"""The seam between a pool and where its shared state lives.

A :class:`StateStore` holds what every worker of a host (SQLite) or every process of a cluster
(Redis) must agree on:

* **membership** — the backends, their weights and a *slot* number each, with a version that
  every change bumps in the same atomic step, so a worker notices a change by polling one
  number;
* **health verdicts** — written by whoever decided them (the elected prober, or a worker that
  saw enough passive failures), read by everyone, expiring unless refreshed;
* **the prober lease** — one holder at a time does the active checks;
* **load snapshots** — each node's in-flight counts, for stores shared between hosts.

In-flight counts within one host never go through a store: they live in a memory-mapped
:class:`~softlb.state.slots.SlotTable`, indexed by the slot number the store gives each
backend. Nothing on the request path waits for a store.

Every method may raise :class:`StoreUnavailable`; callers keep serving with what they last
knew.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from softlb.errors import SoftLBError

__all__ = [
    "MAX_SLOTS",
    "HealthVerdict",
    "Member",
    "Membership",
    "SeedEntry",
    "StateStore",
    "StoreUnavailable",
    "seed_entries",
]

#: Backends a shared store can hold: the width of the in-flight slot table. 1,024 keeps the
#: table at 1.6 MB for 64 workers; a balancer with more backends uses several clusters.
MAX_SLOTS: Final = 1024


class StoreUnavailable(SoftLBError):
    """The state store cannot be reached or answered with an error; ``status`` is 503."""

    status: int = 503


@dataclass(frozen=True)
class Member:
    """One backend as the store knows it."""

    url: str
    weight: int = 1
    #: Column of this backend in the host's in-flight slot table (0 .. MAX_SLOTS - 1).
    slot: int = 0
    #: Taken out of rotation by an operator (``PATCH`` with ``"draining": true``).
    draining: bool = False


@dataclass(frozen=True)
class Membership:
    """Every member, in the order they were added, and the version that names this set."""

    version: int
    members: tuple[Member, ...]

    def urls(self) -> list[str]:
        return [m.url for m in self.members]


@dataclass(frozen=True)
class HealthVerdict:
    """A backend's health as last decided by someone, and why."""

    healthy: bool
    reason: str = ""


class StateStore(ABC):
    """Shared membership, health verdicts, the prober lease and load snapshots.

    Implementations: :class:`~softlb.state.memory.MemoryStore` (one process),
    :class:`~softlb.state.sqlite.SqliteStore` (the workers of one host) and
    :class:`~softlb.state.redis.RedisStore` (several hosts). One contract test suite runs over
    all three. A store object belongs to one process; open it after ``fork()``.
    """

    #: ``"memory"``, ``"sqlite"`` or ``"redis"``.
    kind: str
    #: Whether other hosts share this store (then load snapshots are exchanged through it).
    multi_host: bool = False

    # -- membership ----------------------------------------------------------------------

    @abstractmethod
    def membership(self) -> Membership | None:
        """The current membership, or ``None`` if none was ever written (or it was lost)."""

    @abstractmethod
    def version(self) -> int | None:
        """The membership version (cheap), or ``None`` when there is no membership."""

    @abstractmethod
    def seed(self, members: Iterable[SeedEntry], *, after: int = 0) -> Membership:
        """Write ``(url, weight)`` pairs or ``(url, weight, draining)`` triples as the
        membership if there is none, at version ``after + 1``; return what is there
        afterwards (the first of duplicate URLs wins). Used for the config's ``servers`` at
        start (``after`` 0), and to write back the last known membership when a store comes
        back empty: then ``after`` is past every version a process may still know, so that
        no process takes the new membership, or a change made to it, for one it has seen."""

    @abstractmethod
    def add(self, url: str, weight: int) -> Membership:
        """Add a member (raise :class:`~softlb.errors.BackendExists` if present) and bump
        the version; a slot not used by another member is assigned."""

    @abstractmethod
    def remove(self, url: str) -> Membership:
        """Remove a member (raise :class:`~softlb.errors.UnknownBackend`) and bump the version."""

    @abstractmethod
    def update(
        self, url: str, *, weight: int | None = None, draining: bool | None = None
    ) -> Membership:
        """Change a member's weight and/or draining flag (``None``: leave it), keeping its
        slot and place, and bump the version; raise :class:`~softlb.errors.UnknownBackend`
        for a URL that is not a member (or when there is no membership)."""

    # -- health --------------------------------------------------------------------------

    @abstractmethod
    def health(self) -> Mapping[str, HealthVerdict]:
        """Every verdict that has not expired, by URL."""

    @abstractmethod
    def set_health(self, url: str, verdict: HealthVerdict, ttl: float) -> None:
        """Record a verdict that expires after ``ttl`` seconds unless written again."""

    # -- the prober lease ----------------------------------------------------------------

    @abstractmethod
    def claim_prober(self, owner: str, ttl: float) -> bool:
        """Take or renew the prober lease for ``ttl`` seconds; return whether ``owner`` holds
        it. A lease whose holder stopped renewing it is free once it expires."""

    @abstractmethod
    def release_prober(self, owner: str) -> None:
        """Give the lease up if ``owner`` holds it."""

    # -- load between hosts --------------------------------------------------------------

    def publish_load(self, node: str, loads: Mapping[str, int], ttl: float) -> None:  # noqa: B027
        """Publish this node's in-flight count per URL (multi-host stores only)."""

    def remote_load(self, node: str) -> dict[str, int]:
        """The in-flight counts per URL of every other live node (multi-host stores only)."""
        return {}

    # -- life cycle ----------------------------------------------------------------------

    @abstractmethod
    def clear(self) -> None:
        """Forget everything (tests; and what an operator does to start afresh)."""

    def close(self) -> None:  # noqa: B027
        """Release connections and files."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


#: What :meth:`StateStore.seed` takes per member: ``(url, weight)`` or ``(url, weight,
#: draining)``.
SeedEntry = tuple[str, int] | tuple[str, int, bool]


def seed_entries(members: Iterable[SeedEntry]) -> list[tuple[str, int, bool]]:
    """``members`` as ``(url, weight, draining)`` triples, the first of duplicate URLs kept."""
    unique: dict[str, tuple[str, int, bool]] = {}
    for entry in members:
        url, weight = entry[0], int(entry[1])
        draining = bool(entry[2]) if len(entry) > 2 else False
        unique.setdefault(url, (url, weight, draining))
    return list(unique.values())


def next_free_slot(used: Iterable[int], last: int) -> int:
    """The first slot after ``last`` (wrapping) that no member uses.

    Slots are handed out round the table rather than lowest-first, so a slot a removed backend
    just left is reused last: requests still in flight on it have long finished by then.
    """
    taken = set(used)
    if len(taken) >= MAX_SLOTS:
        from softlb.errors import InvalidBackend

        raise InvalidBackend(f"a shared pool holds at most {MAX_SLOTS} backends")
    slot = (last + 1) % MAX_SLOTS
    while slot in taken:
        slot = (slot + 1) % MAX_SLOTS
    return slot
