"""The seed project's Flask server, rebuilt on softlb's library.

It keeps the seed's API — ``POST /upload_server {"url": ...}`` adds a backend and
``DELETE /delete_server {"url": ...}`` removes one — as ordinary Flask routes, and proxies every
other request through softlb's :class:`~softlb.Pool` and :class:`~softlb.wsgi.LoadBalancer`, with
a :class:`~softlb.HealthChecker` probing the backends. Run it with any of::

    python examples/flask_app.py                       # Flask's development server, port 8080
    flask --app examples/flask_app.py run -p 8080       # the same (Flask finds create_app)
    gunicorn -k gthread --threads 16 -b 127.0.0.1:8080 'examples.flask_app:create_app()'

The config file is ``examples/config.json`` unless ``SOFTLB_CONFIG`` names another; its
``listen`` is not used here (the server command decides where to listen).

``softlb serve`` gives you all of this plus the full admin API; this file shows how to put the
balancer inside an app of your own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request

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


if __name__ == "__main__":
    app = create_app()
    try:
        app.run(host="127.0.0.1", port=8080, threaded=True)
    finally:
        app.extensions["softlb"]["checker"].stop()
        app.extensions["softlb"]["proxy"].close()
