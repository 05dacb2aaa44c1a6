"""Where ``softlb serve`` spends its CPU per request, under wrk load on one pinned core.

Run it from a checkout: ``python benchmarks/profile_serve.py``. It starts the
two nginx backends of ``run.py`` and softlb's app under gunicorn exactly as ``softlb serve``
runs it (``--engine threads``: gunicorn's gthread, 1 worker, 16 threads, keep-alive 5 s,
least_connections) plus the hooks of ``profile_hooks.py``, pinned to CPU 1, and loads it with
``wrk -t1 -c16`` on ``/small`` (``--body big``: ``/big``) from CPU 0, three times:

1. *timing*: the worker's CPU per request from /proc, split into its main thread (gunicorn's
   event loop) and the request threads' ``handle()`` (per-thread CPU clock), and within that
   the WSGI app (softlb) and the rest (gunicorn reading, parsing, writing);
2. *cprofile-cpu*: ``cProfile`` on the thread CPU clock in every request thread, for the CPU
   of the socket syscalls (a few calls per request, so the profiler's per-call cost, a
   clock_gettime() on every call and return, barely touches them);
3. *cprofile-wall*: ``cProfile`` on its own cheap clock, for the split of the Python code:
   each function's own time goes to a bucket (gunicorn parsing, softlb header rules, urllib3
   pool get/put, http.client request building, response parsing...), functions of no bucket
   (builtins, threading, enum, re...) to their callers' buckets; blocking calls (syscalls,
   lock waits) are left out, as their wall time is mostly waiting.

The Python buckets share what handle() used in step 1 minus the syscalls of step 2, so the
totals are unprofiled numbers and the split is an estimate. The three runs are repeated
(``--repeat``, 3) and every number is the median over the repeats (about 2 minutes in all).

It prints both as Markdown and saves them under ``benchmarks/results/profile-*.md``.
``--py-spy`` also records the worker with py-spy (speedscope file next to it, for a flame
graph); on this machine py-spy counts runnable-but-waiting threads as busy and its ``--gil``
mode misses most samples, so its numbers are not used for the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as harness  # noqa: E402  (benchmarks/ is not a package)
from profiling import Func, caller_attribution  # noqa: E402

#: Bucket of a function by its file and name; the first rule that matches wins. A rule is
#: (path fragment, function names or None for any, bucket). The own time of a function that
#: matches no rule (builtins, threading, enum, re, socket.py...) goes to its callers' buckets.
RULES: list[tuple[str, frozenset[str] | None, str]] = [
    (
        "gunicorn/http/wsgi.py",
        frozenset({"create", "base_environ", "default_environ"}),
        "gunicorn: building the environ",
    ),
    ("gunicorn/http/wsgi.py", None, "gunicorn: start_response + writing the answer"),
    (
        "gunicorn/util.py",
        frozenset({"write", "write_chunk", "http_date", "write_nonblock"}),
        "gunicorn: start_response + writing the answer",
    ),
    ("gunicorn/http/", None, "gunicorn: reading + parsing the request"),
    ("gunicorn/", None, "gunicorn: gthread handle()/handle_request() glue, config lookups"),
    # softlb's worker class sits on gunicorn's side of the request: the client socket's
    ("softlb/worker.py", None, "gunicorn: softlb.worker (one send per answer, drain skip)"),
    ("softlb/http/wire.py", None, "softlb: HTTP/1.1 client to the backends (wire.py)"),
    ("softlb/http/headers.py", None, "softlb: header rules (headers.py)"),
    ("softlb/http/upstream.py", None, "softlb: upstream.py glue"),
    ("softlb/pool.py", None, "softlb: pool lease/release + balancer"),
    ("softlb/backend.py", None, "softlb: pool lease/release + balancer"),
    ("softlb/balancers/", None, "softlb: pool lease/release + balancer"),
    ("softlb/stats.py", None, "softlb: stats + metrics"),
    ("softlb/metrics.py", None, "softlb: stats + metrics"),
    ("prometheus_client/", None, "softlb: stats + metrics"),
    ("softlb/state/", None, "softlb: shared state"),
    ("softlb/health.py", None, "softlb: health checker"),
    ("softlb/", None, "softlb: wsgi.py proxy logic (+ admin routing)"),
    (
        "urllib3/connectionpool.py",
        frozenset(
            {
                "_get_conn",
                "_put_conn",
                "_new_conn",
                "_validate_conn",
                "_get_timeout",
                "_prepare_proxy",
                "close",
                "is_connection_dropped",
            }
        ),
        "urllib3: pool get/put",
    ),
    ("urllib3/util/wait.py", None, "urllib3: pool get/put"),
    ("urllib3/util/connection.py", None, "urllib3: pool get/put"),
    ("urllib3/connectionpool.py", None, "urllib3: _make_request"),
    ("urllib3/connection.py", frozenset({"getresponse"}), "urllib3: response object + headers"),
    ("urllib3/connection.py", None, "urllib3: request building (HTTPConnection.request)"),
    (
        "urllib3/response.py",
        frozenset(
            {
                "read",
                "_raw_read",
                "_fp_read",
                "_init_length",
                "drain_conn",
                "release_conn",
                "_decode",
                "_flush_decoder",
                "close",
                "_error_catcher",
            }
        ),
        "urllib3: body read + release",
    ),
    ("urllib3/", None, "urllib3: response object + headers"),
    (
        "http/client.py",
        frozenset(
            {
                "putrequest",
                "putheader",
                "endheaders",
                "_send_output",
                "send",
                "_send_request",
                "request",
                "_validate_path",
                "_validate_method",
                "_validate_host",
                "_encode_request",
                "_output",
                "_get_hostport",
                "connect",
                "set_debuglevel",
                "_tunnel",
                "_is_textIO",
                "_read_readable",
            }
        ),
        "http.client: request building + send",
    ),
    (
        "http/client.py",
        frozenset(
            {
                "read",
                "_safe_read",
                "readinto",
                "_close_conn",
                "close",
                "isclosed",
                "flush",
                "_get_chunk_left",
                "_read_chunked",
            }
        ),
        "http.client: body read",
    ),
    ("http/client.py", None, "http.client: status line + header parsing"),
    ("email/", None, "http.client: status line + header parsing"),
    ("logging/", None, "logging"),
]


#: Builtins that are system calls and release the GIL around them: their time is the kernel's
#: and the thread switch's, on the socket of their caller.
SYSCALLS = {
    "'sendall'": "send",
    "'send'": "send",
    "'recv_into'": "recv",
    "'recv'": "recv",
    "'poll'": "poll",
    "'select'": "poll",
    "'accept'": "accept",
    "'connect'": "connect",
    "'close'": "close",
    "'setsockopt'": "setsockopt",
    # These two release the GIL too (an ioctl/fcntl each): a thread switch under load.
    "'settimeout'": "settimeout",
    "'setblocking'": "setblocking",
}


def _rule(func: Func) -> str | None:
    path, _, name = func
    name = name.rpartition(".")[2] if "." in name and not name.startswith("<") else name
    for fragment, names, label in RULES:
        if fragment in path and (names is None or name in names):
            return label
    return None


def _syscall(func: Func) -> str | None:
    path, _, name = func
    if path != "~" or not any(word in name for word in ("socket", "epoll", "select")):
        return None
    return next((kind for key, kind in SYSCALLS.items() if key in name), None)


def buckets(stats: pstats.Stats) -> tuple[Counter[str], Counter[str]]:
    """Seconds of own time and calls per bucket; unbucketed functions' go to their callers."""
    table: dict[Func, Any] = stats.stats  # type: ignore[attr-defined]
    owner = caller_attribution(
        table, _rule, lambda func: f"other ({Path(func[0]).name}:{func[2]})", "other (recursion)"
    )

    seconds: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    for func, (_, ncalls, own, _, _) in table.items():
        kind = _syscall(func)
        waits = func[0] == "~" and ("'acquire' of" in func[2] or "time.sleep" in func[2])
        for by, amount, out in ((2, own, seconds), (1, ncalls, calls)):
            for label, fraction in owner(func, by).items():
                if waits:
                    label = "locks: acquire (uncontended: a few µs; else futex waits)"  # noqa: PLW2901
                elif kind is not None:
                    side = "client socket" if label.startswith("gunicorn") else "backend socket"
                    label = f"syscall {kind}() on the {side}"  # noqa: PLW2901
                out[label] += amount * fraction
    return seconds, calls


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return bytes(resp.read())


def _measure(mode: str, ctx: Any, seconds: int, pyspy: Path | None, out: Path) -> dict[str, Any]:
    """One run of softlb under gunicorn + profile_hooks in ``mode``; the window's numbers."""
    port = harness.free_port()
    config = ctx.tmp / f"softlb-{mode}.json"
    config.write_text(
        json.dumps(
            {
                "listen": f"127.0.0.1:{port}",
                "algorithm": "least_connections",
                "servers": ctx.backend_urls,
                "health_check": {"path": "/small"},
            }
        )
    )
    conf = ctx.tmp / f"gunicorn-{mode}.py"
    conf.write_text(
        f"import sys\nsys.path.insert(0, {str(HERE)!r})\n"
        "from profile_hooks import post_worker_init  # noqa: F401\n"
        f"bind = ['127.0.0.1:{port}']\nworker_class = 'gthread'\nworkers = 1\n"
        f"threads = {harness.THREADS}\nkeepalive = 5\ntimeout = 60\nloglevel = 'warning'\n"
        "control_socket_disable = True\npreload_app = False\n"
    )
    dump = ctx.tmp / mode
    dump.mkdir(exist_ok=True)
    env = {**os.environ, "BENCH_PROFILE": mode, "BENCH_PROFILE_OUT": str(dump)}
    argv = [str(ctx.softlb_venv / "bin" / "gunicorn"), "-c", str(conf)]
    argv.append(f"softlb.wsgi:create_app({str(config)!r})")
    proc = harness.Proc(f"profile-{mode}", argv, ctx.tmp, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        harness.wait_ready(proc, base + "/small")
        harness.wrk(f"{base}/{ctx.body}", 16, 2)  # warm up
        _get(base + "/_bench/reset")
        spy = None
        if pyspy is not None:
            worker = harness.children(proc.pid)[0]
            spy = subprocess.Popen(
                [
                    *("taskset", "-c", str(harness.LOAD_CPU), str(pyspy), "record"),
                    *("--pid", str(worker), "-d", str(seconds), "-r", "100"),
                    *("--format", "speedscope", "-o", str(out.with_suffix(".speedscope.json"))),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        load = harness.wrk(f"{base}/{ctx.body}", 16, seconds)
        if spy is not None:
            spy.wait(timeout=60)
        window = json.loads(_get(base + "/_bench/dump"))
    finally:
        proc.stop()
    window["rps"] = load["rps"]
    window["body"] = ctx.body
    window["p99_ms"] = load["p99_ms"]
    if mode.startswith("cprofile"):
        seconds, calls = buckets(pstats.Stats(str(dump / "window.pstats")))
        window["buckets"], window["calls"] = dict(seconds), dict(calls)
    return window


#: Builtins that block (their wall time is mostly waiting, for the peer or for the GIL).
BLOCKING = ("syscall ", "locks: ")


def numbers(timing: dict[str, Any], cpu: dict[str, Any], wall: dict[str, Any]) -> dict[str, Any]:
    """µs per request of each part and bucket, from one (timing, cpu, wall) triple of runs."""
    n = max(timing["requests"], 1)
    parts = {
        "total": timing["process_cpu_s"] / n * 1e6,
        "main": timing["main_thread_cpu_s"] / n * 1e6,
        "handle": timing["handle_cpu_s"] / n * 1e6,
        "app": timing["app_cpu_s"] / n * 1e6,
        "rps": timing["rps"],
        "requests": n,
    }
    # Syscalls: their CPU from the thread-CPU-clock profile (few calls, so little overhead).
    ncpu = max(cpu["requests"], 1)
    rows = {
        label: sec / ncpu * 1e6
        for label, sec in cpu["buckets"].items()
        if label.startswith(BLOCKING)
    }
    python_us = max(parts["handle"] - sum(rows.values()), 0.0)
    # Python code: the split of the wall-clock profile, whose clock costs little per call, over
    # the functions that do not block.
    python = {
        label: sec
        for label, sec in wall["buckets"].items()
        if not label.startswith(BLOCKING) and not label.startswith("other (~:")
    }
    python_total = sum(python.values()) or 1.0
    rows.update({label: sec / python_total * python_us for label, sec in python.items()})
    nwall = max(wall["requests"], 1)
    calls = {label: c / nwall for label, c in wall["calls"].items()}
    return {"parts": parts, "rows": rows, "calls": calls, "python_us": python_us}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def report(runs: list[dict[str, Any]], body: str) -> str:
    """The Markdown tables (medians over the repeats): per-thread split, handle() by bucket."""
    part = {key: _median([r["parts"][key] for r in runs]) for key in runs[0]["parts"]}
    labels = {label for r in runs for label in r["rows"]}
    rows = {label: _median([r["rows"].get(label, 0.0) for r in runs]) for label in labels}
    calls = {label: _median([r["calls"].get(label, 0.0) for r in runs]) for label in labels}
    python_us = _median([r["python_us"] for r in runs])
    total, main, handle, app = part["total"], part["main"], part["handle"], part["app"]
    rest = max(total - main - handle, 0.0)
    lines = [
        f"softlb under gunicorn (gthread, 1 worker x {harness.THREADS} threads), /{body}, "
        f"wrk -c16, {part['rps']:,.0f} req/s unprofiled; median of {len(runs)} runs of "
        f"{part['requests']:,.0f} requests; {sum(calls.values()):,.0f} Python and builtin "
        "function calls per request in handle().",
        "",
        "**Per request, unprofiled** (worker CPU from /proc; thread CPU clocks):",
        "",
        "| part | µs / request | share |",
        "|---|---:|---:|",
        f"| whole worker process | {total:.0f} | 100% |",
        f"| main thread: gunicorn's event loop (epoll, accept, keep-alive, hand-off) | "
        f"{main:.0f} | {main / total:.0%} |",
        f"| request threads, handle(): gunicorn around the app (read, parse, environ, write) "
        f"| {handle - app:.0f} | {(handle - app) / total:.0%} |",
        f"| request threads, handle(): the WSGI app (softlb) | {app:.0f} | {app / total:.0%} |",
        f"| the rest: other threads (health checker) and thread switches | {rest:.0f} | "
        f"{rest / total:.0%} |",
        "",
        "(A streamed answer, over 64 KiB, is read from the backend while gunicorn iterates the "
        "app's iterable, so here it counts as gunicorn's; the table below puts it where it "
        "belongs.)",
        "",
        f"**handle() ({handle:.0f} µs) by bucket.** Syscalls that release the GIL: their own "
        "CPU time in a cProfile run on the thread CPU clock. Python code: the remaining "
        f"{python_us:.0f} µs, split as the own time of the non-blocking functions in a cProfile "
        "run on its (cheap, wall) clock. Builtins and stdlib helpers count for their caller's "
        "bucket. A wait for a contended lock taken with `with lock:` is invisible to cProfile "
        "and counts as its holder's own time.",
        "",
        "| bucket | calls / request | µs / request | share of handle() |",
        "|---|---:|---:|---:|",
    ]
    small_us = small_calls = 0.0
    for label, us in sorted(rows.items(), key=lambda item: -item[1]):
        if us / handle < 0.005:
            small_us += us
            small_calls += calls.get(label, 0.0)
            continue
        per_call = calls.get(label, 0.0)
        lines.append(f"| {label} | {per_call:.0f} | {us:.0f} | {us / handle:.1%} |")
    lines.append(
        f"| (buckets under 0.5 % each) | {small_calls:.0f} | {small_us:.0f} | "
        f"{small_us / handle:.1%} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--seconds", type=int, default=8, help="seconds of load per run (8)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each kind; median (3)")
    parser.add_argument("--venv", type=Path, default=Path(sys.prefix), help="softlb's venv")
    parser.add_argument("--py-spy", action="store_true", help="also record a py-spy flame graph")
    parser.add_argument("--body", choices=harness.BODIES, default="small", help="(small)")
    parser.add_argument("--no-save", action="store_true", help="print only, save nothing")
    parser.add_argument(
        "--keep-pstats",
        type=Path,
        metavar="DIR",
        help="copy the last two cProfile dumps there (read them with python -m pstats)",
    )
    args = parser.parse_args(argv)
    venv = args.venv.resolve()
    if not (venv / "bin" / "gunicorn").exists():
        sys.exit(f"profile_serve.py: no gunicorn in {venv}; pass --venv of softlb's venv")
    pyspy = venv / "bin" / "py-spy" if args.py_spy else None
    if pyspy is not None and not pyspy.exists():
        sys.exit(f"profile_serve.py: no {pyspy}; pip install py-spy into {venv}")
    harness.ensure_tools(["nginx", "wrk"])
    os.sched_setaffinity(0, {harness.LOAD_CPU})
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = harness.RESULTS_DIR / f"profile-{stamp}-{args.body}.md"
    raw: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="softlb-profile-") as tmp:
        ctx = harness.Context(Path(tmp), venv, args.seconds, 1)
        ctx.body = args.body
        try:
            harness.start_backends(ctx)
            for rep in range(args.repeat):
                triple = {
                    mode: _measure(mode, ctx, args.seconds, pyspy if rep == 0 else None, out)
                    for mode in ("timing", "cprofile-cpu", "cprofile-wall")
                }
                raw.append(triple)
                got = numbers(triple["timing"], triple["cprofile-cpu"], triple["cprofile-wall"])
                print(
                    f"run {rep + 1}/{args.repeat}: {got['parts']['rps']:,.0f} req/s, "
                    f"{got['parts']['total']:.0f} µs CPU per request",
                    flush=True,
                )
            if args.keep_pstats:
                args.keep_pstats.mkdir(parents=True, exist_ok=True)
                for mode in ("cprofile-cpu", "cprofile-wall"):
                    shutil.copy(
                        ctx.tmp / mode / "window.pstats", args.keep_pstats / f"{mode}.pstats"
                    )
        finally:
            harness.Proc.stop_all()
    text = report(
        [numbers(r["timing"], r["cprofile-cpu"], r["cprofile-wall"]) for r in raw], args.body
    )
    print(text)
    if not args.no_save:
        harness.RESULTS_DIR.mkdir(exist_ok=True)
        out.write_text(f"# softlb serve profile, {stamp}\n\n{text}\n")
        out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
        print(f"\nsaved {out} and {out.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
