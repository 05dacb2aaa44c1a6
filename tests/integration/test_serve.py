"""softlb serve, softlb demo and plain gunicorn, as real processes in front of real backends.

Every balancer runs as a subprocess on a free port, with TestBackends in this process behind
it; assertions are on what the client got and what the backend saw. Each process is stopped by
PID at teardown (see conftest.py) and every wait is bounded.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import softlb
from tests.helpers.servers import TestBackend, body_chunks, body_sha256, free_port
from tests.integration.conftest import (
    BIN,
    SOFTLB,
    Launcher,
    Running,
    memory_kib,
    thread_count,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
MiB = 1024 * 1024

#: Health probes go to /health, which TestBackend does not record as a request.
PROBES: dict[str, Any] = {"health_check": {"path": "/health"}}

#: The request target that must reach the backend byte for byte (SPEC §3).
RAW_TARGET = "/a%2Fb/%7Euser?q=a%20b&x=1&x=2"


def request(
    port: int,
    method: str,
    target: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """Send one request to 127.0.0.1:port; return the status and the whole body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def get(port: int, target: str = "/") -> tuple[int, bytes]:
    return request(port, "GET", target)


def serve_argv(config: Path, *extra: str) -> list[str]:
    return [*SOFTLB, "serve", "--config", str(config), *extra]


def assert_clean(output: str) -> None:
    """No traceback and no gunicorn error in a process's output."""
    assert "Traceback" not in output, output
    assert "[ERROR]" not in output, output


# --------------------------------------------------------------------------- one shared balancer
# Tests that only send requests share one `softlb serve` in front of one backend: each start of
# a balancer costs about a second.


@pytest.fixture(scope="module")
def shared_backend() -> Iterator[TestBackend]:
    with TestBackend() as backend:
        yield backend


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory, shared_backend: TestBackend
) -> Iterator[Running]:
    """`softlb serve` in front of shared_backend, for the whole module."""
    directory = tmp_path_factory.mktemp("shared")
    port = free_port()
    config = directory / "config.json"
    config.write_text(
        json.dumps({"listen": f"127.0.0.1:{port}", "servers": [shared_backend.url], **PROBES})
    )
    launcher = Launcher(directory)
    try:
        yield launcher(serve_argv(config), port=port)
    finally:
        launcher.close()


def test_serve_proxies_to_the_backend(shared: Running, shared_backend: TestBackend) -> None:
    """A GET through `softlb serve` reaches the backend and returns its body."""
    status, body = get(shared.port or 0, "/hello")
    assert status == 200
    assert body == f"ok from {shared_backend.port}".encode()
    assert shared_backend.last.target == "/hello"


def test_serve_prints_the_banner_first(shared: Running) -> None:
    """The startup line comes before gunicorn's own logs, with the shape of the setup."""
    output = shared.output()
    line = (
        f"softlb {softlb.__version__} serving on http://127.0.0.1:{shared.port} "
        "(least_connections, 1 backend, 1 worker × event loop); "
        f"admin at http://127.0.0.1:{shared.port}/_softlb/"
    )
    assert output.splitlines()[0] == line
    assert "Using worker: softlb.aio.Worker" in output
    assert_clean(output)


def test_the_app_runs_in_the_worker_only(shared: Running) -> None:
    """Nothing is started before the fork: the master runs one thread, the worker runs the
    health checker besides its own."""
    [worker] = shared.workers()
    assert thread_count(shared.pid) == 1
    assert thread_count(worker) > 1


def test_raw_target_reaches_the_backend_unchanged(
    shared: Running, shared_backend: TestBackend
) -> None:
    """Regression: the percent-encoding of the path and the query survive gunicorn byte for
    byte (an encoded slash must not become a path separator)."""
    status, _ = get(shared.port or 0, RAW_TARGET)
    assert status == 200
    assert shared_backend.last.target == RAW_TARGET


def test_admin_api_answers(shared: Running, shared_backend: TestBackend) -> None:
    """The admin API is served by the same process: it lists the configured backend."""
    status, body = get(shared.port or 0, "/_softlb/servers")
    assert status == 200
    assert [s["url"] for s in json.loads(body)["servers"]] == [shared_backend.url]


def test_big_bodies_stream_without_growing_memory(
    shared: Running, shared_backend: TestBackend
) -> None:
    """A 100 MiB answer and a 64 MiB chunked upload pass through with the worker's peak RSS
    less than 50 MiB above where it started."""
    [worker] = shared.workers()
    port = shared.port or 0
    get(port, f"/big/{MiB}")  # warm up: the first request sets up pools and buffers
    request(port, "POST", "/upload", body=iter([b"x" * 1000]))
    before = memory_kib(worker)

    size = 100 * MiB
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", f"/big/{size}")
        resp = conn.getresponse()
        assert resp.status == 200
        digest = hashlib.sha256()
        received = 0
        while chunk := resp.read(MiB):
            digest.update(chunk)
            received += len(chunk)
    finally:
        conn.close()
    assert received == size
    assert digest.hexdigest() == body_sha256(size)
    after_download = memory_kib(worker)

    upload = 64 * MiB
    status, body = request(port, "POST", "/upload", body=body_chunks(upload), timeout=30)
    assert status == 200
    echoed = json.loads(body)
    assert echoed["body_length"] == upload
    assert echoed["body_sha256"] == body_sha256(upload)
    assert shared_backend.last.header("Transfer-Encoding") == "chunked"
    after = memory_kib(worker)

    growth = after["VmHWM"] - before["VmRSS"]
    print(
        f"\nworker {worker} RSS: before {before['VmRSS'] / 1024:.1f} MiB "
        f"(peak so far {before['VmHWM'] / 1024:.1f}), after the 100 MiB download "
        f"{after_download['VmRSS'] / 1024:.1f} MiB (peak {after_download['VmHWM'] / 1024:.1f}), "
        f"after the 64 MiB upload {after['VmRSS'] / 1024:.1f} MiB "
        f"(peak {after['VmHWM'] / 1024:.1f}); peak growth {growth / 1024:.1f} MiB"
    )
    assert growth < 50 * 1024


# --------------------------------------------------------------------------- starting and stopping


def test_seed_config_as_it_stands(
    launch: Launcher, write_config: Callable[..., Path], backends: list[TestBackend]
) -> None:
    """The seed project's config file (listenPort ":PORT", healthCheckInterval, servers,
    algorithm) runs as ./config.json under the `softlb` console script."""
    port = free_port()
    write_config(
        {
            "listenPort": f":{port}",
            "healthCheckInterval": "5s",
            "servers": [b.url for b in backends],
            "algorithm": "least_connections",
        }
    )
    running = launch([str(BIN / "softlb"), "serve"], port=port)
    answers = {get(port, "/seed")[1] for _ in range(6)}
    assert answers <= {f"ok from {b.port}".encode() for b in backends}
    # The seed's health checks probe "/" (the default path): count only our requests.
    assert sum(r.target == "/seed" for b in backends for r in b.requests) == 6
    status, body = get(port, "/_softlb/servers")
    assert status == 200
    assert {s["url"] for s in json.loads(body)["servers"]} == {b.url for b in backends}
    assert f"serving on http://0.0.0.0:{port} (all interfaces)" in running.output()
    running.signal(signal.SIGTERM)
    assert running.wait() == 0
    assert_clean(running.output())


@pytest.mark.parametrize(
    ("sig", "group"),
    [
        pytest.param(signal.SIGTERM, False, id="SIGTERM"),
        # A terminal's Ctrl-C reaches the whole process group, the worker included.
        pytest.param(signal.SIGINT, True, id="SIGINT-group"),
    ],
)
def test_stop_lets_the_request_in_flight_finish(
    launch: Launcher,
    write_config: Callable[..., Path],
    backend: TestBackend,
    sig: signal.Signals,
    group: bool,
) -> None:
    """SIGTERM or Ctrl-C during a slow request: it completes with 200, and the process exits
    0."""
    port = free_port()
    running = launch(
        serve_argv(
            write_config({"listen": f"127.0.0.1:{port}", "servers": [backend.url], **PROBES})
        ),
        port=port,
    )
    result: dict[str, Any] = {}

    def slow() -> None:
        try:
            result["answer"] = get(port, "/slow/2")
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    client = threading.Thread(target=slow)
    client.start()
    deadline = time.monotonic() + 10
    while backend.request_count == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert backend.request_count == 1, running.output()
    started = time.monotonic()
    running.signal(sig, group=group)
    client.join(15)
    assert not client.is_alive()
    assert result == {"answer": (200, b"slow")}
    assert running.wait() == 0
    assert time.monotonic() - started < 10
    output = running.output()
    assert_clean(output)
    assert "Quick shutdown" not in output


def test_sighup_reads_the_config_again(
    launch: Launcher, write_config: Callable[..., Path], tmp_path: Path
) -> None:
    """SIGHUP after the config file changed: the new workers proxy to the new servers (as
    plain gunicorn with create_app() did); a config that is not valid then is logged in one
    line and the running one stays (as nginx -s reload keeps its workers)."""
    with TestBackend() as old, TestBackend() as new:
        port = free_port()
        listen = f"127.0.0.1:{port}"
        config = write_config({"listen": listen, "servers": [old.url], **PROBES})
        running = launch(serve_argv(config), port=port)
        assert get(port, "/before") == (200, f"ok from {old.port}".encode())
        write_config({"listen": listen, "servers": [new.url], **PROBES})
        first = set(running.workers(1))
        running.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and set(running.workers(1)) & first:
            time.sleep(0.1)
        assert get(port, "/after") == (200, f"ok from {new.port}".encode())
        assert "reload: " in running.output() and "read again (1 backend)" in running.output()

        (tmp_path / "config.json").write_text('{"servers": ["not a url"]}')
        running.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "is not valid, the running config stays" not in running.output():
            assert time.monotonic() < deadline, running.output()
            time.sleep(0.1)
        time.sleep(1.0)  # the workers gunicorn started meanwhile
        assert get(port, "/still") == (200, f"ok from {new.port}".encode())
        running.signal(signal.SIGTERM)
        assert running.wait() == 0
        assert "Traceback" not in running.output()


def test_json_log_format_makes_every_log_line_json(
    launch: Launcher, write_config: Callable[..., Path], backend: TestBackend
) -> None:
    """SOFTLB_LOG_FORMAT=json: every log line is a JSON object, gunicorn's own (starting,
    booting, signals, exiting) as well as softlb's (README); only the banner on standard
    output is text. gunicorn's lines used to stay text."""
    port = free_port()
    config = write_config({"listen": f"127.0.0.1:{port}", "servers": [backend.url], **PROBES})
    running = launch(serve_argv(config), port=port, env={"SOFTLB_LOG_FORMAT": "json"})
    assert get(port, "/x")[0] == 200
    running.signal(signal.SIGTERM)
    assert running.wait() == 0
    lines = [line for line in running.output().splitlines() if line.strip()]
    banner, *logged = lines
    assert banner.startswith("softlb ") and " serving on " in banner
    documents = [json.loads(line) for line in logged]  # each one parses
    messages = [d.get("message", "") for d in documents if d.get("logger") == "gunicorn.error"]
    assert any(m.startswith("Booting worker") for m in messages), messages
    assert any(m.startswith("Handling signal") for m in messages), messages


def test_two_workers_start_and_share_state(
    launch: Launcher, write_config: Callable[..., Path], backend: TestBackend
) -> None:
    """--workers 2 starts two workers that share their state through SQLite, without a
    warning."""
    port = free_port()
    config = write_config({"listen": f"127.0.0.1:{port}", "servers": [backend.url], **PROBES})
    running = launch(serve_argv(config, "--workers", "2", "--threads", "4"), port=port)
    assert len(running.workers(2)) == 2
    assert get(port, "/x") == (200, f"ok from {backend.port}".encode())
    assert "warning" not in running.output()
    assert "softlb: 2 workers share their state in sqlite:////" in running.output()
    assert "2 workers × event loop" in running.output()  # --threads: the threaded engine's
    running.signal(signal.SIGTERM)
    assert running.wait() == 0


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        pytest.param(None, "config.json: config file not found", id="missing"),
        pytest.param({"algorithm": "fastest"}, '"fastest" is not a known algorithm', id="bad"),
        pytest.param("busy", "the port is already in use", id="port-in-use"),
    ],
)
def test_serve_refuses_to_start_in_one_line(
    launch: Launcher, write_config: Callable[..., Path], config: object, expected: str
) -> None:
    """A missing or bad config, or a taken port: one line, non-zero exit, no traceback."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        if config == "busy":
            config = {"listen": f"127.0.0.1:{busy.getsockname()[1]}"}
        if config is not None:
            write_config(config)
        running = launch([*SOFTLB, "serve"], port=None)
        status = running.wait()
    assert status != 0
    output = running.output()
    assert output.count("\n") == 1, output
    assert output.startswith("softlb: error: ")
    assert expected in output


def test_demo(launch: Launcher) -> None:
    """softlb demo: its balancer answers from the three demo backends in turn, it prints the
    URLs to try, and Ctrl-C ends it with status 0."""
    port = free_port()
    running = launch([*SOFTLB, "demo", "--port", str(port)], port=port)
    bodies = [get(port, "/")[1].decode() for _ in range(6)]
    matches = [
        re.fullmatch(r"Hello from demo backend (\d) \(port \d+\): GET /\n", b) for b in bodies
    ]
    numbers = [int(m[1]) if m else 0 for m in matches]
    assert sorted(numbers[:3]) == [1, 2, 3]
    assert numbers[3:] == numbers[:3]  # round robin: the same order again
    status, body = request(port, "GET", "/", headers={"Accept": "application/json"})
    assert status == 200
    assert json.loads(body)["message"].startswith("Hello from demo backend")
    status, body = get(port, "/_softlb/servers")
    assert status == 200
    assert len(json.loads(body)["servers"]) == 3
    output = running.output()
    for url in (f"http://127.0.0.1:{port}/", "/_softlb/", "/_softlb/servers", "curl -X POST"):
        assert url in output
    running.signal(signal.SIGINT, group=True)
    assert running.wait() == 0
    assert_clean(running.output())


# --------------------------------------------------------------------------- plain gunicorn


@pytest.mark.parametrize(
    "how",
    [
        pytest.param("argument", id="create_app-path"),
        pytest.param("environment", id="SOFTLB_CONFIG"),
    ],
)
def test_plain_gunicorn(
    launch: Launcher,
    write_config: Callable[..., Path],
    backend: TestBackend,
    tmp_path: Path,
    how: str,
) -> None:
    """gunicorn 'softlb.wsgi:create_app("config.json")' (gthread) proxies, and so does
    create_app() with SOFTLB_CONFIG, under examples/gunicorn.conf.py."""
    port = free_port()
    write_config({"servers": [backend.url], **PROBES})
    # gunicorn >= 25.1 opens a control socket under $HOME or $XDG_RUNTIME_DIR: keep it here.
    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path)}
    if how == "argument":
        args = ["-k", "gthread", "--threads", "4", 'softlb.wsgi:create_app("config.json")']
    else:
        env["SOFTLB_CONFIG"] = "config.json"
        args = ["-c", str(EXAMPLES / "gunicorn.conf.py"), "softlb.wsgi:create_app()"]
    running = launch([str(BIN / "gunicorn"), "-b", f"127.0.0.1:{port}", *args], port=port, env=env)
    assert get(port, "/via-gunicorn") == (200, f"ok from {backend.port}".encode())
    get(port, RAW_TARGET)
    assert backend.last.target == RAW_TARGET
    assert "gthread" in running.output()
    running.signal(signal.SIGTERM)
    assert running.wait() == 0
    assert_clean(running.output())


# --------------------------------------------------------------------------- the Flask example


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"softlb_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flask_example(write_config: Callable[..., Path], backends: list[TestBackend]) -> None:
    """examples/flask_app.py keeps the seed's routes and proxies everything else."""
    first, second, _ = backends
    config = write_config({"servers": [first.url], "algorithm": "round_robin", **PROBES})
    app = load_example("flask_app").create_app(config)
    parts = app.extensions["softlb"]
    try:
        client = app.test_client()
        answer = client.get("/hello")
        assert answer.status_code == 200
        assert answer.data == f"ok from {first.port}".encode()

        assert client.post("/upload_server", json={"url": second.url}).status_code == 201
        assert client.post("/upload_server", json={"url": second.url}).status_code == 409
        assert client.post("/upload_server", json={"url": "ftp://x"}).status_code == 400
        assert client.post("/upload_server", data="not json").status_code == 400
        seen = {client.get("/spread").data for _ in range(4)}
        assert seen == {f"ok from {b.port}".encode() for b in (first, second)}

        assert client.delete("/delete_server", json={"url": first.url}).status_code == 200
        assert client.delete("/delete_server", json={"url": first.url}).status_code == 404
        assert {client.get("/after").data for _ in range(3)} == {f"ok from {second.port}".encode()}
        # The seed routes are not proxied; every other path and method is.
        assert all(r.target != "/upload_server" for b in backends for r in b.requests)
        assert client.put("/upload_server_not", data=b"x").status_code == 200
    finally:
        parts["checker"].stop()
        parts["proxy"].close()


def test_flask_example_first_run_has_backends(write_config: Callable[..., Path]) -> None:
    """examples/flask_app.py's first run starts demo backends on its config's free ports, so
    it answers instead of 503; a port that is taken is left to what listens there (#14)."""
    free, taken = free_port(), TestBackend()
    config = write_config(
        {"servers": [f"http://localhost:{free}", taken.url], "algorithm": "round_robin", **PROBES}
    )
    module = load_example("flask_app")
    started = module.start_demo_backends(config)
    app = module.create_app(config)
    parts = app.extensions["softlb"]
    try:
        assert [b.port for b in started] == [free]
        client = app.test_client()
        answers = {client.get("/").data.decode() for _ in range(2)}
        assert answers == {
            f"Hello from demo backend 1 (port {free}): GET /\n",
            f"ok from {taken.port}",
        }
    finally:
        parts["checker"].stop()
        parts["proxy"].close()
        for backend in started:
            backend.stop()
        taken.stop()


def test_flask_example_without_flask() -> None:
    """Without Flask, examples/flask_app.py says what it needs in one line, no traceback."""
    code = (
        "import runpy, sys; sys.modules['flask'] = None; "
        f"runpy.run_path({str(EXAMPLES / 'flask_app.py')!r}, run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 1
    assert done.stderr == "examples/flask_app.py needs Flask: python -m pip install flask\n"


def test_examples_config_is_the_seed_shape() -> None:
    """examples/config.json uses the seed's keys and backends on 8081-8083."""
    data = json.loads((EXAMPLES / "config.json").read_text())
    assert set(data) == {"listenPort", "healthCheckInterval", "servers", "algorithm"}
    assert data["servers"] == [f"http://localhost:{p}" for p in (8081, 8082, 8083)]


def test_worker_that_cannot_start_ends_the_server(launch: Launcher, tmp_path: Path) -> None:
    """If the app cannot be built in the worker, the master stops with a non-zero status and
    says so in its last line."""
    port = free_port()
    script = tmp_path / "failing.py"
    script.write_text(
        "from softlb.config import Config\n"
        "from softlb.server import serve\n"
        "def factory():\n"
        "    raise RuntimeError('cannot build the app')\n"
        f"raise SystemExit(serve(Config(listen_port={port}), factory=factory))\n"
    )
    running = launch([sys.executable, str(script)], port=None)
    assert running.wait() == 3
    output = running.output()
    assert "cannot build the app" in output
    assert output.splitlines()[-1] == (
        "softlb: error: the worker could not start the balancer; the log above says why"
    )


@pytest.mark.parametrize("engine", ["eventloop", "threads"])
def test_admin_listen_moves_the_admin_api_off_the_traffic_port(
    launch: Launcher, write_config: Callable[..., Path], backend: TestBackend, engine: str
) -> None:
    """With admin.listen, the admin API answers there only; on the traffic port its paths
    are proxied like any other (SPEC §2)."""
    port, admin_port = free_port(), free_port()
    config = write_config(
        {
            "listen": f"127.0.0.1:{port}",
            "servers": [backend.url],
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
            **PROBES,
        }
    )
    launch(serve_argv(config, "--engine", engine), port=port)
    status, body = get(admin_port, "/_softlb/servers")
    assert status == 200
    assert [s["url"] for s in json.loads(body)["servers"]] == [backend.url]
    status, body = get(port, "/_softlb/servers")
    assert (status, body) == (200, f"ok from {backend.port}".encode())  # the backend's answer
    assert backend.last.target == "/_softlb/servers"
    assert get(admin_port, "/anything")[0] == 404  # the admin address proxies nothing
