"""The proxy's CSV access log: one row per request answered by a backend.

The rows are what ``softlb simulate --csv`` replays (:data:`softlb.simulate.RECORDED_FIELDS`):
``time`` (arrival, Unix seconds), ``key`` (the request's hash key as the ``hash_key`` setting
defines it), ``latency`` (seconds from the pick to the end of the backend's answer, the time
peak EWMA measures) and ``backend`` (its URL). Turn it on with the config's ``access_log``.
"""

from __future__ import annotations

import csv
import io
import os
import threading
import time

__all__ = ["FIELDS", "AccessLog"]

#: The header row, in order.
FIELDS = ("time", "key", "latency", "backend")


class AccessLog:
    """Appends rows to a CSV file, from any thread and any worker process.

    The file is opened on the first row, in the process that writes it (never before a
    fork), in append mode; each row goes out in one ``write()`` of a whole line, so the rows
    of several workers appending to one file do not mix. The header is written when the
    file is empty. ``_lock`` protects ``_file``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._file: io.TextIOWrapper | None = None
        self._pid = 0

    def record(self, arrival: float, key: str | None, latency: float, backend: str) -> None:
        """Append one row; ``arrival`` in Unix seconds, ``latency`` in seconds."""
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(
            (f"{arrival:.6f}", key or "", f"{latency:.6f}", backend)
        )
        line = buffer.getvalue()
        with self._lock:
            try:
                self._opened().write(line)
            except OSError:  # a full disk must not fail the request it describes
                self._file = None

    def _opened(self) -> io.TextIOWrapper:
        if self._file is None or self._pid != os.getpid():
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            handle = open(self.path, "a", encoding="utf-8", newline="", buffering=1)  # noqa: SIM115
            if handle.tell() == 0:
                handle.write(",".join(FIELDS) + "\n")
            self._file, self._pid = handle, os.getpid()
        return self._file

    def close(self) -> None:
        """Close the file (it is opened again by the next row)."""
        with self._lock:
            handle, self._file = self._file, None
        if handle is not None and self._pid == os.getpid():
            handle.close()

    def __repr__(self) -> str:
        return f"<AccessLog {self.path}>"


def wall_clock_of(monotonic_then: float, monotonic_now: float) -> float:
    """The Unix time of a moment measured on the monotonic clock."""
    return time.time() - (monotonic_now - monotonic_then)
