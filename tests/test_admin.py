"""Tests for softlb.admin: the admin API's routes, validation, token and status page (SPEC §5)."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import threading
from typing import Any
from wsgiref.validate import validator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import Client, EnvironBuilder, TestResponse

import softlb
from softlb.admin import MAX_BODY, AdminApi
from softlb.backend import MAX_WEIGHT, Backend
from softlb.health import HealthChecker
from softlb.pool import Pool
from softlb.stats import ProxyStats
from softlb.status_page import format_duration, render_status_page, server_state
from tests.helpers.servers import TestBackend

A = "http://10.0.0.1:8000"
B = "http://10.0.0.2:8000"
NEW = "http://10.0.0.3:8000"
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def pool() -> Pool:
    """A pool of two backends that are never contacted: A (weight 1) and B (weight 3)."""
    return Pool([A, Backend(B, weight=3)])


@pytest.fixture
def removed(pool: Pool) -> list[str]:
    """The URLs of the pool's ``removed`` events (the proxy closes its connections there)."""
    urls: list[str] = []
    pool.subscribe(lambda event: urls.append(event.url or ""), ("removed",))
    return urls


@pytest.fixture
def api(pool: Pool) -> AdminApi:
    """An AdminApi over ``pool`` with the default prefix, no token, seed routes on."""
    return AdminApi(pool)


@pytest.fixture
def client(api: AdminApi) -> Client:
    """A werkzeug test client for ``api``."""
    return Client(api)


@pytest.fixture
def secured(pool: Pool) -> Client:
    """A test client for an AdminApi over ``pool`` that requires TOKEN."""
    return Client(AdminApi(pool, token=TOKEN))


def members(pool: Pool) -> list[dict[str, object]]:
    """Everything the admin API could change in ``pool``, to assert that nothing did."""
    return [b.as_dict() for b in pool.backends]


def send(client: Client, method: str, path: str, body: object = None, **kw: Any) -> TestResponse:
    """Send ``body`` as JSON (or as is, when bytes or str) with ``method`` to ``path``."""
    if body is not None:
        kw["data"] = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.open(path, method=method, **kw)


def error_of(resp: TestResponse, status: int) -> str:
    """Check that ``resp`` is a JSON error with ``status`` and return its message."""
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.headers["Cache-Control"] == "no-store"
    document = resp.get_json()
    assert set(document) == {"error"}
    message = document["error"]
    assert isinstance(message, str)
    assert message
    assert "\n" not in message
    assert "Traceback" not in message
    return message


def call_raw(api: AdminApi, environ: dict[str, Any]) -> tuple[str, dict[str, str], bytes]:
    """Call ``api`` with ``environ``; return the status line, headers and body."""
    seen: list[tuple[str, dict[str, str]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen.append((status, dict(headers)))
        return lambda data: None

    body = b"".join(api(environ, start_response))
    return seen[0][0], seen[0][1], body


# --------------------------------------------------------------------------- routing


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/_softlb", True),
        ("/_softlb/", True),
        ("/_softlb/servers", True),
        ("/_softlb/anything/else", True),
        ("/upload_server", True),
        ("/delete_server", True),
        ("/_softlbx", False),
        ("/_soft", False),
        ("/", False),
        ("/upload_server/", False),
        ("/api/_softlb/servers", False),
    ],
)
def test_matches_prefix_and_seed_routes(api: AdminApi, path: str, expected: bool) -> None:
    """matches() claims the prefix, everything below it and the two seed routes, nothing else."""
    assert api.matches(path) is expected


def test_matches_without_seed_routes(pool: Pool) -> None:
    """With seed_routes off, the seed paths are left to the proxy."""
    api = AdminApi(pool, seed_routes=False)
    assert not api.matches("/upload_server")
    assert not api.matches("/delete_server")
    assert api.matches("/_softlb/servers")


def test_custom_prefix_drops_trailing_slash(pool: Pool) -> None:
    """A prefix given with a trailing slash serves its routes without it."""
    api = AdminApi(pool, prefix="/ops/lb/")
    assert api.prefix == "/ops/lb"
    assert api.matches("/ops/lb/servers")
    assert not api.matches("/_softlb/servers")
    assert Client(api).get("/ops/lb/servers").status_code == 200


@pytest.mark.parametrize("prefix", ["", "/", "//", "_softlb"])
def test_bad_prefix_is_refused(pool: Pool, prefix: str) -> None:
    """A prefix that is not an absolute path below / raises ValueError."""
    with pytest.raises(ValueError, match="prefix"):
        AdminApi(pool, prefix=prefix)


def test_empty_token_is_refused(pool: Pool) -> None:
    """An empty token raises instead of silently turning authentication off."""
    with pytest.raises(ValueError, match="token"):
        AdminApi(pool, token="")


def test_unknown_admin_path_is_404(client: Client) -> None:
    """A path under the prefix that is no endpoint gets a 404 JSON error listing the endpoints."""
    message = error_of(client.get("/_softlb/nope"), 404)
    assert "/_softlb/nope" in message
    assert "/_softlb/servers" in message


def test_unknown_path_with_trailing_slash_is_404(client: Client) -> None:
    """Routes match exactly: /servers/ is not /servers."""
    error_of(client.get("/_softlb/servers/"), 404)


def test_seed_route_without_seed_routes_is_404(pool: Pool) -> None:
    """When seed routes are off, the API itself does not answer them either."""
    client = Client(AdminApi(pool, seed_routes=False))
    error_of(send(client, "POST", "/upload_server", {"url": NEW}), 404)
    assert NEW not in pool


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/_softlb/servers", "GET, HEAD, POST, PATCH, DELETE, OPTIONS"),
        ("PATCH", "/upload_server", "POST, OPTIONS"),
        ("POST", "/_softlb/metrics", "GET, HEAD, OPTIONS"),
        ("DELETE", "/_softlb/", "GET, HEAD, OPTIONS"),
        ("POST", "/_softlb/status", "GET, HEAD, OPTIONS"),
        ("POST", "/_softlb/health", "GET, HEAD, OPTIONS"),
        ("POST", "/_softlb", "GET, HEAD, OPTIONS"),
        ("GET", "/upload_server", "POST, OPTIONS"),
        ("DELETE", "/upload_server", "POST, OPTIONS"),
        ("GET", "/delete_server", "DELETE, OPTIONS"),
        ("POST", "/delete_server", "DELETE, OPTIONS"),
    ],
)
def test_wrong_method_is_405_with_allow(
    client: Client, pool: Pool, method: str, path: str, allow: str
) -> None:
    """A method a known path does not take gets 405, an Allow header and changes nothing."""
    before = members(pool)
    resp = send(client, method, path, {"url": NEW})
    message = error_of(resp, 405)
    assert resp.headers["Allow"] == allow
    assert method in message
    assert members(pool) == before


def test_options_lists_allowed_methods(client: Client) -> None:
    """OPTIONS answers 204 with the Allow header and no body."""
    resp = client.options("/_softlb/servers")
    assert resp.status_code == 204
    assert resp.headers["Allow"] == "GET, HEAD, POST, PATCH, DELETE, OPTIONS"
    assert "Content-Length" not in resp.headers
    assert resp.get_data() == b""


def test_head_has_length_but_no_body(client: Client) -> None:
    """HEAD answers like GET with the same Content-Length and an empty body."""
    get = client.get("/_softlb/servers")
    head = client.head("/_softlb/servers")
    assert head.status_code == 200
    assert head.headers["Content-Length"] == get.headers["Content-Length"]
    assert head.get_data() == b""


def test_prefix_without_slash_redirects_to_page(client: Client) -> None:
    """GET on the bare prefix is a 308 to the status page, keeping the query string."""
    resp = client.get("/_softlb?x=1")
    assert resp.status_code == 308
    assert resp.headers["Location"] == "/_softlb/?x=1"
    assert resp.headers["Cache-Control"] == "no-store"


def test_redirect_keeps_script_name(api: AdminApi) -> None:
    """Mounted below a SCRIPT_NAME, the redirect points below it too."""
    environ = EnvironBuilder(path="/_softlb", method="GET").get_environ()
    environ["SCRIPT_NAME"] = "/lb"
    status, headers, _ = call_raw(api, environ)
    assert status.startswith("308")
    assert headers["Location"] == "/lb/_softlb/"


# --------------------------------------------------------------------------- GET /servers


def test_list_servers(client: Client) -> None:
    """GET /servers lists every backend with url, weight, healthy, active, requests, failures."""
    resp = client.get("/_softlb/servers")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.headers["Cache-Control"] == "no-store"
    servers = resp.get_json()["servers"]
    assert [s["url"] for s in servers] == [A, B]
    assert [s["weight"] for s in servers] == [1, 3]
    for server in servers:
        assert {"url", "weight", "healthy", "active", "requests", "failures"} <= set(server)
        assert server["healthy"] is True
        assert server["active"] == server["requests"] == server["failures"] == 0


def test_list_servers_reports_live_figures(client: Client, pool: Pool) -> None:
    """active, requests, failures and healthy follow the pool's leases and health verdicts."""
    held = pool.lease()
    with pytest.raises(RuntimeError), pool.lease(exclude=[held.backend]):
        raise RuntimeError("boom")
    pool.set_healthy(A, False)
    servers = {s["url"]: s for s in client.get("/_softlb/servers").get_json()["servers"]}
    assert servers[held.backend.url]["active"] == 1
    other = B if held.backend.url == A else A
    assert servers[other]["requests"] == 1
    assert servers[other]["failures"] == 1
    assert servers[A]["healthy"] is False
    held.release()


def test_list_servers_of_empty_pool(pool: Pool) -> None:
    """An empty pool lists an empty array."""
    resp = Client(AdminApi(Pool())).get("/_softlb/servers")
    assert resp.get_json() == {"servers": []}


# --------------------------------------------------------------------------- POST /servers


@pytest.mark.parametrize("path", ["/_softlb/servers", "/upload_server"])
def test_add_server(client: Client, pool: Pool, path: str) -> None:
    """POST adds a backend in rotation, weight 1 by default, and answers 201 with it."""
    resp = send(client, "POST", path, {"url": NEW})
    assert resp.status_code == 201
    assert resp.headers["Cache-Control"] == "no-store"
    document = resp.get_json()
    assert document["url"] == NEW
    assert document["weight"] == 1
    assert document["healthy"] is True
    assert pool.get(NEW).weight == 1
    assert pool.get(NEW) in pool.eligible


@pytest.mark.parametrize("path", ["/_softlb/servers", "/upload_server"])
def test_add_server_with_weight(client: Client, pool: Pool, path: str) -> None:
    """An integer weight is taken as given."""
    resp = send(client, "POST", path, {"url": NEW, "weight": 7})
    assert resp.status_code == 201
    assert resp.get_json()["weight"] == 7
    assert pool.get(NEW).weight == 7


def test_add_server_normalizes_url(client: Client, pool: Pool) -> None:
    """The URL is stored in canonical form: lower-case scheme and host, no trailing slash."""
    resp = send(client, "POST", "/_softlb/servers", {"url": "HTTP://Example.COM:8080/"})
    assert resp.status_code == 201
    assert resp.get_json()["url"] == "http://example.com:8080"
    assert "http://example.com:8080" in pool


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_add_server_reads_any_content_type(
    client: Client, pool: Pool, content_type: str | None
) -> None:
    """The body is read as JSON whatever Content-Type the client sent, or none."""
    kw = {"content_type": content_type} if content_type else {}
    resp = send(client, "POST", "/_softlb/servers", json.dumps({"url": NEW}).encode(), **kw)
    assert resp.status_code == 201
    assert NEW in pool


@pytest.mark.parametrize("path", ["/_softlb/servers", "/upload_server"])
@pytest.mark.parametrize("url", [A, A + "/", "HTTP://10.0.0.1:8000"])
def test_add_existing_server_is_409(client: Client, pool: Pool, path: str, url: str) -> None:
    """A URL already in the pool, however spelled, gets 409 and changes nothing."""
    before = members(pool)
    message = error_of(send(client, "POST", path, {"url": url, "weight": 5}), 409)
    assert A in message
    assert members(pool) == before


BAD_ADD_BODIES: list[tuple[str, bytes | str | object, str]] = [
    ("not JSON", b"url=http://10.0.0.3:8000", "not JSON"),
    ("truncated JSON", b'{"url": "http://10.0.0.3:8000"', "not JSON"),
    ("array", [{"url": NEW}], "got an array"),
    ("string", "http://10.0.0.3:8000", "not JSON"),
    ("JSON string", json.dumps(NEW), "got a string"),
    ("JSON null", b"null", "got null"),
    ("JSON number", b"42", "got a number"),
    ("empty object", {}, '"url" is missing'),
    ("whitespace", b"  \n ", "empty"),
    ("invalid UTF-8", b'{"url": "http://10.0.0.3:8000\xff"}', "UTF-8"),
    ("UTF-16", json.dumps({"url": NEW}).encode("utf-16"), "UTF-8"),
    ("duplicate key", b'{"url": "http://10.0.0.3:8000", "url": "http://x"}', "twice"),
    ("NaN weight", b'{"url": "http://10.0.0.3:8000", "weight": NaN}', "NaN"),
    ("deep nesting", b"[" * 60000, "too complex"),
    ("huge number", b'{"url": "http://10.0.0.3:8000", "weight": 1' + b"0" * 5000 + b"}", ""),
    ("missing url", {"weight": 2}, '"url" is missing'),
    ("null url", {"url": None}, "string"),
    ("number url", {"url": 8000}, "string"),
    ("list url", {"url": [NEW]}, "string"),
    ("empty url", {"url": ""}, "empty"),
    ("ftp URL", {"url": "ftp://10.0.0.3"}, "http:// or https://"),
    ("no scheme", {"url": "10.0.0.3:8000"}, "http:// or https://"),
    ("no host", {"url": "http://"}, "no host"),
    ("path only", {"url": "http:///path"}, "no host"),
    ("bad port", {"url": "http://10.0.0.3:99999"}, "malformed"),
    ("credentials", {"url": "http://user:pw@10.0.0.3"}, "credentials"),
    ("query", {"url": "http://10.0.0.3/?a=1"}, "query"),
    ("space", {"url": "http://10.0.0.3 /"}, "whitespace"),
    ("bool weight", {"url": NEW, "weight": True}, "weight"),
    ("zero weight", {"url": NEW, "weight": 0}, "weight"),
    ("negative weight", {"url": NEW, "weight": -2}, "weight"),
    ("float weight", {"url": NEW, "weight": 1.5}, "weight"),
    ("whole float weight", {"url": NEW, "weight": 2.0}, "weight"),
    ("string weight", {"url": NEW, "weight": "3"}, "weight"),
    ("null weight", {"url": NEW, "weight": None}, "weight"),
    ("weight too large", {"url": NEW, "weight": MAX_WEIGHT + 1}, "weight"),
    ("extra field", {"url": NEW, "wieght": 2}, '"wieght"'),
    ("extra fields", {"url": NEW, "weight": 2, "a": 1, "b": 2}, '"a", "b"'),
]


@pytest.mark.parametrize("path", ["/_softlb/servers", "/upload_server"])
@pytest.mark.parametrize(
    ("body", "expected"),
    [(body, expected) for _, body, expected in BAD_ADD_BODIES],
    ids=[name for name, _, _ in BAD_ADD_BODIES],
)
def test_bad_add_is_400_and_changes_nothing(
    client: Client, pool: Pool, path: str, body: object, expected: str
) -> None:
    """Every malformed add request gets 400 with a message saying what is wrong."""
    before = members(pool)
    message = error_of(send(client, "POST", path, body), 400)
    assert expected in message
    assert members(pool) == before


@pytest.mark.parametrize("path", ["/_softlb/servers", "/upload_server"])
def test_add_without_body_is_400(client: Client, pool: Pool, path: str) -> None:
    """A POST with no body at all gets 400."""
    before = members(pool)
    assert "empty" in error_of(client.post(path), 400)
    assert members(pool) == before


def test_extra_field_message_lists_allowed(client: Client) -> None:
    """The message about an unknown field names the allowed ones."""
    message = error_of(send(client, "POST", "/_softlb/servers", {"url": NEW, "x": 1}), 400)
    assert message == 'unknown field "x"; allowed: url, weight'


def test_add_accepts_max_weight(client: Client, pool: Pool) -> None:
    """The largest allowed weight is accepted."""
    assert (
        send(client, "POST", "/_softlb/servers", {"url": NEW, "weight": MAX_WEIGHT}).status_code
        == 201
    )
    assert pool.get(NEW).weight == MAX_WEIGHT


def test_concurrent_adds_of_one_url_make_one_member(pool: Pool) -> None:
    """Of many simultaneous adds of one URL exactly one gets 201, the others 409."""
    api = AdminApi(pool)
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def add() -> None:
        client = Client(api)
        start.wait()
        status = send(client, "POST", "/_softlb/servers", {"url": NEW}).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=add) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(statuses) == [201] + [409] * 15
    assert [b.url for b in pool.backends].count(NEW) == 1


# ----------------------------------------------------------------- bodies: size and framing


def test_body_over_limit_is_413(client: Client, pool: Pool) -> None:
    """A body over 64 KiB gets 413 and changes nothing."""
    before = members(pool)
    body = json.dumps({"url": NEW, "weight": 1}) + " " * MAX_BODY
    error_of(send(client, "POST", "/_softlb/servers", body), 413)
    assert members(pool) == before


def test_body_at_limit_is_read(client: Client, pool: Pool) -> None:
    """A body of exactly 64 KiB is still read."""
    text = json.dumps({"url": NEW})
    body = text + " " * (MAX_BODY - len(text))
    assert len(body) == MAX_BODY
    assert send(client, "POST", "/_softlb/servers", body).status_code == 201


class EndlessInput:
    """A wsgi.input that never ends and counts what was read from it."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        assert size is not None
        assert size >= 0, "an unbounded read of the request body"
        self.read_bytes += size
        return b" " * size


def test_large_content_length_is_413_without_reading(api: AdminApi, pool: Pool) -> None:
    """A Content-Length over the limit is refused before a byte of the body is read."""
    stream = EndlessInput()
    environ = EnvironBuilder(path="/_softlb/servers", method="POST").get_environ()
    environ.update({"CONTENT_LENGTH": str(10**12), "wsgi.input": stream})
    status, _, _ = call_raw(api, environ)
    assert status.startswith("413")
    assert stream.read_bytes == 0


def test_endless_chunked_body_is_413_after_limit(api: AdminApi, pool: Pool) -> None:
    """A chunked body is read to at most one byte past the limit, then refused with 413."""
    before = members(pool)
    stream = EndlessInput()
    environ = EnvironBuilder(path="/_softlb/servers", method="POST").get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ.update({"HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input": stream})
    status, headers, body = call_raw(api, environ)
    assert status.startswith("413")
    assert headers["Content-Type"] == "application/json"
    assert str(MAX_BODY) in json.loads(body)["error"]
    assert stream.read_bytes == MAX_BODY + 1
    assert members(pool) == before


@pytest.mark.parametrize("terminated", [False, True])
def test_chunked_body_within_limit_is_read(api: AdminApi, pool: Pool, terminated: bool) -> None:
    """A body without Content-Length (chunked, or input_terminated as gunicorn sets) works."""
    environ = EnvironBuilder(path="/_softlb/servers", method="POST").get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ["wsgi.input"] = io.BytesIO(json.dumps({"url": NEW}).encode())
    if terminated:
        environ["wsgi.input_terminated"] = True
    else:
        environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    status, _, _ = call_raw(api, environ)
    assert status.startswith("201")
    assert NEW in pool


def test_body_without_length_or_chunking_is_empty(api: AdminApi, pool: Pool) -> None:
    """Without Content-Length or chunking there is no body (HTTP/1.1), so nothing is read."""
    stream = EndlessInput()
    environ = EnvironBuilder(path="/_softlb/servers", method="POST").get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ["wsgi.input"] = stream
    status, _, body = call_raw(api, environ)
    assert status.startswith("400")
    assert "empty" in json.loads(body)["error"]
    assert stream.read_bytes == 0


def test_body_shorter_than_content_length_is_400(api: AdminApi, pool: Pool) -> None:
    """A body that ends before its Content-Length (client gone) gets 400 and changes nothing."""
    before = members(pool)
    environ = EnvironBuilder(path="/_softlb/servers", method="POST").get_environ()
    environ.update({"CONTENT_LENGTH": "100", "wsgi.input": io.BytesIO(b'{"url": "http://x"}')})
    status, _, body = call_raw(api, environ)
    assert status.startswith("400")
    assert "Content-Length" in json.loads(body)["error"]
    assert members(pool) == before


@pytest.mark.parametrize("length", ["abc", "-5", "1e3", "٣"])
def test_bad_content_length_is_400(api: AdminApi, length: str) -> None:
    """A Content-Length that is not a decimal number gets 400."""
    environ = EnvironBuilder(path="/_softlb/servers", method="POST").get_environ()
    environ.update({"CONTENT_LENGTH": length, "wsgi.input": io.BytesIO(b"{}")})
    status, _, body = call_raw(api, environ)
    assert status.startswith("400")
    assert "Content-Length" in json.loads(body)["error"]


# --------------------------------------------------------------------------- DELETE /servers


@pytest.mark.parametrize("path", ["/_softlb/servers", "/delete_server"])
def test_remove_server(client: Client, pool: Pool, removed: list[str], path: str) -> None:
    """DELETE removes the backend, answers 200 with it, and the pool's ``removed`` event
    names it (once)."""
    resp = send(client, "DELETE", path, {"url": B})
    assert resp.status_code == 200
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.get_json()["url"] == B
    assert resp.get_json()["weight"] == 3
    assert B not in pool
    assert removed == [B]


def test_remove_server_in_any_spelling(client: Client, pool: Pool, removed: list[str]) -> None:
    """The URL to remove may be spelled in any form that normalizes to the member's."""
    resp = send(client, "DELETE", "/_softlb/servers", {"url": "HTTP://10.0.0.2:8000/"})
    assert resp.status_code == 200
    assert B not in pool
    assert removed == [B]


@pytest.mark.parametrize("path", ["/_softlb/servers", "/delete_server"])
def test_remove_unknown_server_is_404(
    client: Client, pool: Pool, removed: list[str], path: str
) -> None:
    """Removing a URL that is not a member gets 404 and changes nothing."""
    before = members(pool)
    message = error_of(send(client, "DELETE", path, {"url": NEW}), 404)
    assert NEW in message
    assert members(pool) == before
    assert removed == []


BAD_REMOVE_BODIES: list[tuple[str, bytes | object, str]] = [
    ("not JSON", b"url=http://10.0.0.1:8000", "not JSON"),
    ("array", [A], "got an array"),
    ("empty", b"", "empty"),
    ("missing url", {}, '"url" is missing'),
    ("null url", {"url": None}, "string"),
    ("ftp URL", {"url": "ftp://10.0.0.1:8000"}, "http:// or https://"),
    ("no host", {"url": "http://"}, "no host"),
    ("weight given", {"url": A, "weight": 1}, '"weight"'),
    ("extra field", {"url": A, "force": True}, '"force"'),
]


@pytest.mark.parametrize("path", ["/_softlb/servers", "/delete_server"])
@pytest.mark.parametrize(
    ("body", "expected"),
    [(body, expected) for _, body, expected in BAD_REMOVE_BODIES],
    ids=[name for name, _, _ in BAD_REMOVE_BODIES],
)
def test_bad_remove_is_400_and_changes_nothing(
    client: Client, pool: Pool, removed: list[str], path: str, body: object, expected: str
) -> None:
    """Every malformed remove request gets 400 with a message saying what is wrong."""
    before = members(pool)
    message = error_of(send(client, "DELETE", path, body), 400)
    assert expected in message
    assert members(pool) == before
    assert removed == []


def test_remove_lets_in_flight_requests_finish(client: Client, pool: Pool) -> None:
    """A removed backend's in-flight request still completes and is counted on it."""
    lease = pool.lease(exclude=[pool.get(B)])
    assert lease.backend.url == A
    resp = send(client, "DELETE", "/_softlb/servers", {"url": A})
    assert resp.status_code == 200
    assert resp.get_json()["active"] == 1
    assert A not in pool
    lease.release()
    assert lease.backend.active == 0
    assert lease.backend.requests == 1


def test_failing_removed_listener_does_not_fail_removal(
    pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception in a listener of the ``removed`` event is logged; the removal still
    answers 200."""

    def broken(event: object) -> None:
        raise RuntimeError("cannot close")

    pool.subscribe(broken, ("removed",))
    client = Client(AdminApi(pool))
    with caplog.at_level(logging.ERROR, logger="softlb.pool"):
        resp = send(client, "DELETE", "/_softlb/servers", {"url": A})
    assert resp.status_code == 200
    assert A not in pool
    assert "cannot close" in caplog.text


def test_unexpected_error_is_500_json(
    client: Client, pool: Pool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug inside a route answers 500 with a JSON error and no traceback, and is logged."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("internal detail")

    monkeypatch.setattr(pool, "add", broken)
    with caplog.at_level(logging.ERROR, logger="softlb.admin"):
        resp = send(client, "POST", "/_softlb/servers", {"url": NEW})
    assert resp.status_code == 500
    assert "internal detail" not in resp.get_data(as_text=True)
    assert "error" in resp.get_json()
    assert "internal detail" in caplog.text


# --------------------------------------------------------------------------- token


EVERY_CALL: list[tuple[str, str, object]] = [
    ("GET", "/_softlb/servers", None),
    ("HEAD", "/_softlb/servers", None),
    ("POST", "/_softlb/servers", {"url": NEW}),
    ("PATCH", "/_softlb/servers", {"url": A, "weight": 5, "draining": True}),
    ("DELETE", "/_softlb/servers", {"url": A}),
    ("GET", "/_softlb/metrics", None),
    ("GET", "/_softlb/status", None),
    ("GET", "/_softlb/health", None),
    ("GET", "/_softlb/", None),
    ("GET", "/_softlb", None),
    ("GET", "/_softlb/unknown", None),
    ("PUT", "/_softlb/servers", {"url": NEW}),
    ("OPTIONS", "/_softlb/servers", None),
    ("POST", "/upload_server", {"url": NEW}),
    ("DELETE", "/delete_server", {"url": A}),
]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"X-Token": TOKEN},
    ],
    ids=[
        "none",
        "wrong",
        "longer",
        "shorter",
        "basic",
        "no-scheme",
        "bearer-only",
        "empty",
        "other",
    ],
)
@pytest.mark.parametrize(("method", "path", "body"), EVERY_CALL)
def test_token_required_on_every_call(
    secured: Client,
    pool: Pool,
    headers: dict[str, str],
    method: str,
    path: str,
    body: object,
) -> None:
    """Without the right token every admin call gets 401 with the Basic challenge (so that a
    browser asks for it) and changes nothing."""
    before = members(pool)
    resp = send(secured, method, path, body, headers=headers)
    assert resp.status_code == 401
    assert resp.headers.getlist("WWW-Authenticate") == ['Basic realm="softlb"']
    assert resp.headers["Cache-Control"] == "no-store"
    if method != "HEAD":
        error_of(resp, 401)
    assert members(pool) == before


def test_wrong_token_says_so_and_a_missing_one_says_how(secured: Client) -> None:
    """A wrong token is called wrong; a missing one gets how to send it; neither echoes it."""
    wrong = secured.get("/_softlb/servers", headers={"Authorization": "Bearer nope"})
    assert "wrong" in error_of(wrong, 401)
    missing = secured.get("/_softlb/servers")
    assert "Authorization: Bearer TOKEN" in error_of(missing, 401)
    assert TOKEN not in wrong.get_data(as_text=True)


@pytest.mark.parametrize(
    "value", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN} ", f" Bearer {TOKEN}"]
)
def test_right_token_is_accepted(secured: Client, value: str) -> None:
    """The right token works; the scheme is case-insensitive and spaces around are ignored."""
    assert secured.get("/_softlb/servers", headers={"Authorization": value}).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/_softlb/servers", None, 200),
        ("POST", "/_softlb/servers", {"url": NEW}, 201),
        ("DELETE", "/_softlb/servers", {"url": A}, 200),
        ("GET", "/_softlb/metrics", None, 200),
        ("GET", "/_softlb/status", None, 200),
        ("GET", "/_softlb/health", None, 200),
        ("GET", "/_softlb/", None, 200),
        ("GET", "/_softlb", None, 308),
        ("GET", "/_softlb/unknown", None, 404),
        ("PUT", "/_softlb/servers", None, 405),
        ("POST", "/upload_server", {"url": NEW}, 201),
        ("DELETE", "/delete_server", {"url": A}, 200),
    ],
)
def test_right_token_reaches_every_call(
    secured: Client, method: str, path: str, body: object, status: int
) -> None:
    """With the right token each call answers as it would without authentication."""
    assert send(secured, method, path, body, headers=AUTH).status_code == status


# --------------------------------------------------------------------------- health, status


def test_health_endpoint(client: Client) -> None:
    """GET /health says the balancer itself is alive."""
    resp = client.get("/_softlb/health")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ok"}


def test_status_json(pool: Pool) -> None:
    """GET /status reports version, algorithm, uptime, health checks, proxy totals, servers."""
    stats = ProxyStats()
    stats.observe(0.01)
    stats.retried()
    stats.error(502)
    stats.error(502)
    stats.error(503)
    checker = HealthChecker(pool, path="/ping", interval=3, timeout=1, rise=4, fall=5)
    client = Client(AdminApi(pool, stats=stats, checker=checker))
    document = client.get("/_softlb/status").get_json()
    assert document["version"] == softlb.__version__
    assert document["algorithm"] == "least_connections"
    assert document["uptime_seconds"] >= 0
    assert document["health_check"] == {
        "path": "/ping",
        "interval": 3.0,
        "timeout": 1.0,
        "rise": 4,
        "fall": 5,
        "running": False,
    }
    assert document["proxy"] == {"requests": 1, "retries": 1, "errors": {"502": 2, "503": 1}}
    assert [s["url"] for s in document["servers"]] == [A, B]


def test_status_json_without_checker(client: Client) -> None:
    """Without a health checker, health_check is null."""
    assert client.get("/_softlb/status").get_json()["health_check"] is None


# --------------------------------------------------------------------------- status page


def test_status_page(pool: Pool) -> None:
    """GET / is an HTML page showing the algorithm, version, each backend and its state."""
    pool.set_healthy(A, False)
    pool.add(NEW)
    pool.drain(NEW)
    client = Client(AdminApi(pool))
    resp = client.get("/_softlb/")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-store"
    page = resp.get_data(as_text=True)
    assert page.startswith("<!doctype html>")
    assert "least_connections" in page
    assert softlb.__version__ in page
    for url in (A, B, NEW):
        assert url in page
    assert '<span class="pill down">down</span>' in page
    assert '<span class="pill up">up</span>' in page
    assert '<span class="pill draining">draining</span>' in page
    assert "1 / 3" in page  # in rotation


def test_status_page_has_no_external_assets(client: Client) -> None:
    """The page loads nothing from elsewhere: no src= or stylesheet link, no absolute URL."""
    page = client.get("/_softlb/").get_data(as_text=True)
    assert " src=" not in page
    assert "<link" not in page
    assert "https://" not in page
    assert "@import" not in page


def test_status_page_nonce_matches_csp(client: Client) -> None:
    """The inline style and script carry the nonce the Content-Security-Policy allows."""
    resp = client.get("/_softlb/")
    csp = resp.headers["Content-Security-Policy"]
    match = re.search(r"script-src 'nonce-([^']+)'", csp)
    assert match
    nonce = match.group(1)
    page = resp.get_data(as_text=True)
    assert f'<script nonce="{nonce}">' in page
    assert f'<style nonce="{nonce}">' in page
    assert "frame-ancestors 'none'" in csp
    other = client.get("/_softlb/").headers["Content-Security-Policy"]
    assert other != csp  # a fresh nonce per response


def test_status_page_escapes_backend_url(client: Client, pool: Pool) -> None:
    """A backend URL with HTML-special characters is shown escaped."""
    url = "http://10.0.0.9/a&b'c"
    assert send(client, "POST", "/_softlb/servers", {"url": url}).status_code == 201
    page = client.get("/_softlb/").get_data(as_text=True)
    assert "http://10.0.0.9/a&amp;b&#x27;c" in page
    assert "a&b'c" not in page


def test_render_escapes_script_in_every_value() -> None:
    """Every value put in the page is HTML-escaped, so a <script> in one stays text."""
    evil = "<script>alert(1)</script>"
    status = {
        "version": evil,
        "algorithm": evil,
        "uptime_seconds": 5,
        "health_check": {"path": evil, "interval": evil, "timeout": 1, "rise": 1, "fall": 1},
        "proxy": {"requests": 1, "retries": 0, "errors": {evil: 1}},
        "servers": [{"url": evil, "weight": evil, "healthy": True, "active": 0}],
    }
    page = render_status_page(status, prefix="/_softlb", nonce="n0nce")
    assert evil not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 6
    assert page.count("<script") == 1


def test_render_does_not_expand_placeholders_in_values() -> None:
    """A value that looks like a template placeholder is shown as is, not expanded."""
    status = {"servers": [{"url": "http://x/{{nonce}}", "healthy": True}]}
    page = render_status_page(status, prefix="/_softlb", nonce="SECRET-NONCE")
    assert "http://x/{{nonce}}" in page
    assert page.count("SECRET-NONCE") == 2  # the style and the script tags only


def test_render_empty_pool_says_how_to_add() -> None:
    """With no backend the table says how to add one."""
    page = render_status_page({"servers": []}, prefix="/ops", nonce="n")
    assert "No backends" in page
    assert "POST /ops/servers" in page


@pytest.mark.parametrize(
    ("server", "state"),
    [
        ({"healthy": True, "draining": False}, "up"),
        ({"healthy": False, "draining": False}, "down"),
        ({"healthy": True, "draining": True}, "draining"),
        ({"healthy": False, "draining": True}, "draining"),
    ],
)
def test_server_state(server: dict[str, bool], state: str) -> None:
    """Draining wins over health; otherwise healthy is up and unhealthy is down."""
    assert server_state(server) == state


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (42.9, "42s"), (303, "5m 3s"), (7500, "2h 5m"), (3 * 86400 + 4 * 3600, "3d 4h")],
)
def test_format_duration(seconds: float, text: str) -> None:
    """Uptime is shown in its two largest units."""
    assert format_duration(seconds) == text


# --------------------------------------------------------------------------- WSGI compliance


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/_softlb/servers", None),
        ("POST", "/_softlb/servers", {"url": NEW}),
        ("POST", "/_softlb/servers", b"nope"),
        ("DELETE", "/_softlb/servers", {"url": A}),
        ("GET", "/_softlb/metrics", None),
        ("GET", "/_softlb/", None),
        ("GET", "/_softlb", None),
        ("OPTIONS", "/_softlb/servers", None),
        ("PUT", "/_softlb/servers", None),
        ("GET", "/_softlb/nope", None),
    ],
)
def test_answers_are_valid_wsgi(api: AdminApi, method: str, path: str, body: object) -> None:
    """wsgiref's validator finds nothing wrong with any kind of answer."""
    client = Client(validator(api))
    resp = send(client, method, path, body)
    resp.close()
    assert resp.status_code < 500


# --------------------------------------------------------------------------- the whole application


def test_application_counts_proxied_requests(make_app: Any, backend: TestBackend) -> None:
    """After one proxied request, GET /servers shows one request on that backend."""
    app = make_app(servers=[backend.url])
    client = Client(app)
    assert client.get("/hello").status_code == 200
    servers = client.get("/_softlb/servers").get_json()["servers"]
    assert servers == [
        {
            "url": backend.url,
            "weight": 1,
            "healthy": True,
            "draining": False,
            "active": 0,
            "requests": 1,
            "failures": 0,
        }
    ]
    assert backend.request_count == 1  # the admin call itself was not proxied


def test_application_added_backend_gets_traffic(make_app: Any, backends: list[TestBackend]) -> None:
    """A backend added through the API receives requests; a removed one no longer does."""
    first, second, _ = backends
    app = make_app(servers=[first.url], algorithm="round_robin")
    client = Client(app)
    assert send(client, "POST", "/_softlb/servers", {"url": second.url}).status_code == 201
    for _ in range(4):
        assert client.get("/x").status_code == 200
    assert first.request_count == 2
    assert second.request_count == 2
    wire = app.proxy.upstream.transports["http"]  # the proxy's http:// client
    assert second.url in wire._backends
    assert send(client, "DELETE", "/_softlb/servers", {"url": second.url}).status_code == 200
    assert second.url not in wire._backends  # the "removed" event closed its connections
    for _ in range(2):
        assert client.get("/y").status_code == 200
    assert second.request_count == 2
    assert first.request_count == 4


def test_application_seed_routes(make_app: Any, backend: TestBackend) -> None:
    """The seed routes work through the whole application, as in the seed project."""
    app = make_app(servers=[])
    client = Client(app)
    assert client.get("/").status_code == 503
    assert send(client, "POST", "/upload_server", {"url": backend.url}).status_code == 201
    assert client.get("/").status_code == 200
    assert send(client, "DELETE", "/delete_server", {"url": backend.url}).status_code == 200
    assert client.get("/").status_code == 503
    assert backend.request_count == 1


def test_application_without_seed_routes_proxies_them(make_app: Any, backend: TestBackend) -> None:
    """With admin.seed_routes false, /upload_server is an ordinary proxied path."""
    app = make_app(servers=[backend.url], admin={"seed_routes": False})
    resp = send(Client(app), "POST", "/upload_server", {"url": "http://10.0.0.3:8000"})
    assert resp.status_code == 200
    assert backend.last.target == "/upload_server"
    assert len(app.pool) == 1


def test_application_admin_config(make_app: Any, backend: TestBackend) -> None:
    """The config's admin prefix and token are used; the default prefix is then proxied."""
    app = make_app(servers=[backend.url], admin={"prefix": "/ops", "token": TOKEN})
    client = Client(app)
    assert client.get("/ops/servers").status_code == 401
    assert client.get("/ops/servers", headers=AUTH).status_code == 200
    assert client.get("/_softlb/servers").status_code == 200
    assert backend.last.target == "/_softlb/servers"


def test_status_page_says_when_the_state_is_stale() -> None:
    """While the shared store is unreachable the page shows a warning with the error (SPEC §7),
    and no warning otherwise."""
    stale = render_status_page(
        {"state": {"store": "redis", "stale": True, "error": "refused <x>"}, "servers": []},
        prefix="/_softlb",
        nonce="n",
    )
    assert "State is stale: the redis store cannot be reached (refused &lt;x&gt;)" in stale
    fresh = render_status_page(
        {"state": {"store": "redis", "stale": False}, "servers": []}, prefix="/_softlb", nonce="n"
    )
    assert 'id="store" class="banner" hidden></p>' in fresh


# --------------------------------------------------------------------------- PATCH /servers


def test_patch_changes_weight_and_keeps_the_other_fields_and_counters(
    client: Client, pool: Pool
) -> None:
    """PATCH with a weight answers 200 with the server's object; the backend is the same
    object, with its counters, draining flag and health untouched."""
    b = pool.get(B)
    with pool.lease(exclude={pool.get(A)}):
        pass
    resp = send(client, "PATCH", "/_softlb/servers", {"url": B, "weight": 7})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json() == {
        "url": B,
        "weight": 7,
        "healthy": True,
        "draining": False,
        "active": 0,
        "requests": 1,
        "failures": 0,
    }
    assert pool.get(B) is b
    assert (b.weight, b.requests) == (7, 1)
    assert pool.get(A).weight == 1


def test_patch_drains_and_undrains(client: Client, pool: Pool) -> None:
    """draining true takes a backend out of rotation (listed with "draining": true); false
    puts it back; the weight stays."""
    resp = send(client, "PATCH", "/_softlb/servers", {"url": A, "draining": True})
    assert resp.status_code == 200
    assert resp.get_json()["draining"] is True
    assert pool.eligible == (pool.get(B),)
    listed = {s["url"]: s for s in client.get("/_softlb/servers").get_json()["servers"]}
    assert listed[A]["draining"] is True
    assert listed[B]["draining"] is False
    both = send(client, "PATCH", "/_softlb/servers", {"url": A, "draining": False, "weight": 2})
    assert both.get_json()["draining"] is False
    assert [b.url for b in pool.eligible] == [A, B]
    assert pool.get(A).weight == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"url": A}, "nothing to change"),
        ({"url": A, "weight": 0}, "weight must be an integer"),
        ({"url": A, "weight": "2"}, "weight must be an integer"),
        ({"url": A, "weight": True}, "weight must be an integer"),
        ({"url": A, "weight": MAX_WEIGHT + 1}, "weight must be an integer"),
        ({"url": A, "draining": "yes"}, '"draining" must be true or false, got a string'),
        ({"url": A, "draining": 1}, '"draining" must be true or false, got a number'),
        ({"url": A, "draining": None}, '"draining" must be true or false, got null'),
        ({"url": A, "weight": 2, "healthy": False}, 'unknown field "healthy"'),
        ({"weight": 2}, 'the field "url" is missing'),
        ({"url": "10.0.0.1:8000", "weight": 2}, "the scheme is missing"),
        ({"url": A, "weight": 2, "draining": "no"}, '"draining" must be true or false'),
        ([A], "must be a JSON object"),
    ],
)
def test_patch_refuses_a_bad_body_and_changes_nothing(
    client: Client, pool: Pool, body: object, message: str
) -> None:
    """A bad PATCH body gets 400 with a message saying what is wrong; nothing changes, not
    even the part of it that was right."""
    before = members(pool)
    assert message in error_of(send(client, "PATCH", "/_softlb/servers", body), 400)
    assert members(pool) == before


def test_patch_of_an_unknown_backend_is_404(client: Client, pool: Pool) -> None:
    """PATCH naming a URL that is not a member gets 404 and changes nothing."""
    before = members(pool)
    message = error_of(send(client, "PATCH", "/_softlb/servers", {"url": NEW, "weight": 2}), 404)
    assert NEW in message
    assert members(pool) == before


def test_patch_goes_through_the_shared_store(tmp_path: Any) -> None:
    """With shared state the change is written to the store (another worker's view), and
    the store being down gets 503 and changes nothing."""
    from softlb.state.sqlite import SqliteStore
    from softlb.state.sync import SharedState

    db = str(tmp_path / "state.db")
    mine, theirs = Pool(), Pool()
    state = SharedState(mine, SqliteStore(db), seed=[(A, 1), (B, 1)])
    other = SharedState(theirs, SqliteStore(db))
    state.poll()
    other.poll()
    api = Client(AdminApi(mine, state=state))
    resp = send(api, "PATCH", "/_softlb/servers", {"url": A, "weight": 4, "draining": True})
    assert resp.status_code == 200
    other.poll()
    assert (theirs.get(A).weight, theirs.get(A).draining) == (4, True)
    state.store = SqliteStore(str(tmp_path / "missing-dir" / "x" / "state.db"), timeout=0.1)
    (tmp_path / "missing-dir").write_text("a file where a directory should be")
    before = members(mine)
    message = error_of(send(api, "PATCH", "/_softlb/servers", {"url": A, "weight": 9}), 503)
    assert "nothing changed" in message
    assert members(mine) == before
    for s in (state, other):
        s.store.close()


# --------------------------------------------------------------------------- who may call


def from_address(api: AdminApi, address: str) -> Client:
    """A test client whose requests come from ``address`` (REMOTE_ADDR)."""

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        environ["REMOTE_ADDR"] = address
        return api(environ, start_response)

    return Client(app)


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1", ""])
def test_loopback_clients_may_call_without_a_token(pool: Pool, address: str) -> None:
    """Without a token, loopback addresses (IPv4, IPv6, IPv4-mapped) and clients with no
    address at all (a Unix socket) may call the API."""
    client = from_address(AdminApi(pool), address)
    assert client.get("/_softlb/servers").status_code == 200
    assert send(client, "POST", "/_softlb/servers", {"url": NEW}).status_code == 201


@pytest.mark.parametrize(("method", "path", "body"), EVERY_CALL)
@pytest.mark.parametrize("address", ["10.1.2.3", "192.168.1.5", "2001:db8::5", "::ffff:10.1.2.3"])
def test_other_clients_get_403_on_every_route_without_a_token(
    pool: Pool, address: str, method: str, path: str, body: object
) -> None:
    """Without a token, a client off loopback and outside admin.allow gets 403 on every
    route (the seed routes, metrics and page included), told how to be allowed; nothing
    changes."""
    before = members(pool)
    resp = send(from_address(AdminApi(pool), address), method, path, body)
    assert resp.status_code == 403
    if method != "HEAD":
        message = error_of(resp, 403)
        assert "admin.token" in message
        assert "admin.allow" in message
    assert members(pool) == before


@pytest.mark.parametrize("address", ["not-an-address", "999.1.1.1", "fe80::1%eth0x"])
def test_an_unreadable_client_address_is_refused(pool: Pool, address: str) -> None:
    """A REMOTE_ADDR that is not an IP address is not taken for loopback."""
    assert from_address(AdminApi(pool), address).get("/_softlb/servers").status_code == 403


def test_allow_lets_listed_networks_in(pool: Pool) -> None:
    """Addresses and CIDR blocks in allow may call without a token; others still may not."""
    api = AdminApi(pool, allow=["10.0.0.0/8", "192.168.1.7", "2001:db8::/32"])
    for address in ("10.200.3.4", "192.168.1.7", "2001:db8::9", "::ffff:10.0.0.1"):
        assert from_address(api, address).get("/_softlb/servers").status_code == 200, address
    for address in ("11.0.0.1", "192.168.1.8", "2001:db9::1"):
        assert from_address(api, address).get("/_softlb/servers").status_code == 403, address
    assert "10.0.0.0/8" in repr(api)


@pytest.mark.parametrize(
    "allow", [["10.0.0.0/33"], ["not an address"], ["10.0.0.1/8/2"], "10.0.0.0/8", [8]]
)
def test_allow_refuses_what_is_not_an_address(pool: Pool, allow: Any) -> None:
    """A bad allow entry is a ValueError at construction that names it."""
    with pytest.raises(ValueError, match="allow"):
        AdminApi(pool, allow=allow)


def test_a_token_is_required_from_allowed_and_loopback_clients_too(pool: Pool) -> None:
    """With a token, allow does not bypass it: every client needs it, loopback included."""
    api = AdminApi(pool, token=TOKEN, allow=["10.0.0.0/8"])
    for address in ("127.0.0.1", "10.1.1.1", "172.16.0.1"):
        client = from_address(api, address)
        assert client.get("/_softlb/servers").status_code == 401
        assert client.get("/_softlb/servers", headers=AUTH).status_code == 200


def basic(user: str, password: str) -> dict[str, str]:
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


@pytest.mark.parametrize("user", ["", "admin", "any one", "ü"])
def test_the_token_works_as_a_basic_password_with_any_user(secured: Client, user: str) -> None:
    """HTTP Basic with the token as the password is accepted, whatever the user name."""
    assert secured.get("/_softlb/servers", headers=basic(user, TOKEN)).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        basic("admin", "wrong"),
        basic(TOKEN, ""),
        basic("admin", TOKEN + "x"),
        {"Authorization": "Basic " + base64.b64encode(TOKEN.encode()).decode()},
        {"Authorization": "Basic !!!not-base64"},
        {"Authorization": "Basic"},
    ],
    ids=["wrong", "token-as-user", "longer", "no-colon", "garbage", "empty"],
)
def test_a_wrong_basic_password_is_401(secured: Client, pool: Pool, headers: Any) -> None:
    """Basic credentials without the token as the password get 401 and change nothing."""
    before = members(pool)
    resp = send(secured, "POST", "/_softlb/servers", {"url": NEW}, headers=headers)
    assert "wrong" in error_of(resp, 401)
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="softlb"'
    assert members(pool) == before


# --------------------------------------------------------------------------- Origin


WRITES = [
    ("POST", "/_softlb/servers", {"url": NEW}),
    ("PATCH", "/_softlb/servers", {"url": A, "weight": 3}),
    ("DELETE", "/_softlb/servers", {"url": A}),
    ("POST", "/upload_server", {"url": NEW}),
    ("DELETE", "/delete_server", {"url": A}),
    ("PUT", "/_softlb/servers", {"url": A}),
]


@pytest.mark.parametrize(("method", "path", "body"), WRITES)
@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "http://localhost:8081",
        "http://127.0.0.1:8080",
        "null",
        "",
        "not a url",
        "http://localhost:8080.evil.example",
    ],
)
def test_a_cross_site_write_is_403(
    client: Client, pool: Pool, origin: str, method: str, path: str, body: object
) -> None:
    """A state-changing call whose Origin names another host (or is null) gets 403 and
    changes nothing, whichever route it is sent to."""
    before = members(pool)
    headers = {"Origin": origin, "Host": "localhost:8080"}
    message = error_of(send(client, method, path, body, headers=headers), 403)
    assert "cross-site" in message
    assert members(pool) == before


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://localhost:8080", "localhost:8080"),
        ("http://LocalHost:8080", "localhost:8080"),
        ("http://localhost:8080", "LOCALHOST:8080"),
        ("http://lb.example", "lb.example"),
        ("http://lb.example", "lb.example:80"),
        ("http://[::1]:8080", "[::1]:8080"),
    ],
)
def test_a_same_origin_write_is_allowed(client: Client, origin: str, host: str) -> None:
    """An Origin naming the Host the call was sent to (case and default port aside) passes."""
    headers = {"Origin": origin, "Host": host}
    assert (
        send(client, "POST", "/_softlb/servers", {"url": NEW}, headers=headers).status_code == 201
    )


def test_reads_and_writes_without_origin_are_not_checked(client: Client) -> None:
    """GET with a foreign Origin and a write with no Origin (curl) are not refused."""
    assert (
        client.get("/_softlb/servers", headers={"Origin": "http://evil.example"}).status_code == 200
    )
    assert send(client, "POST", "/_softlb/servers", {"url": NEW}).status_code == 201


# --------------------------------------------------------------------------- properties


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)
URLS = st.one_of(
    st.sampled_from([A, B, NEW, "http://[::1]]:80", "http://h:0", "localhost:8081"]),
    st.builds(
        lambda scheme, host, port: f"{scheme}{host}{port}",
        st.sampled_from(["http://", "https://", "", "ftp://", "HTTP://"]),
        st.text(max_size=30),
        st.sampled_from(["", ":80", ":0", ":65536", ":-1", ":x"]),
    ),
    st.text(max_size=40),
)
BODIES = st.one_of(
    JSON_VALUES,
    st.fixed_dictionaries(
        {"url": URLS},
        optional={
            "weight": st.one_of(st.integers(-5, MAX_WEIGHT + 5), JSON_VALUES),
            "draining": st.one_of(st.booleans(), JSON_VALUES),
            "extra": JSON_VALUES,
        },
    ),
)
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))


@PROPERTY
@given(
    method=st.sampled_from(["POST", "PATCH", "DELETE"]),
    path=st.sampled_from(["/_softlb/servers", "/upload_server", "/delete_server"]),
    body=BODIES,
)
def test_random_bodies_never_get_a_5xx_and_a_4xx_changes_nothing(
    method: str, path: str, body: object
) -> None:
    """Whatever JSON body and URL is sent to a writing route, the answer is never a 5xx, and
    a 4xx leaves the pool exactly as it was."""
    pool = Pool([A, Backend(B, weight=3)])
    client = Client(AdminApi(pool))
    before = members(pool)
    resp = send(client, method, path, json.dumps(body))
    assert resp.status_code < 500, resp.get_data(as_text=True)
    if resp.status_code >= 400:
        error_of(resp, resp.status_code)
        assert members(pool) == before


@PROPERTY
@given(raw=st.binary(max_size=200), method=st.sampled_from(["POST", "PATCH", "DELETE"]))
def test_random_bytes_never_get_a_5xx(raw: bytes, method: str) -> None:
    """Arbitrary bytes as a body are a 4xx (or, by chance, a valid call), never a 5xx."""
    pool = Pool([A, Backend(B, weight=3)])
    before = members(pool)
    resp = send(Client(AdminApi(pool)), method, "/_softlb/servers", raw)
    assert resp.status_code < 500
    if resp.status_code >= 400:
        assert members(pool) == before
