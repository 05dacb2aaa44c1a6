"""softlb's gunicorn worker: gunicorn's ``gthread`` worker minus some per-request syscalls.

``softlb serve`` runs :class:`SoftLBWorker` (``worker_class = "softlb.worker.SoftLBWorker"``).
It *is* gunicorn's threaded worker (:class:`gunicorn.workers.gthread.ThreadWorker`): the same
event loop, thread pool, keep-alive, timeouts and graceful stop, and the same bytes on the wire.
Why a subclass at all: on a loaded machine every syscall that releases the GIL costs 10-100 µs
of CPU (a GIL hand-off and a thread switch on top of the kernel's work; see "Profile" in
``benchmarks/README.md``), and per small request gunicorn makes some that are not needed:

1. **Headers and body in one send.** gunicorn's ``Response`` sends the status line and headers
   with one ``sendall()``, then the body with another. :class:`SoftLBResponse` lets gunicorn's
   own code compose the first write (headers, framing, HEAD and 204/304 rules, Content-Length
   truncation) into a buffer and sends it with a single ``sendall()``. softlb's proxy answers a
   body of up to 64 KiB as ``(data,)`` with a Content-Length, and a bodiless answer as ``()``:
   each of those now leaves in one ``sendall()``. A streamed answer is written exactly as
   before, except that its first piece (if no larger than :data:`COALESCE_MAX`) goes out in
   the same ``sendall()`` as the headers instead of right after them: the bytes on the wire and
   the moment they are written do not change, gunicorn always sends the headers with the first
   piece.

2. **No timeout juggling when there is no request body left to drain** (gunicorn >= 26.0).
   After each keep-alive request gunicorn drains what the app left of the request body, with a
   deadline: ``settimeout(remaining)``, then ``settimeout(None)`` to restore it, and once more
   ``settimeout(None)`` before the next request; three ioctls, even for a GET that has no body.
   When the body is provably consumed (a Content-Length body read to its end, nothing
   buffered, no read error), :meth:`SoftLBWorker._keepalive_after` skips that drain: what it
   would have done is read nothing and return True, leaving the socket's timeout as it was.
   Everything else (a body left unread, a chunked or close-delimited one) goes to gunicorn's
   drain unchanged. The ``setblocking(True)``/``setblocking(False)`` pair around each wait in
   the keep-alive poller stays: removing it would mean copying gunicorn's ``handle()`` and
   ``finish_request()``.

**Effect** (the benchmark VM of ``benchmarks/README.md``, gunicorn 27.0.1; softlb proxying
``/small`` from nginx under ``wrk -c16``, plain gthread and this worker loaded side by side on
one core so that the machine's noise hits both alike): 28 µs less worker CPU per request of
~730 (3.5 %), nearly all of it from the drain skip. Per request the worker makes one ``sendto``
instead of two and two ``ioctl`` instead of five. The single send halves the TCP segments of a
small answer, but its effect on the worker's CPU stayed within -18 to +7 µs across runs and
apps: composing into a buffer costs some Python (~2-4 µs here), and the loopback delivery a
send triggers is accounted to softirq time rather than to the worker.

**Robustness.** Both changes rest on gunicorn internals, so this module checks them when it is
imported and turns off whatever does not hold, leaving plain gthread behaviour:

* the one-send response runs a self-test: a few answers (a single body with a Content-Length,
  an empty one, a chunked stream, HEAD, HTTP/1.0) composed by gunicorn's ``Response`` and by
  :class:`SoftLBResponse` must give the same bytes (the Date header aside), and the single-body
  ones one ``sendall()``;
* the drain skip needs ``ThreadWorker._keepalive_after(conn, keepalive)``,
  ``Parser.finish_body(deadline=...)`` and the body classes the check reads, and a parser
  self-test: two pipelined requests parse the same when the first one's message is dropped the
  way :meth:`SoftLBWorker._keepalive_after` drops it.

:data:`ONE_SEND` and :data:`SKIP_DRAIN` say what is on; :data:`FALLBACK_REASONS` why not. A
worker logs a warning at start for each feature turned off. Checked against gunicorn 21.2.0,
22.0.0, 23.0.0, 24.1.1, 25.3.0, 26.2.0, 27.0.0 and 27.0.1 (:data:`CHECKED_VERSIONS`): one send
on all of them, the drain skip on 26.2 and 27.x (older ones make no such calls).

Only the import of gunicorn's gthread worker itself is not guarded: without it there is no
gthread to fall back to, and ``worker_class = "gthread"`` would fail the same way.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable
from typing import Any, Final

import gunicorn
from gunicorn import util as gunicorn_util
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.workers.gthread import ThreadWorker

__all__ = [
    "CHECKED_VERSIONS",
    "COALESCE_MAX",
    "FALLBACK_REASONS",
    "ONE_SEND",
    "SKIP_DRAIN",
    "SoftLBResponse",
    "SoftLBWorker",
]

#: gunicorn versions this module was checked against (unit and integration tests passed).
CHECKED_VERSIONS: Final = (
    "21.2.0",
    "22.0.0",
    "23.0.0",
    "24.1.1",
    "25.3.0",
    "26.2.0",
    "27.0.0",
    "27.0.1",
)

#: The largest first body piece that is copied behind the headers to save a ``sendall()``.
#: softlb's proxy hands over bodies of up to 64 KiB in one piece; beyond that the copy costs
#: about what the saved syscall does.
COALESCE_MAX: Final = 64 * 1024

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# What this module builds on, looked up without failing: a missing piece fails a self-test below
# and turns its feature off instead of breaking the import (and so the server).
_Response: Any = getattr(gunicorn_wsgi, "Response", None)
_ResponseBase: Any = _Response if isinstance(_Response, type) else object
try:
    from gunicorn.http.body import LengthReader as _LengthReader
    from gunicorn.http.parser import RequestParser as _RequestParser
except ImportError:  # pragma: no cover - no gunicorn >= 21.2 lacks them
    _LengthReader = _RequestParser = None


class _Outbox(list):  # type: ignore[type-arg]  # list[bytes]; a plain list is cheaper to make
    """Stands in for the client socket while gunicorn's Response composes one write.

    gunicorn's ``Response`` writes with ``sock.sendall()`` only (through ``gunicorn.util``);
    this collects those bytes (``sendall`` is ``list.append``: no Python frame per call) so
    that they can be sent at once. Any other socket method is missing on purpose: if a gunicorn
    version used one, the self-test at import would fail and turn the one-send response off
    rather than reorder bytes.
    """

    __slots__ = ()
    sendall = list.append


class SoftLBResponse(_ResponseBase):  # type: ignore[misc]  # gunicorn has no type hints
    """gunicorn's HTTP/1 ``Response`` whose first write leaves in one ``sendall()``.

    The first :meth:`write` (or :meth:`close`, for an answer without a body) runs gunicorn's
    own method against an :class:`_Outbox`, so the headers and the first piece of the body are
    composed exactly as gunicorn composes them, then sends the whole of it once. Later writes,
    and a first piece larger than :data:`COALESCE_MAX`, are gunicorn's unchanged.

    The worker turns the ``Response`` gunicorn made for a request into this class before the
    app runs (see :meth:`SoftLBWorker.load_wsgi`); it adds no state of its own. gunicorn's
    methods are called as ``_Response.write(self, ...)`` rather than through ``super()``: this
    runs once or twice per request, and Python is slow on the machines that need this class.

    What was composed is sent even if gunicorn's method raises (say, refusing a non-bytes piece
    after composing the headers, or a timeout abort): gunicorn would have sent it before
    raising too.
    """

    sock: Any  # set by gunicorn's __init__: the client socket

    def write(self, arg: bytes) -> None:
        """Send ``arg`` as the next piece of the body; the first one with the headers."""
        if self.headers_sent or type(arg) is not bytes or len(arg) > COALESCE_MAX:
            _Response.write(self, arg)
            return
        sock = self.sock
        self.sock = outbox = _Outbox()
        try:
            _Response.write(self, arg)
        finally:
            self.sock = sock
            if outbox:
                sock.sendall(b"".join(outbox))

    def close(self) -> None:
        """End the answer; headers not sent yet leave with the chunked terminator, if any."""
        if self.headers_sent:
            _Response.close(self)
            return
        sock = self.sock
        self.sock = outbox = _Outbox()
        try:
            _Response.close(self)
        finally:
            self.sock = sock
            if outbox:
                sock.sendall(b"".join(outbox))


def _one_send_app(app: WSGIApp) -> WSGIApp:
    """``app``, first turning the request's gunicorn ``Response`` into a :class:`SoftLBResponse`.

    gthread's ``handle_request()`` builds a plain ``Response`` and passes its bound
    ``start_response`` to the app; reassigning the object's class (a subclass with no state of
    its own) is the one way in without copying ``handle_request()``. Anything else (HTTP/2's
    response, a ``start_response`` wrapped by a hook) is left alone.
    """

    def app_with_one_send(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        response = getattr(start_response, "__self__", None)
        if type(response) is _Response:
            response.__class__ = SoftLBResponse
        return app(environ, start_response)

    return app_with_one_send


def _body_consumed(parser: Any) -> bool:
    """Whether gunicorn's drain of the current request body would read nothing.

    True for a Content-Length body (an absent one is a Content-Length of 0) read to its end,
    with nothing left in the body's buffer, no read error, and a request that does not ask for
    the connection to close (which the next ``next(parser)`` would otherwise notice).
    """
    mesg = parser.mesg
    if mesg is None:
        return False
    body = mesg.body
    reader: Any = getattr(body, "reader", None)
    return (
        type(reader) is _LengthReader
        and reader.length == 0
        and getattr(body, "failed", False) is False
        and body.buf.tell() == 0
        and not mesg.should_close()
    )


class SoftLBWorker(ThreadWorker):  # type: ignore[misc]  # gunicorn has no type hints
    """gunicorn's gthread worker with the two changes of this module's docstring.

    With both turned off (see :data:`FALLBACK_REASONS`) it is ``ThreadWorker`` unchanged.
    """

    wsgi: Any  # set by gunicorn's load_wsgi(): the WSGI app

    def handle_exit(self, sig: Any, frame: Any) -> None:
        """SIGTERM: stop accepting at once (SPEC §1: a new connection is refused, never left
        hanging in the listen backlog while in-flight requests drain), then drain as gthread.
        The listeners are closed on the worker's own loop, not in the signal handler."""
        super().handle_exit(sig, frame)
        queue = getattr(self, "method_queue", None)
        if queue is not None:
            queue.defer(self._close_listeners)

    def _close_listeners(self) -> None:
        try:
            self.set_accept_enabled(False)
        except Exception:  # gthread already stopped accepting
            self.log.debug("accepting was already off")
        for listener in self.sockets:
            try:
                listener.close()
            except OSError:
                self.log.debug("listener already closed")

    def load_wsgi(self) -> None:
        """Load the app as gthread does, wrapped so that its answers use one send.

        Also, in this worker process only: gunicorn's own answer to a request its parser
        refused (``Content-Length`` with ``Transfer-Encoding``, a bad request line, a head too
        large...) becomes plain text instead of gunicorn's HTML page (SPEC §3: never an HTML
        error page of the server underneath). gunicorn still chooses the status and logs.
        """
        gunicorn_util.write_error = _plain_error
        super().load_wsgi()
        for feature, reason in FALLBACK_REASONS.items():
            self.log.warning(
                "softlb worker: %s is off with gunicorn %s (%s); plain gthread behaviour there",
                feature,
                gunicorn.__version__,
                reason,
            )
        if ONE_SEND:
            self.wsgi = _one_send_app(self.wsgi)

    def _keepalive_after(self, conn: Any, keepalive: bool) -> bool:
        """gthread's "drain the body, then keep alive?", without the drain when it would read
        nothing (and so without its three ``settimeout()`` calls).

        Dropping the parser's finished message makes the next ``next(parser)`` skip its own
        drain too; it would see nothing there either (see :func:`_body_consumed`).
        """
        if keepalive and SKIP_DRAIN and type(conn.parser) is _RequestParser:
            try:
                consumed = _body_consumed(conn.parser)
            except Exception:  # not what the self-test saw: let gunicorn drain
                consumed = False
            if consumed:
                conn.parser.mesg = None
                return True
        result: bool = super()._keepalive_after(conn, keepalive)
        return result


# --------------------------------------------------------------------------- checks at import

_DATE = re.compile(rb"\r\nDate: [^\r\n]*\r\n")


class _Recorder:
    """A client socket for the self-test: records each ``sendall()``."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sends.append(bytes(data))


def _parse_requests(cfg: Any, raw: bytes) -> Any:
    return _RequestParser(cfg, [raw], ("127.0.0.1", 1))


def _answer(
    cls: Any, cfg: Any, request: bytes, headers: list[tuple[str, str]], pieces: list[bytes]
) -> list[bytes]:
    """The ``sendall()`` calls of ``cls`` answering ``request`` with ``pieces`` (Date blanked)."""
    req = next(_parse_requests(cfg, request))
    sock = _Recorder()
    resp = cls(req, sock, cfg)
    resp.start_response("200 OK", headers)
    for piece in pieces:
        resp.write(piece)
    resp.close()
    return [_DATE.sub(b"\r\nDate: -\r\n", data) for data in sock.sends]


def _check_one_send() -> str | None:
    """Why :class:`SoftLBResponse` cannot be used with this gunicorn, or None if it can."""
    from gunicorn.config import Config

    for name in ("write", "close", "start_response", "send_headers"):
        if not callable(getattr(_Response, name, None)):
            return f"Response.{name} is missing"
    probe = object.__new__(_Response)
    probe.__class__ = SoftLBResponse  # the class swap of _one_send_app must be allowed
    cfg = Config()
    get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    head = b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
    get10 = b"GET / HTTP/1.0\r\n\r\n"
    length = [("Content-Type", "text/plain"), ("Content-Length", "5")]
    cases: list[tuple[bytes, list[tuple[str, str]], list[bytes], int | None]] = [
        (get, length, [b"hello"], 1),
        (get, [("Content-Length", "0")], [], 1),
        (get, [], [], 1),
        (head, length, [], 1),
        (get, length, [b"hello, world"], 1),
        (get, [], [b"ab", b"", b"cd"], None),
        (get10, [], [b"ab", b"cd"], None),
    ]
    for request, headers, pieces, sends in cases:
        plain = _answer(_Response, cfg, request, headers, pieces)
        ours = _answer(SoftLBResponse, cfg, request, headers, pieces)
        if b"".join(ours) != b"".join(plain):
            return f"different bytes for {request!r} {headers} {pieces}"
        if sends is not None and len(ours) != sends:
            return f"{len(ours)} sendall() calls for {request!r} {headers} {pieces}"
    return None


def _check_skip_drain() -> str | None:
    """Why :meth:`SoftLBWorker._keepalive_after` must leave gunicorn's drain alone, or None."""
    from gunicorn.config import Config
    from gunicorn.http.parser import Parser

    keepalive_after = getattr(ThreadWorker, "_keepalive_after", None)
    if keepalive_after is None:
        return "ThreadWorker._keepalive_after is missing (older gunicorn: nothing to skip)"
    if list(inspect.signature(keepalive_after).parameters) != ["self", "conn", "keepalive"]:
        return "ThreadWorker._keepalive_after takes other parameters"
    if "deadline" not in inspect.signature(Parser.finish_body).parameters:
        return "Parser.finish_body takes no deadline"
    if _LengthReader is None or _RequestParser is None:
        return "gunicorn.http.body.LengthReader or gunicorn.http.parser.RequestParser is missing"
    cfg = Config()
    parser = _parse_requests(
        cfg, b"POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiGET /b HTTP/1.1\r\n\r\n"
    )
    first = next(parser)
    if _body_consumed(parser):
        return "an unread body looks consumed"
    if first.body.read() != b"hi" or not _body_consumed(parser):
        return "a consumed body does not look consumed"
    parser.mesg = None
    second = next(parser)
    if (second.method, second.path) != ("GET", "/b") or not _body_consumed(parser):
        return "the next request does not parse after the finished one is dropped"
    return None


def _plain_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's ``util.write_error`` with a one-line plain-text body instead of HTML."""
    text = f"{status_int} {reason}: {mesg}\n" if mesg else f"{status_int} {reason}\n"
    body = text.encode("latin-1", "replace")
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    gunicorn_util.write_nonblock(sock, head.encode("latin-1") + body)


def _run_check(check: Callable[[], str | None]) -> str | None:
    """``check()``; a check that raises counts as failed (never an import error)."""
    try:
        return check()
    except Exception as exc:  # any surprise in gunicorn's internals means: do not use it
        return f"self-test raised {type(exc).__name__}: {exc}"


#: Why a feature is off, by feature; empty when both are on.
FALLBACK_REASONS: Final[dict[str, str]] = {}
_one_send_failure = _run_check(_check_one_send)
if _one_send_failure is not None:
    FALLBACK_REASONS["one send per answer"] = _one_send_failure
_skip_drain_failure = _run_check(_check_skip_drain)
if _skip_drain_failure is not None and hasattr(ThreadWorker, "_keepalive_after"):
    # Before gunicorn 26 there is no drain with timeouts to skip: nothing to warn about.
    FALLBACK_REASONS["skipping the empty body drain"] = _skip_drain_failure

#: Whether answers are written by :class:`SoftLBResponse`.
ONE_SEND: Final = _one_send_failure is None
#: Whether :meth:`SoftLBWorker._keepalive_after` skips drains that would read nothing.
SKIP_DRAIN: Final = _skip_drain_failure is None
