"""Health probes: what one check of a backend is, and the default HTTP one.

:class:`HttpProbe` sends ``GET path`` with softlb's blocking urllib3 client
(:mod:`softlb.http.upstream`) and judges the status by ``expected_status``
(:func:`parse_status_ranges`). :class:`~softlb.health.HealthChecker` schedules probes and keeps
the verdicts; it takes any callable ``(Backend) -> ProbeResult`` as its probe.
"""

from __future__ import annotations

import http.client
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import urllib3
from urllib3.exceptions import HTTPError

from softlb.backend import Backend
from softlb.errors import UpstreamConnectError, UpstreamTimeout
from softlb.http.upstream import PROBE_USER_AGENT, SMALL_BODY, in_words, translate

__all__ = ["HttpProbe", "Probe", "ProbeResult", "StatusRanges", "parse_status_ranges"]

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


class HttpProbe:
    """The default health probe: ``GET path`` on a fresh connection, status checked.

    Connection: close on every probe, as HAProxy does, so a probe also proves that new
    connections are accepted. The body is read (up to 64 KiB) and discarded.
    """

    def __init__(
        self,
        *,
        path: str = "/",
        timeout: float = 2.0,
        expected_status: StatusRanges | str = ((200, 399),),
        maxsize: int = 8,
    ) -> None:
        self.path = path
        self.expected_status = parse_status_ranges(expected_status)
        self.timeout = urllib3.Timeout(total=timeout, connect=timeout, read=timeout)
        self._maxsize = maxsize
        self._manager = urllib3.PoolManager(num_pools=max(16, 2 * maxsize), maxsize=maxsize)
        self._headers = {"User-Agent": PROBE_USER_AGENT, "Connection": "close"}

    def __call__(self, backend: Backend) -> ProbeResult:
        try:
            resp = self._manager.request(
                "GET",
                backend.url + self.path,
                headers=self._headers,
                retries=False,
                redirect=False,
                timeout=self.timeout,
                preload_content=False,
                decode_content=False,
            )
            try:
                resp.read(SMALL_BODY, decode_content=False)
            finally:
                resp.close()
                resp.release_conn()
        except (HTTPError, OSError, http.client.HTTPException) as exc:
            err = translate(exc, backend.url, sent=True)
            kind = {
                UpstreamConnectError: "connect failed",
                UpstreamTimeout: "timeout",
            }.get(type(err), "connection broken")
            return ProbeResult(False, f"{kind} ({in_words(exc)})")
        status = resp.status
        ok = any(low <= status <= high for low, high in self.expected_status)
        return ProbeResult(ok, f"HTTP {status}")

    def reset(self) -> None:
        """Forget connections inherited from a parent process (after ``fork()``)."""
        self._manager = urllib3.PoolManager(
            num_pools=max(16, 2 * self._maxsize), maxsize=self._maxsize
        )

    def close(self) -> None:
        """Close the probe's connections."""
        self._manager.clear()
