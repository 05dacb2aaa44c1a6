"""The seed project's Flask server, rebuilt on softlb's library.

It keeps the seed's API — ``POST /upload_server {"url": ...}`` adds a backend and
``DELETE /delete_server {"url": ...}`` removes one — as ordinary Flask routes, and proxies every
other request through softlb's :class:`~softlb.Pool` and :class:`~softlb.wsgi.LoadBalancer`, with
a :class:`~softlb.HealthChecker` probing the backends. It needs Flask
(``python -m pip install flask``). Run it with any of::

    python examples/flask_app.py                       # Flask's development server, port 8080
                                                       # (or $PORT)
    flask --app examples/flask_app.py run -p 8080       # the same (Flask finds create_app)
    gunicorn -k gthread --threads 16 -b 127.0.0.1:8080 'examples.flask_app:create_app()'

The config file is ``examples/config.json`` unless ``SOFTLB_CONFIG`` names another; its
``listen`` is not used here (the server command decides where to listen). Its backends are
``localhost:8081`` to ``8083``: ``python examples/flask_app.py`` with that default config starts
softlb's demo backends on whichever of those ports are free, so that the first run answers
(``curl http://127.0.0.1:8080/``) instead of ``503``; it prints what it serves.

``softlb serve`` gives you all of this plus the full admin API; this file shows how to put the
balancer inside an app of your own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

try:
    from flask import Flask, jsonify, request
except ImportError:  # one readable line, not a traceback
    raise SystemExit("examples/flask_app.py needs Flask: python -m pip install flask") from None

from softlb import Backend, BackendExists, HealthChecker, InvalidBackend, Pool, UnknownBackend
from softlb.balancers import balancer_by_name
from softlb.config import load_config
from softlb.wsgi import LoadBalancer

DEFAULT_CONFIG = Path(__file__).with_name("config.json")

#: The paths Flask answers; every other path goes to a backend.
SEED_ROUTES = frozenset({"/upload_server", "/delete_server"})


def create_app(config_path: str | os.PathLike[str] | None = None) -> Flask:
    """The Flask app: the seed's two routes, and the balancer behind every other path."""
    config = load_config(config_path or os.environ.get("SOFTLB_CONFIG") or DEFAULT_CONFIG)
    pool = Pool(
        [Backend(server.url, server.weight) for server in config.servers],
        balancer=balancer_by_name(config.algorithm),
        slow_start=config.slow_start,
    )
    hc = config.health_check
    checker = HealthChecker(
        pool,
        path=hc.path,
        interval=hc.interval,
        timeout=hc.timeout,
        rise=hc.rise,
        fall=hc.fall,
        expected_status=hc.expected_status,
        initial_state=hc.initial_state,
    )
    proxy = LoadBalancer(
        pool,
        retries=config.retries,
        connect_timeout=config.timeouts.connect,
        read_timeout=config.timeouts.read,
        hash_key=config.hash_key,
    )

    app = Flask(__name__)
    app.extensions["softlb"] = {"pool": pool, "checker": checker, "proxy": proxy}

    def requested_url() -> str | None:
        data = request.get_json(force=True, silent=True)
        url = data.get("url") if isinstance(data, dict) else None
        return url if isinstance(url, str) else None

    @app.post("/upload_server")
    def upload_server() -> Any:
        url = requested_url()
        if url is None:
            return jsonify(error='send a JSON object like {"url": "http://10.0.0.1:8000"}'), 400
        try:
            backend = pool.add(url)
        except InvalidBackend as exc:
            return jsonify(error=str(exc)), 400
        except BackendExists as exc:
            return jsonify(error=str(exc)), 409
        return jsonify(message="server added", url=backend.url), 201

    @app.delete("/delete_server")
    def delete_server() -> Any:
        url = requested_url()
        if url is None:
            return jsonify(error='send a JSON object like {"url": "http://10.0.0.1:8000"}'), 400
        try:
            backend = pool.remove(url)
        except UnknownBackend as exc:
            return jsonify(error=str(exc)), 404
        return jsonify(message="server removed", url=backend.url), 200

    flask_wsgi = app.wsgi_app

    def dispatch(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        """Flask for the seed routes, the balancer for everything else."""
        if environ.get("PATH_INFO") in SEED_ROUTES:
            return flask_wsgi(environ, start_response)
        return proxy(environ, start_response)

    # Flask's documented way to wrap an app in WSGI middleware, keeping `app` a Flask object.
    app.wsgi_app = dispatch  # type: ignore[method-assign]
    checker.start()  # in the process that serves: with gunicorn, a worker after the fork
    return app


def start_demo_backends(config_path: str | os.PathLike[str]) -> list[Any]:
    """Start a softlb demo backend on each port of the config's backends that is free on this
    machine (a first run has none of its own); return them, to stop at exit."""
    from urllib.parse import urlsplit

    from softlb.demo import DemoBackend

    started = []
    for number, server in enumerate(load_config(config_path).servers, start=1):
        parts = urlsplit(server.url)
        if parts.hostname not in ("localhost", "127.0.0.1") or parts.port is None:
            continue
        backend = DemoBackend(number, parts.port)
        if backend.port != parts.port:  # taken: something already answers there
            backend.stop()
            continue
        started.append(backend)
    return started


if __name__ == "__main__":
    from softlb.logs import configure_logging

    configure_logging()  # softlb's lines (backends going down and up) with time and level
    port = int(os.environ.get("PORT") or 8080)
    config_path = os.environ.get("SOFTLB_CONFIG") or DEFAULT_CONFIG
    demo = [] if os.environ.get("SOFTLB_CONFIG") else start_demo_backends(config_path)
    app = create_app(config_path)
    urls = ", ".join(b.url for b in app.extensions["softlb"]["pool"].backends)
    print(f"flask_app: balancing {urls} (config {config_path})")
    for backend in demo:
        print(f"flask_app: started demo backend {backend.number} on {backend.url}")
    print(f"flask_app: try curl http://127.0.0.1:{port}/ ; Ctrl-C stops", flush=True)
    try:
        app.run(host="127.0.0.1", port=port, threaded=True)
    finally:
        app.extensions["softlb"]["checker"].stop()
        app.extensions["softlb"]["proxy"].close()
        for backend in demo:
            backend.stop()
