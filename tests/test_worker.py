"""softlb.worker: gunicorn's gthread worker, one send() per small answer, no needless drains.

Two layers:

* unit tests of :class:`~softlb.worker.SoftLBResponse` and the drain check on real gunicorn
  requests (parsed by gunicorn's own parser) and a recording stand-in for the client socket,
  which is outside the code under test: they count the ``sendall()`` calls;
* integration tests against real gunicorn processes, one running ``SoftLBWorker`` and one
  plain ``gthread``, serving the small WSGI app :data:`APP` below, talked to over raw sockets:
  the bytes are checked exactly (the Date header aside), and compared with plain gthread's.

Run them against another gunicorn by putting it first on the path, e.g.
``PYTHONPATH=/tmp/gunicorn-23.0.0 pytest tests/test_worker.py``: the servers are subprocesses
of this interpreter with the same environment.
"""

from __future__ import annotations

import hashlib
import re
import signal
import socket
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO

import gunicorn
import gunicorn.util
import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.http.parser import RequestParser
from gunicorn.workers.gthread import ThreadWorker

from softlb import worker
from softlb.worker import COALESCE_MAX, SoftLBResponse, SoftLBWorker
from tests.helpers.servers import free_port
from tests.integration.conftest import Launcher, Running

#: Seconds an idle kept-alive connection stays open on the test servers.
KEEPALIVE = 2
#: Bound on every socket read of these tests.
TIMEOUT = 10.0
DATE = re.compile(rb"\r\nDate: ([^\r\n]*)\r\n")
SMALL = b"hello world\n"


# --------------------------------------------------------------------------- unit: the response


class Recorder:
    """The client socket, as far as gunicorn's Response uses it: records each sendall()."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sends.append(bytes(data))

    @property
    def data(self) -> bytes:
        return DATE.sub(b"\r\nDate: -\r\n", b"".join(self.sends))


def parsed(raw: bytes) -> Any:
    """The first request in ``raw``, parsed by gunicorn."""
    return next(RequestParser(Config(), [raw], ("127.0.0.1", 1)))


def answer(
    cls: Any,
    request: bytes,
    status: str,
    headers: list[tuple[str, str]],
    body: Any,
) -> Recorder:
    """What ``cls`` sends when an app answers ``request`` with ``body``, the way gthread's
    handle_request() drives it: write each item, then close()."""
    sock = Recorder()
    resp = cls(parsed(request), sock, Config())
    resp.start_response(status, headers)
    for item in body:
        resp.write(item)
    resp.close()
    return sock


GET = b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n"
HEAD = b"HEAD /small HTTP/1.1\r\nHost: x\r\n\r\n"
GET10 = b"GET /small HTTP/1.0\r\n\r\n"
LENGTH = [("Content-Type", "text/plain"), ("Content-Length", str(len(SMALL)))]


#: gunicorn >= 24 drops a body an app sends in answer to HEAD; older ones send it.
HEAD_BODY_DROPPED = not answer(
    gunicorn_wsgi.Response, HEAD, "200 OK", LENGTH, (SMALL,)
).data.endswith(SMALL)


def pieces(*sizes: int) -> Iterator[bytes]:
    """A streamed answer: a generator of pieces of these sizes."""
    for number, size in enumerate(sizes):
        yield bytes([65 + number % 26]) * size


def test_a_single_body_leaves_in_one_sendall() -> None:
    """(body,) with a Content-Length: status line, headers and body in one sendall()."""
    sock = answer(SoftLBResponse, GET, "200 OK", LENGTH, (SMALL,))
    assert len(sock.sends) == 1
    assert sock.data == (
        b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nDate: -\r\nConnection: keep-alive\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 12\r\n\r\nhello world\n"
    )
    as_list = answer(SoftLBResponse, GET, "200 OK", LENGTH, [SMALL])
    assert len(as_list.sends) == 1
    assert as_list.data == sock.data


def test_plain_gunicorn_sends_twice() -> None:
    """What the worker saves: gunicorn's own Response sends the headers, then the body."""
    sock = answer(gunicorn_wsgi.Response, GET, "200 OK", LENGTH, (SMALL,))
    assert len(sock.sends) == 2
    assert sock.data == answer(SoftLBResponse, GET, "200 OK", LENGTH, (SMALL,)).data


def test_an_empty_answer_leaves_in_one_sendall() -> None:
    """() with Content-Length: 0, and () with no length at all (chunked: the terminator goes
    with the headers)."""
    sock = answer(SoftLBResponse, GET, "200 OK", [("Content-Length", "0")], ())
    assert len(sock.sends) == 1
    assert sock.data == (
        b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nDate: -\r\nConnection: keep-alive\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    sock = answer(SoftLBResponse, GET, "200 OK", [], ())
    assert len(sock.sends) == 1
    assert sock.data == answer(gunicorn_wsgi.Response, GET, "200 OK", [], ()).data
    assert sock.data.endswith(b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")


def test_head_sends_the_headers_only() -> None:
    """HEAD: the headers (Content-Length kept) in one sendall(), no body."""
    sock = answer(SoftLBResponse, HEAD, "200 OK", LENGTH, ())
    assert len(sock.sends) == 1
    assert sock.data == (
        b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nDate: -\r\nConnection: keep-alive\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 12\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("request_", "status", "headers", "sizes", "saved"),
    [
        pytest.param(GET, "200 OK", [], (5, 7, 9), 1, id="chunked"),
        pytest.param(GET, "200 OK", [], (0, 5, 0, 7), 0, id="chunked-empty-first-piece"),
        pytest.param(GET10, "200 OK", [], (5, 7), 1, id="http10-close-delimited"),
        pytest.param(GET, "200 OK", [("Content-Length", "10")], (4, 4, 4), 1, id="truncated"),
        pytest.param(GET, "200 OK", [], (COALESCE_MAX + 1, 5), 0, id="large-first-piece"),
        pytest.param(GET, "200 OK", [], (COALESCE_MAX, 5), 1, id="first-piece-at-the-limit"),
        pytest.param(HEAD, "200 OK", [], (5, 5), 0 if HEAD_BODY_DROPPED else 1, id="head-streamed"),
        pytest.param(GET, "204 No Content", [], (), 0, id="204"),
        pytest.param(GET, "304 Not Modified", [("ETag", '"x"')], (), 0, id="304"),
    ],
)
def test_streamed_answers_are_byte_for_byte_gunicorns(
    request_: bytes,
    status: str,
    headers: list[tuple[str, str]],
    sizes: tuple[int, ...],
    saved: int,
) -> None:
    """A streamed answer: the same bytes as gunicorn's Response; a first piece of up to
    COALESCE_MAX goes in the headers' sendall() (one call saved), every later one in its own
    sendall() as before."""
    plain = answer(gunicorn_wsgi.Response, request_, status, list(headers), pieces(*sizes))
    ours = answer(SoftLBResponse, request_, status, list(headers), pieces(*sizes))
    assert ours.data == plain.data
    assert len(ours.sends) == len(plain.sends) - saved
    if saved:
        assert ours.sends[1:] == plain.sends[2:]


def test_a_bad_piece_still_sends_the_headers_first() -> None:
    """A non-bytes piece: headers sent, then TypeError, as gunicorn does (so handle_request()
    knows the answer started and closes the connection instead of sending a 500)."""
    for cls in (gunicorn_wsgi.Response, SoftLBResponse):
        sock = Recorder()
        resp = cls(parsed(GET), sock, Config())
        resp.start_response("200 OK", LENGTH)
        with pytest.raises(TypeError):
            resp.write("text")
        assert resp.headers_sent
        assert sock.data.endswith(b"Content-Length: 12\r\n\r\n")


def test_the_app_wrapper_upgrades_plain_responses_only() -> None:
    """The worker's app wrapper turns gunicorn's HTTP/1 Response into a SoftLBResponse and
    leaves any other start_response alone."""
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(getattr(start_response, "__self__", start_response))
        return []

    wrapped = worker._one_send_app(app)
    resp = gunicorn_wsgi.Response(parsed(GET), Recorder(), Config())
    wrapped({}, resp.start_response)
    assert type(seen[-1]) is SoftLBResponse

    class Other(gunicorn_wsgi.Response):  # type: ignore[misc]
        pass

    other = Other(parsed(GET), Recorder(), Config())
    wrapped({}, other.start_response)
    assert type(seen[-1]) is Other

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        pass

    wrapped({}, start_response)
    assert seen[-1] is start_response


# --------------------------------------------------------------------------- unit: the checks


def test_both_features_are_on_with_this_gunicorn() -> None:
    """The self-tests pass on the installed gunicorn; the drain skip exists from 26.0."""
    assert worker.ONE_SEND, worker.FALLBACK_REASONS
    assert hasattr(ThreadWorker, "_keepalive_after") == worker.SKIP_DRAIN
    assert worker.FALLBACK_REASONS == {}


def test_an_unexpected_gunicorn_turns_one_send_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """If gunicorn's Response wrote in some other way (here: with send() instead of
    sendall()), the self-test fails, with a reason, instead of raising."""

    def write(sock: Any, data: bytes, chunked: bool = False) -> None:
        sock.send(data)

    monkeypatch.setattr(gunicorn.util, "write", write)
    reason = worker._run_check(worker._check_one_send)
    assert reason is not None
    assert "AttributeError" in reason


def test_a_missing_response_turns_one_send_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gunicorn without gunicorn.http.wsgi.Response: one send is off, with a reason."""
    monkeypatch.setattr(worker, "_Response", None)
    assert worker._run_check(worker._check_one_send) == "Response.write is missing"


def test_a_response_composing_other_bytes_turns_one_send_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If composing into the outbox changed the bytes, the self-test says so."""

    class Doubling(list):  # type: ignore[type-arg]
        def sendall(self, data: bytes) -> None:
            self.extend((data, data))

    monkeypatch.setattr(worker, "_Outbox", Doubling)
    reason = worker._run_check(worker._check_one_send)
    assert reason is not None
    assert reason.startswith("different bytes")


def test_a_missing_keepalive_after_turns_the_drain_skip_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An older (or newer) gthread without _keepalive_after(conn, keepalive): no skip."""
    if hasattr(ThreadWorker, "_keepalive_after"):
        monkeypatch.delattr(ThreadWorker, "_keepalive_after")
    assert "missing" in str(worker._run_check(worker._check_skip_drain))


def parser_after(raw: bytes, read: int | None = 0) -> Any:
    """gunicorn's parser of ``raw`` after its first request, whose body the app read ``read``
    bytes of (None: all of it)."""
    parser = RequestParser(Config(), [raw], ("127.0.0.1", 1))
    req = next(parser)
    if read is None:
        req.body.read()
    elif read:
        req.body.read(read)
    return parser


@pytest.mark.parametrize(
    ("raw", "read", "consumed"),
    [
        pytest.param(GET, 0, True, id="get-no-body"),
        pytest.param(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 0, False, id="unread"),
        pytest.param(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 2, False, id="part"),
        pytest.param(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", None, True, id="read"),
        pytest.param(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            None,
            False,
            id="chunked-is-left-to-gunicorn",
        ),
        pytest.param(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", 0, False, id="close"),
        pytest.param(GET10, 0, False, id="http10"),
    ],
)
def test_body_consumed(raw: bytes, read: int | None, consumed: bool) -> None:
    """The drain is skipped only for a Content-Length body read to its end, on a connection
    that stays open."""
    assert worker._body_consumed(parser_after(raw, read)) is consumed


@pytest.mark.skipif(not worker.SKIP_DRAIN, reason="no drain to skip in this gunicorn")
def test_keepalive_after_skips_only_the_empty_drain() -> None:
    """A consumed body: keep alive, message dropped, the next request parses. An unread one:
    gunicorn's drain runs (and drains it)."""
    me = object.__new__(SoftLBWorker)  # _keepalive_after uses no state of the worker
    raw = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n"
    conn = SimpleNamespace(parser=parser_after(raw))
    assert me._keepalive_after(conn, True) is True
    assert conn.parser.mesg is None
    assert next(conn.parser).path == "/b"
    assert me._keepalive_after(SimpleNamespace(parser=parser_after(raw)), False) is False

    raw = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n"
    conn = SimpleNamespace(parser=parser_after(raw))
    assert me._keepalive_after(conn, True) is True
    assert conn.parser.mesg is not None  # gunicorn's drain ran
    assert next(conn.parser).path == "/b"


@pytest.mark.skipif(not worker.SKIP_DRAIN, reason="no drain to skip in this gunicorn")
def test_keepalive_after_leaves_anything_unexpected_to_gunicorn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another parser class (uWSGI's, a subclass) or a check that raises: gunicorn's drain."""
    me = object.__new__(SoftLBWorker)
    raw = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n"

    class Parser(RequestParser):  # type: ignore[misc]
        pass

    parser = Parser(Config(), [raw], ("127.0.0.1", 1))
    next(parser)
    assert me._keepalive_after(SimpleNamespace(parser=parser), True) is True
    assert parser.mesg is not None  # gunicorn's drain ran

    def broken(parser: Any) -> bool:
        raise AttributeError("not the gunicorn the self-test saw")

    monkeypatch.setattr(worker, "_body_consumed", broken)
    conn = SimpleNamespace(parser=parser_after(raw))
    assert me._keepalive_after(conn, True) is True
    assert conn.parser.mesg is not None
    assert next(conn.parser).path == "/b"


# --------------------------------------------------------------------------- integration

#: The app the gunicorn processes serve (module ``app`` in their directory).
APP = """
import hashlib
import time

SMALL = b"hello world\\n"


def stream(sizes):
    for number, size in enumerate(sizes):
        yield bytes([65 + number % 26]) * size


def big(size, piece):
    sent = 0
    while sent < size:
        n = min(piece, size - sent)
        yield hashlib.sha256(str(sent).encode()).digest() * (n // 32) + b"x" * (n % 32)
        sent += n


def app(environ, start_response):
    path = environ["PATH_INFO"]
    query = dict(p.split("=") for p in environ["QUERY_STRING"].split("&") if p)
    text = [("Content-Type", "text/plain")]
    if path == "/small":
        start_response("200 OK", [*text, ("Content-Length", str(len(SMALL)))])
        return (SMALL,)
    if path == "/list":
        start_response("200 OK", [*text, ("Content-Length", str(len(SMALL)))])
        return [SMALL]
    if path == "/nolength":
        start_response("200 OK", text)
        return (SMALL,)
    if path == "/empty":
        start_response("200 OK", [("Content-Length", "0")])
        return ()
    if path == "/stream":
        start_response("200 OK", text)
        return stream([5, 0, 7, 9])
    if path == "/big":
        size, piece = int(query["size"]), int(query["piece"])
        headers = [("Content-Length", str(size))] if "length" in query else []
        start_response("200 OK", [*text, *headers])
        return big(size, piece)
    if path == "/204":
        start_response("204 No Content", [])
        return ()
    if path == "/304":
        start_response("304 Not Modified", [("ETag", '"x"')])
        return ()
    if path == "/echo":
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("200 OK", [*text, ("Content-Length", str(len(body)))])
        return (body,)
    if path == "/ignore-body":
        start_response("200 OK", [*text, ("Content-Length", "2")])
        return (b"ok",)
    if path == "/slow":
        time.sleep(float(query["s"]))
        start_response("200 OK", [*text, ("Content-Length", "4")])
        return (b"slow",)
    if path == "/class":
        name = type(getattr(start_response, "__self__", None)).__name__.encode()
        start_response("200 OK", [*text, ("Content-Length", str(len(name)))])
        return (name,)
    start_response("404 Not Found", [("Content-Length", "0")])
    return ()
"""

#: A gunicorn config file that turns the one-send response off, as a failed self-test would.
FORCED_FALLBACK = """
import softlb.worker
softlb.worker.ONE_SEND = False
softlb.worker.FALLBACK_REASONS["one send per answer"] = "forced by the test"
"""


def start_gunicorn(launcher: Launcher, directory: Path, worker_class: str, *extra: str) -> Running:
    """gunicorn serving :data:`APP` from ``directory`` with ``worker_class``, 4 threads."""
    (directory / "app.py").write_text(APP)
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-k", worker_class, "--threads", "4"]
    argv += ["--keep-alive", str(KEEPALIVE), "--graceful-timeout", "10", *extra]
    argv += ["-b", f"127.0.0.1:{port}", "app:app"]
    # gunicorn >= 25.1 opens a control socket under $HOME or $XDG_RUNTIME_DIR: keep it here.
    env = {"HOME": str(directory), "XDG_RUNTIME_DIR": str(directory)}
    return launcher(argv, port=port, cwd=directory, env=env)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Running]]:
    """One gunicorn with SoftLBWorker ("softlb") and one with plain gthread ("gthread")."""
    directory = tmp_path_factory.mktemp("worker")
    launcher = Launcher(directory)
    try:
        started = {}
        for name, cls in (("softlb", "softlb.worker.SoftLBWorker"), ("gthread", "gthread")):
            (directory / name).mkdir()
            started[name] = start_gunicorn(launcher, directory / name, cls)
        yield started
    finally:
        launcher.close()


@pytest.fixture
def ours(servers: dict[str, Running]) -> Running:
    return servers["softlb"]


def connect(server: Running) -> socket.socket:
    assert server.port is not None
    return socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)


def read_response(reader: BinaryIO, method: str = "GET") -> bytes:
    """One whole response, exactly as received: the head, then the body framed by its
    Content-Length, chunked encoding or the end of the connection."""
    raw = bytearray(reader.readline())
    if not raw:
        raise EOFError("connection closed before a response")
    headers: dict[str, str] = {}
    while True:
        line = reader.readline()
        if not line:
            raise EOFError(f"connection closed in the head: {bytes(raw)!r}")
        raw += line
        if line == b"\r\n":
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(raw.split()[1])
    if method == "HEAD" or status in (204, 304) or status < 200:
        return bytes(raw)
    if "content-length" in headers:
        raw += reader.read(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size_line = reader.readline()
            raw += size_line
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while (line := reader.readline()) not in (b"\r\n", b""):
                    raw += line
                raw += line
                break
            raw += reader.read(size + 2)
    else:
        raw += reader.read()
    return bytes(raw)


def body_of(response: bytes) -> bytes:
    """The body of a response read by :func:`read_response`, chunked encoding undone."""
    head, _, body = response.partition(b"\r\n\r\n")
    if b"\r\nTransfer-Encoding: chunked" not in head:
        return body
    out = bytearray()
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return bytes(out)
        out += body[:size]
        body = body[size + 2 :]


def normal(response: bytes) -> bytes:
    """``response`` with its Date value blanked, after checking it is an HTTP date."""
    match = DATE.search(response)
    assert match is not None, response
    assert re.fullmatch(rb"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT", match[1])
    return DATE.sub(b"\r\nDate: -\r\n", response, count=1)


def exchange(server: Running, *requests: bytes, pipelined: bool = False) -> list[bytes]:
    """Send ``requests`` on one connection (one after the other, or all at once) and read the
    answers; each normalised by :func:`normal`."""
    answers = []
    with connect(server) as sock, sock.makefile("rb") as reader:
        if pipelined:
            sock.sendall(b"".join(requests))
        for request in requests:
            if not pipelined:
                sock.sendall(request)
            answers.append(normal(read_response(reader, request.split(b" ", 1)[0].decode())))
    return answers


def req(method: str, target: str, version: str = "1.1", body: bytes = b"", **headers: str) -> bytes:
    head = f"{method} {target} HTTP/{version}\r\nHost: t\r\n"
    for name, value in headers.items():
        head += f"{name.replace('_', '-')}: {value}\r\n"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


OK_SMALL = (
    b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nDate: -\r\nConnection: keep-alive\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 12\r\n\r\nhello world\n"
)

integration = pytest.mark.integration


@integration
def test_the_worker_really_runs_softlbs_response(ours: Running) -> None:
    """The app is called with SoftLBResponse's start_response, and no fallback was logged."""
    [answer] = exchange(ours, req("GET", "/class"))
    assert answer.endswith(b"\r\n\r\nSoftLBResponse")
    output = ours.output()
    assert "Using worker: softlb.worker.SoftLBWorker" in output
    assert "softlb worker:" not in output
    assert "Traceback" not in output


@integration
def test_a_single_body_answer_over_keepalive(ours: Running) -> None:
    """(body,) and [body]: exact HTTP/1.1 answers, several on one kept-alive connection."""
    answers = exchange(ours, *[req("GET", "/small"), req("GET", "/list")] * 3)
    assert answers == [OK_SMALL] * 6


@integration
@pytest.mark.skipif(not HEAD_BODY_DROPPED, reason="this gunicorn sends HEAD bodies (gthread too)")
def test_head_gets_the_headers_only(ours: Running) -> None:
    """HEAD: the head with the Content-Length of the GET, no body; the connection goes on."""
    answers = exchange(ours, req("HEAD", "/small"), req("GET", "/small"))
    assert answers == [OK_SMALL[: -len(SMALL)], OK_SMALL]


@integration
def test_empty_answer(ours: Running) -> None:
    """(): Content-Length: 0 and nothing after the head."""
    answers = exchange(ours, req("GET", "/empty"), req("GET", "/small"))
    assert answers == [
        b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nDate: -\r\nConnection: keep-alive\r\n"
        b"Content-Length: 0\r\n\r\n",
        OK_SMALL,
    ]


@integration
def test_streamed_answer_is_chunked_for_http11(ours: Running) -> None:
    """A generator without Content-Length: chunked (the empty piece skipped), keep-alive."""
    answers = exchange(ours, req("GET", "/stream"), req("GET", "/small"))
    assert answers == [
        b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nDate: -\r\nConnection: keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
        b"5\r\nAAAAA\r\n7\r\nCCCCCCC\r\n9\r\nDDDDDDDDD\r\n0\r\n\r\n",
        OK_SMALL,
    ]


@integration
def test_streamed_answer_is_close_delimited_for_http10(ours: Running) -> None:
    """The same for HTTP/1.0: no chunked encoding, Connection: close, the body up to EOF."""
    [answer] = exchange(ours, req("GET", "/stream", version="1.0"))
    assert answer == (
        b"HTTP/1.0 200 OK\r\nServer: gunicorn\r\nDate: -\r\nConnection: close\r\n"
        b"Content-Type: text/plain\r\n\r\nAAAAACCCCCCCDDDDDDDDD"
    )


@integration
@pytest.mark.parametrize("length", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("piece", [1000, 65536, 300_000])
def test_large_streamed_answer_arrives_intact(ours: Running, length: bool, piece: int) -> None:
    """3 MB streamed in pieces smaller than, equal to and larger than COALESCE_MAX."""
    size = 3_000_001
    target = f"/big?size={size}&piece={piece}" + ("&length=1" if length else "")
    [answer] = exchange(ours, req("GET", target), req("GET", "/small"))[:1]
    body = body_of(answer)
    expected = hashlib.sha256()
    for sent in range(0, size, piece):
        n = min(piece, size - sent)
        expected.update(hashlib.sha256(str(sent).encode()).digest() * (n // 32) + b"x" * (n % 32))
    assert len(body) == size
    assert hashlib.sha256(body).hexdigest() == expected.hexdigest()


@integration
@pytest.mark.skipif(
    gunicorn.version_info < (27,),
    reason="gunicorn < 27 answers the first of pipelined requests only (gthread too)",
)
def test_pipelined_requests(ours: Running) -> None:
    """Requests sent back to back in one packet get their answers in order, one with a
    request body the app reads included."""
    answers = exchange(
        ours,
        req("GET", "/small"),
        req("POST", "/echo", body=b"ping"),
        req("GET", "/stream"),
        req("GET", "/empty"),
        req("GET", "/small"),
        pipelined=True,
    )
    assert answers[0] == answers[4] == OK_SMALL
    assert answers[1].endswith(b"Content-Length: 4\r\n\r\nping")
    assert body_of(answers[2]) == b"AAAAACCCCCCCDDDDDDDDD"
    assert answers[3].endswith(b"Content-Length: 0\r\n\r\n")


@integration
@pytest.mark.skipif(
    gunicorn.version_info < (27,),
    reason="gunicorn < 27 may close the connection after an unread body (gthread too)",
)
def test_unread_request_body_does_not_break_keepalive(ours: Running) -> None:
    """A body the app did not read is drained by gunicorn before the next request (up to
    64 KiB; beyond that it closes the connection, see the comparison with plain gthread)."""
    answers = exchange(ours, req("POST", "/ignore-body", body=b"y" * 50_000), req("GET", "/small"))
    assert answers[1] == OK_SMALL


@integration
@pytest.mark.parametrize("status", ["204", "304"])
def test_no_body_statuses(ours: Running, status: str) -> None:
    """204 and 304 carry no body, and the connection stays usable."""
    answers = exchange(ours, req("GET", f"/{status}"), req("GET", "/small"))
    assert answers[0].startswith(f"HTTP/1.1 {status} ".encode())
    assert answers[0].endswith(b"\r\n\r\n")
    assert b"Content-Length" not in answers[0]
    assert answers[1] == OK_SMALL


def raw_exchange(server: Running, requests: list[bytes]) -> bytes:
    """Send ``requests`` at once on one connection, the last one asking to close it, and read
    until the server closes it: every byte it sent, Date values blanked."""
    last = requests[-1]
    close = last.replace(b"\r\n", b"\r\nConnection: close\r\n", 1)
    received = bytearray()
    with connect(server) as sock:
        sock.sendall(b"".join([*requests[:-1], close]))
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                received += b"<RST>"
                break
            if not data:
                break
            received += data
    return DATE.sub(b"\r\nDate: -\r\n", bytes(received))


@integration
@pytest.mark.parametrize(
    "requests",
    [
        pytest.param([req("GET", "/small"), req("GET", "/list")], id="small"),
        pytest.param([req("GET", "/nolength"), req("GET", "/empty")], id="nolength-empty"),
        pytest.param([req("HEAD", "/small"), req("HEAD", "/stream")], id="head"),
        pytest.param([req("GET", "/stream"), req("GET", "/204")], id="stream-204"),
        pytest.param([req("GET", "/304"), req("GET", "/nothing")], id="304-404"),
        pytest.param([req("GET", "/small", version="1.0")], id="http10"),
        pytest.param(
            [req("GET", "/small", version="1.0", Connection="keep-alive"), req("GET", "/empty")],
            id="http10-keepalive",
        ),
        pytest.param(
            [req("GET", "/stream", version="1.0"), req("GET", "/small")], id="http10-stream"
        ),
        pytest.param([req("GET", "/big?size=200000&piece=70000")], id="big-chunked"),
        pytest.param([req("GET", "/big?size=100000&piece=1000&length=1")], id="big-length"),
        pytest.param(
            [req("POST", "/echo", body=b"z" * 100_000), req("GET", "/small")], id="read-body"
        ),
        pytest.param(
            [req("POST", "/ignore-body", body=b"z" * 5_000), req("GET", "/small")],
            id="unread-body",
        ),
        pytest.param([req("POST", "/ignore-body", body=b"z" * 100_000)], id="big-unread-body"),
    ],
)
def test_same_bytes_as_plain_gthread(servers: dict[str, Running], requests: list[bytes]) -> None:
    """Whatever the answer, SoftLBWorker puts the same bytes on the wire as plain gthread of
    the same gunicorn (pipelined requests, read up to the close; gunicorn < 27 answers the
    first one only, then closes the idle connection after the keep-alive timeout)."""
    ours = raw_exchange(servers["softlb"], requests)
    assert ours == raw_exchange(servers["gthread"], requests)
    assert ours.startswith(b"HTTP/1.")


@integration
def test_idle_connection_is_closed_after_keepalive(ours: Running) -> None:
    """A client that sends nothing for longer than the keep-alive timeout is disconnected."""
    with connect(ours) as sock, sock.makefile("rb") as reader:
        sock.sendall(req("GET", "/small"))
        assert normal(read_response(reader)) == OK_SMALL
        started = time.monotonic()
        assert reader.read(1) == b""  # EOF: the worker closed it
        idle = time.monotonic() - started
    # gthread checks the kept-alive connections about once a second.
    assert KEEPALIVE - 0.5 <= idle <= KEEPALIVE + 3


@integration
def test_graceful_stop_finishes_the_request_in_flight(tmp_path: Path) -> None:
    """SIGTERM during a request: it is answered in full, then the master exits 0."""
    launcher = Launcher(tmp_path)
    try:
        server = start_gunicorn(launcher, tmp_path, "softlb.worker.SoftLBWorker")
        with connect(server) as sock, sock.makefile("rb") as reader:
            sock.sendall(req("GET", "/slow?s=1"))
            time.sleep(0.3)
            server.signal(signal.SIGTERM)
            answer = normal(read_response(reader))
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert answer.endswith(b"\r\n\r\nslow")
        assert server.wait() == 0
        assert "Traceback" not in server.output()
    finally:
        launcher.close()


@integration
def test_fallback_is_plain_gthread(tmp_path: Path) -> None:
    """With the one-send response turned off (as a failed self-test does), the worker says so
    at start and serves like plain gthread."""
    (tmp_path / "conf.py").write_text(textwrap.dedent(FORCED_FALLBACK))
    launcher = Launcher(tmp_path)
    try:
        server = start_gunicorn(
            launcher, tmp_path, "softlb.worker.SoftLBWorker", "-c", str(tmp_path / "conf.py")
        )
        assert exchange(server, req("GET", "/small"), req("GET", "/stream"))[0] == OK_SMALL
        [answer] = exchange(server, req("GET", "/class"))
        assert answer.endswith(b"\r\n\r\nResponse")
        output = server.output()
        assert "softlb worker: one send per answer is off with gunicorn" in output
        assert "forced by the test" in output
    finally:
        launcher.close()


# --------------------------------------------------------------------------- the proxy under it

#: softlb's proxy as the app: one scripted backend (SOFTLB_TEST_BACKEND), no retries, a short
#: read timeout; /_failures tells the backend's failures and requests.
PROXY_APP = """
import os

from softlb import Pool
from softlb.wsgi import LoadBalancer

BACKEND = os.environ["SOFTLB_TEST_BACKEND"]
lb = LoadBalancer(Pool([BACKEND], balancer="round_robin"), read_timeout=0.5, retries=0)


def app(environ, start_response):
    if environ["PATH_INFO"] == "/_failures":
        member = lb.pool.get(BACKEND)
        body = f"{member.failures} {member.requests}".encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
    return lb(environ, start_response)
"""

RAW_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def routed(backend_ref: list[Any]) -> Any:
    """A raw-backend script step that answers by the path of the request just received."""

    def step(sock: socket.socket) -> None:
        path = backend_ref[0].requests[-1].request_line.split(b" ")[1]
        if path == b"/stall-chunked":  # a head, then nothing: the proxy's read timeout
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        elif path == b"/bad-chunk":
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nxx\r\n")
        elif path == b"/closed-before-length":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n")
            sock.shutdown(socket.SHUT_RDWR)
        else:
            sock.sendall(RAW_OK)

    return step


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Any]]:
    """gunicorn with SoftLBWorker serving :data:`PROXY_APP` in front of a raw backend."""
    from tests.helpers.raw_backend import RawBackend

    directory = tmp_path_factory.mktemp("proxied")
    (directory / "app.py").write_text(PROXY_APP)
    ref: list[Any] = []
    backend = RawBackend([routed(ref)])
    ref.append(backend)
    launcher = Launcher(directory)
    port = free_port()
    source = Path(worker.__file__).resolve().parents[1]  # this checkout's softlb, not another
    argv = [sys.executable, "-m", "gunicorn", "-k", "softlb.worker.SoftLBWorker", "--threads"]
    argv += ["4", "--keep-alive", str(KEEPALIVE), "-b", f"127.0.0.1:{port}", "app:app"]
    env = {
        "HOME": str(directory),
        "XDG_RUNTIME_DIR": str(directory),
        "SOFTLB_TEST_BACKEND": backend.url,
        "PYTHONPATH": f"{source}:{source.parent}",
    }
    try:
        yield launcher(argv, port=port, cwd=directory, env=env), backend
    finally:
        launcher.close()
        backend.close()


def answer_then_close(server: Running, raw: bytes) -> tuple[bytes, bool]:
    """Send ``raw`` on a new connection; the answer, and whether the server then closed it."""
    with connect(server) as sock, sock.makefile("rb") as reader:
        sock.sendall(raw)
        answer = read_response(reader)
        try:
            closed = reader.read(1) == b""
        except TimeoutError:
            closed = False
    return answer, closed


def failures(server: Running) -> bytes:
    return body_of(exchange(server, req("GET", "/_failures"))[0])


@integration
@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhe", 400),
        (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 18446744073709551621\r\n\r\nx", 400),
        (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nX-No-Host: 1\r\n\r\n", 400),
    ],
    ids=["negative-chunk", "cut-chunk", "huge-length", "gzip-chunked", "no-host"],
)
def test_clients_bad_request_is_theirs_under_gunicorn(
    proxied: tuple[Running, Any], raw: bytes, status: int
) -> None:
    """Regression (hardening issue): ``-5`` as a chunk size got a 500 and a backend failure,
    so any client could eject every backend. A client's bad framing is now 400 (an
    unsupported coding 501), the connection is closed, no byte reaches the backend, and no
    failure is counted."""
    server, backend = proxied
    seen = len(backend.requests)
    if raw.endswith(b"he"):  # a body cut short: the client stops sending
        with connect(server) as sock, sock.makefile("rb") as reader:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            answer, closed = read_response(reader), reader.read(1) == b""
    else:
        answer, closed = answer_then_close(server, raw)
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == str(status).encode()
    assert closed
    assert len(backend.requests) == seen
    assert failures(server) == b"0 0"


@integration
@pytest.mark.parametrize(
    ("path", "status"),
    [("/stall-chunked", b"504"), ("/bad-chunk", b"502"), ("/closed-before-length", b"502")],
)
def test_broken_answer_is_502_or_504_not_gunicorns_500(
    proxied: tuple[Running, Any], path: str, status: bytes
) -> None:
    """Regression (hardening issue): a backend that stalled after a chunked head, sent a bad
    first chunk or closed before its declared length gave gunicorn's HTML 500 page."""
    server, _ = proxied
    [answer] = exchange(server, req("GET", path))
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert b"<html" not in answer.lower() and b"Internal Server Error" not in answer


@integration
def test_small_chunked_upload_reaches_the_backend_with_a_length(
    proxied: tuple[Running, Any],
) -> None:
    """Read ahead as nginx does: a chunked upload that fits SMALL_BODY goes on with a
    Content-Length."""
    server, backend = proxied
    raw = b"PUT /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    raw += b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    [answer] = exchange(server, raw)
    assert answer.startswith(b"HTTP/1.1 200 OK") and body_of(answer) == b"ok"
    seen = backend.requests[-1]
    assert seen.body == b"hello world"
    assert b"Content-Length: 11\r\n" in seen.head
    assert b"transfer-encoding" not in seen.head.lower()


def test_gunicorn_parser_errors_are_plain_text(tmp_path: Any) -> None:
    """A request gunicorn's own parser refuses gets a plain-text answer from the threaded
    engine, never gunicorn's HTML page."""
    import json
    import socket as socketlib
    import subprocess
    import sys
    import time

    from tests.helpers.servers import free_port, wait_for_port

    port = free_port()
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"listen": f"127.0.0.1:{port}", "servers": []}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "softlb", "serve", "--config", str(config), "--engine", "threads"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=15)
        with socketlib.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            )
            answer = b""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                more = sock.recv(4096)
                if not more:
                    break
                answer += more
        assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
        assert b"text/plain" in answer
        assert b"<html" not in answer.lower()
    finally:
        proc.terminate()
        proc.wait(15)
