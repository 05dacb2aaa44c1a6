"""Tests for the strategy simulator (``softlb.simulate``) and ``softlb simulate``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from softlb import cli
from softlb.simulate import (
    RECORDED_FIELDS,
    SCENARIO_NAMES,
    STRATEGIES,
    PlotUnavailable,
    SimulationReport,
    plot,
    simulate,
)

#: Small enough to keep the file fast, large enough for stable percentiles.
REQUESTS = 4000


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``softlb argv`` in-process; return the status, stdout and stderr."""
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return status, out, err


def write_csv(path: Path, rows: Sequence[tuple[object, ...]], header: tuple[str, ...]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_report() -> None:
    """Two runs with the same seed give the same table and the same JSON."""
    first = simulate("failure", seed=7, requests=REQUESTS)
    second = simulate("failure", seed=7, requests=REQUESTS)
    assert first.table() == second.table()
    assert first.to_json() == second.to_json()
    assert [r.strategy for r in first.results] == list(STRATEGIES)


def test_same_seed_same_report_in_another_process() -> None:
    """The numbers do not depend on the process: another interpreter, with another hash seed,
    prints the same JSON."""
    code = (
        "from softlb.simulate import simulate;"
        f"print(simulate('failure', seed=7, requests={REQUESTS}).to_json())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == simulate("failure", seed=7, requests=REQUESTS).to_json()


def test_different_seed_different_numbers() -> None:
    """Another seed gives another workload, so other numbers."""
    one = simulate("slow-backend", seed=1, requests=REQUESTS, strategies=["random"])
    two = simulate("slow-backend", seed=2, requests=REQUESTS, strategies=["random"])
    assert one.to_json() != two.to_json()
    assert one.result("random").p50 != two.result("random").p50


def test_strategies_run_in_the_order_given() -> None:
    """Strategies are reported in the order asked for, once each."""
    report = simulate(
        "baseline", requests=500, strategies=["peak_ewma", "round_robin", "peak_ewma"]
    )
    assert [r.strategy for r in report.results] == ["peak_ewma", "round_robin"]


# --------------------------------------------------------------------------- the published result


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_peak_ewma_and_least_connections_beat_round_robin_with_a_slow_backend(seed: int) -> None:
    """With one backend 10x slower, peak EWMA and least connections have a far lower p99 than
    round robin, which keeps sending a fifth of the traffic to the slow one."""
    report = simulate(
        "slow-backend",
        seed=seed,
        requests=REQUESTS,
        strategies=["round_robin", "least_connections", "peak_ewma"],
    )
    rr = report.result("round_robin")
    lc = report.result("least_connections")
    ewma = report.result("peak_ewma")
    assert ewma.p99 < rr.p99 / 10
    assert lc.p99 < rr.p99 / 10
    assert ewma.p99 < lc.p99  # peak EWMA reacts to latency itself
    assert rr.shares["b5"] == pytest.approx(0.2, abs=0.001)
    assert ewma.shares["b5"] < 0.05
    assert lc.shares["b5"] < 0.1


def test_alike_backends_get_alike_shares() -> None:
    """Nothing wrong: every strategy spreads the load evenly, and nobody hits a down backend."""
    report = simulate("baseline", requests=REQUESTS)
    for result in report.results:
        assert result.down_hits == result.errors == result.ejections == 0
        assert result.answered == REQUESTS
        for share in result.shares.values():
            assert share == pytest.approx(0.2, abs=0.05)


# --------------------------------------------------------------------------- failure


def test_failure_counts_hits_on_the_down_backend_and_ejects_it() -> None:
    """b5 dies for 30 % of the run: without health checks round robin keeps sending it its
    turn of the outage's tries; with them, passive checks eject it after a few failures, and
    active probes bring it back."""
    requests = 12_000  # about 10 s: long enough for b5 to come back through its probes
    strategies = ["round_robin", "least_connections", "peak_ewma"]
    checked = simulate("failure", requests=requests, strategies=strategies)
    unchecked = simulate("failure", requests=requests, strategies=strategies, health_check=False)
    # Round robin spreads tries evenly, retries included: b5 gets h = (arrivals + h) / 5 tries,
    # a quarter of the outage's arrivals.
    routed_during_outage = requests * 0.3 / 4
    blind = unchecked.result("round_robin")
    assert blind.down_hits == pytest.approx(routed_during_outage, rel=0.2)
    assert blind.ejections == 0
    for result in checked.results:
        assert 0 < result.down_hits < routed_during_outage / 10, result.strategy
        assert result.ejections == 1
        assert result.errors == 0  # every failed try was retried elsewhere
        assert result.answered == requests
        # Out for the outage and about two probes more, then back: had it stayed out, b5
        # would have had its fifth of the first 30 % of the run only, 6 %.
        assert 0.09 < result.shares["b5"] < 0.15, result.strategy
    assert any("b5 down from" in event for event in checked.events)
    assert "hit down" in checked.table()


def test_tries_on_a_down_backend_are_retried_up_to_retries() -> None:
    """With retries=0 a try on the down backend is a failed request."""
    report = simulate(
        "failure", requests=REQUESTS, strategies=["round_robin"], health_check=False, retries=0
    )
    result = report.result("round_robin")
    assert result.errors == result.down_hits > 0
    assert result.answered == REQUESTS - result.errors
    assert "errors" in report.table()


# --------------------------------------------------------------------------- recorded


def test_recorded_csv_round_trip(tmp_path: Path) -> None:
    """A recording replayed on one backend with room for everything gives back exactly the
    recorded latencies; rows need not be sorted, and empty keys are allowed."""
    latencies = [0.001 * (i % 50 + 1) for i in range(400)]
    rows = [(1_700_000_000 + i * 0.01, f"user{i % 7}" if i % 3 else "", lat) for i, lat in
            enumerate(latencies)]  # fmt: skip
    rows.reverse()
    path = write_csv(tmp_path / "traffic.csv", rows, RECORDED_FIELDS[:3])
    report = simulate(
        "recorded", csv_path=path, backends=1, concurrency=1000, strategies=["round_robin"]
    )
    result = report.result("round_robin")
    ordered = sorted(latencies)
    assert report.requests == result.answered == 400
    assert report.duration == pytest.approx(3.99)
    assert result.p50 == pytest.approx(ordered[199])
    assert result.p99 == pytest.approx(ordered[395])
    assert result.max == pytest.approx(ordered[-1])


def test_recorded_csv_with_backends(tmp_path: Path) -> None:
    """With a backend column, each label becomes a backend as fast as it was in the recording:
    peak EWMA avoids the one that was 10x slower, round robin does not."""
    rows = []
    for i in range(3000):
        backend = f"http://10.0.0.{i % 3 + 1}:8000"
        latency = 0.010 * (1 + (i * 7919 % 100) / 100) * (10 if backend.endswith("3:8000") else 1)
        rows.append((i * 0.002, f"10.1.0.{i % 40}", latency, backend))
    path = write_csv(tmp_path / "traffic.csv", rows, RECORDED_FIELDS)
    report = simulate("recorded", csv_path=path, strategies=["round_robin", "peak_ewma"])
    assert report.labels == tuple(f"http://10.0.0.{n}:8000" for n in (1, 2, 3))
    assert [spec.name for spec in report.backends] == ["b1", "b2", "b3"]
    assert report.backends[2].median == pytest.approx(10 * report.backends[0].median, rel=0.1)
    assert "b3 = http://10.0.0.3:8000" in report.table()
    rr, ewma = report.result("round_robin"), report.result("peak_ewma")
    assert ewma.p99 < rr.p99
    assert ewma.shares["b3"] < rr.shares["b3"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("time,key\n1,a\n", "header must be time,key,latency"),
        ("time,key,latency\n", "no requests after the header"),
        ("time,key,latency\n0,a,0.1\n1,b,soon\n", "line 3: latency 'soon' is not a number"),
        ("time,key,latency\n0,a,-1\n", "line 2: latency '-1' is negative"),
        ("time,key,latency\nnan,a,1\n", "line 2: time 'nan' is not a finite number"),
        ("time,key,latency\n0,a\n", "line 2: expected 3 fields, got 2"),
    ],
)
def test_bad_csv(tmp_path: Path, text: str, message: str) -> None:
    """A bad recording is a ValueError naming the file, the line and the problem."""
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"bad\.csv") as info:
        simulate("recorded", csv_path=path)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scenario": "nope"}, "unknown scenario 'nope'; choose from: slow-backend"),
        ({"scenario": "recorded"}, "needs a CSV file"),
        ({"scenario": "failure", "csv_path": "x.csv"}, "only read by the recorded scenario"),
        ({"scenario": "failure", "strategies": ["fastest"]}, "unknown strategy 'fastest'"),
        ({"scenario": "failure", "requests": 0}, "requests must be 1 or more"),
        ({"scenario": "failure", "retries": -1}, "retries must be 0 or more"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    """Bad arguments are ValueErrors that say what is allowed."""
    scenario = kwargs.pop("scenario")
    assert isinstance(scenario, str)
    with pytest.raises(ValueError, match=message):
        simulate(scenario, **kwargs)  # type: ignore[arg-type]


def test_scenario_names() -> None:
    """Every scenario name is listed, recorded last."""
    assert SCENARIO_NAMES == ("slow-backend", "slowdown", "failure", "baseline", "recorded")


# --------------------------------------------------------------------------- output


def test_table_and_json() -> None:
    """The table has one row per strategy with the share of every backend; the JSON has
    every figure."""
    report = simulate("slowdown", requests=1000, strategies=["least_connections", "random"])
    lines = report.table().splitlines()
    header = next(line for line in lines if line.startswith("strategy"))
    columns = "strategy  p50 ms  p95 ms  p99 ms  max ms  b1 %  b2 %  b3 %  b4 %  b5 %  hit down"
    assert header.split() == columns.split()
    assert any(line.startswith("least_connections ") for line in lines)
    assert "b5 10x slower from" in report.table()
    data = json.loads(report.to_json())
    assert data["scenario"] == "slowdown"
    assert data["requests"] == 1000
    first = data["results"][0]
    assert first["strategy"] == "least_connections"
    assert sum(first["routed"].values()) == 1000
    assert set(first) >= {"p50_ms", "p95_ms", "p99_ms", "max_ms", "share_percent", "down_hits"}


def test_plot_writes_a_png(tmp_path: Path) -> None:
    """plot() draws the report to a PNG file."""
    pytest.importorskip("matplotlib")
    report = simulate("failure", requests=1000, strategies=["round_robin", "peak_ewma"])
    target = tmp_path / "chart.png"
    plot(report, target)
    assert target.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without matplotlib, plot() says which extra to install."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    report = SimulationReport("x", "x", 1, 0, 0.0, 0.0, 0.0, (), (), (), True, 2)
    with pytest.raises(PlotUnavailable, match=r"pip install softlb\[plot\]"):
        plot(report, tmp_path / "chart.png")


# --------------------------------------------------------------------------- the command


def test_cli_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    """``softlb simulate`` prints the table of the chosen strategies."""
    status, out, err = run(
        capsys, "simulate", "--requests", "1000", "--strategies", "round_robin, peak_ewma"
    )
    assert status == 0
    assert err == ""
    assert out.startswith("scenario slow-backend: ")
    assert "\nround_robin " in out
    assert "\npeak_ewma " in out
    assert "least_connections" not in out


def test_cli_is_deterministic(capsys: pytest.CaptureFixture[str]) -> None:
    """The same command line prints the same output."""
    argv = ("simulate", "--scenario", "failure", "--requests", "1000", "--seed", "5")
    assert run(capsys, *argv) == run(capsys, *argv)


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    """``--json`` prints one JSON document and nothing else."""
    status, out, _ = run(
        capsys, "simulate", "--json", "--requests", "500", "--strategies", "random", "--seed", "3"
    )
    assert status == 0
    data = json.loads(out)
    assert data["seed"] == 3
    assert [r["strategy"] for r in data["results"]] == ["random"]


def test_cli_plot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``--plot FILE.png`` writes the chart as well as printing the table."""
    pytest.importorskip("matplotlib")
    target = tmp_path / "chart.png"
    status, out, _ = run(
        capsys, "simulate", "--requests", "500", "--strategies", "peak_ewma", "--plot", str(target)
    )
    assert status == 0
    assert target.read_bytes().startswith(b"\x89PNG")
    assert f"chart written to {target}" in out


def test_cli_csv(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``--csv FILE`` replays a recording (the scenario is then ``recorded``)."""
    rows = [(i * 0.01, f"k{i % 5}", 0.02) for i in range(200)]
    path = write_csv(tmp_path / "traffic.csv", rows, RECORDED_FIELDS[:3])
    status, out, _ = run(capsys, "simulate", "--csv", str(path), "--strategies", "round_robin")
    assert status == 0
    assert out.startswith(f"scenario recorded: 200 requests replayed from {path}")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scenario", "nope"], "softlb: error: unknown scenario 'nope'; choose from: "),
        (["--strategies", "fastest"], "softlb: error: unknown strategy 'fastest'"),
        (["--scenario", "recorded"], "softlb: error: the recorded scenario needs a CSV file"),
        (["--csv", "/no/such/file.csv"], "softlb: error: /no/such/file.csv: cannot read"),
        (["--plot", "/no/such/dir/chart.png"], "softlb: error: --plot /no/such/dir/chart.png"),
    ],
)
def test_cli_bad_input(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    """Bad input: one line on stderr, exit 2, nothing on stdout."""
    status, out, err = run(capsys, "simulate", *argv)
    assert status == 2
    assert out == ""
    assert err.startswith(message)
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--requests", "0"], "argument --requests: must be 1 or more, got 0"),
        (["--seed", "x"], "argument --seed: 'x' is not a whole number"),
    ],
)
def test_cli_bad_flags(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    """A bad flag value: argparse's usage line and one error line, exit 2."""
    status, out, err = run(capsys, "simulate", *argv)
    assert status == 2
    assert out == ""
    assert expected in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
