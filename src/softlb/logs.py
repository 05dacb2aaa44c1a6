"""softlb's log: the state-change lines, their one style, and where they go.

:func:`install_event_logging` subscribes to a pool's events (:mod:`softlb.events`) and writes
one line per change to the ``softlb.events`` logger — as text, or as one JSON object per line.
The lines are written on the pool's dispatcher thread, never on a request's.
:class:`~softlb.app.Application` installs it, so ``softlb serve`` logs::

    backend http://10.0.0.2:8000 added (weight 1)
    backend http://10.0.0.2:8000 is down: HTTP 503
    backend http://10.0.0.3:8000 is down: 3 requests in a row failed, the last: connection refused
    no backend available: no backend in rotation: 2 members, none eligible

Every softlb line has that shape: what happened, to which backend, then why, in words (never a
library's exception repr). One change is one line: a passive ejection is logged as its
``ejected`` event only, not also as the ``health`` event that comes with it.

With ``json=True`` (``SOFTLB_LOG_FORMAT=json`` for the application) each message is a JSON
object::

    {"time": "2024-06-01T12:00:00.000Z", "level": "warning", "event": "health", ...}

:func:`configure_logging` is what ``softlb serve`` and :func:`softlb.app.create_app` call when
the program has not set up logging itself: ``softlb.*`` lines at INFO and above on stderr, with
time, process and level (gunicorn's format), or pure JSON lines with ``SOFTLB_LOG_FORMAT=json``.
Every event record also carries the event's fields as ``record.softlb_event``.
:func:`warn_if_serial` says once per process when the WSGI server runs one request at a time.
"""

from __future__ import annotations

import datetime
import json as json_module
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

from softlb import events
from softlb.events import Event
from softlb.forking import after_fork_in_child
from softlb.retry import failure_text

if TYPE_CHECKING:
    from softlb.pool import Pool

__all__ = [
    "NO_BACKEND_INTERVAL",
    "STATE_CHANGES",
    "TEXT_FORMAT",
    "EventLogger",
    "JsonFormatter",
    "configure_logging",
    "failure_text",
    "install_event_logging",
    "warn_if_serial",
]

#: softlb's text lines, as gunicorn writes its own: time, process, level, then logger and message.
TEXT_FORMAT: Final = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"
TEXT_DATE_FORMAT: Final = "%Y-%m-%d %H:%M:%S %z"

#: The events logged by default: every change of membership, drain or health, and requests
#: that found no backend. ``retried`` is left out: it is one line per failed try.
STATE_CHANGES: Final = (
    events.ADDED,
    events.REMOVED,
    events.DRAINED,
    events.HEALTH,
    events.EJECTED,
    events.NO_BACKEND,
)

#: At most one ``no_backend`` line per this many seconds; the next line says how many requests
#: were not logged in between. During an outage every request finds no backend, and a line per
#: request would bury the lines that say why.
NO_BACKEND_INTERVAL: Final = 1.0


class EventLogger:
    """The hook :func:`install_event_logging` subscribes: turns an :class:`Event` into a log
    record. Called on the dispatcher thread only, so its counters need no lock."""

    def __init__(self, logger: logging.Logger, *, json: bool = False) -> None:
        self.logger = logger
        self.json = json
        self._no_backend_at = float("-inf")  # event time of the last no_backend line
        self._no_backend_quiet = 0  # no_backend events not logged since

    def __call__(self, event: Event) -> None:
        if event.kind == events.HEALTH and event.detail.startswith("down: passive:"):
            return  # the `ejected` event right after it says the same, with the reason
        level = _level(event)
        extra = ""
        if event.kind == events.NO_BACKEND:
            if event.time - self._no_backend_at < NO_BACKEND_INTERVAL:
                self._no_backend_quiet += 1
                return
            quiet, self._no_backend_quiet = self._no_backend_quiet, 0
            self._no_backend_at = event.time
            if quiet:
                extra = f" ({quiet} more since the last line)"
        else:
            quiet = 0
        if not self.logger.isEnabledFor(level):
            return
        fields = event.as_dict()
        if self.json:
            document: dict[str, object] = {
                "time": _iso(event.time),
                "level": logging.getLevelName(level).lower(),
                "event": event.kind,
                "backend": event.backend,
                "detail": event.detail,
            }
            if quiet:
                document["not_logged"] = quiet
            message = json_module.dumps(document)
        else:
            message = _text(event) + extra
        self.logger.log(level, "%s", message, extra={"softlb_event": fields})


def install_event_logging(
    pool: Pool,
    *,
    json: bool = False,
    logger: logging.Logger | None = None,
    kinds: Iterable[str] = STATE_CHANGES,
) -> Callable[[], None]:
    """Log every state change of ``pool`` to ``softlb.events`` (or ``logger``); returns a
    function that stops it.

    ``kinds`` are the events logged (default :data:`STATE_CHANGES`; add ``"retried"`` for a
    line per retried request, and ``"access"`` for an access log: a line per answered
    request, ``GET /path 200 12.3 ms via URL``). ``json=True`` makes each message one JSON
    object. Levels: a backend going down, an ejection and a retry are warnings, a request
    finding no backend is an error, the rest is info.
    """
    hook = EventLogger(logger or logging.getLogger("softlb.events"), json=json)
    offs = [pool.on(kind, hook) for kind in dict.fromkeys(kinds)]

    def uninstall() -> None:
        for off in offs:
            off()

    return uninstall


def _level(event: Event) -> int:
    kind = event.kind
    if kind == events.NO_BACKEND:
        return logging.ERROR
    if kind in (events.EJECTED, events.RETRIED):
        return logging.WARNING
    if kind == events.HEALTH and not event.detail.startswith("up"):
        return logging.WARNING
    return logging.INFO


def _text(event: Event) -> str:
    kind, url, detail = event.kind, event.backend, event.detail
    if kind == events.ADDED:
        return f"backend {url} added ({detail})" if detail else f"backend {url} added"
    if kind == events.REMOVED:
        return f"backend {url} removed ({detail})" if detail else f"backend {url} removed"
    if kind == events.DRAINED:
        return f"backend {url} draining" if detail == "draining" else f"backend {url} undrained"
    if kind == events.HEALTH:
        verdict, _, reason = detail.partition(": ")
        return f"backend {url} is {verdict}" + (f": {reason}" if reason else "")
    if kind == events.EJECTED:
        return f"backend {url} is down: {detail.removeprefix('passive: ')}"
    if kind == events.RETRIED:
        return f"request retried on another backend after {url} failed: {detail}"
    if kind == events.NO_BACKEND:
        return f"no backend available: {detail}"
    if kind == events.ACCESS:
        return f"{detail} via {url}"
    return f"{kind} {url}: {detail}"


def _iso(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: an event record's own JSON message as it is, any other record
    as ``{"time", "level", "logger", "message"}``."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if getattr(record, "softlb_event", None) is not None and message.startswith("{"):
            return message
        document: dict[str, object] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        if record.exc_info:
            document["error"] = self.formatException(record.exc_info)
        return json_module.dumps(document)


def configure_logging(log_format: str | None = None) -> bool:
    """Send ``softlb.*`` lines at INFO and above to stderr, unless logging is already set up.

    Does nothing (and returns ``False``) when the ``softlb`` logger or the root logger already
    has a handler: then the program decides. Otherwise adds one handler to ``softlb`` and
    returns ``True``. ``log_format`` is ``"text"`` (gunicorn's line format, :data:`TEXT_FORMAT`)
    or ``"json"`` (:class:`JsonFormatter`); by default ``SOFTLB_LOG_FORMAT``, else text. Without
    this, Python prints softlb's warnings bare (no time, no level) and drops its INFO lines.
    """
    logger = logging.getLogger("softlb")
    if logger.handlers or logging.getLogger().handlers:
        return False
    handler = logging.StreamHandler(sys.stderr)
    if (log_format or os.environ.get("SOFTLB_LOG_FORMAT") or "text") == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT, datefmt=TEXT_DATE_FORMAT))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return True


#: Modules whose presence means gunicorn's workers run many requests at once although
#: ``wsgi.multithread`` is false: green threads (gevent, eventlet) and softlb's event loop.
#: softlb's event loop needs no entry: the environ it gives the admin API says multithread.
_CONCURRENT: Final = ("gevent", "eventlet")

_serial_checked = False  # whether warn_if_serial() has looked at a request in this process


def warn_if_serial(environ: Mapping[str, Any], logger: logging.Logger | None = None) -> bool:
    """Warn once per process when gunicorn runs one request at a time here; return whether it
    does (decided on the first request a process sees; later calls return ``False`` at once).

    The signal is the WSGI spec's own, from gunicorn (``SERVER_SOFTWARE`` ``gunicorn/...``):
    ``wsgi.multithread`` false, which gunicorn sets when ``--threads`` is 1 — its default
    ``sync`` worker, and ``gthread`` with one thread — unless the worker is concurrent without
    threads (gevent, eventlet; softlb's event loop says ``wsgi.multithread``). A proxy spends
    its time waiting for backends, so there one slow backend holds up every other request of
    that worker, the admin API and the status page included. Other WSGI servers are not judged.
    """
    global _serial_checked
    if _serial_checked:
        return False
    _serial_checked = True
    software = str(environ.get("SERVER_SOFTWARE") or "")
    serial = (
        software.startswith("gunicorn")
        and environ.get("wsgi.multithread") is False
        and not environ.get("wsgi.run_once")
        and not any(name in sys.modules for name in _CONCURRENT)
    )
    if serial:
        (logger or logging.getLogger("softlb.server")).warning(
            "gunicorn runs one request at a time in worker %d (sync worker, or one thread): "
            "one slow backend holds up every other request, the admin API included; run "
            "gunicorn with -k gthread --threads 16, or use softlb serve",
            os.getpid(),
        )
    return serial


def _reset_after_fork() -> None:
    global _serial_checked
    _serial_checked = False


after_fork_in_child(_reset_after_fork)
