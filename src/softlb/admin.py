"""The admin API (SPEC §5): a WSGI app that lists, adds and removes backends, exposes the
Prometheus metrics and serves a status page.

Routes, under ``prefix`` (default ``/_softlb``):

============================  ========================  =====================================
method and path               body                      answers
============================  ========================  =====================================
``GET {prefix}/servers``                                200 ``{"servers": [...]}``
``POST {prefix}/servers``     ``{"url", "weight"?}``    201 the server; 400; 409 present
``PATCH {prefix}/servers``    ``{"url", "weight"?,      200 the server; 400; 404 unknown
                              "draining"?}``
``DELETE {prefix}/servers``   ``{"url"}``               200 the removed server; 400; 404
``GET {prefix}/metrics``                                200 Prometheus text exposition
``GET {prefix}/status``                                 200 the status page's figures, JSON
``GET {prefix}/explain``      ``?key=&limit=``          200 what the next pick would be, why
``GET {prefix}/health``                                 200 ``{"status": "ok"}`` (liveness)
``GET {prefix}/``                                       200 the status page (HTML)
``GET {prefix}``                                        308 to ``{prefix}/``
``POST /upload_server``       ``{"url", "weight"?}``    as ``POST {prefix}/servers`` (seed)
``DELETE /delete_server``     ``{"url"}``               as ``DELETE {prefix}/servers`` (seed)
============================  ========================  =====================================

Every route also answers ``HEAD`` where it answers ``GET``, and ``OPTIONS`` with 204 and an
``Allow`` header. Any other method gets 405 with ``Allow``; any other path under the prefix 404.
Errors are ``{"error": "<one sentence>"}`` with a 4xx status. A request body must be one
JSON object of at most :data:`MAX_BODY` bytes (any Content-Type); a bad body is refused before
anything changes.

Who may call it (SPEC §5), checked before anything else, on every route (the seed routes, the
page and the metrics included):

* with a ``token``: every client, wherever it is, sends it as ``Authorization: Bearer TOKEN``
  or as the password of HTTP Basic auth (any user name), else 401 with
  ``WWW-Authenticate: Basic realm="softlb"`` (so that a browser asks for it). ``allow`` does
  not bypass a token: like HAProxy's ``stats auth`` or Traefik's ``basicAuth``, a configured
  password is asked of everyone.
* without a token: only clients whose address (``REMOTE_ADDR``, never a header a client could
  forge) is loopback (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104) or inside ``allow``; others get
  403.
* a call that changes state (any method but GET, HEAD and OPTIONS) whose ``Origin`` names
  another host than its ``Host`` (``Origin: null`` included) gets 403: a web page the
  operator happens to visit cannot make their browser change the backends. A call with no
  ``Origin`` (curl, scripts) is not affected.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import logging
import os
import secrets
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final

from softlb import __version__
from softlb.backend import Backend, normalize_url, validate_weight
from softlb.errors import BackendExists, InvalidBackend, UnknownBackend
from softlb.http.headers import (
    BadFraming,
    check_request_framing,
    close_after,
    is_chunked_request,
)
from softlb.metrics import Metrics, histogram_quantile
from softlb.pool import Pool
from softlb.state.base import StoreUnavailable
from softlb.stats import STATUS_CLASSES, BackendFigures, ProxyStats
from softlb.status_page import render_status_page

if TYPE_CHECKING:
    from softlb.health import HealthChecker
    from softlb.state.sync import SharedState
    from softlb.wsgi import Environ, StartResponse

__all__ = [
    "BODY_TOO_LARGE",
    "MAX_BODY",
    "SEED_ADD",
    "SEED_REMOVE",
    "STATUS_CANDIDATES",
    "AdminApi",
    "parse_allow",
]

log = logging.getLogger("softlb.admin")

#: Largest request body accepted, in bytes. A backend spec is well under 1 KiB; 64 KiB leaves
#: room for anything sensible and keeps a hostile client from making us buffer much.
MAX_BODY: Final = 64 * 1024
#: The error for a body above it (the event-loop engine, which stops reading a body long
#: before the admin app would see it, answers with the same).
BODY_TOO_LARGE: Final = (
    f"the request body is larger than {MAX_BODY} bytes; send one small JSON object"
)

#: The seed project's routes, kept for its users (SPEC §5).
SEED_ADD: Final = "/upload_server"
SEED_REMOVE: Final = "/delete_server"

#: Shown in messages about a bad request body.
_EXAMPLE: Final = '{"url": "http://10.0.0.1:8000", "weight": 1}'
_EXAMPLE_URL: Final = '{"url": "http://10.0.0.1:8000"}'
_EXAMPLE_PATCH: Final = '{"url": "http://10.0.0.1:8000", "weight": 2, "draining": true}'

#: Methods that only read: the Origin check (cross-site writes) leaves them alone.
_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})

#: The challenge a 401 carries: Basic, so that a browser asks for the token (as the password).
_CHALLENGE: Final = 'Basic realm="softlb"'

#: Addresses that may call the admin API without a token and without ``allow``: loopback.
#: IPv4-mapped IPv6 addresses (::ffff:127.0.0.1, what a dual-stack socket reports) are
#: checked as the IPv4 address they map.
_LOOPBACK: Final = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Longest field name or path echoed back in an error message.
_ECHO_MAX: Final = 60

#: Candidates the status page (and ``GET {prefix}/status``) lists under "Next pick": the
#: choice and the runners-up are what a person reads; the full list is ``GET {prefix}/explain``.
STATUS_CANDIDATES: Final = 10

#: Query parameters ``GET {prefix}/explain`` takes.
_EXPLAIN_PARAMS: Final = ("key", "limit")

#: Sent with the status page: only its own inline style and script (by nonce) may run, it
#: may fetch only from this origin, and nobody may frame it.
_PAGE_CSP: Final = (
    "default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


class _Refused(Exception):
    """A request the admin API turns down; becomes an ``{"error": ...}`` answer."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: Iterable[tuple[str, str]] = (),
        *,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)
        #: The request's framing cannot be trusted: the connection closes after the answer.
        self.close = close


class _DuplicateKey(ValueError):
    pass


class _BadConstant(ValueError):
    pass


Handler = Callable[["Environ"], _Response]


def _json_body(status: int, document: object, headers: Iterable[tuple[str, str]] = ()) -> _Response:
    body = (json.dumps(document, indent=2) + "\n").encode()
    return _Response(status, body, headers=list(headers))


def _echo(text: str) -> str:
    """``text`` shortened for a message, JSON-quoted so that odd characters stay visible."""
    if len(text) > _ECHO_MAX:
        text = text[: _ECHO_MAX - 1] + "…"
    return json.dumps(text)


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(f"field {_echo(key)} is given twice")
        result[key] = value
    return result


def _no_constant(name: str) -> object:
    raise _BadConstant(f"{name} is not a JSON number")


def parse_allow(allow: Sequence[str]) -> tuple[_Network, ...]:
    """``allow`` (addresses or CIDR blocks such as ``"10.0.0.0/8"``) as networks; raise
    ValueError naming the first entry that is neither. A block with host bits set
    (``"10.0.0.1/8"``) is taken as the block it is in, as iptables and nginx do."""
    if isinstance(allow, str):
        raise ValueError("admin allow must be a list of addresses or CIDR blocks, not a string")
    networks: list[_Network] = []
    for entry in allow:
        if not isinstance(entry, str):
            raise ValueError(
                f"admin allow entries must be strings like '10.0.0.0/8', got {entry!r}"
            )
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"admin allow entry {entry!r} is not an IP address or CIDR block "
                "(like '10.0.0.5' or '10.0.0.0/8')"
            ) from None
    return tuple(networks)


def _client_address(environ: Environ) -> _Address | str | None:
    """The peer's address from ``REMOTE_ADDR`` (IPv4-mapped IPv6 unwrapped); ``"local"``
    when there is none (a Unix socket, whose clients are on this host, or a call from this
    process); ``None`` when it is not an IP address."""
    text = environ.get("REMOTE_ADDR") or ""
    if not text.strip():
        return "local"
    try:
        address = ipaddress.ip_address(text.strip().strip("[]").partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _host_and_port(text: str, scheme: str) -> tuple[str, int | None] | None:
    """``(host, port)`` of a ``Host`` header's value, the port filled in from ``scheme``
    when absent; ``None`` when it cannot be read."""
    text = text.strip().lower()
    if not text:
        return None
    try:
        parts = urllib.parse.urlsplit("//" + text)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname
    if not host or parts.username is not None or parts.path or parts.query:
        return None
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    return host, port


def _same_origin(origin: str, environ: Environ) -> bool:
    """Whether the ``Origin`` header names the host (and port) the request was sent to, by
    its ``Host`` header (or the server's name and port without one). ``null`` never does."""
    origin = origin.strip()
    if not origin or origin.lower() == "null":
        return False
    try:
        parts = urllib.parse.urlsplit(origin)
    except ValueError:
        return False
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or parts.path not in ("", "/"):
        return False
    theirs = _host_and_port(parts.netloc, scheme)
    host_header = environ.get("HTTP_HOST")
    if not host_header:
        name = environ.get("SERVER_NAME") or ""
        port = environ.get("SERVER_PORT") or ""
        host_header = f"{name}:{port}" if port else name
    ours = _host_and_port(host_header, str(environ.get("wsgi.url_scheme") or "http"))
    return theirs is not None and theirs == ours


def _basic_password(credentials: str) -> bytes | None:
    """The password of HTTP Basic credentials (base64 of ``user:password``), as bytes."""
    try:
        decoded = base64.b64decode(credentials.strip().encode("latin-1"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None
    _user, colon, password = decoded.partition(b":")
    return password if colon else None


class AdminApi:
    """The admin API over ``pool``, as a WSGI app; see the module docstring for the routes.

    ``prefix`` is where it lives (a trailing ``/`` is dropped). ``token``, if given, is the
    token every call needs, from every client (as a bearer token or a Basic password).
    Without one, only loopback clients and those whose address is in ``allow`` (addresses or
    CIDR blocks like ``"10.0.0.0/8"``; ValueError for anything else) may call it.
    ``seed_routes`` keeps ``POST /upload_server`` and ``DELETE /delete_server``. ``stats``
    are the proxy's counters for the metrics and the status page (default: fresh, all zero);
    ``checker`` is shown on the status page. A backend removed through the API leaves with
    :meth:`Pool.remove <softlb.pool.Pool.remove>`, whose ``removed`` event tells the proxy to
    close its pooled connections to it.

    A route's work runs under the pool's own locking; the API keeps no lock and no state but
    its start time.
    """

    def __init__(
        self,
        pool: Pool,
        *,
        prefix: str = "/_softlb",
        token: str | None = None,
        seed_routes: bool = True,
        stats: ProxyStats | None = None,
        checker: HealthChecker | None = None,
        state: SharedState | None = None,
        allow: Sequence[str] = (),
    ) -> None:
        if not isinstance(prefix, str) or not prefix.startswith("/") or not prefix.rstrip("/"):
            raise ValueError(f"admin prefix must be a path like '/_softlb', got {prefix!r}")
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("admin token must be a non-empty string, or None for no token")
        self.pool = pool
        self.prefix = prefix.rstrip("/")
        self.seed_routes = seed_routes
        self.stats = stats if stats is not None else ProxyStats()
        self.checker = checker
        #: Where membership changes go first when processes share state; reassigned after a
        #: fork. ``None``: straight to the pool.
        self.state = state
        self._token = token.encode() if token is not None else None
        #: Networks whose clients may call the API without a token (besides loopback).
        self.allow: tuple[_Network, ...] = parse_allow(allow)
        self._metrics = Metrics(
            pool,
            self.stats,
            version=__version__,
            figures=self.figures,
            stale=self._stale,
            snapshot=self.proxy_snapshot,
        )
        self._started = time.monotonic()
        p = self.prefix
        self._routes: dict[str, dict[str, Handler]] = {
            p: {"GET": self._redirect_to_page},
            p + "/": {"GET": self._page},
            p + "/servers": {
                "GET": self._list,
                "POST": self._add,
                "PATCH": self._update,
                "DELETE": self._remove,
            },
            p + "/metrics": {"GET": self._metrics_text},
            p + "/status": {"GET": self._status_json},
            p + "/explain": {"GET": self._explain},
            p + "/health": {"GET": self._health},
        }
        if seed_routes:
            self._routes[SEED_ADD] = {"POST": self._add}
            self._routes[SEED_REMOVE] = {"DELETE": self._remove}

    # -- WSGI ----------------------------------------------------------------------------

    def matches(self, path: str) -> bool:
        """Whether ``path`` (a WSGI ``PATH_INFO``) belongs to the admin API."""
        if path == self.prefix or path.startswith(self.prefix + "/"):
            return True
        return self.seed_routes and path in (SEED_ADD, SEED_REMOVE)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            response = self._dispatch(environ, method)
        except _Refused as exc:
            response = _json_body(exc.status, {"error": exc.message}, exc.headers)
            if exc.close:
                close_after(start_response)
        except Exception:  # never a traceback to the client
            log.exception("admin API failed on %s %s", method, environ.get("PATH_INFO"))
            response = _json_body(
                500, {"error": "the admin API failed on this request; see the balancer's log"}
            )
        headers = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]
        if response.status != 204:  # RFC 9110 §8.6: never a Content-Length on a 204
            headers.append(("Content-Type", response.content_type))
            headers.append(("Content-Length", str(len(response.body))))
        headers.extend(response.headers)
        start_response(f"{response.status} {HTTPStatus(response.status).phrase}", headers)
        if method == "HEAD" or not response.body:
            return []
        return [response.body]

    def _dispatch(self, environ: Environ, method: str) -> _Response:
        self._authorize(environ)
        if method not in _SAFE_METHODS:
            origin = environ.get("HTTP_ORIGIN")
            if origin is not None and not _same_origin(origin, environ):
                raise _Refused(
                    403,
                    f"cross-site request refused: Origin {_echo(origin)} is not the host this "
                    "call was sent to; change the backends from the command line (no Origin "
                    "header) or from a page served by this host",
                )
        path = environ.get("PATH_INFO") or "/"
        handlers = self._routes.get(path)
        if handlers is None:
            raise _Refused(
                404,
                f"there is no admin endpoint {_echo(path)}; the endpoints are "
                + ", ".join(sorted(p for p in self._routes if p != self.prefix)),
            )
        allowed = list(handlers)
        if "GET" in handlers:
            allowed.insert(allowed.index("GET") + 1, "HEAD")
        allow = ", ".join([*allowed, "OPTIONS"])
        if method == "OPTIONS":
            return _Response(204, headers=[("Allow", allow)])
        handler = handlers.get("GET" if method == "HEAD" else method)
        if handler is None:
            raise _Refused(
                405,
                f"method {_echo(method)} is not allowed on {path}; use {allow}",
                [("Allow", allow)],
            )
        return handler(environ)

    # -- authentication ------------------------------------------------------------------

    def _authorize(self, environ: Environ) -> None:
        """Let the call through, or refuse it: 401 without the right token when there is
        one, 403 from a client neither on loopback nor in ``allow`` when there is none."""
        token = self._token
        if token is None:
            if self._allowed(environ):
                return
            client = str(environ.get("REMOTE_ADDR") or "") or "this client"
            raise _Refused(
                403,
                f"the admin API answers only local clients without a token, and {_echo(client)} "
                "is not one; set admin.token (then send it as Authorization: Bearer TOKEN) or "
                "add this address to admin.allow",
            )
        header = environ.get("HTTP_AUTHORIZATION") or ""
        scheme, _, credentials = header.strip().partition(" ")
        scheme = scheme.lower()
        given: bytes | None = None
        if scheme == "bearer":
            try:
                given = credentials.strip().encode("latin-1")  # PEP 3333: header bytes as latin-1
            except UnicodeEncodeError:
                given = None
        elif scheme == "basic":
            given = _basic_password(credentials)
        # Compared whatever was sent, so that the time taken says nothing about the token.
        if hmac.compare_digest(given if given is not None else b"", token) and given is not None:
            return
        if scheme in ("bearer", "basic"):
            message = "the admin token is wrong; send Authorization: Bearer TOKEN"
        else:
            message = (
                "this call needs the admin token; send Authorization: Bearer TOKEN "
                "(or the token as the password of Basic auth)"
            )
        raise _Refused(401, message, [("WWW-Authenticate", _CHALLENGE)])

    def _allowed(self, environ: Environ) -> bool:
        """Whether the client may call without a token: loopback, or inside ``allow``."""
        address = _client_address(environ)
        if address is None:
            return False
        if isinstance(address, str):  # no address at all: a Unix socket
            return True
        if any(address in network for network in _LOOPBACK):
            return True
        return any(address in network for network in self.allow)

    # -- request bodies ------------------------------------------------------------------

    @staticmethod
    def _read_body(environ: Environ) -> bytes:
        """The request body, never more than MAX_BODY + 1 bytes read; 413 beyond MAX_BODY.

        Framing follows the proxy's rules (SPEC §3): a transfer coding other than ``chunked``
        alone gets 501, a bad ``Content-Length`` 400; a bad chunk or a body cut short, 400.
        These close the connection: what follows cannot be trusted to be the next request.
        """
        stream = environ.get("wsgi.input")
        try:
            check_request_framing(environ)
        except BadFraming as exc:
            raise _Refused(exc.status, str(exc), close=True) from None
        length_text = (environ.get("CONTENT_LENGTH") or "").strip()
        if is_chunked_request(environ):
            want = MAX_BODY + 1  # de-chunked by the server: read to its end, within the limit
            length = None
        elif length_text:
            length = int(length_text)  # check_request_framing: plain decimal digits
            if length > MAX_BODY:
                raise _Refused(413, BODY_TOO_LARGE, close=True)
            want = length
        elif environ.get("wsgi.input_terminated"):
            want = MAX_BODY + 1
            length = None
        else:
            return b""  # no Content-Length and not chunked: HTTP says there is no body
        if stream is None or want == 0:
            return b""
        pieces: list[bytes] = []
        got = 0
        while got < want:
            try:
                piece = stream.read(want - got)
            except TimeoutError:  # the socket's timeout: timeouts.client_body (softlb.gthread)
                raise _Refused(408, "the request body paused too long", close=True) from None
            except Exception as exc:  # a bad chunk (gunicorn's ParseException), a reset
                raise _Refused(
                    400, f"the request body could not be read: {_echo(str(exc))}", close=True
                ) from None
            if not piece:
                break
            pieces.append(piece)
            got += len(piece)
        if got > MAX_BODY:
            raise _Refused(413, BODY_TOO_LARGE, close=True)
        if length is not None and got < length:
            raise _Refused(400, "the request body is shorter than its Content-Length", close=True)
        return b"".join(pieces)

    def _read_object(self, environ: Environ, fields: tuple[str, ...]) -> dict[str, Any]:
        """The body as a JSON object holding only ``fields`` (400 for anything else)."""
        if "draining" in fields:
            example = _EXAMPLE_PATCH
        elif "weight" in fields:
            example = _EXAMPLE
        else:
            example = _EXAMPLE_URL
        raw = self._read_body(environ)
        if not raw.strip():
            raise _Refused(400, f"the request body is empty; send a JSON object like {example}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused(
                400, f"the request body is not UTF-8; send a JSON object like {example}"
            ) from None
        try:
            data = json.loads(text, object_pairs_hook=_unique_object, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            why = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
            raise _Refused(400, f"the request body is not JSON ({why}); send {example}") from None
        except (_DuplicateKey, _BadConstant) as exc:
            raise _Refused(400, f"the request body is not acceptable JSON: {exc}") from None
        except (ValueError, RecursionError):  # a number too long to convert, nesting too deep
            raise _Refused(
                400, f"the request body is too complex to be a backend; send {example}"
            ) from None
        if not isinstance(data, dict):
            raise _Refused(
                400,
                f"the request body must be a JSON object like {example}, got {_json_kind(data)}",
            )
        unknown = [key for key in data if key not in fields]
        if unknown:
            names = ", ".join(_echo(key) for key in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise _Refused(
                400,
                f"unknown field{'s' if len(unknown) > 1 else ''} {names}{more}; "
                f"allowed: {', '.join(fields)}",
            )
        if "url" not in data:
            raise _Refused(400, f'the field "url" is missing; send a JSON object like {example}')
        return data

    # -- routes --------------------------------------------------------------------------

    def figures(self) -> list[dict[str, object]]:
        """Every backend as reported: with host-wide counts when processes share state."""
        state = self.state
        if state is not None:
            return state.figures()
        return [b.as_dict() for b in self.pool.backends]

    def proxy_snapshot(self) -> dict[str, object]:
        """The proxy's counters: summed over the host's workers when they share state."""
        state = self.state
        if state is not None:
            return state.proxy_snapshot()
        return self.stats.snapshot()

    def _stale(self) -> bool:
        return self.state is not None and self.state.stale

    def _list(self, environ: Environ) -> _Response:
        return _json_body(200, {"servers": self.figures()})

    def _shared_store(self) -> str | None:
        """The kind of the state's store if several processes share it (sqlite, redis)."""
        state = self.state
        if state is None or state.store.kind == "memory":
            return None
        return state.store.kind

    def _discovered(self, url: str) -> Backend | None:
        """The backend at ``url`` if DNS discovery (a ``resolve`` server) added it: it is this
        process's own, not in the shared store, and the resolver decides its membership."""
        try:
            backend = self.pool.get(url)
        except UnknownBackend:
            return None
        return backend if backend.origin is not None else None

    def _add(self, environ: Environ) -> _Response:
        data = self._read_object(environ, ("url", "weight"))
        try:
            url = normalize_url(data["url"])
            weight = validate_weight(data.get("weight", 1))
            discovered = self._discovered(url)
            if discovered is not None:
                raise BackendExists(
                    f"backend {url} is already present, discovered from {discovered.origin}"
                )
            state = self.state
            backend = state.add(url, weight) if state is not None else self.pool.add(url, weight)
        except InvalidBackend as exc:
            raise _Refused(400, str(exc)) from None
        except BackendExists as exc:
            raise _Refused(409, str(exc)) from None
        except StoreUnavailable as exc:
            raise _Refused(503, f"state store unavailable, nothing changed: {exc}") from None
        # The change itself is logged once, by the event log (softlb.logs); this says who.
        log.debug("backend %s added by %s", url, environ.get("REMOTE_ADDR", "?"))
        return _json_body(201, backend.as_dict())

    def _update(self, environ: Environ) -> _Response:
        """``PATCH {prefix}/servers``: change a backend's weight and/or draining flag in
        place (its counters stay); everything is checked before anything changes."""
        data = self._read_object(environ, ("url", "weight", "draining"))
        weight: int | None = None
        draining: bool | None = None
        try:
            url = normalize_url(data["url"])
            if "weight" in data:
                weight = validate_weight(data["weight"])
        except InvalidBackend as exc:
            raise _Refused(400, str(exc)) from None
        if "draining" in data:
            value = data["draining"]
            if not isinstance(value, bool):
                raise _Refused(400, f'"draining" must be true or false, got {_json_kind(value)}')
            draining = value
        if weight is None and draining is None:
            raise _Refused(
                400,
                f'nothing to change: give "weight", "draining" or both; send {_EXAMPLE_PATCH}',
            )
        try:
            state = self.state
            discovered = self._discovered(url)
            shared = self._shared_store()
            if discovered is not None and shared is not None:
                raise _Refused(
                    409,
                    f"{url} was discovered from {discovered.origin} by each process on its "
                    f"own, and state {shared} is shared by several: a change here "
                    f"would reach one process only; change the server in the config instead",
                )
            if state is not None and discovered is None:
                backend = state.update(url, weight=weight, draining=draining)
            else:  # this process's own backend (no shared state, or discovered here)
                backend = self.pool.get(url)
                if weight is not None:
                    self.pool.set_weight(backend, weight)
                if draining is not None:
                    self.pool.drain(backend, draining)
        except UnknownBackend as exc:
            raise _Refused(404, str(exc)) from None
        except InvalidBackend as exc:
            raise _Refused(400, str(exc)) from None
        except StoreUnavailable as exc:
            raise _Refused(503, f"state store unavailable, nothing changed: {exc}") from None
        changes = []
        if weight is not None:
            changes.append(f"weight {weight}")
        if draining is not None:
            changes.append("draining" if draining else "not draining")
        log.info(
            "backend %s set to %s by %s",
            backend.url,
            ", ".join(changes),
            environ.get("REMOTE_ADDR", "?"),
        )
        entry = next((f for f in self.figures() if f.get("url") == backend.url), None)
        return _json_body(200, entry if entry is not None else backend.as_dict())

    def _remove(self, environ: Environ) -> _Response:
        data = self._read_object(environ, ("url",))
        try:
            url = normalize_url(data["url"])
            discovered = self._discovered(url)
            state = self.state
            if discovered is not None:
                instead = (
                    "change the server in the config, or its DNS records"
                    if self._shared_store() is not None
                    else f'drain it with PATCH {{"url": "{url}", "draining": true}}'
                )
                raise _Refused(
                    409,
                    f"{url} was discovered from {discovered.origin} (resolve) and follows DNS: "
                    f"the next lookup would add it again; {instead} instead",
                )
            backend = state.remove(url) if state is not None else self.pool.remove(url)
        except InvalidBackend as exc:
            raise _Refused(400, str(exc)) from None
        except UnknownBackend as exc:
            raise _Refused(404, str(exc)) from None
        except StoreUnavailable as exc:
            raise _Refused(503, f"state store unavailable, nothing changed: {exc}") from None
        log.debug("backend %s removed by %s", backend.url, environ.get("REMOTE_ADDR", "?"))
        return _json_body(200, backend.as_dict())

    def _metrics_text(self, environ: Environ) -> _Response:
        body, content_type = self._metrics.render(environ.get("HTTP_ACCEPT"))
        return _Response(200, body, content_type)

    def _health(self, environ: Environ) -> _Response:
        return _json_body(200, {"status": "ok"})

    def status(self) -> dict[str, object]:
        """What the status page shows, as served by ``GET {prefix}/status``."""
        snap = self.proxy_snapshot()
        errors = snap["errors_by_status"]
        assert isinstance(errors, Mapping)
        checker = self.checker
        health: dict[str, object] | None = None
        if checker is not None:
            health = {
                "path": checker.path,
                "interval": checker.interval,
                "timeout": checker.timeout,
                "rise": checker.rise,
                "fall": checker.fall,
                "running": checker.running,
            }
        return {
            "version": __version__,
            "pid": os.getpid(),  # which worker answered, when several serve one port
            "algorithm": self.pool.balancer.name,
            "uptime_seconds": round(time.monotonic() - self._started, 3),
            "health_check": health,
            "proxy": {
                "requests": snap["requests"],
                "retries": snap["retries"],
                "errors": {str(status): count for status, count in sorted(errors.items())},
            },
            "state": self._state_status(),
            "time": round(time.time(), 3),  # the page shows ages relative to this clock
            "queue": self.pool.queue_stats().as_dict(),
            "servers": self._status_servers(),
            "explain": self.pool.explain(limit=STATUS_CANDIDATES).as_dict(),
        }

    def _status_servers(self) -> list[dict[str, object]]:
        """:meth:`figures` with what the status page shows besides: the latency (peak-EWMA,
        and the median times to first and last byte from this worker's histograms), the
        answers by status class, and the health checker's last probe and "down since"."""
        members = {b.url: b for b in self.pool.backends}
        answers = self.stats.backend_snapshot()
        checker = self.checker
        out: list[dict[str, object]] = []
        for figure in self.figures():
            entry = dict(figure)
            url = str(entry.get("url", ""))
            backend = members.get(url)
            mine = answers.get(url) or BackendFigures()
            latency = backend.latency if backend is not None else None
            entry["latency_seconds"] = None if latency is None else round(latency, 6)
            p50 = histogram_quantile(0.5, mine.first_byte)
            entry["first_byte_p50"] = None if p50 is None else round(p50, 6)
            p50 = histogram_quantile(0.5, mine.last_byte)
            entry["last_byte_p50"] = None if p50 is None else round(p50, 6)
            entry["responses"] = {
                kind: count
                for kind, count in zip(STATUS_CLASSES, mine.responses, strict=True)
                if count or kind != "1xx"
            }
            report = (
                checker.report(backend) if checker is not None and backend is not None else None
            )
            entry["health"] = report.as_dict() if report is not None else None
            out.append(entry)
        return out

    def _state_status(self) -> dict[str, object]:
        state = self.state
        if state is None:
            return {"store": "memory", "stale": False}
        return {
            "store": state.store.kind,
            "stale": state.stale,
            "error": state.last_error,
            "prober": state.checker.active if state.checker is not None else None,
        }

    def _explain(self, environ: Environ) -> _Response:
        """``GET {prefix}/explain[?key=K][&limit=N]``: :meth:`Pool.explain` as JSON.

        ``key`` is the request key the hashing strategies would hash (a client address, a
        path, a header or cookie value, as ``hash_key`` says); ``limit`` caps the candidates.
        This process's view: its pool, with every worker's requests in flight counted.
        """
        query = environ.get("QUERY_STRING") or ""
        try:
            pairs = urllib.parse.parse_qsl(
                query, keep_blank_values=True, strict_parsing=False, max_num_fields=8
            )
        except ValueError:
            raise _Refused(400, "too many query parameters; use key= and limit=") from None
        params: dict[str, str] = {}
        for name, value in pairs:
            if name not in _EXPLAIN_PARAMS:
                raise _Refused(
                    400,
                    f"unknown query parameter {_echo(name)}; allowed: "
                    + ", ".join(_EXPLAIN_PARAMS),
                )
            if name in params:
                raise _Refused(400, f"query parameter {_echo(name)} is given twice")
            params[name] = value
        limit: int | None = None
        if "limit" in params:
            text = params["limit"]
            if not (text.isascii() and text.isdigit() and len(text) <= 9 and int(text) >= 1):
                raise _Refused(
                    400, f"limit must be a whole number from 1 to 999999999, got {_echo(text)}"
                )
            limit = int(text)
        # An empty key is no key, as for the proxy (LoadBalancer.request_key).
        explanation = self.pool.explain(params.get("key") or None, limit=limit)
        return _json_body(200, explanation.as_dict())

    def _status_json(self, environ: Environ) -> _Response:
        return _json_body(200, self.status())

    def _page(self, environ: Environ) -> _Response:
        nonce = secrets.token_urlsafe(16)
        page = render_status_page(self.status(), prefix=self.prefix, nonce=nonce)
        return _Response(
            200,
            page.encode(),
            "text/html; charset=utf-8",
            [
                ("Content-Security-Policy", _PAGE_CSP.format(nonce=nonce)),
                ("Referrer-Policy", "no-referrer"),
                ("X-Frame-Options", "DENY"),
            ],
        )

    def _redirect_to_page(self, environ: Environ) -> _Response:
        location = (environ.get("SCRIPT_NAME") or "") + self.prefix + "/"
        query = environ.get("QUERY_STRING")
        if query:
            location += "?" + query
        return _json_body(308, {"location": location}, [("Location", location)])

    def __repr__(self) -> str:
        if self._token is not None:
            auth = "token"
        elif self.allow:
            auth = "no token, loopback and " + ", ".join(str(n) for n in self.allow)
        else:
            auth = "no token, loopback only"
        seed = ", seed routes" if self.seed_routes else ""
        return f"<AdminApi {self.prefix} {auth}{seed} over {self.pool!r}>"
