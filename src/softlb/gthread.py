"""The client timeouts of SPEC §2 under gunicorn's ``gthread`` worker (``softlb serve --engine
threads``), which has none of its own for a request that has started to arrive.

gunicorn's threaded worker waits for a connection's first bytes without a thread, then hands
it to a thread that reads the head and the body with blocking reads: a client that sends half
a head (slowloris) or pauses in its body holds that thread for ever, and a few of them stop
the worker. nginx and HAProxy time such clients out, and so does the event-loop engine; here:

- ``timeouts.client_header``: a watchdog thread per worker (:class:`HeadDeadlines`) ends a
  connection whose head is not whole that long after it was accepted (or, kept alive, came
  back with bytes): ``408`` (when some of the head came, on plain HTTP), then the socket is
  shut down, which wakes the blocked read and ends the connection. A connection that waited
  for a free thread longer than that still gets a moment to be read once it has one.
- ``timeouts.client_body``: the client socket's own timeout while the app runs (it reads the
  body there), so a pause longer than that between two reads raises :class:`TimeoutError` in
  the read; the proxy answers ``408`` (:class:`~softlb.wsgi.ClientBodyError`).

And on a TLS listener, plain HTTP gets the event loop's plain-text ``400`` ("plain HTTP was
sent to an HTTPS port", as nginx answers) before the close, instead of a handshake that fails
without a word: the first byte is peeked before gunicorn wraps the socket.

:func:`install` puts both on a running worker, as ``softlb serve``'s ``post_worker_init``
does for its other gthread fixes: the worker's ``handle`` and ``handle_request`` and its app
are wrapped on the instance, not subclassed.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from gunicorn.http.errors import NoMoreData

from softlb.config import TimeoutsConfig
from softlb.http.headers import PLAIN_HTTP_TO_TLS, is_plain_http_start

__all__ = ["HeadDeadlines", "install"]

#: The answer to a head that took too long: the event loop's words.
_TIMEOUT_BODY: Final = b"408 Request Timeout: the request head took too long\n"
_TIMEOUT_ANSWER: Final = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n%b"
    % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


class _Watched:
    __slots__ = ("conn", "due")

    def __init__(self, conn: Any, due: float) -> None:
        self.conn = conn
        self.due = due


class HeadDeadlines:
    """The deadlines of the request heads being read on one worker's threads, and the thread
    that enforces them (checking a few times per ``seconds``, so a head gets between
    ``seconds`` and about 1.25 × ``seconds``).

    ``tls``: the connections speak TLS, so no ``408`` is written from the watchdog (a TLS
    connection is not to be written by two threads at once); they are only shut down.
    """

    def __init__(self, seconds: float, *, tls: bool = False) -> None:
        self.seconds = seconds
        self.tls = tls
        self._lock = threading.Lock()
        self._watched: dict[int, _Watched] = {}  # by id() of the connection
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the watchdog thread (a daemon: it never holds the worker's exit)."""
        self._thread = threading.Thread(target=self._run, name="softlb-head-deadlines", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the watchdog thread (a worker's exit does not wait for it anyway)."""
        self._stop.set()

    @property
    def interval(self) -> float:
        """Seconds between two checks of the watchdog."""
        return max(0.05, min(1.0, self.seconds / 4))

    def queued(self, conn: Any) -> None:
        """``conn`` (gunicorn's ``TConn``) waits for a thread to read a request: new, back
        from keep-alive with bytes, or with bytes read ahead. Its head's time starts."""
        conn._softlb_since = time.monotonic()

    def watch(self, conn: Any) -> None:
        """A thread starts reading a head on ``conn``. Its deadline counts from
        :meth:`queued`, but leaves at least one :attr:`interval` from now: a client whose
        whole head waited in the socket for a thread is read before it is timed out."""
        now = time.monotonic()
        since = getattr(conn, "_softlb_since", now)
        due = max(since + self.seconds, now + self.interval)
        with self._lock:
            self._watched[id(conn)] = _Watched(conn, due)

    def done(self, conn: Any) -> bool:
        """The head on ``conn`` is whole (or its thread let go of it): no more deadline.
        ``False`` when the deadline had already ended the connection."""
        with self._lock:
            return self._watched.pop(id(conn), None) is not None or not _ended(conn)

    def done_socket(self, sock: Any) -> None:
        """:meth:`done` for the connection whose socket is ``sock`` (gunicorn's error answer
        to a head it refused names the socket, not the connection)."""
        with self._lock:
            for key, item in list(self._watched.items()):
                if item.conn.sock is sock:
                    del self._watched[key]

    def expire(self, now: float) -> int:
        """End every connection whose deadline has passed; how many."""
        with self._lock:
            due = [key for key, item in self._watched.items() if item.due <= now]
            expired = [self._watched.pop(key).conn for key in due]
            for conn in expired:
                conn._softlb_timed_out = True
        for conn in expired:
            self._end(conn)
        return len(expired)

    def _end(self, conn: Any) -> None:
        sock = conn.sock
        with contextlib.suppress(OSError, ValueError):
            # Bytes came (gunicorn's thread got past its wait for them) on plain HTTP: 408.
            # Small, on a connection the client writes to: send() does not block here.
            if not self.tls and getattr(conn, "initialized", False):
                sock.send(_TIMEOUT_ANSWER, socket.MSG_DONTWAIT)
        with contextlib.suppress(OSError, ValueError):
            # Wakes the thread blocked reading the head: its read returns nothing, and
            # gunicorn closes the connection as one the client ended. The plain socket's
            # shutdown, also for a TLS one (SSLSocket.shutdown would drop its SSL object
            # under the thread reading it).
            socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def _run(self) -> None:
        interval = self.interval
        while not self._stop.wait(interval):
            self.expire(time.monotonic())


def _ended(conn: Any) -> bool:
    return bool(getattr(conn, "_softlb_timed_out", False))


class _BodyTimeout:
    """The app, with the client socket's timeout at ``seconds`` while it runs (it reads the
    body there) and back to blocking for gunicorn's writes of the answer. Everything else
    (``stop``, ``config``) is the app's."""

    def __init__(self, app: Callable[..., Iterable[bytes]], seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        sock = environ.get("gunicorn.socket")
        if sock is None:
            return self.app(environ, start_response)
        sock.settimeout(self.seconds)
        try:
            return self.app(environ, start_response)
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)


def _refuse_plain_http(conn: Any) -> None:
    """Before gunicorn's ``conn.init()`` wraps a new connection in TLS (its thread has seen
    bytes come), peek at the first: plain HTTP gets :data:`PLAIN_HTTP_TO_TLS`, and
    :class:`NoMoreData`, which gunicorn takes for a client gone and closes quietly. Once per
    connection (one deferred by gunicorn comes back uninitialized)."""
    if getattr(conn, "_softlb_checks_tls", False):
        return
    conn._softlb_checks_tls = True
    init = conn.init

    def checked_init() -> None:
        if not conn.initialized:
            sock = conn.sock
            first = b""
            with contextlib.suppress(OSError):
                first = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            if is_plain_http_start(first):
                with contextlib.suppress(OSError):
                    sock.recv(65536)  # what came, so that the close does not reset the answer
                    sock.sendall(PLAIN_HTTP_TO_TLS)
                raise NoMoreData(b"")
        init()

    conn.init = checked_init


def install(worker: Any, timeouts: TimeoutsConfig, *, tls: bool) -> HeadDeadlines:
    """Give a running gthread ``worker`` the client timeouts of ``timeouts``; the watchdog
    it now runs."""
    deadlines = HeadDeadlines(timeouts.client_header, tls=tls)
    handle = worker.handle
    handle_request = worker.handle_request
    enqueue_req = worker.enqueue_req

    def timed_enqueue(conn: Any) -> Any:  # (on the worker's main thread)
        deadlines.queued(conn)
        return enqueue_req(conn)

    def timed_handle(conn: Any) -> Any:
        deadlines.watch(conn)
        if tls and not conn.initialized:
            _refuse_plain_http(conn)
        try:
            return handle(conn)
        finally:
            deadlines.done(conn)

    handle_error = worker.handle_error

    def timed_error(req: Any, client: Any, addr: Any, exc: BaseException) -> Any:
        deadlines.done_socket(client)  # gunicorn answers the head it refused: no 408 too
        return handle_error(req, client, addr, exc)

    def timed_request(req: Any, conn: Any) -> Any:
        if not deadlines.done(conn):
            return False  # the head came as its deadline ended the connection: not served
        return handle_request(req, conn)

    worker.enqueue_req = timed_enqueue
    worker.handle_error = timed_error
    worker.handle = timed_handle
    worker.handle_request = timed_request
    worker.wsgi = _BodyTimeout(worker.wsgi, timeouts.client_body)
    deadlines.start()
    return deadlines
