"""What ``profile_serve.py`` and ``profile_engine.py`` share: giving each profiled function's
own time and calls to a bucket, and those of a function of no bucket to its callers'."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

#: A cProfile function key: (file, line, name).
Func = tuple[str, int, str]
#: The buckets a function's own time (``by=2``) or calls (``by=1``) belong to, as fractions.
Owner = Callable[[Func, int], dict[str, float]]


def caller_attribution(
    table: dict[Func, Any],
    rule: Callable[[Func], str | None],
    other: Callable[[Func], str],
    recursion: str,
) -> Owner:
    """An :data:`Owner` over a ``pstats.Stats.stats`` table: a function ``rule`` names goes to
    that bucket; any other to its callers' buckets, split by what each caller's calls to it
    took (their calls when none took measurable time); with no callers, or past 40 levels,
    to ``other(func)``. ``recursion`` labels a cycle while it is being resolved."""
    memo: dict[tuple[Func, int], dict[str, float]] = {}

    def owner(func: Func, by: int, depth: int = 0) -> dict[str, float]:
        key = (func, by)
        if key in memo:
            return memo[key]
        label = rule(func)
        if label is not None:
            memo[key] = {label: 1.0}
            return memo[key]
        callers = table.get(func, (0, 0, 0.0, 0.0, {}))[4]
        column = by if sum(c[by] for c in callers.values()) else 1
        total = sum(c[column] for c in callers.values())
        if not callers or depth > 40 or not total:
            memo[key] = {other(func): 1.0}
            return memo[key]
        memo[key] = {recursion: 1.0}  # while resolving: a cycle's guard
        share: dict[str, float] = defaultdict(float)
        for caller, numbers in callers.items():
            weight = numbers[column] / total
            for label, fraction in owner(caller, by, depth + 1).items():
                share[label] += weight * fraction
        memo[key] = dict(share)
        return memo[key]

    return owner
