"""The README's and the quickstart's console commands, run as written (issue #14).

Each page is read in order: every ``$ command`` of its console blocks must be the next one the
walk-through below expects (so a command added to a page without a check here fails), and is
run in a real shell — ``softlb``, ``gunicorn`` and ``curl`` as real subprocesses on 127.0.0.1 —
then checked against what the page says next to it: the output it shows, or the claim in its
comment. The ports a page names (8080 to 8085) are rewritten to free ones, and ``softlb demo``
gets ``--port``; the commands that need the network (``pip install``) are the only ones not run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.servers import TestBackend, free_port
from tests.integration.conftest import Launcher, Running

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("curl") is None, reason="the pages' commands use curl"),
]

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
QUICKSTART = ROOT / "docs" / "quickstart.rst"

#: How long a command may run, and how long a claimed change (a backend marked down) may take.
COMMAND_TIMEOUT = 20.0
CHANGE_TIMEOUT = 15.0

#: The ports the pages use: 8080 the balancer, 8081-8085 backends.
DOC_PORT = re.compile(r"(?<![\d.])(808[0-5])(?!\d)")


@dataclass
class Command:
    """One ``$ command`` of a console block and the output lines the page shows after it."""

    text: str
    output: list[str]
    where: str


def console_commands(page: Path) -> list[Command]:
    """Every command of every console block of a Markdown or reStructuredText page, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    commands: list[Command] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if page.suffix == ".md":
            if line.strip() != "```console":
                continue
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append((i + 1, lines[i]))
                i += 1
        else:
            if line.strip() != ".. code-block:: console":
                continue
            body = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("   ")):
                if lines[i].strip():
                    body.append((i + 1, lines[i][3:]))
                i += 1
        for number, text in body:
            if text.startswith("$ "):
                commands.append(Command(text[2:], [], f"{page.name}:{number}"))
            elif commands:
                commands[-1].output.append(text)
    return commands


def json_blocks(page: Path) -> list[object]:
    """Every JSON code block of a page, parsed."""
    text = page.read_text(encoding="utf-8")
    if page.suffix == ".md":
        found = re.findall(r"^```json\n(.*?)^```", text, re.S | re.M)
    else:
        found = [
            "\n".join(line[3:] for line in block.splitlines())
            for block in re.findall(r"^\.\. code-block:: json\n\n((?:   .*\n|\n)+)", text, re.M)
        ]
    return [json.loads(block) for block in found]


class Page:
    """A page's commands, taken in order by the walk-through; ports rewritten on the way."""

    def __init__(self, page: Path, ports: dict[int, int]) -> None:
        self.commands = console_commands(page)
        self.ports = ports
        self.next_index = 0

    def rewrite(self, text: str) -> str:
        """``text`` with the page's ports replaced by the test's."""
        return DOC_PORT.sub(lambda m: str(self.ports.get(int(m[1]), m[1])), text)

    def take(self, start: str) -> Command:
        """The next command, which must start with ``start`` (the page and the test in step)."""
        assert self.next_index < len(self.commands), f"the page has no command {start!r} any more"
        command = self.commands[self.next_index]
        self.next_index += 1
        assert command.text.startswith(start), (
            f"{command.where}: {command.text!r} is not the command the test expects next "
            f"({start!r}): update tests/test_readme.py with what the page now says"
        )
        return Command(
            self.rewrite(command.text), [self.rewrite(o) for o in command.output], command.where
        )

    def skip(self, start: str, why: str) -> None:
        """Take the next command without running it (it needs the network)."""
        assert why
        self.take(start)

    def done(self) -> None:
        rest = [c.text for c in self.commands[self.next_index :]]
        assert not rest, f"commands the test does not run or check: {rest}"


class Shell:
    """Runs a page's commands in a real shell in a directory of their own."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        shims = directory / "bin"  # `softlb` and `gunicorn` as this interpreter runs them
        shims.mkdir()
        for name in ("softlb", "gunicorn"):
            shim = shims / name
            shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {name} "$@"\n')
            shim.chmod(0o755)
        # curl reads ~/.curlrc: quiet but for errors, and never waiting long.
        (directory / ".curlrc").write_text(f"silent\nshow-error\nmax-time = {COMMAND_TIMEOUT}\n")
        self.env = {
            "PATH": f"{shims}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(ROOT / "src"),
            "HOME": str(directory),
            "XDG_RUNTIME_DIR": str(directory),
            "SOFTLB_LOG_FORMAT": "",
        }
        self.launcher = Launcher(directory)

    def run(self, command: Command) -> str:
        """Run a command to its end; it must succeed. Returns its standard output."""
        done = subprocess.run(
            ["bash", "-c", command.text],
            cwd=self.directory,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        assert done.returncode == 0, f"{command.where}: {command.text}\n{done.stdout}{done.stderr}"
        return done.stdout

    def start(self, command: Command, port: int) -> Running:
        """Start a command that serves until stopped; return once ``port`` accepts."""
        return self.launcher(["bash", "-c", "exec env " + command.text], port=port, env=self.env)

    def close(self) -> None:
        self.launcher.close()


def stop(running: Running) -> str:
    """Ctrl-C, as the pages say; it must exit 0 without a traceback. Returns its output."""
    running.signal(signal.SIGINT)
    assert running.wait() == 0
    output = running.output()
    assert "Traceback" not in output, output
    return output


def until(check: Callable[[], bool], what: str) -> None:
    """Wait (bounded) for a change a page promises."""
    deadline = time.monotonic() + CHANGE_TIMEOUT
    while not check():
        assert time.monotonic() < deadline, f"not within {CHANGE_TIMEOUT}s: {what}"
        time.sleep(0.2)


def servers(port: int) -> dict[str, dict[str, object]]:
    """GET /_softlb/servers, by URL."""
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/_softlb/servers"],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=True,
    ).stdout
    return {s["url"]: s for s in json.loads(out)["servers"]}


def backend_number(answer: str) -> int:
    """Which demo backend answered ``Hello from demo backend N (port P): ...``."""
    match = re.match(r"Hello from demo backend (\d) \(port \d+\): ", answer)
    assert match, answer
    return int(match[1])


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    runner = Shell(tmp_path)
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture
def three_backends() -> Iterator[list[TestBackend]]:
    started = [TestBackend() for _ in range(3)]
    try:
        yield started
    finally:
        for backend in started:
            backend.stop()


def start_demo(page: Page, shell: Shell) -> Running:
    """`softlb demo` on a free port; the page's 8081-8083 become the ports it printed."""
    command = page.take("softlb demo")
    balancer = page.ports[8080]
    running = shell.start(Command(f"{command.text} --port {balancer}", [], command.where), balancer)
    printed = re.search(r"backends: +(.*)", running.output())
    assert printed, running.output()
    urls = printed[1].split()
    assert len(urls) == 3
    for doc_port, url in zip((8081, 8082, 8083), urls, strict=True):
        page.ports[doc_port] = int(url.rsplit(":", 1)[1])
    return running


def test_readme(shell: Shell, three_backends: list[TestBackend]) -> None:
    """README.md: the demo and its failover story, a config whose traffic takes turns by
    weight, `softlb check` and `serve`, gunicorn listening where the admin curls go."""
    page = Page(README, {8080: free_port()})
    balancer = page.ports[8080]
    page.skip("python -m pip install softlb", "needs the network")

    # -- the demo: break a backend, watch the others take its traffic, heal it
    demo = start_demo(page, shell)
    demo_two = f"http://127.0.0.1:{page.ports[8082]}"
    said = shell.run(page.take("curl -X POST http://127.0.0.1:8082/break"))
    assert said.startswith("demo backend 2 ") and " is broken" in said
    again = page.take("curl http://127.0.0.1:8080/ ")  # "again and again: only 1 and 3 answer"
    answered = [backend_number(shell.run(again)) for _ in range(9)]
    assert set(answered) == {1, 3}, answered  # and no request failed (run() checks curl's exit)
    until(lambda: servers(balancer)[demo_two]["healthy"] is False, "backend 2 shown down")
    said = shell.run(page.take("curl -X POST http://127.0.0.1:8082/heal"))
    assert " is healed" in said
    until(lambda: servers(balancer)[demo_two]["healthy"] is True, "backend 2 back in rotation")
    assert 2 in {backend_number(shell.run(again)) for _ in range(3)}  # "back in turn"
    stop(demo)

    # -- your own backends
    page.ports.update({8081: three_backends[0].port, 8082: three_backends[1].port})
    page.ports[8083] = three_backends[2].port
    [config] = json_blocks(README)
    (shell.directory / "config.json").write_text(page.rewrite(json.dumps(config)))
    shell.run(page.take("softlb check --config config.json"))  # "exit 0"
    serve = shell.start(page.take("softlb serve --config config.json"), balancer)  # its listen
    turns = page.take("for i in 1 2 3; do curl -s http://127.0.0.1:8080/;")
    for _ in range(2):
        shell.run(turns)
    counts = [b.request_count for b in three_backends[:2]]
    assert counts == [2, 4], "of every three requests, 8081 gets one and 8082 two"
    stop(serve)

    gunicorn = shell.start(page.take("gunicorn -k softlb.aio.Worker -b 127.0.0.1:8080 "), balancer)
    added = three_backends[2].url
    answer = json.loads(
        shell.run(page.take('curl -X POST  -d \'{"url": "http://127.0.0.1:8083"}\''))
    )
    assert answer["url"] == added
    listed = json.loads(shell.run(page.take("curl          http://127.0.0.1:8080/_softlb/servers")))
    assert added in {s["url"] for s in listed["servers"]}
    answer = json.loads(
        shell.run(page.take('curl -X DELETE -d \'{"url": "http://127.0.0.1:8083"}\''))
    )
    assert answer["url"] == added
    metrics = shell.run(page.take("curl          http://127.0.0.1:8080/_softlb/metrics"))
    assert "softlb_backend_requests_total" in metrics
    output = stop(gunicorn)
    # "Each change is one line in the log on standard error, with time and level"
    lines = [line for line in output.splitlines() if f"backend {added} " in line]
    assert len(lines) == 2, output
    assert "[INFO] softlb.events: backend " in lines[0] and lines[0].endswith("added (weight 1)")
    assert "one request at a time" not in output

    page.skip(
        'python -m pip install -e ".[test]" && python -m pytest', "the network, and the suite"
    )
    page.done()


def test_quickstart(shell: Shell, three_backends: list[TestBackend]) -> None:
    """docs/quickstart.rst: every console command, with the output the page shows."""
    page = Page(QUICKSTART, {8080: free_port(), 8084: free_port(), 8085: free_port()})
    balancer = page.ports[8080]

    def shows(start: str) -> str:
        """Run the next command; its output must be what the page shows."""
        command = page.take(start)
        out = shell.run(command)
        assert out.rstrip("\n").splitlines() == command.output, command.where
        return out

    page.skip("python -m pip install softlb", "needs the network")
    demo = start_demo(page, shell)
    # What the demo prints is the text the page shows.
    text = QUICKSTART.read_text(encoding="utf-8")
    shown = re.search(r"\n\n(   softlb demo: .*?\n   Press Ctrl-C to stop\.)\n", text, re.S)
    assert shown, "the quickstart shows what softlb demo prints"
    printed = demo.output().split("Press Ctrl-C to stop.")[0] + "Press Ctrl-C to stop."
    assert printed.splitlines() == [page.rewrite(line[3:]) for line in shown[1].splitlines()]
    shows("curl http://127.0.0.1:8080/hello")
    shows("curl http://127.0.0.1:8080/hello")
    shows("curl -X POST http://127.0.0.1:8082/break")
    shows("curl http://127.0.0.1:8080/hello")  # backend 3, then 1: no request fails
    shows("curl http://127.0.0.1:8080/hello")
    shows("curl -X POST http://127.0.0.1:8082/heal")
    stop(demo)

    for doc_port, backend in zip((8081, 8082, 8083), three_backends, strict=True):
        page.ports[doc_port] = backend.port
    seed, with_token = json_blocks(QUICKSTART)
    (shell.directory / "config.json").write_text(page.rewrite(json.dumps(seed)))
    shows("softlb check --config config.json")
    command = page.take("softlb serve --config config.json")
    serve = shell.start(command, balancer)
    [shown] = command.output
    banner = serve.output().splitlines()[0]
    version = r"softlb \S+ serving on "
    assert re.fullmatch(
        version + re.escape(shown.split(" serving on ")[1].split(" (")[0]) + " .*", banner
    )
    assert banner.split("; ")[1] == shown.split("; ")[1]
    stop(serve)

    gunicorn = shell.start(
        page.take("gunicorn -k gthread --threads 16 -b 127.0.0.1:8080 "), balancer
    )
    assert shell.run(Command(f"curl http://127.0.0.1:{balancer}/q", [], "")) == (
        f"ok from {three_backends[0].port}"
    )
    stop(gunicorn)
    gunicorn = shell.start(page.take("SOFTLB_CONFIG=config.json gunicorn -k gthread"), balancer)
    command = page.take("curl http://127.0.0.1:8080/_softlb/servers")
    listed = json.loads(shell.run(command))["servers"]
    shown = "\n".join(command.output)  # the first server in full, then "..."
    assert set(listed[0]) == set(re.findall(r'^\s+"(\w+)":', shown, re.M)) - {"servers"}
    assert f'"url": "{listed[0]["url"]}"' in shown
    answer = json.loads(shell.run(page.take('curl -X POST -d \'{"url": "http://localhost:8084"')))
    assert (answer["url"], answer["weight"]) == (f"http://localhost:{page.ports[8084]}", 2)
    answer = json.loads(shell.run(page.take('curl -X DELETE -d \'{"url": "http://localhost:8084"')))
    assert answer["url"] == f"http://localhost:{page.ports[8084]}"
    assert "softlb_request_duration_seconds" in shell.run(
        page.take("curl http://127.0.0.1:8080/_softlb/metrics")
    )
    stop(gunicorn)

    # The token config, served where the page's curl goes: with the token 200, without it 401.
    assert isinstance(with_token, dict)
    (shell.directory / "token.json").write_text(
        json.dumps({**with_token, "listen": f"127.0.0.1:{balancer}"})
    )
    serve = shell.start(Command("softlb serve --config token.json", [], "test"), balancer)
    command = page.take("curl -H 'Authorization: Bearer ")
    assert "servers" in json.loads(shell.run(command))
    refused = shell.run(
        Command(f"curl -w '%{{http_code}}' http://127.0.0.1:{balancer}/_softlb/servers", [], "")
    )
    assert refused.endswith("401")
    stop(serve)
    page.done()
