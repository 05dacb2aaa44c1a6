"""TLS on both engines: termination with the config's ``tls`` or ``--certfile/--keyfile``
(SPEC §1, §2), and https backends whose certificate a test CA signed."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import pytest

from tests.engine.conftest import StartBalancer
from tests.helpers.hostile import TLSBackend
from tests.helpers.servers import TestBackend

trustme = pytest.importorskip("trustme")

pytestmark = pytest.mark.integration

#: The config key that names the CA for https backends, once SPEC has one (None: not yet).
BACKEND_CA_KEY: str | None = None


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


@pytest.mark.parametrize("how", ["SSL_CERT_FILE", "config"])
def test_https_backend_signed_by_a_test_ca(
    balancer: StartBalancer, pems: dict[str, str], how: str
) -> None:
    """An https backend whose certificate a test CA signed is proxied when softlb trusts that
    CA: through OpenSSL's SSL_CERT_FILE, or the config key for it."""
    with TLSBackend(pems["cert"], pems["key"]) as tls_backend:
        if how == "SSL_CERT_FILE":
            lb = balancer({"servers": [tls_backend.url]}, env={"SSL_CERT_FILE": pems["ca"]})
        else:
            if BACKEND_CA_KEY is None:
                pytest.skip("SPEC §2 has no config key yet for the CA of https backends")
            lb = balancer({"servers": [tls_backend.url], BACKEND_CA_KEY: pems["ca"]})
        assert lb.get("/")[::2] == (200, b"tls ok")
