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
from softlb.durations import _show

__all__ = ["Probe", "ProbeResult", "StatusRanges", "parse_status_ranges"]

#: Lowest and highest HTTP status codes (RFC 9110 §15: three digits, first digit 1 to 5).
_STATUS_MIN: Final = 100
_STATUS_MAX: Final = 599
_STATUS_ITEM: Final = re.compile(r"([0-9]{3})(?:\s*-\s*([0-9]{3}))?")
_STATUS_CLASS: Final = re.compile(r"([1-5])xx", re.IGNORECASE)
#: What ``expected_status`` may be, for messages.
STATUS_ALLOWED: Final = (
    'use a status code like 200, a range like "200-399", "2xx", or a list of them'
)

StatusRanges = tuple[tuple[int, int], ...]


def parse_status_ranges(spec: str | int | Iterable[int | str] | StatusRanges) -> StatusRanges:
    """Turn ``200``, ``"200-399"``, ``"2xx"``, ``"200,204,300-399"`` or a list of those (or of
    ``(low, high)`` pairs) into sorted inclusive ranges.

    The one grammar of ``expected_status``, for the config file and
    :class:`~softlb.health.HealthChecker` alike; a bad value raises :class:`ValueError` with a
    message that says what is allowed (the config adds the key path).
    """
    items: list[object] = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise ValueError(f"is empty; {STATUS_ALLOWED}")
    ranges: list[tuple[int, int]] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            ranges.append((item, item))
        elif (
            isinstance(item, tuple)
            and len(item) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in item)
        ):
            ranges.append((item[0], item[1]))
        elif isinstance(item, str):
            for piece in item.split(","):
                ranges.append(_status_piece(piece.strip(), item))
        else:
            raise ValueError(f"{_show(item)} is not a status code or range; {STATUS_ALLOWED}")
    for low, high in ranges:
        for code in (low, high):
            if not _STATUS_MIN <= code <= _STATUS_MAX:
                raise ValueError(
                    f"{_show(code)} is not an HTTP status; "
                    f"use codes from {_STATUS_MIN} to {_STATUS_MAX}"
                )
        if low > high:
            raise ValueError(
                f'"{low}-{high}" is an empty range; write the lower code first, like "200-399"'
            )
    return tuple(sorted(ranges))


def _status_piece(piece: str, whole: str) -> tuple[int, int]:
    """One comma-separated piece of a status string: ``"200"``, ``"200-399"`` or ``"2xx"``."""
    if klass := _STATUS_CLASS.fullmatch(piece):
        hundred = int(klass.group(1)) * 100
        return (hundred, hundred + 99)
    if match := _STATUS_ITEM.fullmatch(piece):
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) else low
        return (low, high)
    raise ValueError(f"{_show(whole)} is not a status code or range; {STATUS_ALLOWED}")


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe: ``ok`` and a short ``detail`` ("HTTP 200", "timeout")."""

    ok: bool
    detail: str


Probe = Callable[[Backend], ProbeResult]
