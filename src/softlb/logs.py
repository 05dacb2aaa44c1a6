"""The balancer's state-change log, written through the pool's event hooks.

:func:`install_event_logging` subscribes to a pool's events (:mod:`softlb.events`) and writes
one line per change to the ``softlb.events`` logger — as text, or as one JSON object per line.
The lines are written on the pool's dispatcher thread, never on a request's.
:class:`~softlb.wsgi.Application` installs it, so ``softlb serve`` logs::

    backend http://10.0.0.2:8000 added (weight 1)
    backend http://10.0.0.2:8000 is down: HTTP 503
    backend http://10.0.0.3:8000 ejected: passive: 3 failed requests in a row, last connect
    no backend available: no backend in rotation: 2 members, none eligible

or, with ``json=True`` (``SOFTLB_LOG_FORMAT=json`` for the application)::

    {"time": "2024-06-01T12:00:00.000Z", "level": "warning", "event": "health", ...}

The logger is not configured here: handlers and levels are the program's (``softlb serve``
prints ``softlb.*`` lines on stderr). With JSON, a handler whose format is ``%(message)s``
gives pure JSON lines; every record also carries the event's fields as ``record.softlb_event``.
"""

from __future__ import annotations

import datetime
import json as json_module
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from softlb import events
from softlb.events import Event

if TYPE_CHECKING:
    from softlb.pool import Pool

__all__ = ["NO_BACKEND_INTERVAL", "STATE_CHANGES", "EventLogger", "install_event_logging"]

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
        return f"backend {url} ejected: {detail}"
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
