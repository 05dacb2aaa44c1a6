"""The Flask + requests toy load balancer, as tutorials write it.

A catch-all route, ``requests.request()`` to the next backend in turn (a new connection each
time, as such toys do), the whole answer read into memory and handed back. Backends come from
``BENCH_BACKENDS``. Run it under gunicorn: ``gunicorn -k gthread --threads 16 toy_flask:app``.
"""

import itertools
import os

import requests
from flask import Flask, Response, request

BACKENDS = itertools.cycle(os.environ["BENCH_BACKENDS"].split(","))
HOP = {"connection", "keep-alive", "transfer-encoding", "content-encoding", "content-length"}

app = Flask(__name__)


@app.route("/", defaults={"path": ""}, methods=["GET", "POST", "PUT", "DELETE", "HEAD"])
@app.route("/<path:path>", methods=["GET", "POST", "PUT", "DELETE", "HEAD"])
def proxy(path):
    resp = requests.request(
        request.method,
        f"{next(BACKENDS)}/{path}",
        params=request.args,
        headers={k: v for k, v in request.headers if k.lower() != "host"},
        data=request.get_data(),
        allow_redirects=False,
        timeout=30,
    )
    headers = [(k, v) for k, v in resp.raw.headers.items() if k.lower() not in HOP]
    return Response(resp.content, resp.status_code, headers)
