"""Tests for softlb.sticky: cookie-inserted session affinity."""

from __future__ import annotations

import http.client
import re

import pytest

from softlb.backend import Backend
from softlb.pool import Pool
from softlb.sticky import ID_LENGTH, StickySessions
from tests.helpers.servers import TestBackend

A, B, C = "http://a:1", "http://b:1", "http://c:1"


def test_a_backend_id_is_opaque_stable_and_keyed() -> None:
    sticky = StickySessions("lb", secret="prod")
    ident = sticky.backend_id(Backend("http://10.0.0.7:8080"))
    assert re.fullmatch(r"[0-9a-f]{16}", ident) and len(ident) == ID_LENGTH
    assert "10.0.0.7" not in ident and "8080" not in ident
    # Another worker or host of the same cluster computes the same id; another cluster not.
    assert StickySessions("other", secret="prod").backend_id("http://10.0.0.7:8080") == ident
    assert StickySessions("lb", secret="staging").backend_id("http://10.0.0.7:8080") != ident
    assert sticky.backend_id(Backend("http://10.0.0.8:8080")) != ident


def test_set_cookie_names_the_backend() -> None:
    sticky = StickySessions("lb", secret="prod")
    backend = Backend(A)
    assert sticky.set_cookie(backend) == (
        f"lb={sticky.backend_id(backend)}; Path=/; HttpOnly; SameSite=Lax"
    )
    secure = StickySessions("lb", secret="prod", secure=True)
    assert secure.set_cookie(backend).endswith("; SameSite=Lax; Secure")


@pytest.mark.parametrize("name", ["", "a b", "a;b", "a=b", "é", 'q"'])
def test_a_cookie_name_must_be_a_token(name: str) -> None:
    with pytest.raises(ValueError, match="sticky cookie name must be a non-empty HTTP token"):
        StickySessions(name)


def test_find_reads_the_cookie_among_others() -> None:
    pool = Pool([A, B, C])
    sticky = StickySessions("lb", secret="s")
    b = pool.get(B)
    ident = sticky.backend_id(b)
    assert sticky.find(pool, f"lb={ident}") is b
    assert sticky.find(pool, f"theme=dark; lb={ident}; x=1") is b
    assert sticky.find(pool, f'lb="{ident}"') is b
    assert sticky.find(pool, f"xlb={ident}; lb=garbage; lb={ident}") is b  # first valid one


@pytest.mark.parametrize(
    "header",
    [None, "", "theme=dark", "lb=", "lb=nothex!nothex!", "lb=0123456789abcdef", "lb", "LB=0123"],
)
def test_find_without_a_valid_cookie_is_none(header: str | None) -> None:
    pool = Pool([A, B])
    assert StickySessions("lb").find(pool, header) is None


def test_find_is_none_for_a_backend_out_of_rotation_and_sees_new_members() -> None:
    pool = Pool([A, B])
    sticky = StickySessions("lb", secret="s")
    cookie_b = f"lb={sticky.backend_id(B)}"
    assert sticky.find(pool, cookie_b) is pool.get(B)
    pool.drain(B)
    assert sticky.find(pool, cookie_b) is None
    pool.drain(B, False)
    pool.set_healthy(B, False, "probe failed")
    assert sticky.find(pool, cookie_b) is None
    pool.set_healthy(B, True)
    assert sticky.find(pool, cookie_b) is pool.get(B)
    pool.remove(B)
    assert sticky.find(pool, cookie_b) is None
    added = pool.add(C)
    assert sticky.find(pool, f"lb={sticky.backend_id(C)}") is added


def get(backend_url: str, cookie: str | None) -> str:
    """GET / from a real backend; its answer names its port."""
    host, port = backend_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/", headers={"Cookie": cookie} if cookie else {})
        response = conn.getresponse()
        response.read()
        return response.getheader("X-Backend") or ""
    finally:
        conn.close()


def test_a_client_sticks_to_its_backend_until_it_leaves_rotation(
    backends: list[TestBackend],
) -> None:
    """The recipe a proxy follows, against real backends: find, lease with prefer, Set-Cookie
    when the backend is not the one the cookie named."""
    pool = Pool([b.url for b in backends], balancer="round_robin")
    sticky = StickySessions("lb", secret="cluster")
    jar: str | None = None
    answered: list[str] = []
    set_cookies = 0

    def request() -> None:
        nonlocal jar, set_cookies
        wanted = sticky.find(pool, jar)
        with pool.lease(prefer=wanted) as backend:
            answered.append(get(backend.url, jar))
            if backend is not wanted:
                jar = sticky.set_cookie(backend).split(";")[0]
                set_cookies += 1

    for _ in range(6):
        request()
    assert len(set(answered)) == 1 and set_cookies == 1  # round robin would have spread them
    first = next(b for b in backends if str(b.port) == answered[0])
    pool.drain(first.url)
    answered.clear()
    for _ in range(4):
        request()
    assert len(set(answered)) == 1 and answered[0] != str(first.port)
    assert set_cookies == 2  # re-set once, on the first request balanced afresh
