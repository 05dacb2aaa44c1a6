"""Two versions of ``softlb serve`` side by side: the working tree against a git revision.

A change to the event-loop engine that saves a few µs per request is smaller than the drift
of this machine from one minute to the next (the same commit measured 0.086 and 0.105 CPU ms
per ``/small`` request ten minutes apart), so it is measured the way ``bench_worker.py``
measured the threaded worker: in rounds, the two versions taking turns, the order alternating
from round to round, and the gain read per round.

``base``
    ``git archive REV src`` (``--base``, default ``HEAD``) unpacked into a temporary
    directory and put first on ``PYTHONPATH``;
``work``
    this checkout's ``src/`` as it is on disk, the same way.

Both run with ``--venv``'s Python and libraries (uvloop, httptools, gunicorn) as
``softlb serve --workers 1`` (the event loop, least_connections) under ``run.py``'s load:
two nginx backends and the proxy pinned to CPU 1, ``wrk -t1`` on CPU 0, keep-alive,
16 and 64 connections, ``/small`` (and ``/big`` with ``--body both``). Reports req/s and CPU
ms/req (utime + stime of the process tree / requests) per round, the medians, and the gain
of ``work`` over ``base`` per round with its spread. A cell where other processes took more
than ``--retry-noisy`` % of a CPU is run once more, the quieter run kept.

Prints only (``--save`` writes ``results/ab-YYYY-MM-DD-HHMM.md`` and ``.json``). All traffic
on 127.0.0.1, every process stopped by its PID. Not part of CI; wrap it in
``flock /tmp/bench.lock`` on a shared machine. About 3 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # benchmarks/run.py: processes, backends, wrk, CPU accounting

REPO = Path(__file__).resolve().parents[1]


def _softlb_from(src: Path) -> Callable[[run.Context, int], tuple[list[str], dict[str, str]]]:
    """``softlb serve`` (1 worker, event loop, least_connections) importing softlb from
    ``src``."""
    inner = run._softlb(1, "least_connections")

    def command(ctx: run.Context, port: int) -> tuple[list[str], dict[str, str]]:
        argv, env = inner(ctx, port)
        return argv, {**env, "PYTHONPATH": str(src)}

    return command


def unpack(rev: str, into: Path) -> Path:
    """``src/`` of ``rev``, unpacked under ``into``; its path."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "src"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def gain_pct(work: float, base: float) -> float:
    """How much less CPU per request ``work`` used than ``base``, in % of ``base``."""
    return (base - work) / base * 100


def report(raw: dict[str, Any], names: list[str]) -> tuple[str, dict[str, Any]]:
    """Per-round and median tables, and the gain per cell."""
    lines = [
        "| body | conns | version | req/s (rounds) | req/s | p99 ms | CPU ms/req (rounds) "
        "| CPU ms/req | others % |",
        "|---|---:|---|---|---:|---:|---|---:|---:|",
    ]
    gains: dict[str, Any] = {}
    for body in run.BODIES:
        for conns in run.CONNECTIONS:
            lines += run.round_rows(raw, body, conns, names)
            work = raw.get("work", {}).get(body, {}).get(conns, [])
            base = raw.get("base", {}).get(body, {}).get(conns, [])
            if work and base and len(work) == len(base):
                per_round = [
                    gain_pct(a["cpu_ms_per_req"], b["cpu_ms_per_req"])
                    for a, b in zip(work, base, strict=True)
                ]
                rps_ratio = [a["rps"] / b["rps"] for a, b in zip(work, base, strict=True)]
                gains[f"{body}-c{conns}"] = {
                    "cpu_gain_pct": per_round,
                    "median_cpu_gain_pct": gain_pct(
                        statistics.median(r["cpu_ms_per_req"] for r in work),
                        statistics.median(r["cpu_ms_per_req"] for r in base),
                    ),
                    "spread_pct": max(per_round) - min(per_round),
                    "rps_ratio": rps_ratio,
                    "median_rps_ratio": statistics.median(rps_ratio),
                }
    lines += [
        "",
        "Gain = CPU ms/req saved by work, in % of base's (per round, and of the medians); "
        "spread = max - min of the per-round gains; req/s ratio = work ÷ base per round.",
        "",
        "| cell | CPU gain per round % | median CPU gain % | spread % | req/s work ÷ base "
        "(rounds) | median |",
        "|---|---|---:|---:|---|---:|",
    ]
    for cell, v in gains.items():
        per_round = " / ".join(f"{g:+.1f}" for g in v["cpu_gain_pct"])
        ratios = " / ".join(f"{r:.3f}" for r in v["rps_ratio"])
        lines.append(
            f"| {cell} | {per_round} | {v['median_cpu_gain_pct']:+.1f} | "
            f"{v['spread_pct']:.1f} | {ratios} | {v['median_rps_ratio']:.3f} |"
        )
    return "\n".join(lines), gains


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare with (HEAD)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (5)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, order alternating (4)")
    parser.add_argument(
        "--body", choices=("small", "both"), default="small", help="/small only, or /big too"
    )
    parser.add_argument(
        "--venv", type=Path, default=Path(sys.prefix), help="softlb's virtualenv (this one)"
    )
    parser.add_argument("--retry-noisy", type=float, default=20.0, metavar="PCT")
    parser.add_argument("--save", action="store_true", help="save results/ab-*.md and .json")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.rounds < 1:
        parser.error("--duration and --rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.venv / "bin" / "softlb").exists():
        sys.exit(f"bench_ab.py: no softlb in {args.venv}; pass --venv")
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench_ab.py: needs 2 CPUs")
    if args.body == "small":
        run.BODIES = run.BODIES[:1]
    run.ensure_tools(["nginx", "wrk"])
    os.sched_setaffinity(0, {run.LOAD_CPU})
    started = time.monotonic()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    rev = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", args.base],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "src"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="softlb-bench-ab-") as tmp:
        base_src = unpack(args.base, Path(tmp))
        targets = {
            "base": run.Target("base", f"base ({rev})", "softlb", True, _softlb_from(base_src)),
            "work": run.Target("work", "work tree", "softlb", True, _softlb_from(REPO / "src")),
        }
        raw, order_log, env = run.alternating_rounds(
            targets, Path(tmp), args.venv.resolve(), duration=args.duration,
            rounds=args.rounds, retry_noisy=args.retry_noisy, started=started,
        )  # fmt: skip
    table, gains = report(raw, list(targets))
    text = "\n".join(
        [
            f"# softlb serve: work tree against {args.base} ({rev}), {env['date']}",
            "",
            f"- **base**: {args.base} = {rev}; **work**: the work tree"
            + (" (with uncommitted changes in src/)" if dirty else " (= its HEAD)"),
            f"- **order**: {'; '.join(' then '.join(o) for o in order_log)}",
            f"- **load**: wrk -t1, {args.duration} s per cell, {args.rounds} rounds",
            "",
            table,
            "",
            f"(ran in {(time.monotonic() - started) / 60:.1f} min)",
        ]
    )
    print()
    print(text)
    if args.save:
        run.RESULTS_DIR.mkdir(exist_ok=True)
        md = run.RESULTS_DIR / f"ab-{stamp}.md"
        md.write_text(text + "\n")
        payload = {"base": rev, "dirty": bool(dirty), "runs": raw, "gains": gains}
        md.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
        print(f"\nsaved {md} and {md.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
