"""Rotation strategies: plain round robin and nginx's smooth weighted round robin."""

from __future__ import annotations

import heapq
from typing import Final

from softlb.backend import Backend
from softlb.balancers.base import ONLY_ONE, Balancer, Candidate, candidate, register

__all__ = ["RoundRobin", "WeightedRoundRobin"]


@register
class RoundRobin(Balancer):
    """Each eligible backend in turn, ignoring weights (nginx's and HAProxy's ``roundrobin``
    with equal weights).

    The position survives a rebuild, so a membership change does not send the next request
    back to the first backend.
    """

    name = "round_robin"
    rule = "each backend in rotation in turn, weights ignored"

    def __init__(self) -> None:
        self._eligible: tuple[Backend, ...] = ()
        self._next = 0

    def rebuild(self, eligible: tuple[Backend, ...], now: float) -> None:
        self._eligible = eligible

    def pick(self, key: str | None, now: float) -> Backend | None:
        eligible = self._eligible
        n = len(eligible)
        if n == 0:
            return None
        if n == 1:
            return eligible[0]
        i = self._next % n
        self._next = i + 1
        return eligible[i]

    def explain(self, key: str | None, now: float, limit: int | None = None) -> list[Candidate]:
        """Score: how many picks come before the backend's turn (0 = next), from the position
        the next pick takes."""
        eligible = self._eligible
        n = len(eligible)
        if n == 0:
            return []
        if n == 1:
            return [candidate(eligible[0], 0, ONLY_ONE, True)]
        start = self._next % n
        out = []
        for turn in range(n if limit is None else min(n, limit)):
            if turn == 0:
                why = f"next in turn (position {start + 1} of {n})"
            else:
                why = f"{turn} pick{'s' if turn > 1 else ''} before its turn"
            out.append(candidate(eligible[(start + turn) % n], turn, why, turn == 0))
        return out


#: Up to this many eligible backends, :class:`WeightedRoundRobin` runs nginx's algorithm,
#: which costs O(n) per pick; above it, Envoy's earliest-deadline-first schedule, O(log n).
#: 32 keeps the O(n) loop near 2 µs on a 2020s CPU.
SMOOTH_EXACT_LIMIT: Final = 32


@register
class WeightedRoundRobin(Balancer):
    """Weighted round robin that interleaves heavy and light backends.

    Up to :data:`SMOOTH_EXACT_LIMIT` eligible backends this is nginx's *smooth* weighted round
    robin (``ngx_http_upstream_get_peer``, 2012): every pick adds each backend's weight to its
    running score, takes the highest score and subtracts the total from it. Weights
    ``{a: 5, b: 1, c: 1}`` give ``a a b a c a a``, never ``a a a a a b c``.

    With more backends it switches to the earliest-deadline-first scheduler of Envoy's
    ``EdfScheduler``: each backend's next turn is due ``1 / weight`` after its last one, and a
    heap finds the earliest. Both give every backend exactly its share of each cycle of
    ``sum(weights)`` picks; EDF is O(log n) per pick where nginx's loop is O(n).

    Effective weights (slow start) are used, so a ramping backend gets its growing share.
    """

    name = "weighted_round_robin"
    rule = (
        "the highest running score + effective weight is picked and loses the total weight "
        "(nginx's smooth weighted round robin; Envoy's earliest deadline first beyond "
        f"{SMOOTH_EXACT_LIMIT} backends)"
    )

    def __init__(self) -> None:
        self._eligible: tuple[Backend, ...] = ()
        # nginx mode: parallel lists of current scores and effective weights.
        self._current: list[float] = []
        self._weights: list[float] = []
        self._total = 0.0
        # EDF mode: heap of (deadline, sequence, index) and the scheduler's clock.
        self._heap: list[tuple[float, int, int]] = []
        self._seq = 0

    def rebuild(self, eligible: tuple[Backend, ...], now: float) -> None:
        # Keep the running scores of backends that stay, so a rebuild does not restart the
        # cycle (nginx keeps current_weight per peer across config reloads of health state).
        old = dict(zip(self._eligible, self._current, strict=False))
        self._eligible = eligible
        self._weights = [b.eff_weight for b in eligible]
        self._total = sum(self._weights)
        if len(eligible) <= SMOOTH_EXACT_LIMIT:
            self._current = [old.get(b, 0.0) for b in eligible]
            self._heap = []
        else:
            self._current = []
            # Stagger the first deadlines ((i + 1) / n of a period) so that backends of equal
            # weight do not share every deadline: with a common start, a weight-10 backend
            # among 39 of weight 1 got its 10 turns back to back, then none for 39 picks.
            n = len(eligible)
            self._heap = [((i + 1) / n / w, i, i) for i, w in enumerate(self._weights)]
            heapq.heapify(self._heap)
            self._seq = len(eligible)

    def pick(self, key: str | None, now: float) -> Backend | None:
        eligible = self._eligible
        n = len(eligible)
        if n == 0:
            return None
        if n == 1:
            return eligible[0]
        if self._heap:
            deadline, _, i = self._heap[0]
            self._seq += 1
            heapq.heapreplace(self._heap, (deadline + 1.0 / self._weights[i], self._seq, i))
            return eligible[i]
        current = self._current
        weights = self._weights
        best = 0
        best_score = current[0] + weights[0]
        current[0] = best_score
        for i in range(1, n):
            score = current[i] + weights[i]
            current[i] = score
            if score > best_score:  # strict: ties go to the earlier backend, as in nginx
                best, best_score = i, score
        current[best] = best_score - self._total
        return eligible[best]

    def explain(self, key: str | None, now: float, limit: int | None = None) -> list[Candidate]:
        """Score: the running score the next pick compares (nginx mode: current + weight, the
        highest wins, ties to the earlier backend), or the next deadline (EDF mode: the
        earliest wins)."""
        eligible = self._eligible
        n = len(eligible)
        if n == 0:
            return []
        if n == 1:
            return [candidate(eligible[0], None, ONLY_ONE, True)]
        weights = self._weights
        count = n if limit is None else min(n, limit)
        out = []
        if self._heap:
            for rank, (deadline, _, i) in enumerate(heapq.nsmallest(count, self._heap)):
                why = f"next turn due at {deadline:.4g} (a turn every 1/{weights[i]:.4g})"
                if rank == 0:
                    why += "; the earliest, so it is picked next"
                out.append(candidate(eligible[i], deadline, why, rank == 0))
            return out
        current = self._current
        scores = [c + w for c, w in zip(current, weights, strict=True)]
        order = sorted(range(n), key=lambda i: (-scores[i], i))  # ties to the earlier backend
        for rank, i in enumerate(order[:count]):
            why = f"running score {current[i]:.4g} + effective weight {weights[i]:.4g}"
            if rank == 0:
                why += f"; the highest, so it is picked next and drops by {self._total:.4g}"
            out.append(candidate(eligible[i], scores[i], why, rank == 0))
        return out
