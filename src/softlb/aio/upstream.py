"""The event-loop engine's HTTP/1.1 client for backends: pooled keep-alive connections as
asyncio protocols, answers parsed by httptools (llhttp, Node's parser).

One :class:`UpstreamConnection` is one TCP (or TLS) connection to one backend. An exchange
writes the request head (and the body when it is in memory) in one ``write()``; the answer's
head is :attr:`UpstreamConnection.answer` (awaited with :meth:`~UpstreamConnection.wait_head`,
or announced by ``on_head``), and the body is either kept until the engine
asks for it (a small answer then leaves in the same ``write()`` as its head) or handed to a
``sink`` as it arrives, with backpressure: :meth:`pause` / :meth:`resume` stop and restart
reading from the backend when the client side's buffer is full.

Failures leave as :class:`~softlb.errors.UpstreamConnectError` (nothing was sent),
:class:`~softlb.errors.UpstreamTimeout` (``read_timeout`` passed without a byte) or
:class:`~softlb.errors.UpstreamBroken` (reset, closed early, or an answer llhttp refuses), so
the retry rules of :mod:`softlb.retry` apply unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import typing
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Final
from urllib.parse import urlsplit

import httptools

from softlb.errors import UpstreamBroken, UpstreamConnectError, UpstreamError, UpstreamTimeout
from softlb.http.headers import HOP_BY_HOP_BYTES, connection_token_bytes
from softlb.retry import may_resend

__all__ = ["BackendAddress", "UpstreamConnection", "UpstreamPool", "UpstreamAnswer"]

log = logging.getLogger("softlb.proxy")

#: Most interim (1xx) answers skipped before the final one, as Go's Transport.
MAX_INTERIM: Final = 5

#: Largest answer head accepted from a backend (status line and fields), as the threaded
#: engine's client: above it the answer is a 502.
MAX_HEAD: Final = 64 * 1024

#: A client connection's and a backend connection's write buffer high-water mark: above it
#: the other side stops being read until the buffer drains below the low mark.
HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024

#: What may not appear in a header name or value, a method or a target.
_UNSAFE: Final = re.compile(r"[\r\n\x00]")

#: Statuses whose answers never have a body (RFC 9110 §6.4.1), besides every answer to HEAD.
_BODILESS: Final = frozenset({204, 304})

#: Hop-by-hop field names, lower-cased bytes: never passed on to the client.
_HOP: Final = HOP_BY_HOP_BYTES
#: Fields an answer's Connection header cannot take away: the engine relays the body in the
#: backend's framing, so the client needs its Content-Length (as the request side keeps Host
#: and Content-Length; RFC 9112 §6.3 framing outranks a hop-by-hop claim).
_FRAMING: Final = frozenset({b"content-length"})
#: What a Connection header may name and leave the answer's field block as it is.
_GONE_OR_KEPT: Final = _HOP | _FRAMING
#: The usual Connection value, which names no field but itself (a hop-by-hop one): decided
#: without a call (per answer). Not ``close``: a field named Close would have to go.
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"Keep-Alive"})
#: The lengths of those names: a field of another length is neither (most of an answer's).
_SPECIAL_LENGTHS: Final = frozenset(len(name) for name in _GONE_OR_KEPT)

#: Received answer-head bytes (status line, fields, their CRLFs) beyond which the exact size
#: of the fields (each counted as name + value + 4) is worked out. A field line of n wire
#: bytes counts at most n + 1 (``a:\r\n`` is 4 bytes, counted 5), so the fields cannot pass
#: :data:`MAX_HEAD` before this many bytes have come.
_HEAD_CHECK: Final = MAX_HEAD * 4 // 5


class _Discard(list[tuple[bytes, bytes]]):
    """Where trailer fields go once the head is complete: nowhere (they are not forwarded,
    nor announced: Trailer is hop-by-hop)."""

    __slots__ = ()

    def append(self, item: tuple[bytes, bytes], /) -> None:
        pass


_TRAILERS: Final = _Discard()


class _AfterAnswer(Exception):  # a signal to stop the parser, not an error
    """Raised from a parser callback when a second answer begins after the exchange's answer
    ended: llhttp stops there (the callback's exception ends ``feed_data``)."""


class _Unset:
    """Type of :data:`_UNSET`: "not given", where ``None`` means "no limit"."""


_UNSET: Final = _Unset()


class BackendAddress:
    """Where one backend is: host, port, TLS, the ``Host``-independent base path."""

    __slots__ = ("base", "host", "port", "tls", "url")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)
        self.base = parts.path.rstrip("/").encode("latin-1")


class UpstreamAnswer:
    """The head of a backend's answer, as the client will get it (hop-by-hop not yet removed).

    ``headers`` are raw ``(name, value)`` byte pairs in the order the backend sent them;
    ``fields`` is the field block for the client, made in the same pass that read the
    framing: ``Name: value\r\n`` lines in that order, hop-by-hop fields and the ones the
    answer's Connection header names left out.
    ``length`` is the Content-Length when the backend framed the body by length, else ``None``;
    ``chunked`` says it framed it in chunks; neither means no body or one that runs to the
    end of the connection (``until_close``).
    """

    __slots__ = (
        "chunked",
        "fields",
        "headers",
        "keep_alive",
        "length",
        "reason",
        "status",
        "until_close",
    )

    def __init__(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        fields: bytes | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.fields = _client_fields(headers) if fields is None else fields
        self.length: int | None = None
        self.chunked = False
        self.until_close = False
        self.keep_alive = True


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to a backend; serves one exchange at a time.

    The engine drives it: :meth:`start` sends a request, awaits :meth:`wait_head`, then either
    takes the whole body (:meth:`take_body`, when :attr:`complete` is already set) or sets a
    ``sink`` that gets each piece as it arrives and ``on_done(error)`` when the answer ends.
    """

    def __init__(self, pool: UpstreamPool, address: BackendAddress) -> None:
        self.pool = pool
        self.address = address
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.reused = False
        self.closed = False
        #: The future :meth:`wait_head` awaits, made when first asked for (the fast path
        #: never asks: ``on_head`` tells it).
        self._head_future: asyncio.Future[UpstreamAnswer] | None = None
        self.complete = False
        self.upgraded = False
        self.upgrade_tail = b""
        self.sink: Callable[[bytes], None] | None = None
        self.on_done: Callable[[UpstreamError | None], None] | None = None
        self.on_drain: Callable[[], None] | None = None  # the backend can take more body
        self.on_full: Callable[[], None] | None = None  # the backend's write buffer is full
        #: Scheduled once (``loop.call_soon``) when the answer's head has come (after the
        #: whole read that brought it: a small answer is complete by then) or the exchange has
        #: failed; for a driver that waits on callbacks instead of :meth:`wait_head`. It
        #: runs from the loop's ready queue, not inside the read: the same work batched after
        #: the loop's reads costs less CPU than done inside each (benchmarks/README.md).
        #: It is called with this connection, whose :attr:`context` holds what the driver
        #: kept with the exchange (a bound method and a tuple cost less than a partial).
        self.on_head: Callable[[UpstreamConnection], None] | None = None
        self.context: tuple[typing.Any, ...] = ()
        self._parser: httptools.HttpResponseParser | None = None
        self._answer: UpstreamAnswer | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._head_bytes = 0  # bytes received while the head was not complete
        self._interim_bytes = 0  # the fields of the interim answers skipped, as counted
        self._head_done = False
        self._body: list[bytes] = []
        self._interim = 0
        self._head_request = False
        self._want_upgrade = False
        self._got_bytes = False
        self._active = False  # an exchange is under way (bytes are expected)
        #: Why the exchange failed, once it has (kept for a reader that comes later).
        self.failed: UpstreamError | None = None
        self._last_read = 0.0  # loop time of the last read, for the engine's timeout sweep
        self._read_timeout = pool.read_timeout
        self._lost: asyncio.Future[None] | None = None
        self.paused = False
        self.writing_paused = False

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = typing.cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            sink = self.sink
            if sink is not None:
                sink(data)
            return
        parser = self._parser
        if not self._active or parser is None:  # bytes nobody asked for: it is unusable
            self._drop()
            return
        self._got_bytes = True
        self._last_read = self.loop.time()
        if not self._head_done:
            self._head_bytes += len(data)  # before the parser runs: on_headers_complete reads it
        try:
            parser.feed_data(data)
            if (
                not self._head_done
                and self._head_bytes > _HEAD_CHECK
                and self._head_size() > MAX_HEAD
            ):
                raise _HeadTooLarge
        except httptools.HttpParserUpgrade as exc:
            if self._answer is not None and self._answer.status == 101 and self._want_upgrade:
                self.upgraded = True
                self.upgrade_tail = data[int(exc.args[0]) :]
                self.pool.busy.discard(self)
                self._parser = None
                return
            if self.complete:  # (a 101 after a whole answer: unasked, as any second answer)
                self._after_answer()
                return
            self._fail(
                UpstreamBroken(
                    f"{self.address.url} switched protocols unasked", backend=self.address.url
                )
            )
        except httptools.HttpParserError as exc:
            if self.complete:
                self._after_answer()
                return
            self._fail(
                UpstreamBroken(
                    f"invalid answer from {self.address.url}: {exc}", backend=self.address.url
                )
            )
        except _HeadTooLarge:
            self._fail(
                UpstreamBroken(
                    f"answer head from {self.address.url} is too large", backend=self.address.url
                )
            )
        else:
            on_head = self.on_head  # (_schedule_on_head, inline: per request)
            if on_head is not None and self._head_done:
                self.on_head = None
                self.loop.call_soon(on_head, self)

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.busy.discard(self)
        self.pool._forget_idle(self)
        if self.upgraded:
            done = self.on_done
            self.on_done = None
            if done is not None:
                done(None)
            return
        answer = self._answer
        if self._active and not self.complete:
            if answer is not None and answer.until_close and self._head_done and exc is None:
                self._finish()  # a body delimited by the end of the connection ended
                # (not on a reset: then the body was cut, and the client must see it cut)
            else:
                why = f"{exc}" if exc else "closed the connection"
                if not self._got_bytes:
                    self._fail(
                        _ConnectionGone(
                            f"{self.address.url} {why} before answering", backend=self.address.url
                        )
                    )
                else:
                    self._fail(
                        UpstreamBroken(
                            f"{self.address.url} {why} during the answer", backend=self.address.url
                        )
                    )
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.on_full is not None:
            self.on_full()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.on_drain is not None:
            self.on_drain()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        if self.complete:  # a second answer in the same read: nobody asked for it
            raise _AfterAnswer
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        # The size limit is checked in data_received and on_headers_complete; once the head
        # is complete, the fields are trailers and go to _TRAILERS, which drops them.
        self._headers.append((name, value))

    def _head_size(self) -> int:
        """The head received so far as :data:`MAX_HEAD` counts it: the reason phrase, and
        name + value + 4 per field (interim answers' fields included)."""
        size = self._interim_bytes + len(self._reason)
        for name, value in self._headers:
            size += len(name) + len(value) + 4
        return size

    def on_headers_complete(self) -> None:
        if self.complete:  # (a second answer with an empty reason: no on_status)
            raise _AfterAnswer
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        headers = self._headers
        if 100 <= status < 200 and status != 101:
            self._interim += 1
            if self._interim > MAX_INTERIM:
                raise httptools.HttpParserError("too many interim answers")
            self._interim_bytes = self._head_size()
            if self._interim_bytes > MAX_HEAD:
                raise _HeadTooLarge
            self._headers = []
            self._reason = b""
            return  # an interim answer (103 Early Hints...): skipped, as the threaded engine
        if self._head_bytes > _HEAD_CHECK and self._head_size() > MAX_HEAD:
            raise _HeadTooLarge  # (fewer bytes came than that: it cannot be too large)
        self._headers = _TRAILERS
        # One pass: the framing and the field block for the client.
        length: int | None = None
        chunked = False
        connection: list[bytes] | None = None
        lines: list[bytes] = []
        for name, value in headers:
            if len(name) in _SPECIAL_LENGTHS:  # (a length check is cheaper than lower())
                lname = name.lower()
                if lname in _HOP:
                    if lname == b"transfer-encoding":
                        if value.strip().lower() != b"chunked":
                            # gzip, or a coding list: not relayable as it stands (the field
                            # is per hop, and dropping it would hand the client coded bytes)
                            raise httptools.HttpParserError(
                                "a Transfer-Encoding other than chunked alone"
                            )
                        chunked = True
                    elif lname == b"connection":
                        if connection is None:
                            connection = []
                        connection.append(value)
                    continue
                if lname == b"content-length":
                    length = int(value)  # llhttp checked it: digits, no conflict
            lines += (name, b": ", value, b"\r\n")
        if (
            connection is not None
            and not (len(connection) == 1 and connection[0] in _PLAIN_CONNECTION)
            and not connection_token_bytes(connection) <= _GONE_OR_KEPT
        ):
            fields = _client_fields(headers)  # it names more fields to drop: the slow way
        else:
            fields = b"".join(lines)
        answer = UpstreamAnswer(status, self._reason, headers, fields)
        answer.keep_alive = parser.should_keep_alive()
        if self._head_request or status in _BODILESS or status == 101:
            length = 0
        elif chunked:
            answer.chunked = True
            length = None
        elif length is None:
            answer.until_close = True
            answer.keep_alive = False
        answer.length = length
        self._answer = answer
        self._head_done = True
        head = self._head_future
        if head is not None and not head.done():
            head.set_result(answer)
        if self._head_request:  # llhttp would wait for a body the answer to HEAD never has
            self._finish()
            self._parser = None  # the next exchange needs a parser in its first state

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is None:
            self._body.append(body)
        else:
            sink(body)

    # -- driving an exchange ------------------------------------------------------------

    def start(
        self,
        data: bytes,
        head_request: bool,
        upgrade: bool,
        read_timeout: float | _Unset | None = _UNSET,
    ) -> None:
        """Send ``data`` (the request head, with its body when it is in memory) and wait for
        the answer (:meth:`wait_head`, or ``on_head``). ``read_timeout`` overrides the pool's
        for this exchange."""
        self._read_timeout = (
            self.pool.read_timeout
            if read_timeout is _UNSET  # (not isinstance(): a call, per request)
            else typing.cast("float | None", read_timeout)
        )
        self._head_future = None
        self.complete = False
        self._answer = None
        self._headers = []
        self._reason = b""
        self._head_bytes = 0
        self._interim_bytes = 0
        self._head_done = False
        self._body = []
        self._interim = 0
        self._got_bytes = False
        self._head_request = head_request
        self._want_upgrade = upgrade
        self.sink = None
        self.on_done = None
        self.on_head = None
        self.failed = None
        if self._parser is None:
            self._parser = httptools.HttpResponseParser(self)
        self._active = True
        self._last_read = self.loop.time()
        pool = self.pool
        pool.busy.add(self)
        if pool._sweep is None:  # (the call only when it has something to do: per request)
            pool._ensure_sweep()
        assert self.transport is not None
        self.transport.write(data)

    @property
    def answer(self) -> UpstreamAnswer | None:
        """The answer's head, once it has come (``None`` before, and after a failure that
        came first)."""
        return self._answer if self._head_done else None

    def wait_head(self) -> asyncio.Future[UpstreamAnswer]:
        """A future of the answer's head: resolved at once if it has come, failed with the
        exchange's error if it has failed (else when either happens). Made on the first
        call, so that an exchange nobody waits on (the fast path) costs no future."""
        head = self._head_future
        if head is None:
            head = self._head_future = self.loop.create_future()
            if self._head_done and self._answer is not None:
                head.set_result(self._answer)
            elif self.failed is not None:
                head.set_exception(self.failed)
        return head

    def write(self, data: bytes) -> None:
        """More of the request body (or tunnel bytes)."""
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def take_body(self) -> bytes:
        """What has arrived of the body and not been handed on yet."""
        body = self._body
        self._body = []
        if not body:
            return b""
        return body[0] if len(body) == 1 else b"".join(body)

    def take_pieces(self) -> list[bytes]:
        """What has arrived of the body and not been handed on yet, as the pieces it came in
        (written on with one ``writelines()``, without joining them first)."""
        body = self._body
        self._body = []
        return body

    def stream(
        self, sink: Callable[[bytes], None], on_done: Callable[[UpstreamError | None], None]
    ) -> None:
        """Hand every later piece of the body to ``sink``; ``on_done`` when the answer ends."""
        self.sink = sink
        self.on_done = on_done
        if self.failed is not None:
            self.on_done = None
            on_done(self.failed)
        elif self.complete and not self.upgraded:
            self.on_done = None
            on_done(None)

    def pause(self) -> None:
        """Stop reading from the backend (the client's buffer is full)."""
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self._last_read = self.loop.time()  # the wait was the client's, not the backend's
            self.transport.resume_reading()

    def release(self, reusable: bool) -> None:
        """The exchange is over: back to the idle pool when ``reusable``, else closed."""
        self._active = False
        self.pool.busy.discard(self)
        self.sink = None
        self.on_done = None
        self.on_head = None
        self.context = ()
        self.on_drain = self.on_full = None
        if (
            reusable
            and self.complete
            and not self.closed
            and not self.upgraded
            # After an upgrade request the backend declined, not either: one whose parser
            # skips an upgrade request's body (as llhttp does when told to) would read the
            # body this proxy sent as the next request.
            and not self._want_upgrade
            and self._answer is not None
            and self._answer.keep_alive
        ):
            self.reused = True
            if self.paused:
                self.resume()
            # Back to the pool's idle connections (inline: per request).
            pool = self.pool
            idle = pool._idle.get(self.address.url)
            if idle is None:  # (not setdefault: that makes a deque on every call)
                idle = pool._idle[self.address.url] = deque()
            if not pool.closed and len(idle) < pool.max_idle:
                idle.append(self)
                return
        self._drop()

    def abort(self) -> None:
        """Close now, mid-exchange (the client went away, or sent a bad body). An exchange
        still under way fails: whoever waits for its head (:meth:`wait_head`) hears it, so
        that the lease it holds is released instead of waiting for ever."""
        self.sink = None
        self.on_done = None
        self.on_head = None
        if self._active and self.failed is None:
            url = self.address.url
            self._fail(UpstreamBroken(f"exchange with {url} cut short", backend=url))
        else:
            self._drop()

    # -- internals ------------------------------------------------------------------------

    def _finish(self) -> None:
        """The answer has ended (llhttp's ``on_message_complete``, whose alias this is: one
        call per answer, not two)."""
        if self.complete or not self._head_done:
            return  # (or the end of an interim answer)
        self.complete = True
        self._active = False  # a byte after the answer makes the connection unusable
        self.pool.busy.discard(self)
        done = self.on_done
        if done is not None:
            self.on_done = None
            done(None)

    on_message_complete = _finish

    def _fail(self, error: UpstreamError) -> None:
        if self.failed is None:
            self.failed = error
        self._active = False
        self.pool.busy.discard(self)
        head = self._head_future
        if head is not None and not head.done():
            head.set_exception(error)
            head.exception()  # retrieved: nobody may await it if the client has gone
        done = self.on_done
        self.on_done = None
        self._drop()
        if done is not None:
            done(error)
        self._schedule_on_head()

    def _after_answer(self) -> None:
        """Bytes came after the whole answer: another answer nobody asked for (a backend
        that answered early took the request's body for a next request), or junk. The answer
        stands, as its framing delimited it; the connection cannot be trusted again."""
        self._drop()
        self._schedule_on_head()

    def _schedule_on_head(self) -> None:
        on_head = self.on_head
        if on_head is not None:
            self.on_head = None
            self.loop.call_soon(on_head, self)

    def _drop(self) -> None:
        self._parser = None
        self._active = False
        self.pool.busy.discard(self)
        self.pool._forget_idle(self)
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def check_timeout(self, now: float) -> None:
        """Called by the engine's sweep: fail the exchange when the backend has sent nothing
        for ``read_timeout`` seconds (time the client made it wait, paused, does not count)."""
        timeout = self._read_timeout
        if timeout is None or self.paused or not self._active:
            return
        if now - self._last_read >= timeout:
            self._fail(
                UpstreamTimeout(
                    f"backend did not answer in time: {self.address.url}", backend=self.address.url
                )
            )


class _HeadTooLarge(Exception):
    pass


def _client_fields(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The field block of an answer for the client: ``Name: value\r\n`` lines, hop-by-hop
    fields and the ones its Connection header names (RFC 9110 §7.6.1) left out."""
    connection = [value for name, value in headers if name.lower() == b"connection"]
    # The fields it names go too, but never Content-Length: the body keeps the backend's
    # framing.
    skip = (_HOP | connection_token_bytes(connection)) - _FRAMING if connection else _HOP
    lines: list[bytes] = []
    for name, value in headers:
        if name.lower() not in skip:
            lines += (name, b": ", value, b"\r\n")
    return b"".join(lines)


class _ConnectionGone(UpstreamBroken):
    """A connection closed before any byte of the answer: on a reused one, the backend closed
    it while idle (the request may go again on a fresh connection without blaming it)."""


class UpstreamPool:
    """Idle keep-alive connections per backend for one event loop, and how to make new ones.

    ``ssl_context`` verifies ``https://`` backends (by default the system's CAs, which
    honours ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``). ``max_idle`` bounds the idle connections
    kept per backend.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        connect_timeout: float | None = 2.0,
        read_timeout: float | None = 30.0,
        max_idle: int = 64,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.loop = loop
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self._ssl = ssl_context
        self._idle: dict[str, deque[UpstreamConnection]] = {}
        #: Connections with an exchange under way, for the read-timeout sweep.
        self.busy: set[UpstreamConnection] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._addresses: dict[str, BackendAddress] = {}
        self.closed = False

    def address(self, url: str) -> BackendAddress:
        address = self._addresses.get(url)
        if address is None:
            if len(self._addresses) > 4096:
                self._addresses.clear()
            address = self._addresses[url] = BackendAddress(url)
        return address

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def take_idle(self, url: str) -> UpstreamConnection | None:
        """The most recently used idle connection to ``url``, if there is one."""
        idle = self._idle.get(url)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def connect(self, url: str) -> UpstreamConnection:
        """A new connection to ``url``."""
        address = self.address(url)
        try:
            connecting = self.loop.create_connection(
                lambda: UpstreamConnection(self, address),
                address.host,
                address.port,
                ssl=self.ssl_context() if address.tls else None,
                server_hostname=address.host if address.tls else None,
            )
            if self.connect_timeout is not None:
                _, protocol = await asyncio.wait_for(connecting, self.connect_timeout)
            else:
                _, protocol = await connecting
        except asyncio.TimeoutError:
            raise UpstreamConnectError(f"connecting to {url} timed out", backend=url) from None
        except ssl.SSLError as exc:
            raise UpstreamConnectError(
                f"TLS with {url} failed: {exc.reason or exc}", backend=url
            ) from None
        except OSError as exc:
            raise UpstreamConnectError(
                f"cannot connect to {url}: {exc.strerror or exc}", backend=url
            ) from None
        return protocol

    async def exchange(
        self,
        url: str,
        head: Callable[[BackendAddress], bytes],
        body: bytes = b"",
        *,
        head_request: bool = False,
        upgrade: bool = False,
        resend: bool = True,
        stream: Callable[[UpstreamConnection], None] | None = None,
        read_timeout: float | _Unset | None = _UNSET,
        started: UpstreamConnection | None = None,
    ) -> UpstreamConnection:
        """Send a request to ``url`` and wait for the head of its answer; the connection it
        went on comes back, its body still to be read (:meth:`UpstreamConnection.stream`,
        :meth:`read_body`), to be given back with :meth:`UpstreamConnection.release`.

        ``head(address)`` makes the request head for the backend's address; ``body`` (in
        memory) leaves in the same write. ``stream(conn)``, if given, sends the rest of a body
        that is not in memory. A *reused* connection that fails before any byte of the answer
        was closed by the backend while idle: the request goes once more on a fresh
        connection when it may be sent again (``resend``) and nothing was streamed (Go's
        Transport rule), and that is not the backend's failure.

        ``started`` is a connection on which the caller has already started this exchange
        (with the same head and body, nothing streamed): it is waited on first, under the
        same rule.
        """
        fresh = False
        conn = started
        while True:
            if conn is None:
                conn = None if fresh else self.take_idle(url)
                if conn is None:
                    conn = await self.connect(url)
                conn.start(
                    head(conn.address) + body,
                    head_request=head_request,
                    upgrade=upgrade,
                    read_timeout=read_timeout,
                )
                if stream is not None:
                    stream(conn)
            try:
                await conn.wait_head()
            except _ConnectionGone as exc:
                if conn.reused and resend and not fresh and stream is None:
                    fresh = True
                    conn = None
                    continue
                raise UpstreamBroken(str(exc), backend=url) from None
            return conn

    async def request(
        self,
        url: str,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes | Iterable[bytes] | None = None,
        *,
        chunked: bool = False,
        read_timeout: float | _Unset | None = _UNSET,
    ) -> UpstreamConnection:
        """:meth:`exchange` for a request given as plain values, as the threaded engine's
        clients (:class:`~softlb.http.transport.Transport`) take it: ``headers`` are sent as
        given, plus ``Host`` (the backend's address) when they have none and the framing of
        ``body`` (``Content-Length`` for bytes, chunks when ``chunked``). Names and values
        with CR, LF or NUL are refused with ``ValueError`` before anything is sent."""
        fields = []
        has_host = False
        for name, value in headers.items():
            if _UNSAFE.search(name) or _UNSAFE.search(value):
                raise ValueError(f"header {name!r} holds CR, LF or NUL")
            lname = name.lower()
            if lname == "host":
                has_host = True
            elif lname in ("content-length", "transfer-encoding"):
                continue  # framing is made here, for the body as given
            fields.append(f"{name}: {value}\r\n")
        if _UNSAFE.search(target) or " " in target or _UNSAFE.search(method):
            raise ValueError("the method or target holds a space, CR, LF or NUL")
        data = b""
        pieces: Iterable[bytes] | None = None
        if isinstance(body, (bytes, bytearray)):
            data = bytes(body)
            fields.append(f"Content-Length: {len(data)}\r\n")
        elif body is not None:
            pieces = body
            if chunked:
                fields.append("Transfer-Encoding: chunked\r\n")
            else:
                given = {k.lower(): v for k, v in headers.items()}.get("content-length")
                if given is None:
                    raise ValueError("a streamed body needs chunked=True or a Content-Length")
                fields.append(f"Content-Length: {given}\r\n")
        elif method in ("POST", "PUT", "PATCH"):
            fields.append("Content-Length: 0\r\n")
        text = "".join(fields)

        def head(address: BackendAddress) -> bytes:
            host = ""
            if not has_host:
                netloc = f"[{address.host}]" if ":" in address.host else address.host
                default = 443 if address.tls else 80
                port = "" if address.port == default else f":{address.port}"
                host = f"Host: {netloc}{port}\r\n"
            line = f"{method} {address.base.decode('latin-1')}{target} HTTP/1.1\r\n"
            return (line + host + text + "\r\n").encode("latin-1")

        def stream(conn: UpstreamConnection) -> None:
            assert pieces is not None
            for piece in pieces:
                if piece:
                    conn.write(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                conn.write(b"0\r\n\r\n")

        return await self.exchange(
            url,
            head,
            data,
            head_request=method == "HEAD",
            resend=may_resend(method, any(k.lower() == "idempotency-key" for k in headers)),
            stream=stream if pieces is not None else None,
            read_timeout=read_timeout,
        )

    async def read_body(self, conn: UpstreamConnection) -> bytes:
        """The whole body of the answer ``conn`` got (then ``conn`` is released: pooled when
        it can be); an :class:`~softlb.errors.UpstreamError` if it breaks off."""
        pieces = [conn.take_body()]
        done: asyncio.Future[UpstreamError | None] = self.loop.create_future()

        def finished(error: UpstreamError | None) -> None:
            if not done.done():
                done.set_result(error)

        conn.stream(pieces.append, finished)
        error = await done
        if error is not None:
            conn.abort()
            raise error
        conn.release(reusable=True)
        return b"".join(pieces)

    # -- the read-timeout sweep ---------------------------------------------------------------

    def _ensure_sweep(self) -> None:
        """One timer for every exchange of this pool, instead of one per request: each
        looks at the busy connections a few times per read timeout."""
        if self._sweep is None and not self.closed:
            self._sweep = self.loop.call_later(self._interval(), self._run_sweep)

    def _interval(self) -> float:
        shortest = min(
            [c._read_timeout for c in self.busy if c._read_timeout is not None]
            + [self.read_timeout or 60.0]
        )
        return min(max(shortest / 5, 0.02), 1.0)

    def _run_sweep(self) -> None:
        self._sweep = None
        now = self.loop.time()
        for conn in list(self.busy):
            conn.check_timeout(now)
        if self.busy and not self.closed and not self.loop.is_closed():
            self._sweep = self.loop.call_later(self._interval(), self._run_sweep)

    def _forget_idle(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.address.url)
        if idle:
            with contextlib.suppress(ValueError):
                idle.remove(conn)

    def forget(self, url: str) -> None:
        """Close the idle connections of a backend that left the pool."""
        for conn in list(self._idle.pop(url, ())):
            conn._drop()
        self._addresses.pop(url, None)

    def close(self) -> None:
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in list(self._idle.values()):
            for conn in list(idle):
                conn._drop()
        self._idle.clear()
