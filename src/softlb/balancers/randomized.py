"""Random choice, plain or weighted, and power of two choices."""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
from collections.abc import Callable, Iterable

from softlb.backend import Backend
from softlb.balancers.base import ONLY_ONE, Balancer, Candidate, candidate, register
from softlb.balancers.least import load_of

__all__ = ["PowerOfTwoChoices", "Random", "WeightedDraw"]


def _lowest(indexes: Iterable[int], count: int | None, key: Callable[[int], float]) -> list[int]:
    """The ``count`` indexes with the lowest ``key`` (all of them if ``None``), lowest first,
    ties in index order; O(n log count), so that a limited explain stays cheap."""
    if count is None:
        return sorted(indexes, key=lambda k: (key(k), k))
    if count <= 0:
        return []
    return heapq.nsmallest(count, indexes, key=lambda k: (key(k), k))


class WeightedDraw(Balancer):
    """The base of the random strategies (:class:`Random`, :class:`PowerOfTwoChoices`,
    :class:`~softlb.balancers.ewma.PeakEwma`): draws an eligible backend at random in
    proportion to its weight (``_draw()``), and explains those draws. Subclass it for a
    strategy of your own that draws."""

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

    # -- explain: the same draws, on a copy of the generator's state ---------------------

    def _probability(self, backend: Backend) -> float:
        """The chance that one draw returns ``backend``."""
        if not self._cumulative:
            return 1.0 / len(self._eligible)
        return backend.eff_weight / self._total

    def _pair(self) -> tuple[int, int]:
        """The two indexes the next two-choice pick draws (see PowerOfTwoChoices.pick); the
        generator's state is put back afterwards, so the pick itself draws them again."""
        rng = self._rng
        state = rng.getstate()
        try:
            i = self._draw()
            j = self._draw()
            if j == i:
                j = (i + 1 + int(rng.random() * (len(self._eligible) - 1))) % len(self._eligible)
        finally:
            rng.setstate(state)
        return i, j

    def _explain_pair(
        self,
        limit: int | None,
        cost: Callable[[Backend], float],
        describe: Callable[[Backend, float], str],
    ) -> list[Candidate]:
        """Candidates of a two-choice strategy: the winner of the next draw first, the other
        drawn backend second, the rest by increasing ``cost``."""
        eligible = self._eligible
        n = len(eligible)
        if n == 0:
            return []
        if n == 1:
            return [candidate(eligible[0], cost(eligible[0]), ONLY_ONE, True)]
        i, j = self._pair()
        a, b = eligible[i], eligible[j]
        cost_a, cost_b = cost(a), cost(b)
        winner, loser = (b, a) if cost_b < cost_a else (a, b)
        costs = [cost(backend) for backend in eligible]
        others = (k for k in range(n) if k not in (i, j))
        rest = _lowest(others, None if limit is None else limit - 2, costs.__getitem__)
        order = [winner, loser, *(eligible[k] for k in rest)]
        score_of = {backend: costs[k] for k, backend in enumerate(eligible)}
        out = []
        for backend in order[: n if limit is None else limit]:
            score = score_of[backend]
            p = self._probability(backend)
            why = f"{describe(backend, score)}; drawn with probability {p:.1%}"
            if backend is winner:
                why += f"; drawn next against {loser.url}: " + (
                    "lower, so it is picked" if cost_a != cost_b else "equal, the first draw wins"
                )
            elif backend is loser:
                why += f"; drawn next against {winner.url}, and loses"
            out.append(candidate(backend, score, why, backend is winner))
        return out


@register
class Random(WeightedDraw):
    """A random eligible backend, in proportion to weight (nginx's and HAProxy's ``random``).

    Pass ``seed=`` (or an ``rng=``) for a reproducible sequence.
    """

    name = "random"
    rule = "one backend drawn at random, in proportion to its effective weight"

    def pick(self, key: str | None, now: float) -> Backend | None:
        n = len(self._eligible)
        if n == 0:
            return None
        if n == 1:
            return self._eligible[0]
        return self._eligible[self._draw()]

    def explain(self, key: str | None, now: float, limit: int | None = None) -> list[Candidate]:
        """Score: the probability of being drawn. The next draw (made on a copy of the
        generator's state) is ``chosen`` and first; the others follow, likeliest first."""
        eligible = self._eligible
        n = len(eligible)
        if n == 0:
            return []
        if n == 1:
            return [candidate(eligible[0], 1.0, ONLY_ONE, True)]
        rng = self._rng
        state = rng.getstate()
        try:
            drawn = self._draw()
        finally:
            rng.setstate(state)
        others = (k for k in range(n) if k != drawn)
        if self._cumulative:  # likeliest first
            rest = _lowest(
                others, None if limit is None else limit - 1, lambda k: -eligible[k].eff_weight
            )
        else:  # all alike: membership order
            rest = list(others) if limit is None else list(itertools.islice(others, limit - 1))
        out = []
        for k in [drawn, *rest][: n if limit is None else limit]:
            backend = eligible[k]
            p = self._probability(backend)
            why = f"drawn with probability {p:.1%}"
            if self._cumulative:
                why += f" (effective weight {backend.eff_weight:.4g} of {self._total:.4g})"
            if k == drawn:
                why += "; the next draw"
            out.append(candidate(backend, p, why, k == drawn))
        return out


@register
class PowerOfTwoChoices(WeightedDraw):
    """Draw two different backends at random (by weight) and take the less loaded one.

    Mitzenmacher's "power of two choices", as in HAProxy's ``random(2)`` and Envoy's default
    least-request balancer: nearly the spread of least connections at the cost of two draws,
    and no herd behaviour when many balancers share the same backends. Load is compared as in
    least connections, ``(in flight + 1) / weight``; a tie goes to the first draw.
    """

    name = "power_of_two_choices"
    rule = (
        "two backends drawn at random by effective weight; the lower "
        "(in flight + 1) / effective weight wins"
    )

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

    def explain(self, key: str | None, now: float, limit: int | None = None) -> list[Candidate]:
        """Score: the load least connections compares, ``(in flight + 1) / effective weight``.
        The next two draws (made on a copy of the generator's state) come first: the winner,
        ``chosen``, then the other; the rest follow by increasing load."""

        def describe(backend: Backend, load: float) -> str:
            in_flight = backend.active + backend.shared_active
            return (
                f"({in_flight} in flight + 1) / effective weight {backend.eff_weight:.4g} "
                f"= {load:.4g}"
            )

        return self._explain_pair(limit, load_of, describe)
