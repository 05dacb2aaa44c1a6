"""The :class:`Balancer` protocol every strategy implements, and the by-name registry.

A balancer belongs to exactly one :class:`~softlb.pool.Pool`. The pool calls every method
below while holding its lock, so a balancer keeps no lock of its own and may keep indexes that
it updates incrementally (least connections keeps its backends bucketed by load, for
instance). The pool hands the balancer a new tuple of eligible backends — healthy, not
draining — whenever membership, health or an effective weight changes (grpc-go's "new picker
per state change"); between two rebuilds only ``pick``, ``acquired`` and ``released`` run.

:meth:`Balancer.explain` answers "what would you pick now, and why?" without changing what
later picks return: it reads the strategy's state, and a strategy that draws at random saves
its generator's state and puts it back. :meth:`Pool.explain() <softlb.pool.Pool.explain>` is
how users call it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from softlb.backend import Backend

__all__ = ["BALANCERS", "Balancer", "Candidate", "balancer_by_name", "candidate", "register"]


@dataclass(frozen=True)
class Candidate:
    """A backend in rotation, as :meth:`Balancer.explain` sees it.

    ``weight`` is the configured weight and ``effective_weight`` the one the strategy uses
    (lower during slow start); ``slow_start`` is their ratio while a ramp runs (0.1 to 1), else
    ``None``. ``in_flight`` counts this process's requests and, with shared state, the other
    processes' (``active + shared_active``); ``latency`` is the peak-EWMA in seconds (``None``
    before the first answer). ``score`` is the figure the strategy compares — its meaning is
    strategy-specific and ``why`` says it in words — and ``chosen`` marks the backend the next
    pick returns.
    """

    url: str
    weight: int
    effective_weight: float
    in_flight: int
    latency: float | None
    score: float | None
    why: str
    chosen: bool = False
    slow_start: float | None = None

    def as_dict(self) -> dict[str, object]:
        """The candidate as a JSON-ready mapping."""
        return {
            "url": self.url,
            "chosen": self.chosen,
            "score": _rounded(self.score),
            "why": self.why,
            "weight": self.weight,
            "effective_weight": _rounded(self.effective_weight),
            "slow_start": _rounded(self.slow_start),
            "in_flight": self.in_flight,
            "latency": _rounded(self.latency),
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def candidate(backend: Backend, score: float | None, why: str, chosen: bool = False) -> Candidate:
    """A :class:`Candidate` for ``backend`` with its current figures; the caller holds the
    pool's lock."""
    ramp = backend.eff_weight / backend.weight if backend._ramp_from is not None else None
    return Candidate(
        url=backend.url,
        weight=backend.weight,
        effective_weight=backend.eff_weight,
        in_flight=backend.active + backend.shared_active,
        latency=backend.latency,
        score=score,
        why=why,
        chosen=chosen,
        slow_start=ramp,
    )


#: What :meth:`Balancer.explain` says about the only backend in rotation.
ONLY_ONE = "the only backend in rotation"


class Balancer(ABC):
    """Chooses a backend for each request from the pool's eligible backends."""

    #: The name used in the config's ``algorithm`` key and in reprs.
    name: ClassVar[str]
    #: Whether the strategy reads the request key passed to :meth:`pick`.
    uses_key: ClassVar[bool] = False
    #: Whether the strategy indexes backends by load when rebuilt, so that loads changed
    #: outside its acquired/released hooks (other processes' in-flight counts) need a rebuild.
    #: The others read loads live at pick time.
    indexes_load: ClassVar[bool] = False
    #: How the strategy chooses, in one line, for :meth:`Pool.explain()
    #: <softlb.pool.Pool.explain>`.
    rule: ClassVar[str] = ""

    @abstractmethod
    def rebuild(self, eligible: tuple[Backend, ...], now: float) -> None:
        """Take a new set of eligible backends (in membership order); may be empty."""

    @abstractmethod
    def pick(self, key: str | None, now: float) -> Backend | None:
        """Return the backend for the next request, or ``None`` when none is eligible."""

    def explain(self, key: str | None, now: float, limit: int | None = None) -> list[Candidate]:
        """Every eligible backend with its score, the one :meth:`pick` would return next first
        (``chosen``), the others in the order the strategy prefers them; at most ``limit``.

        Must leave the strategy as it was: the next :meth:`pick` returns the same backend
        whether this ran or not. The pool holds its lock. The default raises
        :class:`NotImplementedError`, and the pool then lists the eligible backends unscored.
        """
        raise NotImplementedError

    def acquired(self, backend: Backend) -> None:  # noqa: B027 - optional hook
        """Called after ``backend.active`` went up by one (the backend may not be eligible)."""

    def released(self, backend: Backend) -> None:  # noqa: B027 - optional hook
        """Called after ``backend.active`` went down by one (the backend may not be eligible)."""

    def load_changed(self, backend: Backend) -> None:  # noqa: B027 - optional hook
        """Called when ``backend.shared_active`` (other processes' requests in flight) was
        read anew at a pick, between two rebuilds: a strategy that indexes loads re-ranks the
        backend (the others read loads live at pick time)."""

    def take(self, key: str | None, now: float) -> Backend | None:
        """:meth:`pick`, then count the request in flight on the backend picked:
        ``backend.active`` up by one and :meth:`acquired`. The pool's usual lease (no
        backend excluded, preferred or limited) makes this one call, so that a strategy can
        do both in one step: least connections ranks the backend once instead of twice."""
        backend = self.pick(key, now)
        if backend is not None:
            backend.active += 1
            self.acquired(backend)
        return backend

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


#: Every strategy by its config name.
BALANCERS: dict[str, type[Balancer]] = {}

_B = TypeVar("_B", bound=type[Balancer])


def register(cls: _B) -> _B:
    """Class decorator that makes a strategy available by its ``name``."""
    BALANCERS[cls.name] = cls
    return cls


def balancer_by_name(name: str, **options: object) -> Balancer:
    """Return a new balancer of the strategy called ``name`` (e.g. ``"round_robin"``).

    ``options`` go to the strategy's constructor (``seed=`` for the random ones). An unknown
    name raises :class:`ValueError` listing the known ones.
    """
    try:
        cls: Callable[..., Balancer] = BALANCERS[name]
    except KeyError:
        known = ", ".join(sorted(BALANCERS))
        raise ValueError(f"unknown balancing algorithm {name!r}; known: {known}") from None
    return cls(**options)
