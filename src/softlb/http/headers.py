"""Pure header rules of the proxy: what goes to the backend and what comes back to the client.

No I/O and no third-party import: these functions take a WSGI environ or a list of header
pairs and return new values, so every rule is testable on plain dicts (SPEC §3).

* :func:`request_target` -- the path and query to send upstream, byte for byte as the client
  sent them.
* :func:`upstream_request_headers` -- the client's headers minus the hop-by-hop ones, plus
  ``X-Forwarded-For`` / ``-Proto`` / ``-Host``.
* :func:`downstream_response_headers` -- the backend's headers minus the hop-by-hop ones.

Hop-by-hop headers are one list, :data:`HOP_BY_HOP`, plus whatever the ``Connection`` header
names, dropped in both directions (the shape of Go's ``net/http/httputil/reverseproxy.go``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final
from urllib.parse import quote

__all__ = [
    "HOP_BY_HOP",
    "HOST_PATTERN",
    "MAX_CONTENT_LENGTH",
    "PLAIN_HTTP_TO_TLS",
    "BadFraming",
    "check_request_framing",
    "close_after",
    "connection_tokens",
    "downstream_response_headers",
    "is_chunked_request",
    "is_plain_http_start",
    "request_target",
    "upstream_request_headers",
]

#: The answer to plain HTTP sent to a TLS listener, in plain text (nginx: "The plain HTTP
#: request was sent to HTTPS port"), before the connection is closed.
_PLAIN_TO_TLS_BODY: Final = b"400 Bad Request: plain HTTP was sent to an HTTPS port\n"
PLAIN_HTTP_TO_TLS: Final[bytes] = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n%b"
    % (len(_PLAIN_TO_TLS_BODY), _PLAIN_TO_TLS_BODY)
)


def is_plain_http_start(first: bytes) -> bool:
    """Whether a connection's first byte starts plain HTTP rather than TLS: a method's first
    letter, or the empty line RFC 9112 §2.2 lets come before a request (a TLS record starts
    with 0x16)."""
    return len(first) == 1 and (first.isalpha() or first in b"\r\n")


#: Headers that describe one connection, not the message, lower-cased: never forwarded in
#: either direction (RFC 9110 §7.6.1, RFC 9112 §9.6, and the RFC 2616 §13.5.1 list).
HOP_BY_HOP: Final[frozenset[str]] = frozenset(
    {
        "connection",
        "keep-alive",  # RFC 2068; not in RFC 9110's grammar but still sent by HTTP/1.0 peers
        "proxy-connection",  # non-standard, but still sent by libcurl and old browsers
        "te",  # the backend gets our own TE (none), not the client's
        "transfer-encoding",  # framing is per hop: we re-frame the body on each side
        "upgrade",  # no protocol switching through the proxy (WSGI cannot hand over a socket)
        "proxy-authorization",  # credentials meant for us, not for the backend (RFC 9110 §11.7.2)
        "proxy-authenticate",  # a challenge from a proxy behind us, not for the client
        "trailer",  # RFC 9110 §6.6.2; we forward no trailers, so announcing them would lie
        # RFC 2616 §13.5.1 spelled it "Trailers", a typo (erratum 4522); Go dropped "Trailers"
        # for "Trailer" in 1.10, but dropping the misspelling too costs nothing.
        "trailers",
    }
)


def connection_tokens(values: Iterable[str]) -> frozenset[str]:
    """Return the lower-cased header names listed in one or more ``Connection`` values."""
    tokens: set[str] = set()
    for value in values:
        for part in value.split(","):
            token = part.strip(" \t").lower()
            if token:
                tokens.add(token)
    return frozenset(tokens)


#: :data:`HOP_BY_HOP` as bytes, for the event loop, which reads heads as bytes.
HOP_BY_HOP_BYTES: Final[frozenset[bytes]] = frozenset(name.encode() for name in HOP_BY_HOP)

#: ``Connection`` values as sent -> :func:`connection_token_bytes`: peers send few distinct ones.
_token_cache: dict[bytes, frozenset[bytes]] = {}


def connection_token_bytes(values: list[bytes]) -> frozenset[bytes]:
    """:func:`connection_tokens` of raw (bytes) ``Connection`` values, as bytes; the last
    256 distinct values are remembered, so the usual ``keep-alive`` costs a lookup."""
    key = values[0] if len(values) == 1 else b"\n".join(values)
    tokens = _token_cache.get(key)
    if tokens is None:
        text = connection_tokens(value.decode("latin-1") for value in values)
        tokens = frozenset(token.encode("latin-1") for token in text)
        if len(_token_cache) >= 256:
            _token_cache.clear()
        _token_cache[key] = tokens
    return tokens


# --------------------------------------------------------------------------- request target

#: Characters left as they are when re-quoting a decoded path: RFC 3986 ``pchar`` (sub-delims,
#: ":" and "@") plus "/". quote() always keeps letters, digits and "_.-~". "%" is NOT here:
#: a "%" in a decoded PATH_INFO came from "%25", so it must be escaped again to round-trip.
_PATH_SAFE: Final = "/:@!$&'()*+,;="

#: Every printable ASCII character except the space: used to escape only what cannot go on
#: the wire (controls, space, bytes >= 0x80) while keeping existing %XX escapes as they are.
_WIRE_SAFE: Final = "".join(chr(c) for c in range(0x21, 0x7F))


def _wire_safe(text: str) -> str:
    """Return ``text`` with every byte that is not printable ASCII percent-encoded.

    WSGI strings carry bytes as latin-1 characters. gunicorn refuses such request targets,
    but other servers pass them through, and http.client can only send ASCII.
    """
    if text.isascii() and text.isprintable() and " " not in text:
        return text
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:  # a server that decoded the target as UTF-8 (not PEP 3333)
        raw = text.encode("utf-8", "surrogateescape")
    return quote(raw, safe=_WIRE_SAFE)


def _requote_path(path: str) -> str:
    """Percent-encode a decoded (PEP 3333, latin-1) path so that decoding it gives it back."""
    try:
        raw = path.encode("latin-1")
    except UnicodeEncodeError:  # a server that decoded the path as UTF-8 (not PEP 3333)
        raw = path.encode("utf-8", "surrogateescape")
    return quote(raw, safe=_PATH_SAFE)


def _is_scheme(text: str) -> bool:
    """Return True if ``text`` (ASCII, non-empty) matches RFC 3986 ``scheme``."""
    return text.replace("+", "").replace("-", "").replace(".", "").isalnum()


def _origin_form(raw: str, method: str) -> str | None:
    """Turn a raw request target into origin-form, or return None if it is not usable."""
    hash_at = raw.find("#")  # a fragment is not part of a request target (RFC 9112 §3.2)
    if hash_at >= 0:
        raw = raw[:hash_at]
    if raw[:1] == "/":
        return raw
    if raw == "*":  # asterisk-form is only meaningful for OPTIONS (RFC 9112 §3.2.4)
        return "*" if method == "OPTIONS" else "/"
    sep = raw.find("://")
    scheme = raw[:sep]
    if sep <= 0 or not (scheme.isascii() and scheme[0].isalpha() and _is_scheme(scheme)):
        return None  # authority-form (CONNECT) or garbage: rebuild from PATH_INFO instead
    rest = raw[sep + 3 :]
    start = len(rest)
    for delimiter in "/?":
        found = rest.find(delimiter)
        if 0 <= found < start:
            start = found
    target = rest[start:]
    if not target or target[0] == "?":  # "http://host" / "http://host?q": the path is empty
        if not target and method == "OPTIONS":
            return "*"  # RFC 9112 §3.2.4: OPTIONS for the whole server
        return "/" + target
    return target


def request_target(environ: Mapping[str, Any]) -> str:
    """Return the path and query to send upstream, exactly as the client sent them.

    The raw target from ``RAW_URI`` (gunicorn) or ``REQUEST_URI`` (uWSGI, werkzeug) is used
    as is, so escapes such as ``%2F`` survive; an absolute-form target loses its scheme and
    authority. Without a raw target, ``SCRIPT_NAME + PATH_INFO`` is re-quoted (``%2F`` then
    comes out as ``/``: the WSGI server already decoded it) and ``QUERY_STRING`` appended.
    """
    method = environ.get("REQUEST_METHOD", "GET")
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        target = _origin_form(raw, method)
        if target is not None:
            return _wire_safe(target)
    path = _requote_path(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""))
    if not path.startswith("/"):
        path = "/" + path
    query = environ.get("QUERY_STRING")
    if query:
        return f"{path}?{_wire_safe(query)}"
    return path


# ------------------------------------------------------------------------- request headers

#: Header names whose conventional spelling is not what str.title() gives.
_ODD_NAMES: Final = (
    "Content-MD5",
    "DNT",
    "ETag",
    "Sec-WebSocket-Accept",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Version",
    "TE",
    "WWW-Authenticate",
    "X-XSS-Protection",
)

#: Headers every request is likely to carry, spelled out so the common case is one lookup.
_COMMON_NAMES: Final = (
    "Accept",
    "Accept-Encoding",
    "Accept-Language",
    "Authorization",
    "Cache-Control",
    "Content-Length",
    "Content-Type",
    "Cookie",
    "Forwarded",
    "Host",
    "Idempotency-Key",
    "If-Match",
    "If-Modified-Since",
    "If-None-Match",
    "Origin",
    "Pragma",
    "Range",
    "Referer",
    "User-Agent",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "X-Real-IP",
    "X-Request-ID",
)


def _environ_key(name: str) -> str:
    return "HTTP_" + name.upper().replace("-", "_")


#: Header name of each environ key; CONTENT_TYPE / CONTENT_LENGTH are the CGI spellings.
#: Filled on demand with the names seen in traffic, up to _MAX_CACHED_NAMES entries.
_NAMES: dict[str, str] = {
    "CONTENT_TYPE": "Content-Type",
    "CONTENT_LENGTH": "Content-Length",
    **{_environ_key(name): name for name in _COMMON_NAMES + _ODD_NAMES},
}

#: Cap on _NAMES, so that a client inventing header names cannot grow it without bound.
_MAX_CACHED_NAMES: Final = 1024

#: Environ keys never copied by the loop: hop-by-hop headers, and the X-Forwarded-* ones,
#: which are computed after it.
_SKIPPED_KEYS: Final = frozenset(
    {_environ_key(name) for name in HOP_BY_HOP}
    | {"HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_HOST"}
)

#: Environ keys a Connection header cannot remove: they carry routing and framing, which Go
#: keeps outside the header map (Request.Host, Request.ContentLength) for the same reason.
_UNREMOVABLE_KEYS: Final = frozenset({"HTTP_HOST", "CONTENT_LENGTH", "HTTP_CONTENT_LENGTH"})

#: For each Connection value seen: the environ keys the loop skips (_SKIPPED_KEYS plus the
#: headers the value names) and whether it names X-Forwarded-For. Bounded like _NAMES.
_CONNECTION_RULES: dict[str, tuple[frozenset[str], bool]] = {}

_CONTENT_LENGTH_KEYS: Final = frozenset({"CONTENT_LENGTH", "HTTP_CONTENT_LENGTH"})
_CGI_KEYS: Final = frozenset({"CONTENT_TYPE", "CONTENT_LENGTH"})


def _header_name(key: str) -> str:
    """Return the Title-Case header name of an ``HTTP_*`` environ key, caching it."""
    name = key[5:].replace("_", "-").title()
    if len(_NAMES) < _MAX_CACHED_NAMES:
        _NAMES[key] = name
    return name


def _connection_rule(value: str) -> tuple[frozenset[str], bool]:
    """Return (environ keys to skip, names X-Forwarded-For?) for a Connection ``value``.

    Host and Content-Length cannot be named away; naming Content-Type drops the CGI key too.
    """
    rule = _CONNECTION_RULES.get(value)
    if rule is None:
        named: set[str] = set()
        for token in connection_tokens((value,)):
            key = _environ_key(token)
            if key in _UNREMOVABLE_KEYS:
                continue
            named.add(key)
            if key == "HTTP_CONTENT_TYPE":
                named.add("CONTENT_TYPE")
        rule = (_SKIPPED_KEYS | named, "HTTP_X_FORWARDED_FOR" in named)
        if len(_CONNECTION_RULES) < _MAX_CACHED_NAMES:
            _CONNECTION_RULES[value] = rule
    return rule


def _server_host(environ: Mapping[str, Any]) -> str:
    """Return ``SERVER_NAME[:SERVER_PORT]``, without the scheme's default port (PEP 3333)."""
    host = str(environ.get("SERVER_NAME", ""))
    port = str(environ.get("SERVER_PORT", ""))
    scheme = environ.get("wsgi.url_scheme", "http")
    if port and (port, scheme) not in (("80", "http"), ("443", "https")):
        return f"{host}:{port}"
    return host


def upstream_request_headers(environ: Mapping[str, Any]) -> dict[str, str]:
    """Return the headers to send to the backend for the request described by ``environ``.

    Every ``HTTP_*`` key becomes a Title-Case header, plus ``Content-Type`` and
    ``Content-Length`` when non-empty; hop-by-hop headers and those named in ``Connection``
    are dropped (``Host`` and ``Content-Length`` are kept whatever Connection says), and a
    chunked request loses ``Content-Length`` (the body is re-framed). ``Host`` is the
    client's. ``X-Forwarded-For`` gets ``REMOTE_ADDR`` appended; ``X-Forwarded-Proto`` and
    ``X-Forwarded-Host`` replace whatever the client sent. ``Forwarded`` is left alone.
    """
    connection = environ.get("HTTP_CONNECTION")
    if connection:
        skipped, drop_forwarded_for = _connection_rule(connection)
    else:
        skipped, drop_forwarded_for = _SKIPPED_KEYS, False
    if "HTTP_TRANSFER_ENCODING" in environ and is_chunked_request(environ):
        skipped = skipped | _CONTENT_LENGTH_KEYS

    names = _NAMES
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if key in skipped:
            continue
        name = names.get(key)
        if name is None:
            if not key.startswith("HTTP_"):
                continue
            name = _header_name(key)
        elif not value and key in _CGI_KEYS:
            continue
        headers[name] = value

    forwarded_for = None if drop_forwarded_for else environ.get("HTTP_X_FORWARDED_FOR")
    remote = environ.get("REMOTE_ADDR")
    if remote:
        forwarded_for = f"{forwarded_for}, {remote}" if forwarded_for else remote
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    headers["X-Forwarded-Proto"] = environ.get("wsgi.url_scheme", "http")
    forwarded_host = environ.get("HTTP_HOST") or _server_host(environ)
    if forwarded_host:
        headers["X-Forwarded-Host"] = forwarded_host
    return headers


def is_chunked_request(environ: Mapping[str, Any]) -> bool:
    """Return True if the request body is sent with ``Transfer-Encoding: chunked``."""
    value = environ.get("HTTP_TRANSFER_ENCODING")
    if not value:
        return False
    return "chunked" in connection_tokens((value,))


#: A request's Content-Length must be below this (2^63, as nginx and Go): larger values
#: overflow a backend's signed 64-bit length and could make it see a different request.
MAX_CONTENT_LENGTH: Final = 2**63


class BadFraming(ValueError):
    """A request the proxy refuses before any byte of it reaches a backend: the client's
    fault, never the backend's. ``status`` is the answer: 400 (malformed) or 501 (a
    transfer coding the proxy does not speak)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


#: A valid ``Host`` field value (RFC 9112 §3.2, RFC 3986 §3.2.2): ``uri-host [":" port]``,
#: the host an IP literal in brackets, or a name of unreserved, sub-delim and %-encoded
#: characters (empty is allowed). A request with anything else gets 400 (RFC 9112 §3.2:
#: "MUST respond with a 400"), as nginx answers it.
HOST_PATTERN: Final = (
    r"(?:\[[0-9A-Fa-f:.]+(?:%25[A-Za-z0-9._~-]+)?\]"  # an IP literal, maybe with a zone
    r"|[A-Za-z0-9._~!$&'()*+,;=%\x80-\xff-]*)"  # a reg-name (raw UTF-8 too, as nginx)
    r"(?::[0-9]*)?"
)
_HOST_VALUE: Final = re.compile(HOST_PATTERN)


def close_after(start_response: Callable[..., object]) -> None:
    """Ask the WSGI server to close the connection after this answer, where it can: for a
    request whose framing cannot be trusted, the rest of what the client sent is not the
    next request. gunicorn ignores a ``Connection`` header from the app (PEP 3333 forbids
    hop-by-hop headers there), but its ``Response``, the object ``start_response`` is bound
    to, has ``force_close()``; other servers are left to their own rules."""
    force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
    if callable(force_close):
        force_close()


def check_request_framing(environ: Mapping[str, Any]) -> int | None:
    """Return the request body's length (0 without a body), or ``None`` for a chunked body;
    raise :class:`BadFraming` for a request that must not be forwarded (SPEC §3).

    * ``Transfer-Encoding`` other than ``chunked`` alone (``gzip, chunked``, ``identity``):
      501, since the proxy would forward a body whose coding it dropped; in HTTP/1.0: 400
      (RFC 9112 §6.1, a request-smuggling pattern);
    * ``Content-Length`` that is not a plain ASCII decimal below :data:`MAX_CONTENT_LENGTH`
      (signs, spaces inside, lists such as ``5, 6``, other scripts' digits): 400;
    * an HTTP/1.1 request without ``Host``, or a ``Host`` that is no ``host[:port]``: 400
      (RFC 9112 §3.2).
    """
    if environ.get("SERVER_PROTOCOL") == "HTTP/1.1" and "HTTP_HOST" not in environ:
        raise BadFraming(400, "an HTTP/1.1 request needs a Host header")
    host = environ.get("HTTP_HOST")
    if host is not None and _HOST_VALUE.fullmatch(str(host).strip(" \t")) is None:
        raise BadFraming(400, "the Host header is not a valid host[:port]")
    coding = environ.get("HTTP_TRANSFER_ENCODING")
    if coding is not None:
        codings = [part.strip(" \t").lower() for part in str(coding).split(",")]
        if codings != ["chunked"]:
            raise BadFraming(501, f"Transfer-Encoding {str(coding)[:40]!r} is not supported")
        if environ.get("SERVER_PROTOCOL") == "HTTP/1.0":
            raise BadFraming(400, "Transfer-Encoding in an HTTP/1.0 request")
        # A Content-Length next to it is not checked here: gunicorn refuses that pair with a
        # 400 before the app runs, and some servers (and werkzeug's test client) put the
        # de-chunked body's length in CONTENT_LENGTH. The chunked framing wins either way.
        return None
    length_text = str(environ.get("CONTENT_LENGTH") or "").strip(" \t")
    if not length_text:
        return 0
    if not (length_text.isascii() and length_text.isdigit()) or len(length_text) > 19:
        raise BadFraming(400, f"bad Content-Length {length_text[:40]!r}")
    length = int(length_text)
    if length >= MAX_CONTENT_LENGTH:
        raise BadFraming(400, f"Content-Length {length_text[:40]} is too large")
    return length


# ------------------------------------------------------------------------ response headers


def downstream_response_headers(items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Return the backend's response headers minus the hop-by-hop ones, for start_response.

    Headers named in the response's ``Connection`` header(s) are dropped too. Repeated headers
    (several ``Set-Cookie``) stay separate items, in order; values are not touched.
    """
    pairs = items if isinstance(items, list) else list(items)
    connection = [value for name, value in pairs if name.lower() == "connection"]
    dropped = HOP_BY_HOP | connection_tokens(connection) if connection else HOP_BY_HOP
    return [(name, value) for name, value in pairs if name.lower() not in dropped]
