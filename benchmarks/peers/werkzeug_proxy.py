"""werkzeug's ``ProxyMiddleware`` in front of the backends, taken in turn.

``ProxyMiddleware`` proxies path prefixes to one target each and cannot map ``/`` (it turns
the prefix into ``//``), so this calls its per-request ``proxy_to()`` app for every path, as
the middleware itself does once a prefix matched; the only addition is picking the next
backend. The client's Host is kept (``"host": None``), as a load balancer does.
"""

import itertools
import os

from werkzeug.middleware.http_proxy import ProxyMiddleware


def _not_found(environ, start_response):
    start_response("404 Not Found", [("Content-Length", "0")])
    return []


_TARGETS = {
    f"/backend{i}/": {"target": url, "host": None}
    for i, url in enumerate(os.environ["BENCH_BACKENDS"].split(","))
}
_MIDDLEWARE = ProxyMiddleware(_not_found, _TARGETS, timeout=30)
_OPTIONS = itertools.cycle(list(_MIDDLEWARE.targets.values()))


def app(environ, start_response):
    proxied = _MIDDLEWARE.proxy_to(next(_OPTIONS), environ["PATH_INFO"], "")
    return proxied(environ, start_response)
