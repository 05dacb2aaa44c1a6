"""A bare round-robin reverse proxy on uvloop + httptools: the floor of a Python proxy.

    python bare_uvloop.py PORT http://127.0.0.1:8001 http://127.0.0.1:8002 ...

``run.py``'s ``bare-uvloop`` target, run with softlb's venv (the same uvloop and httptools as
the event-loop engine). asyncio Protocols only, no task on the path of a request: keep-alive
clients, one pooled keep-alive connection per request in flight to the backends, taken in
turn; answers framed by Content-Length or in chunks streamed as they arrive (the client's
write buffer above 256 KiB pauses the backend); hop-by-hop fields (and those Connection
names) dropped both ways, X-Forwarded-For appended. Nothing else: no retries, health checks,
timeouts, limits, metrics, logs or admin; pipelined requests wait their turn with the client
paused; an answer to HEAD has no body; a failure closes the client's connection.

The process is tuned as softlb's event-loop worker tunes itself (``softlb.aio.tuning`` on main
since c399053): glibc's mmap threshold 1 MiB and trim threshold 32 MiB, so that a 256 KiB
answer does not cost page faults for every buffer, and ``gc.freeze()`` with a young
generation of 5,000. ``BENCH_TUNING=off`` leaves both at their defaults.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import signal
import socket
import sys
from collections import deque
from urllib.parse import urlsplit

import httptools
import uvloop

HOP = frozenset(
    b"connection keep-alive proxy-connection te trailer transfer-encoding upgrade "
    b"proxy-authenticate proxy-authorization".split()
)
XFF = b"x-forwarded-for"


def named(value: bytes) -> frozenset[bytes]:
    """The fields a Connection header names (hop-by-hop too)."""
    return frozenset(t.strip().lower() for t in value.split(b","))


def nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Backend:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.idle: list[Upstream] = []


class Upstream(asyncio.Protocol):
    """One keep-alive connection to a backend: sends a request, relays its answer."""

    def __init__(self, backend: Backend) -> None:
        self.backend, self.transport, self.closed = backend, None, False
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.pending: list[bytes] = []  # written before the connection is up
        self.out: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason, self.chunked, self.done, self.head_req = b"", False, False, False
        self.keep, self.paused = True, False

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport
        if self.closed:  # the client left while this connected
            transport.close()
            return
        nodelay(transport)
        if self.pending:
            transport.write(b"".join(self.pending))
            self.pending = []

    def send(self, data: bytes) -> None:
        if self.transport is None:
            self.pending.append(data)
        elif not self.closed:
            self.transport.write(data)

    def start(self, client: Client, data: bytes, head_req: bool) -> None:
        self.client, self.head_req, self.done = client, head_req, False
        self.headers, self.reason = [], b""
        self.send(data)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.abort()  # connection_lost closes the client
            return
        out, client = self.out, self.client
        if out and client is not None:
            self.out = []
            client.send(out)
        if self.done and client is not None:
            self.client = None
            if self.keep and not self.closed:
                self.pause(False)  # if the client had paused it
                self.backend.idle.append(self)
            else:
                self.transport.close()
            client.answered()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self in self.backend.idle:
            self.backend.idle.remove(self)
        client, self.client = self.client, None
        if client is not None and client.transport is not None:
            if self.out:  # the end of a body that ran to the end of the connection
                client.transport.write(b"".join(self.out))
            elif not client.answering:
                client.transport.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            client.transport.close()

    def pause(self, paused: bool) -> None:
        if paused != self.paused and self.transport is not None and not self.closed:
            self.paused = paused
            (self.transport.pause_reading if paused else self.transport.resume_reading)()

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        client, parser = self.client, self.parser
        status = parser.get_status_code()
        skip, framed, self.chunked = HOP, False, False
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"connection":
                skip = skip | named(value)
            elif lname == b"transfer-encoding":
                self.chunked = framed = True
            elif lname == b"content-length":
                framed = True
        self.keep = parser.should_keep_alive()
        bodiless = self.head_req or status in (204, 304)
        out = [b"HTTP/1.1 %d %b\r\n" % (status, self.reason)]
        out += [b"%b: %b\r\n" % nv for nv in self.headers if nv[0].lower() not in skip]
        if self.chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        if client is not None and (not client.keep_alive or not (framed or bodiless)):
            client.keep_alive = False
            out.append(b"Connection: close\r\n")
        self.out.append(b"".join(out) + b"\r\n")
        if client is not None:
            client.answering = True
        if self.head_req:  # llhttp would wait for the body HEAD never gets
            self.done, self.parser = True, httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        self.out += (b"%x\r\n" % len(body), body, b"\r\n") if self.chunked else (body,)

    def on_message_complete(self) -> None:
        if self.chunked:
            self.out.append(b"0\r\n\r\n")
        self.done = True


class Request:
    __slots__ = ("body", "chunked", "head", "head_req", "keep_alive", "upstream")

    def __init__(self, head: bytes, keep_alive: bool, head_req: bool, chunked: bool) -> None:
        self.head, self.keep_alive = head, keep_alive
        self.head_req, self.chunked = head_req, chunked
        self.body: list[bytes] = []
        self.upstream: Upstream | None = None


class Client(asyncio.Protocol):
    """One client connection: one request at a time, answered by a pooled upstream."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy, self.transport = proxy, None
        self.parser = httptools.HttpRequestParser(self)
        self.waiting: deque[Request] = deque()
        self.upstream: Upstream | None = None
        self.request: Request | None = None  # being parsed
        self.keep_alive, self.answering, self.paused = True, False, False

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport
        nodelay(transport)
        transport.set_write_buffer_limits(256 * 1024, 64 * 1024)
        self.peer = transport.get_extra_info("peername")[0].encode()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()

    def send(self, out: list[bytes]) -> None:
        if len(out) == 1 or sum(map(len, out)) < 16384:
            self.transport.write(b"".join(out))
        else:
            self.transport.writelines(out)

    def connection_lost(self, exc: Exception | None) -> None:
        upstream, self.transport = self.upstream, None
        if upstream is not None:  # mid-answer: that connection cannot be reused
            upstream.client = None
            if upstream.transport is not None:
                upstream.transport.abort()
            else:
                upstream.closed = True

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause(True)

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause(False)

    def on_message_begin(self) -> None:
        self.url, self.headers = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        lines, skip, xff, chunked = [], HOP, b"", False
        for name, value in self.headers:
            lname = name.lower()
            if lname in HOP or lname == XFF:
                if lname == b"connection":
                    skip = skip | named(value)
                elif lname == XFF:
                    xff = value + b", "
                elif lname == b"transfer-encoding":
                    chunked = True
                continue
            lines.append((lname, b"%b: %b\r\n" % (name, value)))
        parser = self.parser
        method = parser.get_method()
        out = [method, b" ", self.url, b" HTTP/1.1\r\n"]
        out += [line for lname, line in lines if lname not in skip]
        out += (b"X-Forwarded-For: ", xff, self.peer, b"\r\n")
        out.append(b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"\r\n")
        head = b"".join(out)
        request = Request(head, parser.should_keep_alive(), method == b"HEAD", chunked)
        self.request = request
        if self.upstream is None:
            self.dispatch(request)
        else:  # pipelined: read no further until the ones ahead are answered
            self.waiting.append(request)
            self.paused = True
            self.transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        self.forward(b"%x\r\n%b\r\n" % (len(body), body) if self.request.chunked else body)

    def on_message_complete(self) -> None:
        if self.request.chunked:
            self.forward(b"0\r\n\r\n")

    def forward(self, piece: bytes) -> None:
        upstream = self.request.upstream
        if upstream is not None:
            upstream.send(piece)
        else:
            self.request.body.append(piece)

    def dispatch(self, request: Request) -> None:
        self.upstream = request.upstream = self.proxy.lease()
        self.keep_alive, self.answering = request.keep_alive, False
        data = request.head + b"".join(request.body) if request.body else request.head
        request.body = []
        self.upstream.start(self, data, request.head_req)

    def answered(self) -> None:
        self.upstream = None
        if self.transport is None:
            return
        if not self.keep_alive:
            self.transport.close()
        elif self.waiting:
            self.dispatch(self.waiting.popleft())
        elif self.paused:
            self.paused = False
            self.transport.resume_reading()


class Proxy:
    def __init__(self, loop: asyncio.AbstractEventLoop, urls: list[str]) -> None:
        self.loop, self.backends, self.turn = loop, [Backend(u) for u in urls], 0

    def lease(self) -> Upstream:
        backend = self.backends[self.turn]
        self.turn = (self.turn + 1) % len(self.backends)
        if backend.idle:
            return backend.idle.pop()
        upstream = Upstream(backend)
        connecting = self.loop.create_connection(lambda: upstream, backend.host, backend.port)
        task = self.loop.create_task(connecting)
        task.add_done_callback(lambda t: t.exception() and upstream.connection_lost(None))
        return upstream


def tune() -> None:
    """softlb's worker tuning: glibc's mmap (-3) and trim (-1) thresholds, the collector."""
    if os.environ.get("BENCH_TUNING", "") == "off":
        return
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(-3, 1 << 20)
    mallopt(-1, 32 << 20)
    gc.collect()
    gc.freeze()
    gc.set_threshold(5000, *gc.get_threshold()[1:])


def serve(loop: asyncio.AbstractEventLoop, port: int, urls: list[str]) -> None:
    """Proxy 127.0.0.1:``port`` to ``urls`` on ``loop`` until SIGTERM or SIGINT."""
    tune()
    proxy = Proxy(loop, urls)
    sock = socket.create_server(("127.0.0.1", port), backlog=4096)
    loop.run_until_complete(loop.create_server(lambda: Client(proxy), sock=sock, backlog=4096))
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.add_signal_handler(signal.SIGINT, loop.stop)
    loop.run_forever()


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: bare_uvloop.py PORT BACKEND_URL...")
    event_loop = uvloop.new_event_loop()
    asyncio.set_event_loop(event_loop)
    serve(event_loop, int(sys.argv[1]), sys.argv[2:])
