"""The ``softlb`` command: ``serve``, ``check``, ``demo`` (SPEC §1) and ``simulate``.

Every failure the user can cause — a bad or missing config, a bad flag, a port in use — ends
with one readable line on stderr and a non-zero exit, never a traceback; so does Ctrl-C.
Exit statuses: 0 done, 1 could not run (port in use), 2 bad usage or bad config (argparse's
convention), 130 interrupted before the server started.

gunicorn is reached only through :mod:`softlb.server`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, NoReturn

from softlb import __version__
from softlb.config import (
    access_log_problem,
    listens_clash,
    load_config,
    parse_listen,
    tls_problem,
)
from softlb.demo import DEFAULT_PORT, HOST, run_demo
from softlb.durations import parse_duration
from softlb.errors import ConfigError
from softlb.server import (
    DEFAULT_ENGINE,
    DEFAULT_THREADS,
    DEFAULT_WORKERS,
    ENGINES,
    GRACEFUL_TIMEOUT,
    BindError,
    ServeOptions,
    admin_exposure_warning,
    backends_text,
    bindable_together,
    check_bindable,
    serve,
)

if TYPE_CHECKING:
    from softlb.config import Config

__all__ = ["main"]

PROG: Final = "softlb"
DEFAULT_CONFIG: Final = "config.json"

#: Exit statuses.
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class _CommandError(Exception):
    """Ends the command with ``softlb: error: <message>`` and ``status``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- argument types
# argparse turns ArgumentTypeError into "softlb serve: error: argument --bind: <message>".


def _without_key(error: ConfigError, key: str) -> str:
    text = str(error)
    return text[len(key) + 2 :] if text.startswith(f"{key}: ") else text


def _bind(value: str) -> str:
    """``--bind``: any listen address the config accepts, returned as ``HOST:PORT``."""
    try:
        host, port = parse_listen(value, key="--bind")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(_without_key(exc, "--bind")) from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {number}")
    return number


#: The most ``--workers`` and ``--threads`` take: far above any machine's use (nginx runs one
#: worker a core), low enough that a typo cannot fork or spawn without end.
MAX_WORKERS: Final = 1024
MAX_THREADS: Final = 10_000


def _bounded(most: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = _positive(value)
        if number > most:
            raise argparse.ArgumentTypeError(f"must be {most} or less, got {number}")
        return number

    return parse


def _readable_file(value: str) -> str:
    """A file that exists and can be read (a TLS certificate or key)."""
    if not os.path.isfile(value):
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    if not os.access(value, os.R_OK):
        raise argparse.ArgumentTypeError(f"{value}: cannot read it (permission denied)")
    return value


def _port(value: str) -> int:
    number = _positive(value)
    if number > 65535:
        raise argparse.ArgumentTypeError(f"port {number} is out of range; use 1 to 65535")
    return number


def _integer(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None


def _duration(value: str) -> float:
    """A duration flag: a number of seconds (a command line has no JSON numbers to tell
    ``30`` from ``"30"``, so a bare number is seconds here) or a string with units."""
    given: str | float = value
    for number in (int, float):
        with contextlib.suppress(ValueError):
            given = number(value)
            break
    try:
        return parse_duration(given, key="--graceful-timeout")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(_without_key(exc, "--graceful-timeout")) from None


# --------------------------------------------------------------------------- commands


def _problems(error: ConfigError, path: str) -> list[str]:
    """Each problem of ``error`` as a line that starts with the file name."""
    return [p if p.startswith(f"{path}: ") else f"{path}: {p}" for p in error.problems]


def _load(path: str, *, defaulted: bool) -> Config:
    """The config at ``path``; a :class:`_CommandError` of one line if it is bad or missing."""
    try:
        return load_config(path)
    except ConfigError as exc:
        lines = _problems(exc, path)
        message = lines[0]
        if len(lines) > 1:
            more = len(lines) - 1
            message += (
                f" (and {more} more problem{'s' if more > 1 else ''}; "
                f'run "softlb check --config {path}" to list them all)'
            )
        elif defaulted and message.endswith("config file not found"):
            message += ' (pass --config PATH, or try "softlb demo" for a setup-free start)'
        raise _CommandError(message, EXIT_USAGE) from None


def _summary(config: Config) -> str:
    return f"{config.algorithm}, {backends_text(config)}"


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a config: one OK line and 0, or one line per problem and 2."""
    if args.path is not None and args.config is not None and args.path != args.config:
        raise _CommandError("give the config once: either --config PATH or PATH", EXIT_USAGE)
    path = args.path or args.config or DEFAULT_CONFIG
    try:
        config = load_config(path)
    except ConfigError as exc:
        # The problems are what was asked for, so they go to stdout, as a linter's do.
        for line in _problems(exc, path):
            print(line)
        return EXIT_USAGE
    if config.access_log is not None:
        why = access_log_problem(config.access_log)
        if why is not None:
            print(f"{path}: access_log: {why}")
            return EXIT_USAGE
    print(f"{path}: OK ({_summary(config)}, listen {config.listen})")
    warning = admin_exposure_warning(config)
    if warning is not None:
        print(warning, file=sys.stderr)
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the balancer on gunicorn until SIGINT/SIGTERM."""
    config = _load(args.config or DEFAULT_CONFIG, defaulted=args.config is None)
    if bool(args.certfile) != bool(args.keyfile):
        raise _CommandError("--certfile and --keyfile go together: give both", EXIT_USAGE)
    if args.certfile:
        why = tls_problem(args.certfile, args.keyfile)
        if why is not None:
            raise _CommandError(f"--certfile/--keyfile: {why}", EXIT_USAGE)
    access_log = args.access_log if args.access_log is not None else config.access_log
    if access_log is not None:
        why = access_log_problem(access_log)
        if why is not None:
            where = "--access-log" if args.access_log is not None else "access_log"
            raise _CommandError(f"{where}: {why}", EXIT_USAGE)
    options = ServeOptions(
        bind=args.bind,
        workers=args.workers,
        threads=args.threads,
        graceful_timeout=args.graceful_timeout,
        access_log=args.access_log,
        engine=args.engine,
        certfile=args.certfile,
        keyfile=args.keyfile,
    )
    bind = options.bind or config.listen
    try:
        check_bindable(bind)
        if config.admin.listen is not None:
            try:
                check_bindable(config.admin.listen)
            except BindError as exc:
                raise BindError(f"admin.listen: {exc}") from None
    except BindError as exc:
        raise _CommandError(str(exc), EXIT_FAILED) from None
    admin_listen = config.admin.listen
    if admin_listen is not None and (
        listens_clash(admin_listen, bind) or not bindable_together(bind, admin_listen)
    ):
        where = "--bind" if options.bind else "listen"
        raise _CommandError(
            f"admin.listen: {admin_listen} takes the port of the proxy's {where} {bind} on the "
            "same interface; give it another port",
            EXIT_USAGE,
        )
    return serve(config, options)


def cmd_demo(args: argparse.Namespace) -> int:
    """Three demo backends and a balancer in front of them, until SIGINT/SIGTERM."""
    port: int = DEFAULT_PORT if args.port is None else args.port
    try:
        check_bindable(f"{HOST}:{port}")
    except BindError as exc:
        hint = "" if args.port is not None else "; pick another port with --port N"
        raise _CommandError(f"{exc}{hint}", EXIT_FAILED) from None
    return run_demo(port)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Replay a workload against the strategies; print a table or JSON, maybe draw a chart."""
    from softlb.simulate import PlotUnavailable, plot, simulate

    scenario: str = args.scenario or ("recorded" if args.csv is not None else "slow-backend")
    if args.plot is not None and not Path(args.plot).resolve().parent.is_dir():
        raise _CommandError(f"--plot {args.plot}: no such directory", EXIT_USAGE)
    strategies = None
    if args.strategies is not None:
        strategies = [name.strip() for name in args.strategies.split(",") if name.strip()]
    try:
        report = simulate(
            scenario,
            strategies=strategies,
            seed=args.seed,
            requests=args.requests,
            csv_path=args.csv,
        )
    except ValueError as exc:
        raise _CommandError(str(exc), EXIT_USAGE) from None
    if args.plot is not None:
        try:
            plot(report, args.plot)
        except PlotUnavailable as exc:
            raise _CommandError(str(exc), EXIT_FAILED) from None
        except ValueError as exc:  # a file name matplotlib has no format for
            raise _CommandError(f"--plot {args.plot}: {exc}", EXIT_USAGE) from None
        except OSError as exc:
            raise _CommandError(
                f"cannot write {args.plot}: {exc.strerror or exc}", EXIT_FAILED
            ) from None
    if args.json:
        print(report.to_json())
    else:
        print(report.table(), end="")
        if args.plot is not None:
            print(f"chart written to {args.plot}")
    return EXIT_OK


# --------------------------------------------------------------------------- the parser


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage error is one line (SPEC §1), without argparse's usage
    block before it; ``--help`` still shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``softlb`` argument parser."""
    parser = _Parser(
        prog=PROG,
        description="softlb: an HTTP load balancer with health checks and an admin API.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    commands.required = True

    serve = commands.add_parser(
        "serve",
        help="run the balancer (gunicorn workers, one event loop each)",
        description="Run the balancer until SIGINT/SIGTERM, then let in-flight requests "
        "finish (up to the graceful timeout) and exit 0.",
    )
    serve.add_argument(
        "--config", metavar="PATH", help=f"config file (default: ./{DEFAULT_CONFIG})"
    )
    serve.add_argument(
        "--bind",
        metavar="HOST:PORT",
        type=_bind,
        help="listen address; overrides the config's listen",
    )
    serve.add_argument(
        "--workers",
        metavar="N",
        type=_bounded(MAX_WORKERS),
        default=DEFAULT_WORKERS,
        help=f"worker processes (default: {DEFAULT_WORKERS})",
    )
    serve.add_argument(
        "--threads",
        metavar="N",
        type=_bounded(MAX_THREADS),
        default=DEFAULT_THREADS,
        help="threads per worker with --engine threads: requests proxied at once "
        f"(default: {DEFAULT_THREADS}; ignored by the event loop)",
    )
    serve.add_argument(
        "--engine",
        choices=tuple(ENGINES),
        default=DEFAULT_ENGINE,
        help="eventloop: one event loop per worker serves every connection (default); "
        "threads: gunicorn's threaded worker",
    )
    serve.add_argument(
        "--certfile", metavar="PATH", type=_readable_file, help="TLS certificate (PEM)"
    )
    serve.add_argument("--keyfile", metavar="PATH", type=_readable_file, help="TLS key (PEM)")
    serve.add_argument(
        "--graceful-timeout",
        metavar="DURATION",
        type=_duration,
        default=GRACEFUL_TIMEOUT,
        help=f'how long in-flight requests may finish on stop: seconds, or like "2m" '
        f"(default: {GRACEFUL_TIMEOUT:g}s)",
    )
    serve.add_argument(
        "--access-log",
        metavar="PATH|-",
        nargs="?",
        const="-",
        help="one line per proxied request, naming the backend, to PATH or - (stdout); "
        "overrides the config's access_log (default: the config's, else off)",
    )
    serve.set_defaults(handler=cmd_serve)

    check = commands.add_parser(
        "check",
        help="validate a config file",
        description="Validate a config file: print OK and exit 0, or print one line per "
        "problem and exit 2.",
    )
    check.add_argument(
        "--config", metavar="PATH", help=f"config file (default: ./{DEFAULT_CONFIG})"
    )
    check.add_argument("path", nargs="?", metavar="PATH", help="config file, as --config")
    check.set_defaults(handler=cmd_check)

    demo = commands.add_parser(
        "demo",
        help="start three demo backends and a balancer in front of them",
        description="Start three local demo backends and a balancer in front of them, print "
        "the URLs to try, and run until Ctrl-C.",
    )
    demo.add_argument(
        "--port",
        metavar="N",
        type=_port,
        help=f"balancer port on {HOST} (default: {DEFAULT_PORT})",
    )
    demo.set_defaults(handler=cmd_demo)

    simulate = commands.add_parser(
        "simulate",
        help="compare the strategies on a simulated or recorded workload",
        description="Replay a workload against every balancing strategy on a virtual clock "
        "(no sockets) and report latency percentiles, each backend's share and the tries that "
        "hit a down backend. The same seed gives the same numbers.",
    )
    simulate.add_argument(
        "--scenario",
        metavar="NAME",
        help="slow-backend, slowdown, failure, baseline or recorded "
        "(default: slow-backend, or recorded with --csv)",
    )
    simulate.add_argument(
        "--strategies",
        metavar="A,B,...",
        help="comma-separated algorithm names (default: all seven)",
    )
    simulate.add_argument(
        "--seed", metavar="N", type=_integer, default=1, help="random seed (default: 1)"
    )
    simulate.add_argument(
        "--requests",
        metavar="N",
        type=_positive,
        help="requests per strategy (default: 20000; every row of a --csv)",
    )
    simulate.add_argument(
        "--csv", metavar="FILE", help="recorded workload: time,key,latency[,backend] rows"
    )
    simulate.add_argument(
        "--plot", metavar="FILE.png", help="also draw a chart (needs pip install softlb[plot])"
    )
    simulate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    simulate.set_defaults(handler=cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``softlb`` command line with ``argv`` (default: ``sys.argv[1:]``); return the
    exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except _CommandError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:  # Ctrl-C before the server took over the signal
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
