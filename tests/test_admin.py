"""Tests for softlb.admin: the admin API's routes, validation, token and status page (SPEC §5)."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from typing import Any
from wsgiref.validate import validator

import pytest
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
def removed() -> list[str]:
    """The URLs the admin API's on_remove hook was called with."""
    return []


@pytest.fixture
def api(pool: Pool, removed: list[str]) -> AdminApi:
    """An AdminApi over ``pool`` with the default prefix, no token, seed routes on."""
    return AdminApi(pool, on_remove=removed.append)


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
    """DELETE removes the backend, answers 200 with it and calls on_remove with its URL."""
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


def test_on_remove_failure_does_not_fail_removal(
    pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception in on_remove is logged; the removal still answers 200."""

    def broken(url: str) -> None:
        raise RuntimeError("cannot close")

    client = Client(AdminApi(pool, on_remove=broken))
    with caplog.at_level(logging.ERROR, logger="softlb.admin"):
        resp = send(client, "DELETE", "/_softlb/servers", {"url": A})
    assert resp.status_code == 200
    assert A not in pool
    assert "on_remove" in caplog.text


def test_on_remove_can_be_replaced(pool: Pool) -> None:
    """on_remove is a public attribute: the hook in place at removal time is the one called."""
    first: list[str] = []
    second: list[str] = []
    api = AdminApi(pool, on_remove=first.append)
    api.on_remove = second.append
    send(Client(api), "DELETE", "/_softlb/servers", {"url": A})
    assert first == []
    assert second == [A]


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
    assert second.url in app.proxy.upstream._backends
    assert send(client, "DELETE", "/_softlb/servers", {"url": second.url}).status_code == 200
    assert second.url not in app.proxy.upstream._backends  # on_remove closed its connections
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
