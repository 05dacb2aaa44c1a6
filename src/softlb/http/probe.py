"""The default health probe: ``GET path`` with softlb's blocking urllib3 client
(:mod:`softlb.http.upstream`), the status judged by ``expected_status``."""

from __future__ import annotations

import http.client
from typing import Any

import urllib3
from urllib3.exceptions import HTTPError

from softlb.backend import Backend
from softlb.errors import UpstreamConnectError, UpstreamTimeout
from softlb.http.upstream import PROBE_USER_AGENT, SMALL_BODY, in_words, translate
from softlb.probe import ProbeResult, StatusRanges, parse_status_ranges

__all__ = ["HttpProbe"]


class HttpProbe:
    """The default health probe: ``GET path`` on a fresh connection, status checked.

    Connection: close on every probe, as HAProxy does, so a probe also proves that new
    connections are accepted. The body is read (up to 64 KiB) and discarded. ``ca_certs``:
    a PEM file of the authorities ``https://`` backends' certificates are checked against
    (default: the system's).
    """

    def __init__(
        self,
        *,
        path: str = "/",
        timeout: float = 2.0,
        expected_status: StatusRanges | str = ((200, 399),),
        maxsize: int = 8,
        ca_certs: str | None = None,
    ) -> None:
        self.path = path
        self.expected_status = parse_status_ranges(expected_status)
        self.timeout = urllib3.Timeout(total=timeout, connect=timeout, read=timeout)
        self._maxsize = maxsize
        #: PEM file of the authorities ``https://`` backends' certificates are checked
        #: against; ``None``: the system's.
        self.ca_certs = ca_certs
        self._manager = self._new_manager()
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
        self._manager = self._new_manager()

    def _new_manager(self) -> urllib3.PoolManager:
        tls: dict[str, Any] = {} if self.ca_certs is None else {"ca_certs": self.ca_certs}
        return urllib3.PoolManager(
            num_pools=max(16, 2 * self._maxsize), maxsize=self._maxsize, **tls
        )

    def close(self) -> None:
        """Close the probe's connections."""
        self._manager.clear()
