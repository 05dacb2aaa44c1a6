"""TLS on both engines: termination with the config's ``tls`` or ``--certfile/--keyfile``
(SPEC §1, §2), and https backends whose certificate a test CA signed."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator

import pytest

from tests.engine.conftest import StartBalancer
from tests.helpers.hostile import RawClient, TLSBackend
from tests.helpers.servers import TestBackend

trustme = pytest.importorskip("trustme")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pems(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PEM files of a certificate for 127.0.0.1 and localhost, its key, and the CA."""
    directory = tmp_path_factory.mktemp("pems")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: directory / f"{name}.pem" for name in ("cert", "key", "ca")}
    paths["cert"].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    ca.cert_pem.write_to_path(str(paths["ca"]))
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture(scope="module")
def backend() -> Iterator[TestBackend]:
    with TestBackend() as server:
        yield server


@pytest.mark.parametrize("how", ["config", "flags"])
def test_tls_termination(
    balancer: StartBalancer,
    backend: TestBackend,
    pems: dict[str, str],
    client_context: ssl.SSLContext,
    how: str,
) -> None:
    """The listener speaks HTTPS with the given certificate, and the backend is told
    X-Forwarded-Proto: https."""
    if how == "config":
        config = {
            "servers": [backend.url],
            "tls": {"certfile": pems["cert"], "keyfile": pems["key"]},
        }
        lb = balancer(config, ssl_context=client_context)
    else:
        lb = balancer(
            {"servers": [backend.url]},
            "--certfile",
            pems["cert"],
            "--keyfile",
            pems["key"],
            ssl_context=client_context,
        )
    status, _, _ = lb.get("/echo?tls=1")
    assert status == 200
    assert backend.last.target == "/echo?tls=1"
    assert backend.last.header_values("X-Forwarded-Proto") == ["https"]
    with lb.raw(timeout=3.0) as client:  # and a second request on one TLS connection
        client.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert [client.read_response().status for _ in range(2)] == [200, 200]


def test_plain_http_to_the_tls_port_gets_400(
    balancer: StartBalancer,
    backend: TestBackend,
    pems: dict[str, str],
    client_context: ssl.SSLContext,
) -> None:
    """Plain HTTP sent to a TLS listener gets a plain-text 400 that says so, then the close
    (nginx's answer), and nothing reaches the backend; HTTPS on the same port still works.
    Both engines (the threaded one peeks before gunicorn's handshake, which closed silently)."""
    config = {"servers": [backend.url], "tls": {"certfile": pems["cert"], "keyfile": pems["key"]}}
    lb = balancer(config, ssl_context=client_context)
    with RawClient(lb.port, timeout=3.0) as client:  # no TLS
        client.send(b"GET /plain-to-tls HTTP/1.1\r\nHost: x\r\n\r\n")
        response = client.read_response()
        assert (response.status, response.body) == (
            400, b"400 Bad Request: plain HTTP was sent to an HTTPS port\n"
        )  # fmt: skip
        client.wait_closed(timeout=2.0)
    assert "/plain-to-tls" not in [seen.target for seen in backend.requests]
    assert lb.get("/after")[0] == 200


@pytest.mark.parametrize("how", ["SSL_CERT_FILE", "config"])
def test_https_backend_signed_by_a_test_ca(
    balancer: StartBalancer, pems: dict[str, str], how: str
) -> None:
    """An https backend whose certificate a test CA signed is proxied when softlb trusts that
    CA: through OpenSSL's SSL_CERT_FILE, or the config's backend_tls.ca_file."""
    with TLSBackend(pems["cert"], pems["key"]) as tls_backend:
        if how == "SSL_CERT_FILE":
            lb = balancer({"servers": [tls_backend.url]}, env={"SSL_CERT_FILE": pems["ca"]})
        else:
            lb = balancer({"servers": [tls_backend.url], "backend_tls": {"ca_file": pems["ca"]}})
        assert lb.get("/")[::2] == (200, b"tls ok")


def test_https_backend_with_an_untrusted_certificate_is_refused(
    balancer: StartBalancer, pems: dict[str, str]
) -> None:
    """Verification is on by default: a backend whose certificate no trusted CA signed gets
    no request; the client gets a 502 that says why, not the backend's answer."""
    with TLSBackend(pems["cert"], pems["key"]) as tls_backend:
        lb = balancer({"servers": [tls_backend.url], "retries": 0})
        status, _, body = lb.get("/")
        assert status == 502, body
        assert b"tls ok" not in body


@pytest.mark.parametrize("trusted", [True, False])
def test_health_probe_checks_https_backends_with_backend_tls(
    balancer: StartBalancer, pems: dict[str, str], trusted: bool
) -> None:
    """The health checker's probe trusts ``backend_tls.ca_file`` as the proxy does: a backend
    signed by that CA that starts down comes up; without the CA, one that starts up goes
    down (its certificate fails the probe)."""
    with TLSBackend(pems["cert"], pems["key"]) as tls_backend:
        config: dict[str, object] = {
            "servers": [tls_backend.url],
            "health_check": {
                "interval": "100ms", "timeout": "1s", "rise": 1, "fall": 1,
                "initial_state": "down" if trusted else "up",
            },
        }  # fmt: skip
        if trusted:
            config["backend_tls"] = {"ca_file": pems["ca"]}
        lb = balancer(config)
        deadline = time.monotonic() + 10
        while lb.servers()[tls_backend.url]["healthy"] is not trusted:
            assert time.monotonic() < deadline, lb.servers()
            time.sleep(0.1)
