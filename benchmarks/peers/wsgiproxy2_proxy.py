"""WSGIProxy2's ``HostProxy``, one per backend, taken in turn.

``BENCH_WSGIPROXY_CLIENT`` picks its HTTP client: ``urllib3`` (a ``PoolManager`` whose pools
keep 16 connections, one per gunicorn thread; WSGIProxy2's own default keeps one) or
``httplib`` (its default client: http.client, a new connection per request).
"""

import itertools
import os

import urllib3
from wsgiproxy import HostProxy

_CLIENT = os.environ.get("BENCH_WSGIPROXY_CLIENT", "urllib3")
_URLS = os.environ["BENCH_BACKENDS"].split(",")

if _CLIENT == "urllib3":
    _MANAGER = urllib3.PoolManager(10, maxsize=16, block=False, retries=False)
    _PROXIES = [HostProxy(url, client="urllib3", pool=_MANAGER) for url in _URLS]
else:
    _PROXIES = [HostProxy(url) for url in _URLS]
_CYCLE = itertools.cycle(_PROXIES)


def app(environ, start_response):
    return next(_CYCLE)(environ, start_response)
