"""The threaded engine (``softlb serve --engine threads``): softlb's proxy under gunicorn's
stock ``gthread`` worker.

Integration tests against real gunicorn processes serving softlb's proxy in front of a raw
backend, talked to over raw sockets, and one against ``softlb serve --engine threads`` itself
(SPEC §3: gunicorn's parser errors are plain text, never its HTML page). The worker subclass
these tests used to cover (``softlb.worker``) is gone: it did not pay for its use of gunicorn
internals (issue #12, ``benchmarks/bench_worker.py``).
"""

from __future__ import annotations

import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

import softlb
from tests.helpers.servers import free_port
from tests.integration.conftest import Launcher, Running

#: Seconds an idle kept-alive connection stays open on the test servers.
KEEPALIVE = 2
#: Bound on every socket read of these tests.
TIMEOUT = 10.0
DATE = re.compile(rb"\r\nDate: ([^\r\n]*)\r\n")


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


integration = pytest.mark.integration


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
    """gunicorn's stock gthread worker serving :data:`PROXY_APP` in front of a raw backend."""
    from tests.helpers.raw_backend import RawBackend

    directory = tmp_path_factory.mktemp("proxied")
    (directory / "app.py").write_text(PROXY_APP)
    ref: list[Any] = []
    backend = RawBackend([routed(ref)])
    ref.append(backend)
    launcher = Launcher(directory)
    port = free_port()
    source = Path(softlb.__file__).resolve().parents[1]  # this checkout's softlb, not another
    argv = [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads"]
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
