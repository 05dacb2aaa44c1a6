"""Tests for the ``softlb`` command line, run in-process: check, flag errors, --version.

Nothing here starts gunicorn: every command either finishes on its own (``check``) or fails
before the server would start. tests/integration/ runs ``serve`` and ``demo`` for real.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import softlb
from softlb import cli, server
from softlb.config import AdminConfig, Config, ServerSpec, TimeoutsConfig
from softlb.server import ServeOptions

SEED = {
    "listenPort": ":8080",
    "healthCheckInterval": "5s",
    "servers": ["http://localhost:8081", "http://localhost:8082", "http://localhost:8083"],
    "algorithm": "least_connections",
}

GOOD = {
    "listen": "127.0.0.1:9000",
    "algorithm": "round_robin",
    "servers": ["http://10.0.0.1:8000", {"url": "http://10.0.0.2:8000", "weight": 3}],
    "health_check": {"path": "/health", "interval": "2s", "timeout": "500ms"},
    "timeouts": {"connect": "1s", "read": "10s"},
    "admin": {"token": "s3cret", "prefix": "/admin"},
    "retries": 1,
}


def write(tmp_path: Path, data: object, name: str = "config.json") -> str:
    """Write ``data`` (JSON, or the text/bytes as is) to tmp_path/name; return the path."""
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data)
    else:
        path.write_text(json.dumps(data))
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``softlb argv`` in-process; return the status, stdout and stderr."""
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return status, out, err


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Replace the gunicorn server and the demo by recorders; return the calls made."""
    calls: list[tuple[Any, ...]] = []

    def fake_serve(config: Config, options: ServeOptions | None = None) -> int:
        calls.append(("serve", config, options))
        return 0

    def fake_demo(port: int) -> int:
        calls.append(("demo", port))
        return 0

    monkeypatch.setattr(cli, "serve", fake_serve)
    monkeypatch.setattr(cli, "run_demo", fake_demo)
    return calls


# --------------------------------------------------------------------------- --version, usage


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the program name and the package version and exits 0."""
    status, out, _ = run(capsys, "--version")
    assert status == 0
    assert out.strip() == f"softlb {softlb.__version__}"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """softlb with no command names what is missing and exits 2."""
    status, _, err = run(capsys)
    assert status == 2
    assert "COMMAND" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """serve --help lists every option and exits 0."""
    status, out, _ = run(capsys, "serve", "--help")
    assert status == 0
    for option in ("--config", "--bind", "--workers", "--threads", "--graceful-timeout"):
        assert option in out


# --------------------------------------------------------------------------- check


def test_check_good_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A valid config gets one OK line with its algorithm, backends and listen address."""
    path = write(tmp_path, GOOD)
    status, out, err = run(capsys, "check", "--config", path)
    assert status == 0
    assert out == f"{path}: OK (round_robin, 2 backends, listen 127.0.0.1:9000)\n"
    assert err == ""


def test_check_seed_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The seed project's config file is valid as it stands (SPEC §2)."""
    path = write(tmp_path, SEED)
    status, out, _ = run(capsys, "check", "--config", path)
    assert status == 0
    assert out == f"{path}: OK (least_connections, 3 backends, listen 0.0.0.0:8080)\n"


def test_check_examples_config(capsys: pytest.CaptureFixture[str]) -> None:
    """examples/config.json is valid."""
    path = str(Path(__file__).parent.parent / "examples" / "config.json")
    status, out, _ = run(capsys, "check", path)
    assert status == 0
    assert "OK (least_connections, 3 backends, listen 127.0.0.1:8080)" in out


def test_check_counts_resolved_names_apart(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A ``resolve`` server is a name, not one backend: it may resolve to several, or to none
    yet; the OK line (and the banner) count it apart."""
    servers = [
        "http://10.0.0.1:80",
        {"url": "http://backends.example.test:80", "resolve": True},
        {"url": "http://more.example.test:80", "resolve": True},
    ]
    path = write(tmp_path, {"servers": servers})
    status, out, _ = run(capsys, "check", "--config", path)
    assert status == 0
    assert out == (
        f"{path}: OK (least_connections, 1 backend + 2 resolved names, listen 127.0.0.1:8080)\n"
    )


def test_check_defaults_to_config_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --config, check reads ./config.json; one backend is singular."""
    write(tmp_path, {"servers": ["http://10.0.0.1"]})
    monkeypatch.chdir(tmp_path)
    status, out, _ = run(capsys, "check")
    assert status == 0
    assert out == "config.json: OK (least_connections, 1 backend, listen 127.0.0.1:8080)\n"


def test_check_positional_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """check also takes the path without --config."""
    path = write(tmp_path, {})
    status, out, _ = run(capsys, "check", path)
    assert status == 0
    assert out.startswith(f"{path}: OK (least_connections, 0 backends")


def test_check_path_given_twice(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Two different paths (--config and positional) are a usage error."""
    status, _, err = run(
        capsys, "check", "--config", write(tmp_path, {}), write(tmp_path, {}, "b.json")
    )
    assert status == 2
    assert err.startswith("softlb: error: give the config once")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param("{", "not valid JSON: line 1 column 2", id="invalid-json"),
        pytest.param("", "file is empty", id="empty"),
        pytest.param(b"\xff\xfe{}", "not valid UTF-8", id="not-utf8"),
        pytest.param([1, 2], "the top level must be a JSON object", id="not-an-object"),
        pytest.param({"servrs": []}, 'servrs: unknown key (did you mean "servers"?)', id="typo"),
        pytest.param({"algorithm": "fastest"}, "algorithm: ", id="algorithm"),
        pytest.param({"servers": ["ftp://x"]}, "servers[0]: ", id="url"),
        pytest.param({"servers": [{"url": "http://a", "weight": 0}]}, "weight", id="weight"),
        pytest.param({"healthCheckInterval": "5 parsecs"}, "healthCheckInterval: ", id="duration"),
        pytest.param({"listenPort": "nope"}, "listenPort: ", id="listen"),
        pytest.param({"timeouts": {"read": -1}}, "timeouts.read: ", id="timeout"),
        pytest.param({"admin": {"token": ""}}, "admin.token: ", id="token"),
        pytest.param({"state": "mongodb://x"}, "state: ", id="state"),
    ],
)
def test_check_bad_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: object, expected: str
) -> None:
    """Every kind of bad config: exit 2, one line naming the file and the problem."""
    path = write(tmp_path, content)
    status, out, err = run(capsys, "check", "--config", path)
    assert status == 2
    assert err == ""  # the problems are check's report: stdout, as a linter's
    lines = out.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: ")
    assert expected in lines[0]


def test_check_lists_every_problem(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A config with several problems gets one line per problem, each prefixed by the file."""
    bad = {
        "listen": "x",
        "algorithm": "fastest",
        "servers": ["ftp://a", {"url": "http://b", "weight": 0}],
        "bogus": 1,
    }
    path = write(tmp_path, bad)
    status, out, _ = run(capsys, "check", "--config", path)
    assert status == 2
    lines = out.splitlines()
    assert len(lines) == 5, lines
    assert all(line.startswith(f"{path}: ") for line in lines)
    keys = {line[len(path) + 2 :].split(":", 1)[0] for line in lines}
    assert keys == {"listen", "algorithm", "servers[0]", "servers[1].weight", "bogus"}


def test_check_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A config file that does not exist: one line, exit 2."""
    path = str(tmp_path / "nope.json")
    status, out, _ = run(capsys, "check", "--config", path)
    assert status == 2
    assert out == f"{path}: config file not found\n"


# --------------------------------------------------------------------------- serve and demo


def test_serve_runs_gunicorn_with_the_config_and_flags(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, no_server: list[tuple[Any, ...]]
) -> None:
    """serve hands the loaded config and the flags to the server; --bind overrides listen."""
    from tests.helpers.servers import free_port

    port = free_port()
    path = write(tmp_path, GOOD)
    status, _, _ = run(
        capsys,
        "serve",
        "--config",
        path,
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "1",
        "--threads",
        "4",
        "--graceful-timeout",
        "5s",
    )
    assert status == 0
    [(what, config, options)] = no_server
    assert what == "serve"
    assert config.algorithm == "round_robin"
    assert options == ServeOptions(
        bind=f"127.0.0.1:{port}", workers=1, threads=4, graceful_timeout=5.0
    )


@pytest.mark.parametrize(("given", "seconds"), [("30", 30.0), ("2.5", 2.5), ("0", 0.0)])
def test_serve_graceful_timeout_takes_a_bare_number_of_seconds(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    no_server: list[tuple[Any, ...]],
    given: str,
    seconds: float,
) -> None:
    """A flag has no JSON number to tell ``30`` from ``"30"``: a bare number is seconds."""
    path = write(tmp_path, GOOD)
    status, _, err = run(capsys, "serve", "--config", path, "--graceful-timeout", given)
    assert (status, err) == (0, "")
    [(_, _, options)] = no_server
    assert options.graceful_timeout == seconds


def test_serve_defaults_to_config_json(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_server: list[tuple[Any, ...]],
) -> None:
    """Without --config, serve reads ./config.json and listens where it says."""
    from tests.helpers.servers import free_port

    port = free_port()
    write(tmp_path, {"listen": f"127.0.0.1:{port}"})
    monkeypatch.chdir(tmp_path)
    status, _, _ = run(capsys, "serve")
    assert status == 0
    [(_, config, options)] = no_server
    assert config.listen_port == port
    assert options == ServeOptions()


def test_serve_missing_default_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ./config.json: one line that says so and how to go on, exit 2."""
    monkeypatch.chdir(tmp_path)
    status, out, err = run(capsys, "serve")
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("softlb: error: config.json: config file not found")
    assert "--config" in err
    assert "softlb demo" in err


def test_serve_bad_config_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A config with several problems: one line with the first, the count of the others and
    the command that lists them."""
    path = write(tmp_path, {"algorithm": "fastest", "retries": -1, "bogus": 1})
    status, out, err = run(capsys, "serve", "--config", path)
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"softlb: error: {path}: ")
    assert f'and 2 more problems; run "softlb check --config {path}"' in err


def test_unwritable_access_log_is_one_line_before_serving(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An access log that cannot be written (its directory missing) is found by ``check``
    and ``serve`` (config key or ``--access-log``) before anything runs: one line, exit 2;
    a writable one is created, as ``nginx -t`` creates its logs."""
    missing = str(tmp_path / "no-such-dir" / "access.log")
    path = write(tmp_path, {"servers": ["http://127.0.0.1:9"], "access_log": missing})
    status, out, _ = run(capsys, "check", "--config", path)
    assert status == 2
    assert out.startswith(f"{path}: access_log: cannot write the access log to ")
    assert out.endswith(": No such file or directory\n") and out.count("\n") == 1
    status, out, err = run(capsys, "serve", "--config", path)
    assert (status, out, err.count("\n")) == (2, "", 1)
    assert err.startswith("softlb: error: access_log: cannot write the access log")
    good = write(tmp_path, {"servers": ["http://127.0.0.1:9"]}, name="good.json")
    status, out, err = run(capsys, "serve", "--config", good, "--access-log", missing)
    assert (status, out, err.count("\n")) == (2, "", 1)
    assert err.startswith("softlb: error: --access-log: cannot write the access log")
    fine = write(
        tmp_path, {"servers": ["http://127.0.0.1:9"], "access_log": str(tmp_path / "a.log")},
        name="fine.json",
    )  # fmt: skip
    assert run(capsys, "check", "--config", fine)[0] == 0
    assert (tmp_path / "a.log").is_file()


def test_serve_refuses_a_certificate_flag_pair_that_cannot_serve_tls(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--certfile/--keyfile are checked as the config's tls is: files that are not a
    certificate and its key are one line and exit 2, not a worker crash loop."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    path = write(tmp_path, {"servers": ["http://127.0.0.1:9"]})
    status, out, err = run(
        capsys, "serve", "--config", path, "--certfile", str(junk), "--keyfile", str(junk)
    )
    assert (status, out, err.count("\n")) == (2, "", 1)
    assert err.startswith("softlb: error: --certfile/--keyfile: ")
    assert "not a certificate chain and its unencrypted private key" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["serve", "--workers", "0"], "argument --workers: must be 1 or more, got 0"),
        (["serve", "--workers", "two"], "argument --workers: 'two' is not a whole number"),
        (["serve", "--threads", "-1"], "argument --threads: must be 1 or more"),
        (
            ["serve", "--workers", "99999999999999999999"],
            "argument --workers: must be 1024 or less, got 99999999999999999999",
        ),  # (it forked without end)
        (["serve", "--threads", "10001"], "argument --threads: must be 10000 or less"),
        (["serve", "--bind", "nonsense"], 'argument --bind: "nonsense" has no port'),
        (["serve", "--bind", "127.0.0.1:99999"], "argument --bind: port 99999 is out of range"),
        (["serve", "--bind", "::1:80"], "argument --bind: "),
        (["serve", "--graceful-timeout", "soon"], "argument --graceful-timeout: "),
        (["serve", "--graceful-timeout", "-1"], "argument --graceful-timeout: -1 is negative"),
        (["serve", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["demo", "--port", "0"], "argument --port: must be 1 or more"),
        (["demo", "--port", "70000"], "argument --port: port 70000 is out of range"),
        (["launch"], "invalid choice: 'launch'"),
    ],
)
def test_bad_flags(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    """A bad flag: one readable line (SPEC §1), exit 2, no traceback."""
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    assert expected in err
    assert len(err.splitlines()) == 1
    assert "usage:" not in err


def test_bind_accepts_every_listen_form(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, no_server: list[tuple[Any, ...]]
) -> None:
    """--bind takes what the config's listen takes and normalizes it to HOST:PORT."""
    from tests.helpers.servers import free_port

    path = write(tmp_path, {})
    port = free_port()
    for given, bind in [
        (str(port), f"0.0.0.0:{port}"),
        (f":{port}", f"0.0.0.0:{port}"),
        (f"localhost:{port}", f"localhost:{port}"),
    ]:
        assert run(capsys, "serve", "--config", path, "--bind", given)[0] == 0
        assert no_server[-1][2].bind == bind


def test_serve_port_in_use(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    busy_port: int,
    no_server: list[tuple[Any, ...]],
) -> None:
    """The listen port is taken: one line, exit 1, the server is not started."""
    path = write(tmp_path, {"listen": f"127.0.0.1:{busy_port}"})
    status, _, err = run(capsys, "serve", "--config", path)
    assert status == 1
    assert err == (
        f"softlb: error: cannot listen on 127.0.0.1:{busy_port}: the port is already in use "
        "(is another softlb or server running?)\n"
    )
    assert no_server == []


def test_serve_admin_listen_port_in_use(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    busy_port: int,
    no_server: list[tuple[Any, ...]],
) -> None:
    """``admin.listen``'s port is taken: the same one line, naming the key, exit 1, the
    server is not started (gunicorn would retry it for five seconds, then log a dozen)."""
    from tests.helpers.servers import free_port

    path = write(
        tmp_path,
        {"listen": f"127.0.0.1:{free_port()}", "admin": {"listen": f"127.0.0.1:{busy_port}"}},
    )
    status, _, err = run(capsys, "serve", "--config", path)
    assert status == 1
    assert err == (
        f"softlb: error: admin.listen: cannot listen on 127.0.0.1:{busy_port}: the port is "
        "already in use (is another softlb or server running?)\n"
    )
    assert no_server == []


@pytest.mark.parametrize("admin_host", ["127.0.0.1", "localhost"])
def test_serve_admin_listen_on_the_bind_address(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    no_server: list[tuple[Any, ...]],
    admin_host: str,
) -> None:
    """``--bind`` on ``admin.listen``'s port and interface (by the same name or another): one
    line, exit 2, nothing started (gunicorn would retry for five seconds, then log a dozen
    lines)."""
    from tests.helpers.servers import free_port

    port = free_port()
    path = write(tmp_path, {"admin": {"listen": f"{admin_host}:{port}"}})
    status, _, err = run(capsys, "serve", "--config", path, "--bind", f"127.0.0.1:{port}")
    assert status == 2
    assert err == (
        f"softlb: error: admin.listen: {admin_host}:{port} takes the port of the proxy's "
        f"--bind 127.0.0.1:{port} on the same interface; give it another port\n"
    )
    assert no_server == []


def test_serve_address_not_local(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, no_server: list[tuple[Any, ...]]
) -> None:
    """A listen address that is not this machine's: one line, exit 1."""
    path = write(tmp_path, {"listen": "192.0.2.1:8080"})  # TEST-NET-1, never local
    status, _, err = run(capsys, "serve", "--config", path)
    assert status == 1
    assert err.startswith("softlb: error: cannot listen on 192.0.2.1:8080: ")
    assert err.count("\n") == 1


def test_demo_port_in_use(
    capsys: pytest.CaptureFixture[str], busy_port: int, no_server: list[tuple[Any, ...]]
) -> None:
    """demo on a taken port: one line, exit 1, no backend started."""
    status, _, err = run(capsys, "demo", "--port", str(busy_port))
    assert status == 1
    assert err.startswith(f"softlb: error: cannot listen on 127.0.0.1:{busy_port}: ")
    assert err.count("\n") == 1
    assert no_server == []


def test_demo_passes_the_port(
    capsys: pytest.CaptureFixture[str], no_server: list[tuple[Any, ...]]
) -> None:
    """demo --port N runs the demo on N."""
    from tests.helpers.servers import free_port

    port = free_port()
    assert run(capsys, "demo", "--port", str(port))[0] == 0
    assert no_server == [("demo", port)]


def test_ctrl_c_before_the_server_starts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C before gunicorn takes over the signal: exit 130, no traceback."""

    def interrupted(config: Config, options: ServeOptions | None = None) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "serve", interrupted)
    from tests.helpers.servers import free_port

    path = write(tmp_path, {"listen": f"127.0.0.1:{free_port()}"})
    status, _, _ = run(capsys, "serve", "--config", path)
    assert status == 130


# --------------------------------------------------------------------------- server helpers


def test_banner() -> None:
    """The startup line names the version, address, algorithm, backends, workers and admin."""
    config = Config(
        listen_host="127.0.0.1",
        servers=(ServerSpec("http://a"), ServerSpec("http://b"), ServerSpec("http://c")),
    )
    assert server.banner(config, ServeOptions(), version="0.1.0") == (
        "softlb 0.1.0 serving on http://127.0.0.1:8080 (least_connections, 3 backends, "
        "1 worker × event loop); admin at http://127.0.0.1:8080/_softlb/"
    )
    assert server.banner(config, ServeOptions(engine="threads"), version="0.1.0") == (
        "softlb 0.1.0 serving on http://127.0.0.1:8080 (least_connections, 3 backends, "
        "1 worker × 16 threads); admin at http://127.0.0.1:8080/_softlb/"
    )


def test_banner_all_interfaces_and_bind() -> None:
    """Listening on every interface, the admin URL is one a local browser can open."""
    options = ServeOptions(bind="0.0.0.0:9000", workers=2, threads=4, engine="threads")
    assert server.banner(Config(), options, version="1.2") == (
        "softlb 1.2 serving on http://0.0.0.0:9000 (all interfaces) (least_connections, "
        "0 backends, 2 workers × 4 threads); admin at http://127.0.0.1:9000/_softlb/"
    )


def test_banner_names_the_admin_listen_address() -> None:
    """With ``admin.listen``, the admin API is there, not on the proxy's address (where its
    prefix is proxied); on every interface, the banner says so, as for the proxy's."""
    config = Config(admin=AdminConfig(listen="0.0.0.0:9901"))
    assert server.banner(config, ServeOptions(bind="127.0.0.1:9000"), version="1.2") == (
        "softlb 1.2 serving on http://127.0.0.1:9000 (least_connections, 0 backends, "
        "1 worker × event loop); admin at http://127.0.0.1:9901/_softlb/ (all interfaces)"
    )
    config = Config(admin=AdminConfig(listen="127.0.0.1:9901"))
    assert server.banner(config, ServeOptions(bind="127.0.0.1:9000"), version="1.2").endswith(
        "admin at http://127.0.0.1:9901/_softlb/"
    )


def test_no_warning_for_one_worker_or_shared_state() -> None:
    """The default setups need no warning: one worker, or several sharing a store."""
    assert server.startup_warnings(Config(state="memory"), ServeOptions()) == []
    assert server.startup_warnings(Config(), ServeOptions(workers=3)) == []
    assert server.startup_warnings(Config(state="sqlite:///s.db"), ServeOptions(workers=3)) == []


def test_warning_for_workers_with_memory_state() -> None:
    """Several workers told to keep state in memory get one warning line."""
    warnings = server.startup_warnings(Config(state="memory"), ServeOptions(workers=3))
    assert len(warnings) == 1
    assert "\n" not in warnings[0] and warnings[0].startswith("softlb: warning: ")
    assert "--workers 3" in warnings[0]
    assert "admin change reaches only the worker" in warnings[0]


def test_default_state_is_sqlite_for_several_workers() -> None:
    """Several workers default to a SQLite file of their own; one worker to memory."""
    assert server.default_state(Config(), ServeOptions()) == ("memory", [])
    state, files = server.default_state(Config(), ServeOptions(workers=2))
    assert state.startswith("sqlite:////") and state.endswith(".db")
    assert files[0] == state[len("sqlite:///") :]
    assert server.default_state(Config(state="redis://h:1/0"), ServeOptions(workers=2)) == (
        "redis://h:1/0",
        [],
    )


def test_gunicorn_settings() -> None:
    """gthread workers, the app built after the fork, a graceful stop, a generous timeout."""
    config = Config(timeouts=TimeoutsConfig(read=120.0))
    assert server.gunicorn_settings(config, ServeOptions())["worker_class"] == "softlb.aio.Worker"
    options = ServeOptions(threads=8, graceful_timeout=2.5, engine="threads")
    settings = server.gunicorn_settings(config, options)
    assert settings["worker_class"] == "gthread"
    assert settings["workers"] == 1
    assert settings["threads"] == 8
    assert settings["preload_app"] is False
    assert settings["graceful_timeout"] == 3
    assert settings["timeout"] == 150
    assert settings["bind"] == ["127.0.0.1:8080"]
    assert settings["accesslog"] is None
    assert settings["errorlog"] == "-"
    assert server.gunicorn_settings(Config(), ServeOptions())["timeout"] == 60


def test_embedded_gunicorn_takes_known_settings_only() -> None:
    """Settings this gunicorn does not know are skipped; known ones reach its config."""
    settings = server.gunicorn_settings(Config(), ServeOptions(threads=3, engine="threads"))
    settings["no_such_setting_in_any_gunicorn"] = 1
    app = server.SoftLBServer(lambda: None, settings)  # type: ignore[arg-type,return-value]
    assert app.cfg.worker_class_str == "gthread"
    assert app.cfg.threads == 3
    assert app.cfg.preload_app is False
    assert app.cfg.graceful_timeout == 30


@pytest.mark.parametrize("bad", [{"workers": 0}, {"threads": 0}, {"graceful_timeout": -1}])
def test_serve_options_validate(bad: dict[str, Any]) -> None:
    """ServeOptions refuses values gunicorn could not run with."""
    with pytest.raises(ValueError):
        ServeOptions(**bad)


def test_softlb_state_environment_variable_chooses_the_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SOFTLB_STATE names the store when the config does not; the config still wins."""
    monkeypatch.setenv("SOFTLB_STATE", "redis://127.0.0.1:6379/0")
    assert server.default_state(Config(), ServeOptions(workers=2)) == (
        "redis://127.0.0.1:6379/0",
        [],
    )
    assert server.default_state(Config(state="memory"), ServeOptions(workers=2)) == ("memory", [])


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:pw@h/0", "redis://user:***@h/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("sqlite:////var/lib/softlb/state.db", "sqlite:////var/lib/softlb/state.db"),
    ],
)
def test_store_passwords_are_not_printed(url: str, shown: str) -> None:
    """The startup line names the store without its password."""
    assert server._redact_password(url) == shown


def test_check_and_serve_warn_about_an_open_admin_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No token and admin.allow wider than loopback: both commands say who can change the
    backends; loopback alone, or a token, is quiet."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"admin": {"allow": ["127.0.0.1", "10.0.0.0/8"]}}))
    status, out, err = run(capsys, "check", "--config", str(path))
    assert status == 0
    assert "OK" in out
    assert "admin.allow lets 10.0.0.0/8 call the admin API without a token" in err
    for wide in ("10.0.0.0/8", "::ffff:10.0.0.1/128", "::ffff:0.0.0.0/96"):
        config = Config(admin=AdminConfig(allow=(wide,)))
        assert any(wide in w for w in server.startup_warnings(config, ServeOptions()))
    quiet = [
        Config(admin=AdminConfig(allow=("127.0.0.0/8", "::1/128"))),
        Config(admin=AdminConfig(allow=("::ffff:127.0.0.1/128", "::ffff:127.0.0.0/104"))),
        Config(admin=AdminConfig(allow=("10.0.0.0/8",), token="s3cret")),
    ]
    for config in quiet:
        assert server.startup_warnings(config, ServeOptions()) == []
