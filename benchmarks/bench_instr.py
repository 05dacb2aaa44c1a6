"""Instructions per request of softlb's event-loop engine, counted by callgrind: the work
tree against a git revision.

CPU time per request drifts on this machine by more than a change worth one or two µs
(see ``bench_ab.py``); the number of instructions the engine runs per request does not
(±0.2 % between runs). ``valgrind --tool=callgrind`` counts every instruction the process
runs in user space (the kernel's share of a system call is not in it: read that with
``bench_ab.py``), so one run per version tells such a change apart.

For each version (``base``: ``git archive REV src``; ``work``: this checkout's ``src/``)
the engine runs under callgrind with run.py's two nginx backends and its config for
``softlb serve`` (least_connections), on CPU 1; a client on CPU 0 sends ``--warmup``
requests, the engine's counters are zeroed (``callgrind_control -z``), then ``--requests``
more go over ``--connections`` keep-alive connections (``GET /small``) and the counters are
dumped (``callgrind_control --dump``). Reports instructions per request per version
(``--runs`` runs each, in alternating order) and the change; with ``--floor``, the floor's
too (``peers/bare_uvloop.py``, run.py's ``bare-uvloop``).

The engine runs as ``peers/engine_alone.py``: what ``softlb serve``'s worker runs (the
app, Engine, loop and tuning) in the process valgrind starts, since ``callgrind_control``
does not reach a worker that gunicorn forked.

Prints only. All traffic on 127.0.0.1, every process stopped by its PID. Not part of CI.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # benchmarks/run.py: processes, backends
from bench_ab import REPO, unpack

READY_TIMEOUT_S = 120.0  # startup under valgrind is slow
PEER = Path(__file__).resolve().parent / "peers" / "engine_alone.py"
FLOOR = Path(__file__).resolve().parent / "peers" / "bare_uvloop.py"


async def _client(port: int, requests: int, connections: int) -> int:
    """Send ``requests`` keep-alive ``GET /small`` over ``connections`` connections; the
    number answered 200."""
    per_conn = [requests // connections + (i < requests % connections) for i in range(connections)]
    request = b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n"

    async def one(count: int) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        ok = 0
        try:
            for _ in range(count):
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                await asyncio.wait_for(reader.readexactly(length), 30)
                ok += head.startswith(b"HTTP/1.1 200 ")
        finally:
            writer.close()
        return ok

    results = await asyncio.gather(*(one(n) for n in per_conn if n))
    return sum(results)


def _total(dump_dir: Path, pid: int) -> int:
    """The instruction total of ``pid``'s last callgrind dump."""
    dumps = sorted(dump_dir.glob(f"cg.{pid}*"), key=lambda p: p.stat().st_mtime)
    for path in reversed(dumps):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no callgrind dump of {pid} in {dump_dir}")


def measure(
    ctx: run.Context,
    src: Path | None,
    name: str,
    *,
    warmup: int,
    requests: int,
    connections: int,
    keep: Path | None = None,
) -> float:
    """Instructions per request of softlb's engine importing softlb from ``src``, or of the
    floor (``peers/bare_uvloop.py``) when ``src`` is None."""
    port = run.free_port()
    python = str(ctx.softlb_venv / "bin" / "python")
    if src is None:
        serve = [python, str(FLOOR), str(port), *ctx.backend_urls]
        env = dict(os.environ)
    else:
        serve = [python, str(PEER), str(run.softlb_config(ctx, port)), str(port)]
        env = {**os.environ, "PYTHONPATH": str(src)}
    dump_dir = ctx.tmp / f"cg-{name}-{port}"
    dump_dir.mkdir()
    argv = [
        "valgrind", "--tool=callgrind", "--quiet", f"--callgrind-out-file={dump_dir}/cg.%p",
        *serve,
    ]  # fmt: skip
    proc = run.Proc(f"instr-{name}-{port}", argv, ctx.tmp, env=env)
    try:
        run.wait_ready(proc, f"http://127.0.0.1:{port}/small", timeout=READY_TIMEOUT_S)
        worker = proc.pid  # taskset execs valgrind, which runs the engine in this process
        asyncio.run(_client(port, warmup, connections))
        subprocess.run(["callgrind_control", "-z", str(worker)], check=True, capture_output=True)
        answered = asyncio.run(_client(port, requests, connections))
        subprocess.run(
            ["callgrind_control", "--dump", str(worker)], check=True, capture_output=True
        )
        if answered != requests:
            raise RuntimeError(f"{name}: {answered} of {requests} requests answered 200")
        return _total(dump_dir, worker) / requests
    finally:
        proc.stop()
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for dump in dump_dir.glob("cg.*"):
                shutil.copy(dump, keep / f"{name}-{dump.name}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare with (HEAD)")
    parser.add_argument("--requests", type=int, default=4000, help="requests counted (4000)")
    parser.add_argument("--warmup", type=int, default=1000, help="requests before (1000)")
    parser.add_argument("--connections", type=int, default=16, help="connections (16)")
    parser.add_argument("--runs", type=int, default=2, help="runs of each version (2)")
    parser.add_argument(
        "--venv", type=Path, default=Path(sys.prefix), help="softlb's virtualenv (this one)"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="copy the callgrind dumps there (callgrind_annotate)",
    )
    parser.add_argument(
        "--floor", action="store_true", help="measure the floor (peers/bare_uvloop.py) once too"
    )
    args = parser.parse_args(argv)
    if min(args.requests, args.warmup, args.connections, args.runs) < 1:
        parser.error("--requests, --warmup, --connections and --runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            sys.exit(f"bench_instr.py: {tool} not found (apt-get install valgrind)")
    run.ensure_tools(["nginx"])
    os.sched_setaffinity(0, {run.LOAD_CPU})
    with tempfile.TemporaryDirectory(prefix="softlb-bench-instr-") as tmp:
        ctx = run.Context(tmp=Path(tmp), softlb_venv=args.venv.resolve(), duration=0, repeat=1)
        versions = {"base": unpack(args.base, Path(tmp)), "work": REPO / "src"}
        counts: dict[str, list[float]] = {name: [] for name in versions}
        try:
            run.start_backends(ctx)
            for i in range(args.runs):
                order = list(versions) if i % 2 == 0 else list(reversed(versions))
                for name in order:
                    per_request = measure(
                        ctx, versions[name], name, warmup=args.warmup,
                        requests=args.requests, connections=args.connections, keep=args.keep,
                    )  # fmt: skip
                    counts[name].append(per_request)
                    print(f"run {i + 1} {name}: {per_request:,.0f} instructions/request")
            if args.floor:
                floor = measure(
                    ctx, None, "floor", warmup=args.warmup, requests=args.requests,
                    connections=args.connections, keep=args.keep,
                )  # fmt: skip
                print(f"floor: {floor:,.0f} instructions/request")
        finally:
            run.Proc.stop_all()
    base, work = statistics.median(counts["base"]), statistics.median(counts["work"])
    print(
        f"\nbase ({args.base}) {base:,.0f}  work {work:,.0f}  "
        f"change {(work - base) / base * 100:+.2f} %"
    )
    if args.floor:
        print(f"floor {floor:,.0f}  work ÷ floor {work / floor:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
