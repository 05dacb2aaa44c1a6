"""The "bare 40-line urllib3 round-robin WSGI proxy": the floor softlb is measured against.

No retries, no health checks, no error pages: headers copied, hop-by-hop ones dropped, the body
streamed, backends taken in turn. Backends come from ``BENCH_BACKENDS`` (comma-separated URLs).
Run it under gunicorn: ``gunicorn -k gthread --threads 16 bare_urllib3:app``.
"""

import itertools
import os

import urllib3

HOP = {"connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade"}
HOP |= {"proxy-authorization", "proxy-authenticate", "trailer"}
POOLS = itertools.cycle(
    [
        urllib3.connection_from_url(url, maxsize=16, block=False, retries=False)
        for url in os.environ["BENCH_BACKENDS"].split(",")
    ]
)


def app(environ, start_response):
    headers = {
        key[5:].replace("_", "-").title(): value
        for key, value in environ.items()
        if key.startswith("HTTP_") and key[5:].replace("_", "-").lower() not in HOP
    }
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.replace("_", "-").title()] = environ[key]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else None
    resp = next(POOLS).urlopen(
        environ["REQUEST_METHOD"],
        environ.get("RAW_URI") or environ["PATH_INFO"],
        body=body,
        headers=headers,
        redirect=False,
        preload_content=False,
        decode_content=False,
    )
    out = [(k, v) for k, v in resp.headers.iteritems() if k.lower() not in HOP]
    start_response(f"{resp.status} {resp.reason}", out)

    def stream():
        try:
            yield from resp.stream(65536, decode_content=False)
        finally:
            resp.release_conn()

    return stream()
