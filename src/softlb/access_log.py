"""The proxy's access log: one line per request, in one of three formats (SPEC §2).

Turn it on with the config's ``access_log`` (a file path, or ``"-"`` for standard output) and
pick the format with ``access_log_format``:

``"csv"`` (the default)
    What ``softlb simulate --csv`` replays (:data:`softlb.simulate.RECORDED_FIELDS`): ``time``
    (arrival, Unix seconds), ``key`` (the request's hash key as the ``hash_key`` setting
    defines it), ``latency`` (seconds from the pick to the end of the backend's answer, the
    time peak EWMA measures) and ``backend`` (its URL), under a header row. Requests no
    backend answered are not written: the simulator has nothing to replay for them.
``"combined"``
    nginx's ``combined`` format followed by nginx's ``$upstream_addr`` and
    ``$upstream_response_time``, so that log tools that read nginx's lines read these::

        127.0.0.1 - - [04/Dec/2026:18:39:42 +0000] "GET /a?b=1 HTTP/1.1" 200 512 "-"
        "curl/8.5.0" 10.0.0.1:8000 0.012

    (one line; broken here to fit).

``"json"``
    One JSON object per line: ``time`` (ISO 8601, UTC), ``client``, ``method``, ``target``,
    ``status``, ``bytes``, ``backend`` (URL, or ``null``), ``upstream_time_ms``,
    ``duration_ms``, ``referer``, ``user_agent`` (``null`` when absent).

:class:`AccessLog` picks the writer (:class:`CsvFormat`, :class:`CombinedFormat`,
:class:`JsonFormat`) and owns the file; both engines call :meth:`AccessLog.record` with plain
values, from any thread.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol, TextIO
from urllib.parse import urlsplit

__all__ = [
    "FIELDS",
    "FORMATS",
    "AccessEntry",
    "AccessLog",
    "CombinedFormat",
    "CsvFormat",
    "JsonFormat",
    "LineFormat",
    "wall_clock_of",
]

#: The CSV header row, in order.
FIELDS = ("time", "key", "latency", "backend")

#: English month abbreviations for ``$time_local`` (``%b`` would follow the C locale).
_MONTHS: Final = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
                  "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")  # fmt: skip


@dataclass(frozen=True, slots=True)
class AccessEntry:
    """One request as the access log sees it; every field a plain value.

    ``arrival`` is the wall-clock (Unix) time the request started, ``latency`` the seconds
    from the backend's pick to the end of its answer (``None`` when no backend answered),
    ``duration`` the seconds from the request's arrival to the end of the answer to the client.
    """

    arrival: float
    key: str | None = None
    latency: float | None = None
    backend: str | None = None
    client: str = ""
    method: str = ""
    target: str = ""
    protocol: str = "HTTP/1.1"
    status: int = 0
    bytes_sent: int = 0
    referer: str | None = None
    user_agent: str | None = None
    user: str | None = None
    duration: float | None = None


class LineFormat(Protocol):
    """A writer: how one :class:`AccessEntry` becomes one line."""

    #: The format's name, as ``access_log_format`` spells it.
    name: str
    #: A first line for an empty file (``None``: no header).
    header: str | None

    def line(self, entry: AccessEntry) -> str | None:
        """The line, ending in ``"\\n"``, or ``None`` to write nothing for this entry."""


class CsvFormat:
    """The rows ``softlb simulate --csv`` replays: ``time,key,latency,backend``."""

    name = "csv"
    header: str | None = ",".join(FIELDS) + "\n"

    def line(self, entry: AccessEntry) -> str | None:
        """One CSV row, or ``None`` when no backend answered (there is nothing to replay)."""
        if entry.backend is None:
            return None
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(
            (f"{entry.arrival:.6f}", entry.key or "", f"{entry.latency or 0.0:.6f}", entry.backend)
        )
        return buffer.getvalue()


def _escape(text: str | None) -> str:
    """A string as nginx writes it in a log line: ``"-"`` when empty, and ``"``, ``\\``,
    control and non-ASCII characters as ``\\xHH`` (of their UTF-8 bytes), so that a
    client cannot forge a line or a field."""
    if not text:
        return "-"
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return text
    out = []
    for byte in text.encode("utf-8", "surrogateescape"):
        if 0x20 <= byte < 0x7F and byte not in (0x22, 0x5C):
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02X}")
    return "".join(out)


def _time_local(arrival: float) -> str:
    """``$time_local``: ``04/Dec/2026:18:39:42 +0000``, in the process's time zone."""
    moment = time.localtime(arrival)
    offset = moment.tm_gmtoff or 0
    sign = "-" if offset < 0 else "+"
    hours, minutes = divmod(abs(offset) // 60, 60)
    return (
        f"{moment.tm_mday:02d}/{_MONTHS[moment.tm_mon - 1]}/{moment.tm_year}:"
        f"{moment.tm_hour:02d}:{moment.tm_min:02d}:{moment.tm_sec:02d} "
        f"{sign}{hours:02d}{minutes:02d}"
    )


def _upstream_addr(backend: str | None) -> str:
    """nginx's ``$upstream_addr``: the backend's ``host:port`` (``"-"`` without one)."""
    if not backend:
        return "-"
    parts = urlsplit(backend)
    if parts.port is not None:
        return parts.netloc
    return f"{parts.netloc}:{443 if parts.scheme == 'https' else 80}"


class CombinedFormat:
    """nginx's ``combined`` line plus ``$upstream_addr $upstream_response_time``."""

    name = "combined"
    header: str | None = None

    def __init__(self) -> None:
        self._stamp = (-1, "")  # (second, its $time_local): one formatting per second

    def line(self, entry: AccessEntry) -> str | None:
        """``$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent
        "$http_referer" "$http_user_agent" $upstream_addr $upstream_response_time``."""
        request = f"{entry.method} {entry.target} {entry.protocol}" if entry.method else ""
        upstream_time = "-" if entry.latency is None else f"{entry.latency:.3f}"
        second = int(entry.arrival)
        stamp = self._stamp  # one read: another thread may replace it, never half of it
        if stamp[0] != second:
            stamp = self._stamp = (second, _time_local(second))
        return (
            f"{_escape(entry.client)} - {_escape(entry.user)} [{stamp[1]}] "
            f'"{_escape(request)}" {entry.status} {entry.bytes_sent} '
            f'"{_escape(entry.referer)}" "{_escape(entry.user_agent)}" '
            f"{_upstream_addr(entry.backend)} {upstream_time}\n"
        )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


class JsonFormat:
    """One JSON object per line, for log pipelines (Loki, Elasticsearch, jq)."""

    name = "json"
    header: str | None = None

    def __init__(self) -> None:
        self._stamp = (-1, "")  # (second, its ISO 8601 form): one formatting per second

    def line(self, entry: AccessEntry) -> str | None:
        """The object of :mod:`the module's <softlb.access_log>` list, on one line."""
        second = int(entry.arrival)
        stamp = self._stamp
        if stamp[0] != second:
            stamp = self._stamp = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        millis = int(entry.arrival * 1000) % 1000
        obj = {
            "time": f"{stamp[1]}.{millis:03d}Z",
            "client": entry.client,
            "method": entry.method,
            "target": entry.target,
            "status": entry.status,
            "bytes": entry.bytes_sent,
            "backend": entry.backend,
            "upstream_time_ms": _ms(entry.latency),
            "duration_ms": _ms(entry.duration),
            "referer": entry.referer or None,
            "user_agent": entry.user_agent or None,
        }
        return json.dumps(obj, separators=(",", ":")) + "\n"


#: The writers by ``access_log_format`` name.
FORMATS: Final[dict[str, Callable[[], LineFormat]]] = {
    "csv": CsvFormat,
    "combined": CombinedFormat,
    "json": JsonFormat,
}


class AccessLog:
    """Writes one line per request to a file or standard output, from any thread and any
    worker process.

    ``path`` is a file path or ``"-"`` for standard output; ``log_format`` one of
    :data:`FORMATS`. A file is opened on the first line, in the process that writes it (never
    before a fork), in append mode, line-buffered; each line goes out in one ``write()``, so
    the lines of several workers appending to one file do not mix. The CSV header is written
    when the file is empty (on standard output: before the first line of each process).
    Standard output is flushed after every line, so that a container's log collector sees
    each request at once. A write error (a full disk) is swallowed: it must not fail the
    request the line describes. ``_lock`` protects ``_file`` and ``_pid``.
    """

    def __init__(self, path: str | os.PathLike[str], log_format: str = "csv") -> None:
        factory = FORMATS.get(log_format)
        if factory is None:
            raise ValueError(
                f"access log format must be one of {', '.join(FORMATS)}, got {log_format!r}"
            )
        self.path = os.fspath(path)
        self.format: LineFormat = factory()
        self._stdout = self.path == "-"
        self._lock = threading.Lock()
        self._file: TextIO | None = None
        self._pid = 0

    def record(
        self,
        arrival: float,
        key: str | None = None,
        latency: float | None = None,
        backend: str | None = None,
        *,
        client: str = "",
        method: str = "",
        target: str = "",
        protocol: str = "HTTP/1.1",
        status: int = 0,
        bytes_sent: int = 0,
        referer: str | None = None,
        user_agent: str | None = None,
        user: str | None = None,
        duration: float | None = None,
    ) -> None:
        """Write one line for a request (see :class:`AccessEntry` for the values).

        ``arrival`` is Unix seconds (:func:`wall_clock_of` turns a monotonic reading into
        it), ``latency`` and ``duration`` seconds, ``backend`` the answering backend's URL
        (``None`` for an answer the proxy made itself). The CSV format needs only the first
        four; the others fill the combined and JSON lines.
        """
        entry = AccessEntry(
            arrival, key, latency, backend, client, method, target, protocol, status,
            bytes_sent, referer, user_agent, user, duration,
        )  # fmt: skip
        self.write(entry)

    def write(self, entry: AccessEntry) -> None:
        """Write the line of one :class:`AccessEntry` (formatted outside the lock)."""
        line = self.format.line(entry)
        if line is None:
            return
        with self._lock:
            try:
                handle = self._opened()
                handle.write(line)
                if self._stdout:
                    handle.flush()
            except (OSError, ValueError):  # full disk, closed stdout: never fail the request
                self._file = None

    def _opened(self) -> TextIO:
        if self._stdout:  # looked up each time: a test or a daemon may replace it
            if self._pid != os.getpid():
                self._pid = os.getpid()
                if self.format.header:
                    sys.stdout.write(self.format.header)
            return sys.stdout
        if self._file is None or self._pid != os.getpid():
            header = self.format.header
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            handle = open(self.path, "a", encoding="utf-8", newline="", buffering=1)  # noqa: SIM115
            if header and handle.tell() == 0:
                handle.write(header)
            self._file, self._pid = handle, os.getpid()
        return self._file

    def close(self) -> None:
        """Close the file (it is opened again by the next line); standard output stays open."""
        with self._lock:
            handle, self._file = self._file, None
            mine = self._pid == os.getpid()
        if handle is not None and mine:
            handle.close()

    def __repr__(self) -> str:
        return f"<AccessLog {self.path} {self.format.name}>"


def wall_clock_of(monotonic_then: float, monotonic_now: float) -> float:
    """The Unix time of a moment measured on the monotonic clock."""
    return time.time() - (monotonic_now - monotonic_then)
