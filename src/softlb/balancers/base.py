"""The :class:`Balancer` protocol every strategy implements, and the by-name registry.

A balancer belongs to exactly one :class:`~softlb.pool.Pool`. The pool calls every method
below while holding its lock, so a balancer keeps no lock of its own and may keep indexes that
it updates incrementally (least connections keeps its backends bucketed by load, for
instance). The pool hands the balancer a new tuple of eligible backends — healthy, not
draining — whenever membership, health or an effective weight changes (grpc-go's "new picker
per state change"); between two rebuilds only ``pick``, ``acquired`` and ``released`` run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, TypeVar

from softlb.backend import Backend

__all__ = ["BALANCERS", "Balancer", "balancer_by_name", "register"]


class Balancer(ABC):
    """Chooses a backend for each request from the pool's eligible backends."""

    #: The name used in the config's ``algorithm`` key and in reprs.
    name: ClassVar[str]
    #: Whether the strategy reads the request key passed to :meth:`pick`.
    uses_key: ClassVar[bool] = False

    @abstractmethod
    def rebuild(self, eligible: tuple[Backend, ...], now: float) -> None:
        """Take a new set of eligible backends (in membership order); may be empty."""

    @abstractmethod
    def pick(self, key: str | None, now: float) -> Backend | None:
        """Return the backend for the next request, or ``None`` when none is eligible."""

    def acquired(self, backend: Backend) -> None:  # noqa: B027 - optional hook
        """Called after ``backend.active`` went up by one (the backend may not be eligible)."""

    def released(self, backend: Backend) -> None:  # noqa: B027 - optional hook
        """Called after ``backend.active`` went down by one (the backend may not be eligible)."""

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
