"""The requests adapter and the httpx transport, against real local backends.

Both send through BalancedClient, so these tests check what each library adds: requests and
responses carried across faithfully, failover, and errors as the library's own exceptions.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests

from softlb import Pool
from softlb.client import BalancedClient, RetryBudget
from softlb.contrib.httpx_transport import BalancedTransport
from softlb.contrib.requests_adapter import BalancedAdapter
from softlb.errors import NoBackendAvailable, UpstreamBroken, UpstreamConnectError
from tests.helpers.servers import COOKIES, TestBackend

BASE = "http://service"


def pool_of(servers: list[Any], balancer: str = "round_robin") -> Pool:
    return Pool(servers, balancer=balancer)


@pytest.fixture
def session_for() -> Iterator[Any]:
    """Makes requests sessions with a BalancedAdapter mounted on http://service/."""
    sessions: list[requests.Session] = []

    def make(servers: list[Any], **options: Any) -> requests.Session:
        session = requests.Session()
        session.mount(f"{BASE}/", BalancedAdapter(pool_of(servers), **options))
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        session.close()


@pytest.fixture
def httpx_for() -> Iterator[Any]:
    """Makes httpx clients over a BalancedTransport with base URL http://service."""
    clients: list[httpx.Client] = []

    def make(servers: list[Any], **options: Any) -> httpx.Client:
        client = httpx.Client(
            transport=BalancedTransport(pool_of(servers), **options), base_url=BASE
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


# -- requests ------------------------------------------------------------------------------


def test_requests_get_spreads_over_backends(backends: list[TestBackend], session_for: Any) -> None:
    """GETs through the adapter go round robin, path and query kept, answers intact."""
    session = session_for([b.url for b in backends])
    answers = [session.get(f"{BASE}/hello?x=1&y=%2F") for _ in range(3)]
    assert [r.headers["X-Backend"] for r in answers] == [str(b.port) for b in backends]
    for response, backend in zip(answers, backends, strict=True):
        assert response.status_code == 200
        assert response.reason == "OK"
        assert response.text == f"ok from {backend.port}"
        assert response.url == f"{BASE}/hello?x=1&y=%2F"
        assert response.raw.url == f"{backend.url}/hello?x=1&y=%2F"
        assert backend.last.target == "/hello?x=1&y=%2F"


def test_requests_post_carries_headers_and_body(backend: TestBackend, session_for: Any) -> None:
    """Method, headers and body reach the backend; the backend's own Host is sent."""
    session = session_for([backend.url])
    response = session.post(f"{BASE}/echo", data=b"\x00binary\xff", headers={"X-Test": "yes"})
    assert response.status_code == 200
    seen = backend.last
    assert seen.method == "POST"
    assert seen.body == b"\x00binary\xff"
    assert seen.header("X-Test") == "yes"
    assert seen.header("Host") == f"127.0.0.1:{backend.port}"
    assert response.json()["body_length"] == 8


def test_requests_json_and_form_bodies(backend: TestBackend, session_for: Any) -> None:
    """requests' json= and data= encodings arrive as requests made them."""
    session = session_for([backend.url])
    session.put(f"{BASE}/echo", json={"a": 1})
    assert json.loads(backend.last.body) == {"a": 1}
    session.post(f"{BASE}/echo", data={"k": "v w"})
    assert backend.last.body == b"k=v+w"
    assert backend.last.header("Content-Type") == "application/x-www-form-urlencoded"


def test_requests_streamed_upload(backend: TestBackend, session_for: Any) -> None:
    """A generator body is sent chunked."""
    session = session_for([backend.url])
    response = session.post(f"{BASE}/echo", data=(piece for piece in [b"ab", b"cd"]))
    assert response.status_code == 200
    assert backend.last.body == b"abcd"
    assert backend.last.header("Transfer-Encoding") == "chunked"


def test_requests_status_headers_and_cookies(backend: TestBackend, session_for: Any) -> None:
    """Error statuses come back as responses; repeated Set-Cookie fill the session's jar."""
    session = session_for([backend.url])
    assert session.get(f"{BASE}/status/404").status_code == 404
    response = session.get(f"{BASE}/cookies")
    assert response.cookies.get_dict() == {"a": "1", "b": "2"}
    assert session.cookies.get_dict() == {"a": "1", "b": "2"}
    assert len(COOKIES) == 2


def test_requests_decodes_gzip(backend: TestBackend, session_for: Any) -> None:
    """A gzip answer is decoded by requests, streamed or not."""
    session = session_for([backend.url])
    assert session.get(f"{BASE}/gzip").content.startswith(b"softlb gzip test body")
    with session.get(f"{BASE}/gzip", stream=True) as response:
        assert response.content.startswith(b"softlb gzip test body")


def test_requests_failover(backend: TestBackend, refused_url: str, session_for: Any) -> None:
    """A refused connection fails over to another backend, for POST too."""
    session = session_for([refused_url, backend.url])
    assert session.get(f"{BASE}/").status_code == 200
    assert session.post(f"{BASE}/echo", data=b"x").status_code == 200
    assert backend.request_count == 2


def test_requests_stream_counts_in_flight(backend: TestBackend, session_for: Any) -> None:
    """With stream=True the request is in flight until the body has been read."""
    session = session_for([backend.url])
    adapter = session.get_adapter(f"{BASE}/")
    assert isinstance(adapter, BalancedAdapter)
    with session.get(f"{BASE}/big/200000", stream=True) as response:
        assert adapter.client.pool.in_flight == 1
        assert len(response.content) == 200000
        assert adapter.client.pool.in_flight == 0


def test_requests_errors_are_requests_exceptions(
    backends: list[TestBackend], session_for: Any
) -> None:
    """No answer: ConnectionError or ReadTimeout, with the softlb error as the cause."""
    session = session_for([b.url for b in backends], read_timeout=0.2)
    with pytest.raises(requests.ReadTimeout):
        session.get(f"{BASE}/slow/5")
    with pytest.raises(requests.ConnectionError) as caught:
        session.post(f"{BASE}/drop")
    assert isinstance(caught.value.__cause__, UpstreamBroken)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        session.get(f"{BASE}/reset-mid-body", stream=True).content  # noqa: B018
    empty = session_for([])
    with pytest.raises(requests.ConnectionError) as caught:
        empty.get(f"{BASE}/")
    assert isinstance(caught.value.__cause__, NoBackendAvailable)


def test_requests_key_feeds_consistent_hash(backends: list[TestBackend]) -> None:
    """key(request) picks the backend for a consistent-hash pool."""
    adapter = BalancedAdapter(
        pool_of([b.url for b in backends], "consistent_hash"),
        key=lambda request: request.headers.get("X-User"),
    )
    with requests.Session() as session:
        session.mount(f"{BASE}/", adapter)
        seen = {session.get(f"{BASE}/", headers={"X-User": "42"}).text for _ in range(5)}
    assert len(seen) == 1


def test_requests_adapters_can_share_a_client(backend: TestBackend) -> None:
    """A BalancedClient given to adapters is shared and left open; options go to it."""
    with BalancedClient(pool_of([backend.url])) as client:
        with requests.Session() as one, requests.Session() as two:
            one.mount(f"{BASE}/", BalancedAdapter(client))
            two.mount(f"{BASE}/", BalancedAdapter(client))
            assert one.get(f"{BASE}/").ok and two.get(f"{BASE}/").ok
        assert client.request("GET", "/").status == 200  # still open
        with pytest.raises(TypeError, match="retries"):
            BalancedAdapter(client, retries=1)
    with pytest.raises(TypeError, match="Pool or BalancedClient"):
        BalancedAdapter("http://127.0.0.1:1")  # type: ignore[arg-type]


# -- httpx ---------------------------------------------------------------------------------


def test_httpx_get_spreads_over_backends(backends: list[TestBackend], httpx_for: Any) -> None:
    """GETs through the transport go round robin, path and query kept, answers intact."""
    client = httpx_for([b.url for b in backends])
    answers = [client.get("/hello", params={"q": "a b"}) for _ in range(3)]
    assert [r.headers["x-backend"] for r in answers] == [str(b.port) for b in backends]
    for response, backend in zip(answers, backends, strict=True):
        assert response.status_code == 200
        assert response.reason_phrase == "OK"
        assert response.http_version == "HTTP/1.1"
        assert response.text == f"ok from {backend.port}"
        assert backend.last.target == "/hello?q=a+b"
        assert backend.last.header("Host") == f"127.0.0.1:{backend.port}"


def test_httpx_post_carries_headers_and_body(backend: TestBackend, httpx_for: Any) -> None:
    """Method, headers (repeated ones joined) and body reach the backend."""
    client = httpx_for([backend.url])
    response = client.post(
        "/echo",
        content=b"payload",
        headers=[("X-Test", "yes"), ("X-Multi", "1"), ("X-Multi", "2")],
    )
    assert response.status_code == 200
    assert response.json()["body_length"] == 7
    seen = backend.last
    assert (seen.method, seen.body) == ("POST", b"payload")
    assert seen.header("X-Test") == "yes"
    assert seen.header("X-Multi") == "1, 2"


def test_httpx_explicit_host_is_kept(backend: TestBackend, httpx_for: Any) -> None:
    """A Host the caller set (not httpx's default for the base URL) is sent as it is."""
    client = httpx_for([backend.url])
    client.get("/", headers={"Host": "api.example"})
    assert backend.last.header("Host") == "api.example"


def test_httpx_streamed_upload(backend: TestBackend, httpx_for: Any) -> None:
    """A generator body is sent chunked."""
    client = httpx_for([backend.url])
    response = client.post("/echo", content=(piece for piece in [b"ab", b"cd"]))
    assert response.status_code == 200
    assert backend.last.body == b"abcd"


def test_httpx_status_headers_and_gzip(backend: TestBackend, httpx_for: Any) -> None:
    """Statuses, repeated headers and gzip bodies come back as httpx would get them."""
    client = httpx_for([backend.url])
    assert client.get("/status/503").status_code == 503
    response = client.get("/cookies")
    assert response.headers.get_list("set-cookie") == list(COOKIES)
    assert client.get("/gzip").content.startswith(b"softlb gzip test body")


def test_httpx_failover(backend: TestBackend, refused_url: str, httpx_for: Any) -> None:
    """A refused connection fails over to another backend, for POST too."""
    client = httpx_for([refused_url, backend.url])
    assert client.get("/").status_code == 200
    assert client.post("/echo", content=b"x").status_code == 200
    assert backend.request_count == 2


def test_httpx_stream_counts_in_flight(backend: TestBackend, httpx_for: Any) -> None:
    """A streamed response is in flight until read; closing it early ends it too."""
    client = httpx_for([backend.url])
    transport = client._transport
    assert isinstance(transport, BalancedTransport)
    pool = transport.client.pool
    with client.stream("GET", "/big/200000") as response:
        assert pool.in_flight == 1
        assert len(response.read()) == 200000
        assert pool.in_flight == 0
    with client.stream("GET", "/big/200000") as response:
        assert pool.in_flight == 1
    assert pool.in_flight == 0
    assert pool.backends[0].failures == 0


def test_httpx_errors_are_httpx_exceptions(backends: list[TestBackend], httpx_for: Any) -> None:
    """No answer: ConnectError, ReadTimeout or ReadError, with the softlb error as the cause."""
    client = httpx_for([b.url for b in backends])
    with pytest.raises(httpx.ReadTimeout):
        client.get("/slow/5", timeout=httpx.Timeout(2.0, read=0.2))
    with pytest.raises(httpx.ReadError) as caught:
        client.post("/drop")
    assert isinstance(caught.value.__cause__, UpstreamBroken)
    with pytest.raises(httpx.ReadError):
        client.get("/reset-mid-body")
    with pytest.raises(httpx.ConnectError) as refused:
        httpx_for([]).get("/")
    assert isinstance(refused.value.__cause__, NoBackendAvailable)


def test_httpx_all_refused_is_connect_error(refused_url: str, httpx_for: Any) -> None:
    """When no backend could be connected httpx raises ConnectError."""
    client = httpx_for([refused_url])
    with pytest.raises(httpx.ConnectError) as caught:
        client.get("/")
    assert isinstance(caught.value.__cause__, UpstreamConnectError)


def test_httpx_budget_is_the_clients(backend: TestBackend, refused_url: str) -> None:
    """The transport retries under the client's budget: none left, no failover."""
    budget = RetryBudget(ratio=0, min_per_second=0)
    transport = BalancedTransport(pool_of([refused_url, backend.url]), budget=budget)
    with (
        httpx.Client(transport=transport, base_url=BASE) as client,
        pytest.raises(httpx.ConnectError),
    ):
        client.get("/")
    assert backend.request_count == 0


# -- optional dependencies -----------------------------------------------------------------


def test_public_names_are_pinned() -> None:
    """Each adapter module exports its one class; the package itself exports nothing."""
    import softlb.contrib
    import softlb.contrib.httpx_transport
    import softlb.contrib.requests_adapter

    assert softlb.contrib.__all__ == []
    assert softlb.contrib.requests_adapter.__all__ == ["BalancedAdapter"]
    assert softlb.contrib.httpx_transport.__all__ == ["BalancedTransport"]


@pytest.mark.parametrize(
    ("module", "library", "extra"),
    [
        ("softlb.contrib.requests_adapter", "requests", "softlb[requests]"),
        ("softlb.contrib.httpx_transport", "httpx", "softlb[httpx]"),
    ],
)
def test_missing_library_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, module: str, library: str, extra: str
) -> None:
    """Without the library, importing the adapter says which extra to install."""
    monkeypatch.setitem(sys.modules, library, None)
    monkeypatch.delitem(sys.modules, module)
    with pytest.raises(ImportError, match=re.escape(f"pip install {extra}")):
        importlib.import_module(module)
