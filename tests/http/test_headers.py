"""Tests for softlb.http.headers: the pure header and request-target rules (SPEC §3)."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_to_bytes

import pytest

from softlb.http import headers
from softlb.http.headers import (
    HOP_BY_HOP,
    connection_tokens,
    downstream_response_headers,
    is_chunked_request,
    is_plain_http_start,
    request_target,
    upstream_request_headers,
)


def environ(**extra: Any) -> dict[str, Any]:
    """Return a gunicorn-like environ for ``GET /`` from 10.0.0.9, updated with ``extra``."""
    base: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/",
        "QUERY_STRING": "",
        "RAW_URI": "/",
        "SERVER_NAME": "lb.example",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "10.0.0.9",
        "REMOTE_PORT": "51515",
        "wsgi.url_scheme": "http",
        "wsgi.input": None,
        "wsgi.errors": None,
        "wsgi.version": (1, 0),
        "wsgi.multithread": True,
        "HTTP_HOST": "lb.example:8080",
    }
    base.update(extra)
    return base


def names(result: dict[str, str]) -> set[str]:
    return {name.lower() for name in result}


def test_all_is_pinned() -> None:
    """The public names the proxy imports stay exported."""
    assert sorted(headers.__all__) == [
        "BadFraming",
        "HOP_BY_HOP",
        "HOST_PATTERN",
        "MAX_CONTENT_LENGTH",
        "PLAIN_HTTP_TO_TLS",
        "check_request_framing",
        "close_after",
        "connection_tokens",
        "downstream_response_headers",
        "is_chunked_request",
        "is_plain_http_start",
        "request_target",
        "upstream_request_headers",
    ]


@pytest.mark.parametrize(
    ("first", "plain"),
    [(b"G", True), (b"p", True), (b"\r", True), (b"\n", True), (b"\x16", False),
     (b"\x80", False), (b"", False), (b"GE", False)],
)  # fmt: skip
def test_is_plain_http_start(first: bytes, plain: bool) -> None:
    """A TLS record starts with 0x16; a request with a method's letter or an empty line."""
    assert is_plain_http_start(first) is plain


def test_hop_by_hop_list() -> None:
    """HOP_BY_HOP holds the RFC 9110/2616 list, lower-cased, plus the "trailers" misspelling."""
    assert {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "trailer",
        "trailers",
    } == HOP_BY_HOP
    assert all(name == name.lower() for name in HOP_BY_HOP)


# ------------------------------------------------------------------------- connection_tokens


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], set()),
        ([""], set()),
        (["close"], {"close"}),
        (["Keep-Alive, X-Private"], {"keep-alive", "x-private"}),
        (["  keep-alive ,\tUpgrade,,  "], {"keep-alive", "upgrade"}),
        (["X-A", "x-b, X-C"], {"x-a", "x-b", "x-c"}),
    ],
)
def test_connection_tokens(values: list[str], expected: set[str]) -> None:
    """Connection values are split on commas, trimmed, lower-cased, empties dropped."""
    assert connection_tokens(values) == frozenset(expected)


# ---------------------------------------------------------------------------- request_target


@pytest.mark.parametrize(
    "raw",
    [
        "/",
        "/a%2Fb/%7Euser?q=a%20b&x=1&x=2",
        "/a%2fb",  # lower-case escapes stay lower-case
        "//double//slashes/",
        "/path;params=1/x",
        "/~user/a+b?q=a+b&empty=&flag",
        "/%E2%82%AC?euro=%E2%82%AC",
        "/?",
        "/p?q=%3F%23%26",
        "/p?q=a/b?c",
    ],
)
@pytest.mark.parametrize("key", ["RAW_URI", "REQUEST_URI"])
def test_request_target_raw_is_byte_exact(key: str, raw: str) -> None:
    """RAW_URI (gunicorn) and REQUEST_URI (uWSGI, werkzeug) are forwarded byte for byte."""
    env = environ(PATH_INFO="/decoded/differently", QUERY_STRING="other")
    del env["RAW_URI"]
    env[key] = raw
    assert request_target(env) == raw


def test_request_target_prefers_raw_uri_to_request_uri() -> None:
    """When both are present, gunicorn's RAW_URI wins."""
    assert request_target(environ(RAW_URI="/raw", REQUEST_URI="/req")) == "/raw"


@pytest.mark.parametrize(
    ("raw", "method", "expected"),
    [
        ("http://example.com/a%2Fb?q=1", "GET", "/a%2Fb?q=1"),
        ("https://user:pw@example.com:8443/p/", "GET", "/p/"),
        ("HTTP://EXAMPLE.COM/X", "GET", "/X"),
        ("http://[::1]:8080/v6?x", "GET", "/v6?x"),
        ("http://example.com", "GET", "/"),
        ("http://example.com?q=1", "GET", "/?q=1"),
        ("http://example.com", "OPTIONS", "*"),
        ("http://example.com/", "OPTIONS", "/"),
        ("http://example.com/p#frag", "GET", "/p"),
    ],
)
def test_request_target_absolute_form(raw: str, method: str, expected: str) -> None:
    """An absolute-form target loses its scheme and authority (RFC 9112 §3.2.2)."""
    assert request_target(environ(RAW_URI=raw, REQUEST_METHOD=method)) == expected


@pytest.mark.parametrize(("method", "expected"), [("OPTIONS", "*"), ("GET", "/"), ("POST", "/")])
def test_request_target_asterisk(method: str, expected: str) -> None:
    """ "*" stays "*" for OPTIONS only; any other method gets "/"."""
    assert request_target(environ(RAW_URI="*", REQUEST_METHOD=method)) == expected


def test_request_target_drops_fragment() -> None:
    """A fragment is not part of a request target and is not forwarded."""
    assert request_target(environ(RAW_URI="/p?q=1#frag")) == "/p?q=1"


def test_request_target_escapes_bytes_that_cannot_go_on_the_wire() -> None:
    """Raw non-ASCII bytes (latin-1 in WSGI) are percent-encoded; existing escapes are kept."""
    raw = "/caf\xc3\xa9/%2F?q=\xe9 x"  # the UTF-8 bytes of "café", as a WSGI string
    assert request_target(environ(RAW_URI=raw)) == "/caf%C3%A9/%2F?q=%E9%20x"


@pytest.mark.parametrize("raw", ["example.com:443", "garbage", "1http://x/"])
def test_request_target_unusable_raw_falls_back(raw: str) -> None:
    """An authority-form or malformed raw target is rebuilt from PATH_INFO and QUERY_STRING."""
    env = environ(RAW_URI=raw, PATH_INFO="/from/path", QUERY_STRING="a=1")
    assert request_target(env) == "/from/path?a=1"


def wsgi_path(raw: bytes) -> str:
    """Return the PATH_INFO a PEP 3333 server makes of the raw path ``raw``."""
    return unquote_to_bytes(raw).decode("latin-1")


@pytest.mark.parametrize(
    ("raw_path", "expected"),
    [
        (b"/", "/"),
        (b"/plain/path", "/plain/path"),
        (b"/a%20b", "/a%20b"),
        (b"/a%2Fb", "/a/b"),  # the server decoded %2F: it cannot be told from "/" any more
        (b"/100%25", "/100%25"),
        (b"/%3F%23", "/%3F%23"),  # "?" and "#" in a path must stay escaped
        (b"/~user/a+b;c=d:e@f!$&'()*,=", "/~user/a+b;c=d:e@f!$&'()*,="),
        (b"/caf%C3%A9", "/caf%C3%A9"),  # non-ASCII, UTF-8 encoded
        (b"/%E9t%E9", "/%E9t%E9"),  # non-ASCII, latin-1 encoded
        (b"/%00%0A%7F", "/%00%0A%7F"),  # control characters
        (b'/"<>\\^`{|}', "/%22%3C%3E%5C%5E%60%7B%7C%7D"),
    ],
)
def test_request_target_fallback_requotes_path(raw_path: bytes, expected: str) -> None:
    """Without a raw URI, PATH_INFO is re-quoted so that decoding it gives the same bytes."""
    env = environ(PATH_INFO=wsgi_path(raw_path))
    del env["RAW_URI"]
    target = request_target(env)
    assert target == expected
    assert unquote_to_bytes(target) == unquote_to_bytes(raw_path)


def test_request_target_fallback_script_name_and_query() -> None:
    """The fallback is SCRIPT_NAME + PATH_INFO, then "?" + QUERY_STRING as the client sent it."""
    env = environ(SCRIPT_NAME="/app", PATH_INFO="/x y", QUERY_STRING="q=a%20b&x=1&x=2")
    del env["RAW_URI"]
    assert request_target(env) == "/app/x%20y?q=a%20b&x=1&x=2"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"PATH_INFO": "", "SCRIPT_NAME": ""}, "/"),
        ({"PATH_INFO": "", "SCRIPT_NAME": "/app"}, "/app"),
        ({"PATH_INFO": "/p", "QUERY_STRING": ""}, "/p"),
        ({"PATH_INFO": "/p", "RAW_URI": ""}, "/p"),
        ({"PATH_INFO": "/\u20ac"}, "/%E2%82%AC"),  # a server that decoded as UTF-8 (not PEP 3333)
    ],
)
def test_request_target_fallback_edge_cases(extra: dict[str, str], expected: str) -> None:
    """Empty paths become "/", an empty query adds no "?", non-latin-1 text is sent as UTF-8."""
    env = environ()
    del env["RAW_URI"]
    env.update(extra)
    assert request_target(env) == expected


# ------------------------------------------------------------------ upstream_request_headers


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("HTTP_CONNECTION", "Connection"),
        ("HTTP_KEEP_ALIVE", "Keep-Alive"),
        ("HTTP_PROXY_CONNECTION", "Proxy-Connection"),
        ("HTTP_TE", "TE"),
        ("HTTP_TRANSFER_ENCODING", "Transfer-Encoding"),
        ("HTTP_UPGRADE", "Upgrade"),
        ("HTTP_PROXY_AUTHORIZATION", "Proxy-Authorization"),
        ("HTTP_TRAILER", "Trailer"),
        ("HTTP_TRAILERS", "Trailers"),
    ],
)
def test_upstream_drops_hop_by_hop(key: str, name: str) -> None:
    """Hop-by-hop request headers are not sent to the backend."""
    value = "keep-alive" if key == "HTTP_CONNECTION" else "x"
    result = upstream_request_headers(environ(**{key: value}, HTTP_X_KEEP="1"))
    assert name.lower() not in names(result)
    assert result["X-Keep"] == "1"


@pytest.mark.parametrize(
    "connection", ["X-Private", "x-private", "close, X-Private", " keep-alive ,X-PRIVATE "]
)
def test_upstream_drops_headers_named_in_connection(connection: str) -> None:
    """A header the client's Connection names is hop-by-hop too, whatever its case."""
    env = environ(HTTP_CONNECTION=connection, HTTP_X_PRIVATE="secret", HTTP_X_PUBLIC="yes")
    result = upstream_request_headers(env)
    assert "x-private" not in names(result)
    assert "connection" not in names(result)
    assert result["X-Public"] == "yes"


def test_upstream_connection_cannot_remove_host_or_content_length() -> None:
    """Connection naming Host or Content-Length does not strip routing or framing."""
    env = environ(
        REQUEST_METHOD="POST",
        HTTP_CONNECTION="host, content-length, content-type",
        CONTENT_LENGTH="3",
        CONTENT_TYPE="text/plain",
    )
    result = upstream_request_headers(env)
    assert result["Host"] == "lb.example:8080"
    assert result["Content-Length"] == "3"
    assert "Content-Type" not in result


def test_upstream_connection_naming_xff_drops_the_client_value() -> None:
    """Connection naming X-Forwarded-For drops the client's value; ours is still set."""
    env = environ(HTTP_CONNECTION="X-Forwarded-For", HTTP_X_FORWARDED_FOR="1.1.1.1")
    assert upstream_request_headers(env)["X-Forwarded-For"] == "10.0.0.9"


def test_upstream_keeps_client_host() -> None:
    """The client's Host is kept, not replaced by the backend's."""
    result = upstream_request_headers(environ(HTTP_HOST="Shop.Example:8443"))
    assert result["Host"] == "Shop.Example:8443"


def test_upstream_without_host() -> None:
    """An HTTP/1.0 request without Host gets none (the upstream client adds the backend's)."""
    env = environ(SERVER_PROTOCOL="HTTP/1.0")
    del env["HTTP_HOST"]
    result = upstream_request_headers(env)
    assert "Host" not in result
    assert result["X-Forwarded-Host"] == "lb.example:8080"


@pytest.mark.parametrize(
    ("client_value", "remote", "expected"),
    [
        (None, "10.0.0.9", "10.0.0.9"),
        ("", "10.0.0.9", "10.0.0.9"),
        ("203.0.113.1", "10.0.0.9", "203.0.113.1, 10.0.0.9"),
        ("203.0.113.1, 198.51.100.2", "10.0.0.9", "203.0.113.1, 198.51.100.2, 10.0.0.9"),
        ("203.0.113.1", None, "203.0.113.1"),
        (None, None, None),
        (None, "::1", "::1"),
    ],
)
def test_upstream_x_forwarded_for(
    client_value: str | None, remote: str | None, expected: str | None
) -> None:
    """X-Forwarded-For gets REMOTE_ADDR appended, or is created from it."""
    env = environ()
    del env["REMOTE_ADDR"]
    if client_value is not None:
        env["HTTP_X_FORWARDED_FOR"] = client_value
    if remote is not None:
        env["REMOTE_ADDR"] = remote
    assert upstream_request_headers(env).get("X-Forwarded-For") == expected


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize("client_value", [None, "https", "gopher"])
def test_upstream_x_forwarded_proto_replaced(scheme: str, client_value: str | None) -> None:
    """X-Forwarded-Proto is the scheme the balancer saw, whatever the client sent."""
    env = environ(**{"wsgi.url_scheme": scheme})
    if client_value is not None:
        env["HTTP_X_FORWARDED_PROTO"] = client_value
    result = upstream_request_headers(env)
    assert result["X-Forwarded-Proto"] == scheme
    assert [n for n in result if n.lower() == "x-forwarded-proto"] == ["X-Forwarded-Proto"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"HTTP_HOST": "shop.example"}, "shop.example"),
        ({"HTTP_HOST": "shop.example", "HTTP_X_FORWARDED_HOST": "evil.example"}, "shop.example"),
        ({"HTTP_HOST": None, "HTTP_X_FORWARDED_HOST": "evil.example"}, "lb.example:8080"),
        ({"HTTP_HOST": None, "SERVER_PORT": "80"}, "lb.example"),
        ({"HTTP_HOST": None, "SERVER_PORT": "443", "wsgi.url_scheme": "https"}, "lb.example"),
        ({"HTTP_HOST": None, "SERVER_PORT": "443"}, "lb.example:443"),
    ],
)
def test_upstream_x_forwarded_host_replaced(extra: dict[str, str | None], expected: str) -> None:
    """X-Forwarded-Host is the client's Host, else SERVER_NAME[:PORT]; replacing the client's."""
    env = environ()
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    assert upstream_request_headers(env)["X-Forwarded-Host"] == expected


def test_upstream_forwarded_header_left_alone() -> None:
    """The standard Forwarded header is passed through unchanged."""
    value = 'for="[2001:db8::1]";proto=https, for=198.51.100.7'
    assert upstream_request_headers(environ(HTTP_FORWARDED=value))["Forwarded"] == value


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"CONTENT_TYPE": "application/json", "CONTENT_LENGTH": "12"}, {"12", "application/json"}),
        ({"CONTENT_TYPE": "", "CONTENT_LENGTH": ""}, set()),
        ({"CONTENT_LENGTH": "0"}, {"0"}),
    ],
)
def test_upstream_content_type_and_length(extra: dict[str, str], expected: set[str]) -> None:
    """CONTENT_TYPE and CONTENT_LENGTH are sent when non-empty, as Content-Type/-Length."""
    result = upstream_request_headers(environ(REQUEST_METHOD="POST", **extra))
    got = {v for n, v in result.items() if n in ("Content-Type", "Content-Length")}
    assert got == expected


def test_upstream_chunked_request_drops_content_length() -> None:
    """A chunked request is re-framed: neither Transfer-Encoding nor Content-Length is sent."""
    env = environ(REQUEST_METHOD="POST", HTTP_TRANSFER_ENCODING="chunked", CONTENT_LENGTH="5")
    result = upstream_request_headers(env)
    assert "transfer-encoding" not in names(result)
    assert "content-length" not in names(result)


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("HTTP_X_FOO_BAR", "X-Foo-Bar"),
        ("HTTP_USER_AGENT", "User-Agent"),
        ("HTTP_ACCEPT", "Accept"),
        ("HTTP_COOKIE", "Cookie"),
        ("HTTP_AUTHORIZATION", "Authorization"),
        ("HTTP_IDEMPOTENCY_KEY", "Idempotency-Key"),
        ("HTTP_DNT", "DNT"),
        ("HTTP_SEC_WEBSOCKET_KEY", "Sec-WebSocket-Key"),
        ("HTTP_X_B3_TRACEID", "X-B3-Traceid"),
        ("HTTP_X_VERY_RARE_HEADER_NAME_7", "X-Very-Rare-Header-Name-7"),
    ],
)
def test_upstream_header_names_title_case(key: str, name: str) -> None:
    """HTTP_* keys become conventional Title-Case header names."""
    assert upstream_request_headers(environ(**{key: "v"}))[name] == "v"


def test_upstream_skips_non_header_keys() -> None:
    """CGI and wsgi.* keys other than CONTENT_* are not headers."""
    result = upstream_request_headers(environ(HTTP_ACCEPT="*/*"))
    assert set(result) == {
        "Host",
        "Accept",
        "X-Forwarded-For",
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
    }


def test_upstream_values_unchanged() -> None:
    """Header values, including joined repeats and empty ones, are passed through as is."""
    env = environ(HTTP_ACCEPT="text/html,application/json", HTTP_X_EMPTY="", HTTP_X_SP=" a  b ")
    result = upstream_request_headers(env)
    assert result["Accept"] == "text/html,application/json"
    assert result["X-Empty"] == ""
    assert result["X-Sp"] == " a  b "


def test_upstream_does_not_mutate_environ() -> None:
    """The environ is read, never written."""
    env = environ(HTTP_CONNECTION="X-A", HTTP_X_A="1", HTTP_X_FORWARDED_FOR="1.1.1.1")
    before = dict(env)
    upstream_request_headers(env)
    upstream_request_headers(env)  # and the cached Connection rule gives the same answer
    assert env == before


def test_upstream_name_cache_is_bounded() -> None:
    """Made-up header names cannot grow the name cache without bound."""
    for i in range(headers._MAX_CACHED_NAMES + 50):
        assert upstream_request_headers(environ(**{f"HTTP_X_R{i}": "v"}))[f"X-R{i}"] == "v"
    assert len(headers._NAMES) <= headers._MAX_CACHED_NAMES


# ------------------------------------------------------------------------ is_chunked_request


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, False),
        ("", False),
        ("chunked", True),
        ("Chunked", True),
        ("gzip, chunked", True),
        ("gzip", False),
    ],
)
def test_is_chunked_request(value: str | None, expected: bool) -> None:
    """Transfer-Encoding naming chunked marks a chunked request body."""
    env = environ() if value is None else environ(HTTP_TRANSFER_ENCODING=value)
    assert is_chunked_request(env) is expected


# --------------------------------------------------------------- downstream_response_headers


@pytest.mark.parametrize(
    "name",
    [
        "Connection",
        "Keep-Alive",
        "keep-alive",
        "Proxy-Connection",
        "TE",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Trailer",
        "Trailers",
    ],
)
def test_downstream_drops_hop_by_hop(name: str) -> None:
    """Hop-by-hop response headers do not reach the client, whatever their case."""
    value = "keep-alive" if name == "Connection" else "x"
    result = downstream_response_headers([(name, value), ("X-Keep", "1")])
    assert result == [("X-Keep", "1")]


def test_downstream_drops_headers_named_in_connection() -> None:
    """Headers the backend's Connection header(s) name are dropped too."""
    items = [
        ("Connection", "close, X-Private"),
        ("X-Private", "secret"),
        ("connection", "x-other"),
        ("X-OTHER", "1"),
        ("X-Public", "yes"),
    ]
    assert downstream_response_headers(items) == [("X-Public", "yes")]


def test_downstream_keeps_repeated_headers_in_order() -> None:
    """Repeated headers such as Set-Cookie stay separate items, in their order."""
    items = [
        ("Set-Cookie", "a=1; Path=/"),
        ("Content-Type", "text/html"),
        ("Set-Cookie", "b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT"),
        ("Keep-Alive", "timeout=5"),
        ("set-cookie", "c=3"),
    ]
    assert downstream_response_headers(items) == [
        ("Set-Cookie", "a=1; Path=/"),
        ("Content-Type", "text/html"),
        ("Set-Cookie", "b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT"),
        ("set-cookie", "c=3"),
    ]


def test_downstream_accepts_any_iterable() -> None:
    """A generator works as well as a list (e.g. urllib3's HTTPHeaderDict.iteritems())."""
    items = iter([("Connection", "X-A"), ("X-A", "1"), ("X-B", "2")])
    assert downstream_response_headers(items) == [("X-B", "2")]


def test_downstream_values_unchanged() -> None:
    """End-to-end response headers are passed through untouched."""
    items = [("Content-Encoding", "gzip"), ("Location", "/elsewhere"), ("X-Empty", "")]
    assert downstream_response_headers(items) == items
