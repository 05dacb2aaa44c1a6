"""Peak EWMA: prefer the backend expected to answer soonest (Finagle, linkerd, tower)."""

from __future__ import annotations

import math
from typing import Final

from softlb.backend import EWMA_DECAY_SECONDS, Backend
from softlb.balancers.base import Candidate, register
from softlb.balancers.randomized import WeightedDraw

__all__ = ["DEFAULT_RTT", "PeakEwma", "peak_ewma_cost"]

#: Latency assumed for a backend that has not answered yet *while it has requests pending*:
#: "an arbitrary default RTT of 1 second", as in Finagle's PeakEwma (and tower's port of it).
#: An unmeasured backend with nothing in flight costs 0, as in Finagle, so a newcomer gets a
#: request at once and is measured; the penalty keeps a slow newcomer from getting a pile of
#: requests before its first answer.
DEFAULT_RTT: Final = 1.0


def peak_ewma_cost(
    backend: Backend,
    now: float,
    tau: float = EWMA_DECAY_SECONDS,
    seeded_at: float | None = None,
) -> float:
    """Expected cost of one more request: decayed latency estimate × (in flight + 1) / weight.

    The estimate decays towards zero while no sample arrives (tower's ``RttEstimate``), so a
    backend that was slow once is tried again after a while instead of being shunned forever.
    A backend never measured costs 0 while idle and :data:`DEFAULT_RTT` (decaying from
    ``seeded_at``, when it joined) while it has requests pending.
    """
    pending = backend.active + backend.shared_active
    if backend._ewma_at:
        estimate, at = backend._ewma, backend._ewma_at
    elif pending == 0:
        return 0.0
    else:
        estimate, at = DEFAULT_RTT, now if seeded_at is None else seeded_at
    if now > at:
        estimate *= math.exp(-(now - at) / tau)
    return estimate * (pending + 1) / backend.eff_weight


@register
class PeakEwma(WeightedDraw):
    """Power of two choices on peak-EWMA cost (Finagle's ``Balancers.p2cPeakEwma``).

    Each backend's latency is tracked as an exponentially weighted moving average that jumps
    straight to any slower sample (the "peak") and decays with a 10 s time constant
    (:data:`~softlb.backend.EWMA_DECAY_SECONDS`, Finagle's and linkerd's default). Two backends
    are drawn at random and the one with the lower ``estimate × (in flight + 1)`` wins, so a
    backend that slows down loses traffic within a few requests, long before a health check
    would notice.
    """

    name = "peak_ewma"
    rule = (
        "two backends drawn at random by effective weight; the lower "
        "latency estimate × (in flight + 1) / effective weight wins"
    )

    def __init__(self, *, seed: int | None = None) -> None:
        super().__init__(seed=seed)
        # When each not-yet-measured backend joined, for the decay of its DEFAULT_RTT.
        self._seeded: dict[Backend, float] = {}

    def rebuild(self, eligible: tuple[Backend, ...], now: float) -> None:
        super().rebuild(eligible, now)
        self._seeded = {b: self._seeded.get(b, now) for b in eligible if not b._ewma_at}

    def pick(self, key: str | None, now: float) -> Backend | None:
        eligible = self._eligible
        n = len(eligible)
        if n == 0:
            return None
        if n == 1:
            return eligible[0]
        i = self._draw()
        j = self._draw()
        if j == i:
            j = (i + 1 + int(self._rng.random() * (n - 1))) % n
        a, b = eligible[i], eligible[j]
        seeded = self._seeded
        cost_a = peak_ewma_cost(a, now, seeded_at=seeded.get(a))
        cost_b = peak_ewma_cost(b, now, seeded_at=seeded.get(b))
        return b if cost_b < cost_a else a

    def explain(self, key: str | None, now: float, limit: int | None = None) -> list[Candidate]:
        """Score: :func:`peak_ewma_cost` now. The next two draws (made on a copy of the
        generator's state) come first: the winner, ``chosen``, then the other; the rest follow
        by increasing cost."""
        seeded = self._seeded

        def cost(backend: Backend) -> float:
            return peak_ewma_cost(backend, now, seeded_at=seeded.get(backend))

        def describe(backend: Backend, value: float) -> str:
            pending = backend.active + backend.shared_active
            if not backend._ewma_at and pending == 0:
                return "not measured yet and idle: cost 0, so it is tried at once"
            estimate = value * backend.eff_weight / (pending + 1)
            if backend._ewma_at:
                measured = f"latency estimate {estimate * 1000:.4g} ms"
            else:
                measured = f"not measured yet: {estimate * 1000:.4g} ms assumed"
            return (
                f"{measured} × ({pending} in flight + 1) / effective weight "
                f"{backend.eff_weight:.4g} = {value:.4g}"
            )

        return self._explain_pair(limit, cost, describe)
