"""Health probes: what one check of a backend is (:class:`ProbeResult`, :data:`Probe`) and
the one grammar of ``expected_status`` (:func:`parse_status_ranges`). Standard library only,
like the rest of the core.

:class:`~softlb.health.HealthChecker` schedules probes and keeps the verdicts; it takes any
callable ``(Backend) -> ProbeResult`` as its probe, by default
:class:`softlb.http.probe.HttpProbe`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from softlb.backend import Backend

__all__ = ["Probe", "ProbeResult", "StatusRanges", "parse_status_ranges"]

_STATUS_CLASS: Final = re.compile(r"[1-5]xx", re.IGNORECASE)

StatusRanges = tuple[tuple[int, int], ...]


def parse_status_ranges(spec: str | int | Iterable[int | str] | StatusRanges) -> StatusRanges:
    """Turn ``"200-399"``, ``"2xx"``, ``"200,204,300-399"``, ``200`` or a list of those into
    ranges: the one grammar of ``expected_status``, for the config and the checker alike."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        return ((spec, spec),)
    items: Iterable[object] = spec.split(",") if isinstance(spec, str) else list(spec)  # type: ignore[arg-type]
    ranges: list[tuple[int, int]] = []
    for item in items:
        if isinstance(item, tuple) and len(item) == 2:
            low, high = int(item[0]), int(item[1])
        elif isinstance(item, int) and not isinstance(item, bool):
            low = high = item
        elif isinstance(item, str) and _STATUS_CLASS.fullmatch(item.strip()):
            low = int(item.strip()[0]) * 100
            high = low + 99
        elif isinstance(item, str):
            lo_text, _, hi_text = item.strip().partition("-")
            low = int(lo_text)
            high = int(hi_text) if hi_text else low
        else:
            raise ValueError(f"status range {item!r} is not a code or 'LOW-HIGH'")
        if not 100 <= low <= high <= 599:
            raise ValueError(f"status range {low}-{high} must lie within 100-599, low <= high")
        ranges.append((low, high))
    if not ranges:
        raise ValueError("no status range given")
    return tuple(ranges)


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe: ``ok`` and a short ``detail`` ("HTTP 200", "timeout")."""

    ok: bool
    detail: str


Probe = Callable[[Backend], ProbeResult]
