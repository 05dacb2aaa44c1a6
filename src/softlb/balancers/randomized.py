"""Random choice, plain or weighted, and power of two choices."""

from __future__ import annotations

import bisect
import itertools
import random

from softlb.backend import Backend
from softlb.balancers.base import Balancer, register
from softlb.balancers.least import load_of

__all__ = ["PowerOfTwoChoices", "Random"]


class _WeightedDraw(Balancer):
    """Shared machinery: draw an eligible backend at random in proportion to its weight."""

    def __init__(self, *, seed: int | None = None, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random(seed)
        self._eligible: tuple[Backend, ...] = ()
        self._cumulative: list[float] = []  # empty when every weight is equal
        self._total = 0.0

    def rebuild(self, eligible: tuple[Backend, ...], now: float) -> None:
        self._eligible = eligible
        weights = [b.eff_weight for b in eligible]
        if len(set(weights)) <= 1:
            self._cumulative = []
        else:
            self._cumulative = list(itertools.accumulate(weights))
        self._total = sum(weights)

    def _draw(self) -> int:
        """Index of one weighted random draw; the pool is not empty."""
        if not self._cumulative:
            return int(self._rng.random() * len(self._eligible))
        return bisect.bisect_right(self._cumulative, self._rng.random() * self._total)


@register
class Random(_WeightedDraw):
    """A random eligible backend, in proportion to weight (nginx's and HAProxy's ``random``).

    Pass ``seed=`` (or an ``rng=``) for a reproducible sequence.
    """

    name = "random"

    def pick(self, key: str | None, now: float) -> Backend | None:
        n = len(self._eligible)
        if n == 0:
            return None
        if n == 1:
            return self._eligible[0]
        return self._eligible[self._draw()]


@register
class PowerOfTwoChoices(_WeightedDraw):
    """Draw two different backends at random (by weight) and take the less loaded one.

    Mitzenmacher's "power of two choices", as in HAProxy's ``random(2)`` and Envoy's default
    least-request balancer: nearly the spread of least connections at the cost of two draws,
    and no herd behaviour when many balancers share the same backends. Load is compared as in
    least connections, ``(in flight + 1) / weight``; a tie goes to the first draw.
    """

    name = "power_of_two_choices"

    def pick(self, key: str | None, now: float) -> Backend | None:
        eligible = self._eligible
        n = len(eligible)
        if n == 0:
            return None
        if n == 1:
            return eligible[0]
        i = self._draw()
        j = self._draw()
        if j == i:  # draw the second among the others so both candidates are real choices
            j = (i + 1 + int(self._rng.random() * (n - 1))) % n
        a, b = eligible[i], eligible[j]
        return b if load_of(b) < load_of(a) else a
