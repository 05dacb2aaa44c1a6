"""Event hooks: what happened to a pool, delivered to callbacks off the request path.

:meth:`Pool.on() <softlb.pool.Pool.on>` subscribes a callback to one kind of event (or to
:data:`ALL` of them). The thread that causes an event — an admin call, a health probe, a
request — only builds an :class:`Event` and appends it to a bounded queue; one daemon thread per
pool, the :class:`Dispatcher`, calls the callbacks in order. So a slow callback never slows a
request, and an exception in one is logged (``softlb.events``) and does not stop the others.

=====================  ==================  =================================================
constant               ``Event.kind``      when, and ``Event.detail``
=====================  ==================  =================================================
:data:`ADDED`          ``"added"``         a backend joined the pool; ``"weight N"``
:data:`REMOVED`        ``"removed"``       a backend left; ``"nothing in flight"``,
                                           ``"3 requests in flight finish"``
:data:`DRAINED`        ``"drained"``       drain turned on (``"draining"``) or off (``"ready"``)
:data:`HEALTH`         ``"health"``        in or out of rotation for health:
                                           ``"down: HTTP 500"``, ``"up: HTTP 200"``,
                                           ``"down: timeout"``, ``"down: passive: ..."``
:data:`EJECTED`        ``"ejected"``       taken out on passive evidence (failed requests), in
                                           addition to its ``health`` event
:data:`RETRIED`        ``"retried"``       the proxy tried a request again elsewhere; the
                                           backend that failed, and why
:data:`NO_BACKEND`     ``"no_backend"``    a request found nothing in rotation (``backend``
                                           is ``None``)
:data:`ACCESS`         ``"access"``        a backend answered a request (the proxy):
                                           ``"GET /path 200 12.3 ms"``; only to hooks that
                                           name it, never to ``"*"``
=====================  ==================  =================================================

Each change is reported once, after it is visible in the pool. The queue holds
:data:`QUEUE_SIZE` events; when it is full (a callback is stuck) new events are dropped and
counted in :attr:`Dispatcher.dropped` rather than making anyone wait.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "ACCESS",
    "ADDED",
    "ALL",
    "DRAINED",
    "EJECTED",
    "FAILURE",
    "HEALTH",
    "KINDS",
    "KNOWN",
    "NO_BACKEND",
    "PER_REQUEST",
    "QUEUE_SIZE",
    "REMOVED",
    "RETRIED",
    "Dispatcher",
    "Event",
    "Hook",
]

log = logging.getLogger("softlb.events")

ADDED: Final = "added"
REMOVED: Final = "removed"
DRAINED: Final = "drained"
HEALTH: Final = "health"
EJECTED: Final = "ejected"
RETRIED: Final = "retried"
NO_BACKEND: Final = "no_backend"
#: One per request a backend answered, published by the proxy: ``"GET /path 200 12.3 ms"``.
#: Not part of :data:`ALL`: it is per request, so it is delivered only to hooks that ask for
#: it by name (the access log of :func:`softlb.logs.install_event_logging`).
ACCESS: Final = "access"
#: One per request that failed on a backend (the lease recorded a failure; ``detail`` is its
#: kind: ``"connect"``, ``"timeout"``, ``"broken"``, ``"error"``). Per request, like
#: :data:`ACCESS`: delivered only to hooks that name it. Passive health checks listen to it.
FAILURE: Final = "failure"
#: Subscribes a callback to every kind of event but the per-request ones (:data:`PER_REQUEST`).
ALL: Final = "*"

#: Every event kind, in the order the documentation lists them.
KINDS: Final = (ADDED, REMOVED, DRAINED, HEALTH, EJECTED, RETRIED, NO_BACKEND)

#: The kinds published once per request: never delivered to ``"*"``, only when named.
PER_REQUEST: Final = (ACCESS, FAILURE)

#: Every kind :meth:`Pool.on() <softlb.pool.Pool.on>` accepts by name.
KNOWN: Final = (*KINDS, *PER_REQUEST)

#: Events waiting for delivery beyond which new ones are dropped. State changes come a few at a
#: time; 1,024 rides out a burst (a whole cluster's membership applied at once, a flood of
#: ``no_backend`` during an outage) while bounding what a stuck callback can pile up.
QUEUE_SIZE: Final = 1024

#: How long :meth:`Dispatcher.stop` waits for the thread to deliver what is queued.
STOP_TIMEOUT: Final = 5.0


@dataclass(frozen=True)
class Event:
    """One thing that happened to a pool, as given to :meth:`Pool.on() <softlb.pool.Pool.on>`
    callbacks.

    ``kind`` is one of :data:`KINDS`; ``backend`` the URL of the backend concerned (``None``
    for ``no_backend``); ``detail`` a short human reason (see the table in
    :mod:`softlb.events`); ``time`` when it happened, in seconds since the epoch
    (:func:`time.time`).
    """

    kind: str
    backend: str | None
    detail: str = ""
    time: float = 0.0

    def as_dict(self) -> dict[str, object]:
        """The event as a JSON-ready mapping: ``event``, ``backend``, ``detail``, ``time``."""
        return {
            "event": self.kind,
            "backend": self.backend,
            "detail": self.detail,
            "time": self.time,
        }


Callback = Callable[[Event], object]


class Hook:
    """One subscription: a callback and the kind it listens to (:data:`ALL` for every kind).

    ``active`` turns false when it is unsubscribed, so that an event already queued is not
    delivered to it afterwards.
    """

    __slots__ = ("active", "callback", "kind")

    def __init__(self, kind: str, callback: Callback) -> None:
        self.kind = kind
        self.callback = callback
        self.active = True

    def __repr__(self) -> str:
        return f"<Hook {self.kind} {self.callback!r}{'' if self.active else ' (unsubscribed)'}>"


class _Flush:
    """A marker put in the queue: set when everything queued before it has been delivered."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


_Item = tuple[Event, tuple[Hook, ...]] | _Flush


class Dispatcher:
    """A bounded queue of events and the one daemon thread that delivers them to hooks.

    :meth:`put` never waits: it appends under a lock that the thread holds only to pop, and
    drops the event (counting it in :attr:`dropped`) when :data:`QUEUE_SIZE` events already
    wait. The thread starts with :meth:`start` or, lazily, with the first :meth:`put` after a
    fork or a :meth:`stop`; nothing runs at import or construction.

    Locking: ``_cond`` protects ``_items``, ``_thread``, ``_last`` and ``_pid``; callbacks run
    without it.
    """

    def __init__(self, *, maxsize: int = QUEUE_SIZE, name: str = "softlb-events") -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self.name = name
        #: Events dropped because the queue was full.
        self.dropped = 0
        #: Events handed to callbacks so far.
        self.delivered = 0
        self._cond = threading.Condition(threading.Lock())
        self._items: deque[_Item] = deque()
        self._thread: threading.Thread | None = None  # the thread delivering, if any
        self._last: threading.Thread | None = None  # the latest started, maybe still draining
        self._pid = os.getpid()

    # -- producing -----------------------------------------------------------------------

    def put(self, event: Event, hooks: tuple[Hook, ...]) -> bool:
        """Queue ``event`` for ``hooks``; return ``False`` if it was dropped (queue full)."""
        if self._pid != os.getpid():  # forked without after_fork(): start afresh
            self.after_fork()
        with self._cond:
            if len(self._items) >= self.maxsize:
                self.dropped += 1
                return False
            self._items.append((event, hooks))
            if self._thread is None:
                self._start_locked()
            else:
                self._cond.notify()
        return True

    # -- the thread ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the delivery thread unless it runs already."""
        if self._pid != os.getpid():
            self.after_fork()
        with self._cond:
            if self._thread is None:
                self._start_locked()

    def _start_locked(self) -> None:
        # A thread that stop() released may still be delivering what was queued before it:
        # the new one waits for it to end, so that callbacks never run two at a time.
        thread = threading.Thread(target=self._run, args=(self._last,), name=self.name, daemon=True)
        self._thread = self._last = thread
        thread.start()

    def _run(self, previous: threading.Thread | None) -> None:
        try:
            self._deliver(previous)
        finally:
            with self._cond:
                if self._thread is threading.current_thread():  # ended by a BaseException
                    self._thread = None  # the next event starts a new thread

    def _deliver(self, previous: threading.Thread | None) -> None:
        if previous is not None:
            previous.join()
        me = threading.current_thread()
        cond = self._cond
        while True:
            with cond:
                items = self._items
                while not items and self._thread is me:
                    cond.wait()
                # Stopped: deliver what is left, then end. Replaced by a newer thread: end now
                # and leave the rest to it.
                if self._thread is not me and (not items or self._thread is not None):
                    return
                item = items.popleft()
            if isinstance(item, _Flush):
                item.done.set()
                continue
            event, hooks = item
            for hook in hooks:
                if hook.active and (
                    hook.kind == event.kind or (hook.kind == ALL and event.kind in KINDS)
                ):
                    try:
                        hook.callback(event)
                    except Exception:  # a callback must never stop the dispatcher
                        log.exception(
                            "event hook %r failed on %s event for %s",
                            hook.callback,
                            event.kind,
                            event.backend,
                        )
            self.delivered += 1

    @property
    def thread_ident(self) -> int | None:
        """The delivery thread's ``threading.get_ident()`` value, while it runs."""
        thread = self._thread
        return thread.ident if thread is not None else None

    @property
    def running(self) -> bool:
        """Whether a delivery thread is alive (one that :meth:`stop` released may still be
        delivering what was queued before)."""
        thread = self._last
        return thread is not None and thread.is_alive()

    @property
    def pending(self) -> int:
        """Events queued and not yet delivered."""
        return sum(1 for item in self._items if not isinstance(item, _Flush))

    def flush(self, timeout: float | None = STOP_TIMEOUT) -> bool:
        """Wait until every event queued so far has been delivered; ``False`` on timeout.

        Returns at once when no thread runs (``True`` if nothing is queued), and ``False``
        when called from a callback (the thread cannot wait for itself).
        """
        marker = _Flush()
        if self._pid != os.getpid():
            self.after_fork()
        with self._cond:
            if self._thread is None:
                return not self._items
            if self._thread is threading.current_thread():  # from a callback: cannot wait
                return False
            self._items.append(marker)  # a marker is never dropped: it is not an event
            self._cond.notify()
        return marker.done.wait(timeout)

    def stop(self, timeout: float | None = STOP_TIMEOUT) -> bool:
        """Deliver what is queued, then end the thread; ``False`` if it did not end in time.

        Events that arrive later start the thread again. Idempotent.
        """
        if self._pid != os.getpid():  # the parent's thread is not ours to stop
            self.after_fork()
            return True
        with self._cond:
            thread = self._thread
            if thread is None:
                return True
            self._thread = None
            self._cond.notify_all()
        if thread is threading.current_thread():  # stop() called from a callback
            return False
        thread.join(timeout)
        return not thread.is_alive()

    def after_fork(self) -> None:
        """In a child made by ``fork()``: a fresh lock and an empty queue; the parent's thread
        does not exist here, and the next event starts a new one. Events queued in the parent
        are the parent's to deliver. Called by :meth:`Pool.after_fork`, and by any method that
        finds itself in a new process."""
        self._cond = threading.Condition(threading.Lock())
        self._items = deque()
        self._thread = self._last = None
        self._pid = os.getpid()
        self.dropped = self.delivered = 0

    def __repr__(self) -> str:
        state = "running" if self.running else "idle"
        return (
            f"<Dispatcher {state} [{self.pending} queued | {self.delivered} delivered, "
            f"{self.dropped} dropped]>"
        )
