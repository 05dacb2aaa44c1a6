"""The WSGI reverse proxy in-process (werkzeug's test client) in front of real backends.

Each test asserts on what the backend received as well as on what the client got back, in the
manner of Go's reverseproxy_test.go.
"""

from __future__ import annotations

import gzip
import io
import json
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from gunicorn.http.errors import InvalidChunkSize
from werkzeug.test import Client

from softlb import Backend, Pool
from softlb.errors import ProxyError
from softlb.http.upstream import SMALL_BODY
from softlb.wsgi import LoadBalancer, UpstreamRequest
from tests.helpers.raw_backend import RawBackend
from tests.helpers.servers import (
    COOKIES,
    GZIP_PLAIN,
    RefusingURL,
    TestBackend,
    body_chunks,
    body_sha256,
)


def make(servers: list[Any], **options: Any) -> tuple[LoadBalancer, Client]:
    """A LoadBalancer over ``servers`` (round robin unless told) and a test client for it."""
    balancer = options.pop("balancer", "round_robin")
    lb = LoadBalancer(Pool(servers, balancer=balancer), **options)
    return lb, Client(lb)


@pytest.fixture
def proxy(backend: TestBackend) -> Iterator[tuple[LoadBalancer, Client]]:
    """A proxy in front of the one ``backend``."""
    lb, client = make([backend.url])
    yield lb, client
    lb.close()


def echo(response: Any) -> dict[str, Any]:
    """The JSON the backend's /echo answered with."""
    data: dict[str, Any] = json.loads(response.get_data())
    return data


def headers_of(data: dict[str, Any]) -> dict[str, str]:
    """The echoed request headers as a dict with lower-case names."""
    return {name.lower(): value for name, value in data["headers"]}


# -- paths, methods, bodies ----------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/a%2Fb/%7Euser?q=a%20b&x=1&x=2",
        "/echo/%2e%2E/x?y=%zz",
        "/echo;params?a=b;c",
        "/echo?",
        "/echo//double//slashes",
        "/caf%C3%A9?q=%E2%9C%93",
        "/echo?a=1&a=2&a=3&empty=&=x",
    ],
)
def test_path_and_query_reach_the_backend_byte_for_byte(
    backend: TestBackend, proxy: tuple[LoadBalancer, Client], target: str
) -> None:
    """The raw request target (gunicorn's RAW_URI) is forwarded exactly as the client sent it."""
    _, client = proxy
    response = client.get(target, environ_overrides={"RAW_URI": target})
    assert response.status_code == 200
    assert backend.last.target == target


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"])
def test_every_method_is_forwarded(
    backend: TestBackend, proxy: tuple[LoadBalancer, Client], method: str
) -> None:
    """Any method, standard or not, reaches the backend unchanged with its body."""
    _, client = proxy
    response = client.open("/echo", method=method, data=b"payload")
    assert response.status_code == 200
    assert backend.last.method == method
    assert backend.last.body == b"payload"


def test_large_request_body_is_streamed_intact(
    backend: TestBackend, proxy: tuple[LoadBalancer, Client]
) -> None:
    """A request body larger than the read-at-once limit arrives whole and unchanged."""
    _, client = proxy
    body = b"".join(body_chunks(3 * 1024 * 1024 + 17))
    response = client.post("/upload", data=body)
    assert response.status_code == 200
    assert echo(response)["body_sha256"] == body_sha256(len(body))
    assert backend.last.header("Content-Length") == str(len(body))


def test_chunked_request_body_is_forwarded_chunked(
    backend: TestBackend, proxy: tuple[LoadBalancer, Client]
) -> None:
    """A chunked upload (no Content-Length) is streamed to the backend with chunked framing."""
    _, client = proxy
    body = b"".join(body_chunks(1_000_000))
    response = client.post(
        "/upload",
        input_stream=io.BytesIO(body),
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 200
    data = echo(response)
    assert data["body_length"] == len(body)
    assert data["body_sha256"] == body_sha256(len(body))
    assert backend.last.header("Transfer-Encoding") == "chunked"
    assert not backend.last.has_header("Content-Length")


def test_short_request_body_gets_400_and_nothing_is_sent(
    backend: TestBackend, proxy: tuple[LoadBalancer, Client]
) -> None:
    """A body shorter than its Content-Length is the client's fault: 400, backend untouched."""
    _, client = proxy
    response = client.post(
        "/echo",
        input_stream=io.BytesIO(b"abc"),
        environ_overrides={"CONTENT_LENGTH": "10"},
    )
    assert response.status_code == 400
    assert backend.request_count == 0


class _FailingInput:
    """A WSGI server's input stream whose client connection fails after ``good`` bytes."""

    def __init__(self, good: bytes, error: BaseException) -> None:
        self._data = io.BytesIO(good)
        self._error = error

    def read(self, size: int = -1) -> bytes:
        data = self._data.read(size)
        if not data:
            raise self._error
        return data


@pytest.mark.parametrize(
    ("error", "status"), [(TimeoutError("timed out"), 408), (OSError("reset by peer"), 400)]
)
def test_client_failing_during_a_streamed_body_is_not_the_backends_fault(
    backend: TestBackend, proxy: tuple[LoadBalancer, Client], error: BaseException, status: int
) -> None:
    """A 1 MiB upload whose client goes quiet (the server's read timed out: 408, SPEC §2's
    ``client_body``) or away (400) half-way: no failure recorded."""
    lb, client = proxy
    response = client.post(
        "/echo",
        environ_overrides={
            "CONTENT_LENGTH": str(1024 * 1024),
            "wsgi.input": _FailingInput(b"x" * 300_000, error),
        },
    )
    assert response.status_code == status
    member = lb.pool.get(backend.url)
    assert (member.failures, member.active) == (0, 0)


def test_answer_refused_by_the_wsgi_server_frees_its_lease(
    backend: TestBackend, proxy: tuple[LoadBalancer, Client]
) -> None:
    """If start_response raises (the server refuses a header), the lease and the backend
    connection are released all the same."""
    lb, _ = proxy
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": f"/big/{1024 * 1024}",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
    }

    def refuse(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        raise ValueError("header refused")

    with pytest.raises(ValueError, match="header refused"):
        lb._proxy(environ, refuse, 0.0)
    assert lb.pool.get(backend.url).active == 0


# -- headers -------------------------------------------------------------------------------


def test_request_hop_by_hop_headers_are_removed(
    backend: TestBackend, proxy: tuple[LoadBalancer, Client]
) -> None:
    """Connection, the headers it names, and every RFC 9110 hop-by-hop header stay behind."""
    _, client = proxy
    response = client.get(
        "/echo",
        headers={
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "hidden",
            "Keep-Alive": "timeout=5",
            "Proxy-Connection": "keep-alive",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "TE": "trailers",
            "Upgrade": "websocket",
            "Trailer": "X-T",
            "X-Kept": "yes",
        },
    )
    seen = headers_of(echo(response))
    for name in ("connection", "x-secret", "keep-alive", "proxy-connection",
                 "proxy-authorization", "te", "upgrade", "trailer"):  # fmt: skip
        assert name not in seen, name
    assert seen["x-kept"] == "yes"


def test_forwarding_headers_are_set_and_host_is_kept(
    backend: TestBackend, proxy: tuple[LoadBalancer, Client]
) -> None:
    """Host is the client's; X-Forwarded-For is appended to; -Proto and -Host are replaced."""
    _, client = proxy
    response = client.get(
        "/echo",
        headers={
            "Host": "shop.example:8443",
            "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Proto": "gopher",
            "X-Forwarded-Host": "evil.example",
        },
        environ_base={"REMOTE_ADDR": "198.51.100.7"},
        base_url="https://shop.example:8443",
    )
    seen = headers_of(echo(response))
    assert seen["host"] == "shop.example:8443"
    assert seen["x-forwarded-for"] == "203.0.113.9, 198.51.100.7"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"] == "shop.example:8443"


def test_no_header_is_invented(backend: TestBackend, proxy: tuple[LoadBalancer, Client]) -> None:
    """The proxy adds no User-Agent or Accept-Encoding the client did not send."""
    _, client = proxy
    seen = headers_of(echo(client.get("/echo")))
    assert "user-agent" not in seen
    assert "accept-encoding" not in seen


def test_response_hop_by_hop_headers_are_removed(proxy: tuple[LoadBalancer, Client]) -> None:
    """Hop-by-hop headers of the answer, and those its Connection names, do not reach the client."""
    _, client = proxy
    response = client.get("/hop")
    names = {name.lower() for name, _ in response.headers}
    for name in ("connection", "x-private", "keep-alive", "proxy-authenticate", "trailer",
                 "upgrade"):  # fmt: skip
        assert name not in names, name
    assert response.headers["X-Public"] == "yes"


def test_repeated_set_cookie_headers_are_kept(proxy: tuple[LoadBalancer, Client]) -> None:
    """Several Set-Cookie headers come back as several headers, in order."""
    _, client = proxy
    assert client.get("/cookies").headers.getlist("Set-Cookie") == list(COOKIES)


# -- answers -------------------------------------------------------------------------------


def test_redirect_is_passed_through_not_followed(
    backend: TestBackend, proxy: tuple[LoadBalancer, Client]
) -> None:
    """A 302 goes back to the client with its Location; the proxy does not follow it."""
    _, client = proxy
    response = client.get("/status/302")
    assert response.status_code == 302
    assert response.headers["Location"] == "/elsewhere"
    assert backend.request_count == 1


def test_gzip_body_is_not_decoded(proxy: tuple[LoadBalancer, Client]) -> None:
    """A compressed answer arrives compressed, with its Content-Encoding."""
    _, client = proxy
    response = client.get("/gzip", headers={"Accept-Encoding": "gzip"})
    assert response.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(response.get_data()) == GZIP_PLAIN


@pytest.mark.parametrize(("method", "path"), [("HEAD", "/"), ("GET", "/status/204"),
                                              ("GET", "/status/304")])  # fmt: skip
def test_answers_without_body(proxy: tuple[LoadBalancer, Client], method: str, path: str) -> None:
    """HEAD, 204 and 304 answers carry no body."""
    lb, client = proxy
    response = client.open(path, method=method)
    assert response.get_data() == b""
    assert lb.pool.in_flight == 0


def test_status_and_reason_are_passed_through(proxy: tuple[LoadBalancer, Client]) -> None:
    """A backend's 418 reaches the client as 418."""
    _, client = proxy
    assert client.get("/status/418").status_code == 418


def test_large_answer_is_streamed_in_bounded_memory(proxy: tuple[LoadBalancer, Client]) -> None:
    """A 32 MiB answer flows through in pieces without the proxy holding it in memory."""
    lb, client = proxy
    size = 32 * 1024 * 1024
    tracemalloc.start()
    try:
        response = client.get(f"/big/{size}", buffered=False)
        total = 0
        biggest = 0
        for piece in response.response:
            total += len(piece)
            biggest = max(biggest, len(piece))
        response.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size
    assert biggest <= 64 * 1024
    assert peak < 8 * 1024 * 1024
    assert lb.pool.in_flight == 0


def test_streamed_answer_counts_in_flight_until_closed(
    backend: TestBackend, proxy: tuple[LoadBalancer, Client]
) -> None:
    """A streamed answer keeps its backend's request in flight until the body is done."""
    lb, client = proxy
    response = client.get("/chunked/200000", buffered=False)
    assert lb.pool.get(backend.url).active == 1
    assert sum(len(p) for p in response.response) == 200000
    response.close()
    assert lb.pool.get(backend.url).active == 0
    assert lb.pool.get(backend.url).requests == 1


def test_failure_mid_body_cuts_the_answer_and_counts_a_failure(
    backend: TestBackend, proxy: tuple[LoadBalancer, Client]
) -> None:
    """When the backend dies mid-body the client's answer is cut short; no second status."""
    lb, client = proxy
    response = client.get("/reset-mid-body", buffered=False)
    assert response.status_code == 200
    with pytest.raises(ProxyError):
        for _ in response.response:
            pass
    response.close()
    member = lb.pool.get(backend.url)
    assert (member.active, member.failures) == (0, 1)


# -- failures, retries and error answers ---------------------------------------------------


def test_connect_refused_fails_over_for_any_method(backends: list[TestBackend]) -> None:
    """A POST to a refusing backend is sent to the next one, which gets it exactly once."""
    dead = RefusingURL()
    lb, client = make([dead, backends[0].url])
    response = client.post("/echo", data=b"once")
    assert response.status_code == 200
    assert backends[0].request_count == 1
    assert backends[0].last.body == b"once"
    assert lb.pool.get(dead).failures == 1
    assert lb.stats.snapshot()["retries"] == 1


def test_post_is_not_retried_after_it_was_sent(backends: list[TestBackend]) -> None:
    """A POST whose connection dies after sending is answered 502, never sent twice."""
    _, client = make([b.url for b in backends])
    response = client.post("/drop", data=b"x")
    assert response.status_code == 502
    assert sum(b.request_count for b in backends) == 1


def test_post_with_idempotency_key_is_retried(backends: list[TestBackend]) -> None:
    """A POST carrying Idempotency-Key may be sent again after a failure."""
    _, client = make([b.url for b in backends], retries=1)
    response = client.post("/drop", data=b"x", headers={"Idempotency-Key": "k1"})
    assert response.status_code == 502
    assert sum(b.request_count for b in backends) == 2


def test_idempotent_request_is_retried_up_to_the_limit(backends: list[TestBackend]) -> None:
    """A GET that fails after sending is tried on up to ``retries`` other backends."""
    _, client = make([b.url for b in backends], retries=2)
    assert client.get("/drop").status_code == 502
    assert [b.request_count for b in backends] == [1, 1, 1]
    _, client2 = make([b.url for b in backends], retries=0)
    assert client2.get("/drop").status_code == 502
    assert sum(b.request_count for b in backends) == 4


def test_all_backends_refusing_gives_502(refused_url: str) -> None:
    """When no try could connect the answer is 502 with a short reason, never a traceback."""
    _, client = make([refused_url, RefusingURL()])
    response = client.get("/")
    assert response.status_code == 502
    assert response.get_data(as_text=True).startswith("502 Bad Gateway")
    assert "Traceback" not in response.get_data(as_text=True)


def test_read_timeout_gives_504(backend: TestBackend) -> None:
    """A backend slower than the read timeout gets the client a 504."""
    lb, client = make([backend.url], read_timeout=0.3)
    response = client.get("/slow/3")
    assert response.status_code == 504
    assert "504" in response.get_data(as_text=True)
    assert lb.pool.get(backend.url).failures == 1


def test_no_backend_gives_503() -> None:
    """An empty pool, or one whose backends are all out of rotation, answers 503."""
    _, client = make([])
    assert client.get("/").status_code == 503
    lb, client = make(["http://127.0.0.1:9"])
    lb.pool.set_healthy("http://127.0.0.1:9", False)
    response = client.get("/")
    assert response.status_code == 503
    assert response.headers["Content-Type"].startswith("text/plain")


def test_out_of_rotation_backend_gets_nothing(backends: list[TestBackend]) -> None:
    """A backend taken out of rotation receives no request while others are in rotation."""
    lb, client = make([b.url for b in backends])
    lb.pool.set_healthy(backends[1].url, False)
    for _ in range(9):
        assert client.get("/").status_code == 200
    assert [b.request_count for b in backends] == [5, 0, 4]


# -- hooks and keys ------------------------------------------------------------------------


def test_rewrite_hook_changes_the_upstream_request(
    backend: TestBackend, proxy: tuple[LoadBalancer, Client]
) -> None:
    """A rewrite hook can change the target and headers sent to the backend."""
    lb, client = proxy

    def rewrite(request: UpstreamRequest, environ: dict[str, Any]) -> None:
        request.target = "/echo/rewritten"
        request.headers["X-Added"] = "1"

    lb.rewrite = rewrite
    client.get("/original")
    assert backend.last.target == "/echo/rewritten"
    assert backend.last.header("X-Added") == "1"


def test_error_handler_makes_the_error_answer(refused_url: str) -> None:
    """A custom error handler decides the answer for a request that could not be proxied."""

    def handler(environ: dict[str, Any], error: ProxyError) -> tuple[int, list[Any], bytes]:
        return error.status, [("Content-Type", "application/json")], b'{"oops": true}'

    _, client = make([refused_url], error_handler=handler)
    response = client.get("/")
    assert response.status_code == 502
    assert response.json == {"oops": True}


def test_internal_error_is_a_plain_500(proxy: tuple[LoadBalancer, Client]) -> None:
    """A bug in a hook gives the client a plain 500, not a traceback."""
    lb, client = proxy

    def rewrite(request: UpstreamRequest, environ: dict[str, Any]) -> None:
        raise RuntimeError("bug")

    lb.rewrite = rewrite
    response = client.get("/")
    assert response.status_code == 500
    assert "Traceback" not in response.get_data(as_text=True)
    assert lb.pool.in_flight == 0


def test_consistent_hash_on_a_header_keeps_a_user_on_one_backend(
    backends: list[TestBackend],
) -> None:
    """With hash_key header:X-User every request of one user lands on the same backend."""
    _, client = make([b.url for b in backends], balancer="consistent_hash",
                      hash_key="header:X-User")  # fmt: skip
    seen = {client.get("/", headers={"X-User": "alice"}).headers["X-Backend"] for _ in range(10)}
    assert len(seen) == 1
    users = {client.get("/", headers={"X-User": f"u{i}"}).headers["X-Backend"] for i in range(60)}
    assert len(users) == 3


def test_backend_base_path_is_prepended(backend: TestBackend) -> None:
    """A backend URL with a path sends every request under that path."""
    _, client = make([Backend(backend.url + "/api")])
    client.get("/v1/items?x=1")
    assert backend.last.target == "/api/v1/items?x=1"


def test_client_that_stops_mid_upload_is_not_held_against_the_backend(
    backend: TestBackend, proxy: tuple[LoadBalancer, Client]
) -> None:
    """A streamed upload cut short by the client gets 400 and records no backend failure."""
    lb, client = proxy
    response = client.post(
        "/upload",
        input_stream=io.BytesIO(b"x" * 100_000),
        environ_overrides={"CONTENT_LENGTH": "1000000"},
    )
    assert response.status_code == 400
    member = lb.pool.get(backend.url)
    assert (member.failures, member.active, member.healthy) == (0, 0, True)


def test_access_log_rows_replay_in_the_simulator(
    backends: list[TestBackend], tmp_path: Any
) -> None:
    """With an access log, each answered request (small or streamed) appends one CSV row that
    softlb simulate --csv reads back."""
    from softlb.access_log import AccessLog
    from softlb.simulate import simulate

    path = tmp_path / "access.csv"
    lb, client = make(
        [b.url for b in backends], hash_key="header:X-User", access_log=AccessLog(path)
    )
    for i in range(6):
        assert client.get("/", headers={"X-User": f"u{i}"}).status_code == 200
    response = client.get("/big/200000", buffered=False, headers={"X-User": "big"})
    assert sum(len(p) for p in response.response) == 200000
    response.close()
    lb.close()
    lines = path.read_text().splitlines()
    assert lines[0] == "time,key,latency,backend"
    rows = [line.split(",") for line in lines[1:]]
    assert [r[1] for r in rows] == [f"u{i}" for i in range(6)] + ["big"]
    assert {r[3] for r in rows} == {b.url for b in backends}
    assert all(float(r[2]) >= 0 for r in rows)
    report = simulate("recorded", csv_path=str(path), strategies=["round_robin"], seed=1)
    assert report.result("round_robin").answered == 7


# -- hardening: the client's bad requests, broken and early answers -------------------------------

RAW_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
def raw() -> Iterator[RawBackend]:
    """A scripted raw-socket backend answering 200 "ok" to everything."""
    with RawBackend([RAW_OK]) as backend:
        yield backend


def test_bad_chunk_from_the_client_is_400_and_no_backend_failure(raw: RawBackend) -> None:
    """Regression (hardening issue): gunicorn's InvalidChunkSize is neither OSError nor
    ValueError, so a client sending ``-5`` as a chunk size got a 500 and the backend a
    failure: any client could eject every backend. Now: 400, backend never contacted."""
    lb, client = make([raw.url])
    response = client.post(
        "/",
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input": _FailingInput(b"", InvalidChunkSize(b"-5"))},
    )
    assert response.status_code == 400
    assert raw.requests == []
    member = lb.pool.get(raw.url)
    assert (member.failures, member.requests, member.healthy) == (0, 0, True)


@pytest.mark.parametrize(
    "length",
    ["18446744073709551621", "9223372036854775808", "+5", "5, 6", "0x10", "\u0665", "-1", "1 0"],
)
def test_bad_content_length_is_400_before_any_backend(raw: RawBackend, length: str) -> None:
    """A Content-Length that is not a plain decimal below 2^63 never reaches a backend."""
    lb, client = make([raw.url])
    response = client.post(
        "/", input_stream=io.BytesIO(b"hello"), environ_overrides={"CONTENT_LENGTH": length}
    )
    assert response.status_code == 400
    assert response.get_data(as_text=True).startswith("400 Bad Request")
    assert raw.requests == []
    assert lb.pool.get(raw.url).failures == 0


@pytest.mark.parametrize("coding", ["gzip, chunked", "identity", "chunked, chunked", "br"])
def test_unsupported_transfer_coding_is_501(raw: RawBackend, coding: str) -> None:
    """Anything but ``chunked`` alone: 501 Not Implemented, nothing forwarded."""
    _, client = make([raw.url])
    response = client.post(
        "/",
        input_stream=io.BytesIO(b"5\r\nhello\r\n0\r\n\r\n"),
        headers={"Transfer-Encoding": coding},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 501
    assert raw.requests == []


def test_http11_request_without_host_is_400(raw: RawBackend) -> None:
    """HTTP/1.1 requires Host; HTTP/1.0 does not."""
    lb, _ = make([raw.url])
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "SERVER_NAME": "lb",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
    }
    statuses: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        statuses.append(status)

    b"".join(lb(environ, start_response))
    assert statuses == ["400 Bad Request"]
    assert raw.requests == []
    b"".join(lb({**environ, "SERVER_PROTOCOL": "HTTP/1.0"}, start_response))
    assert statuses[-1] == "200 OK"
    assert len(raw.requests) == 1


def test_small_chunked_body_goes_with_a_length_and_can_be_retried() -> None:
    """A chunked upload that ends within SMALL_BODY is read ahead and sent with a
    Content-Length (as nginx buffers it), so a PUT is replayed on a second backend."""
    with RawBackend(["close"]) as dropping, RawBackend([RAW_OK]) as good:
        lb, client = make([dropping.url, good.url])
        response = client.put(
            "/",
            input_stream=io.BytesIO(b"payload"),
            headers={"Transfer-Encoding": "chunked"},
            environ_overrides={"wsgi.input_terminated": True},
        )
        assert (response.status_code, response.get_data()) == (200, b"ok")
        assert [r.body for r in dropping.requests + good.requests] == [b"payload"] * 2
        assert b"Content-Length: 7\r\n" in good.requests[0].head
        assert b"transfer-encoding" not in good.requests[0].head.lower()
        lb.close()


def test_large_chunked_body_streams_whole_after_the_read_ahead(raw: RawBackend) -> None:
    """Beyond SMALL_BODY the body is streamed chunked, the part read ahead first."""
    _, client = make([raw.url])
    body = bytes(range(256)) * (SMALL_BODY // 256 * 3 + 1)
    response = client.post(
        "/",
        input_stream=io.BytesIO(body),
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 200
    assert raw.requests[0].body == body
    assert b"transfer-encoding: chunked" in raw.requests[0].head.lower()


def stall_after_chunked_head(sock: Any) -> None:
    sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")


def close_before_the_body(sock: Any) -> None:
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n")
    sock.close()


@pytest.mark.parametrize(
    ("step", "status"),
    [
        (stall_after_chunked_head, 504),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n", 502),
        (close_before_the_body, 502),
    ],
    ids=["stall", "bad-first-chunk", "closed-before-length"],
)
def test_answer_broken_before_its_first_byte_is_502_or_504(step: Any, status: int) -> None:
    """Regression (hardening issue): an answer whose body fails before its first byte went
    out became the WSGI server's own HTML 500 page; now the proxy's 502/504, and a failure."""
    with RawBackend([step]) as backend:
        lb, client = make([backend.url], read_timeout=0.3, retries=0)
        response = client.get("/")
        assert response.status_code == status
        assert response.get_data(as_text=True).startswith(str(status))
        assert lb.pool.get(backend.url).failures == 1
        assert lb.pool.get(backend.url).active == 0
        lb.close()


def test_early_answer_to_a_large_upload_is_passed_on() -> None:
    """A backend that answers 401 before reading a large streamed upload: the client gets
    that 401 (as with nginx), not a 502, and the backend no failure."""

    def deny(sock: Any) -> None:
        sock.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 7\r\n\r\ndenied\n")
        sock.close()

    with RawBackend([deny], read_body=False) as backend:
        lb, client = make([backend.url])
        size = 8 * 1024 * 1024
        response = client.put("/", input_stream=io.BytesIO(b"u" * size),
                              environ_overrides={"CONTENT_LENGTH": str(size)})  # fmt: skip
        assert (response.status_code, response.get_data()) == (401, b"denied\n")
        member = lb.pool.get(backend.url)
        assert (member.failures, member.active) == (0, 0)
        lb.close()


def test_failover_from_https_to_http_sends_no_skip_marker(raw: RawBackend) -> None:
    """Regression (hardening issue): the urllib3 client added ``User-Agent:
    @@@SKIP_HEADER@@@`` to the request's own headers, and the http backend tried next sent
    it on the wire. Clients now leave their inputs alone."""
    dead_tls = f"https://127.0.0.1:{RefusingURL().port}"
    lb, client = make([dead_tls, raw.url])
    response = client.get("/", headers={"X-Client": "1"})
    assert response.status_code == 200
    assert lb.pool.get(dead_tls).failures == 1
    head = raw.requests[0].head.lower()
    assert b"skip_header" not in head
    assert b"user-agent" not in head and b"accept-encoding" not in head
    lb.close()


# -- sticky sessions and max_connections (the WSGI proxy) -------------------------------------


def test_sticky_sessions_on_the_wsgi_proxy(backends: list[TestBackend], make_app: Any) -> None:
    app = make_app(
        servers=[b.url for b in backends], algorithm="round_robin", sticky={"cookie": "SRV"}
    )
    client = Client(app)
    first = client.get("/x", environ_overrides={"REMOTE_ADDR": "127.0.0.1"})
    cookie = first.headers["Set-Cookie"]
    assert cookie.startswith("SRV=")
    value = cookie.split(";", 1)[0].split("=", 1)[1]
    client.set_cookie("SRV", value)
    for _ in range(5):
        again = client.get("/x")
        assert again.get_data() == first.get_data()
        assert "Set-Cookie" not in again.headers


def test_max_connections_without_a_queue_is_503(backend: TestBackend, make_app: Any) -> None:
    """At its limit with timeouts.queue 0, a request gets 503 at once; the backend's own
    requests are unaffected."""
    import threading

    app = make_app(servers=[{"url": backend.url, "max_connections": 1}], timeouts={"queue": 0})
    holder = threading.Thread(target=lambda: Client(app).get("/slow/0.6"))
    holder.start()
    deadline = time.monotonic() + 3
    while app.pool.backends[0].active == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert Client(app).get("/x").status_code == 503
    holder.join(5)
    assert Client(app).get("/x").status_code == 200
