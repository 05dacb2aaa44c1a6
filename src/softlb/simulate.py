"""Strategy simulator: replay a workload against every balancing strategy, without sockets.

A discrete-event simulation over the *real* :class:`~softlb.pool.Pool`, strategies and
:class:`~softlb.health.HealthChecker`; nothing here re-implements a strategy. The pool reads a
virtual clock, so in-flight counts, peak-EWMA estimates and health verdicts evolve exactly as
they would under real traffic, only faster:

* a request arrives (Poisson arrivals, or the times of a recorded CSV) and takes a lease, as
  the proxy does;
* each simulated backend is a queueing server with ``concurrency`` slots: a request beyond
  them waits in its queue, and that wait is part of its latency (it is what makes a poor
  strategy's tail grow). Service times follow the backend's distribution (lognormal or
  exponential with a given median), slowed down by the scenario's slowdowns;
* the lease is released when the request completes, so the balancer sees the latency the
  proxy would (queueing included);
* a backend that is down refuses connections after :data:`CONNECT_REFUSED_SECONDS` and cuts
  off the requests it held when it died; each such try is recorded on the lease
  (``lease.fail(...)``) and counted as a "hit down"; the request is retried elsewhere as the
  proxy does (``retries``, default 2), while a :class:`~softlb.health.HealthChecker` driven by
  the same clock (a fake probe, :meth:`~softlb.health.HealthChecker.run_pending`) ejects the
  backend on passive evidence and brings it back through its probes.

Every strategy sees the same workload: the same arrivals, keys and service-time draws
(common random numbers), so differences between rows come from the strategies alone. Each
source of randomness has its own :class:`random.Random` derived from the master seed; the
same seed gives the same numbers.

::

    report = simulate("slow-backend", seed=1)
    print(report.table())
    plot(report, "slow-backend.png")      # needs matplotlib: pip install softlb[plot]
"""

from __future__ import annotations

import csv
import heapq
import inspect
import json
import logging
import math
import random
import statistics
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from softlb.backend import Backend
from softlb.balancers.base import BALANCERS, Balancer
from softlb.errors import NoBackendAvailable
from softlb.health import HealthChecker, ProbeResult
from softlb.pool import Lease, Pool, PoolEvent

__all__ = [
    "CONNECT_REFUSED_SECONDS",
    "SCENARIOS",
    "STRATEGIES",
    "BackendSpec",
    "Outage",
    "PlotUnavailable",
    "Scenario",
    "SimulationReport",
    "Slowdown",
    "StrategyResult",
    "RECORDED_FIELDS",
    "SCENARIO_NAMES",
    "plot",
    "simulate",
]

#: The seven built-in strategies, in the order the simulator runs and reports them (the order
#: of the algorithms page).
STRATEGIES: Final = (
    "least_connections",
    "round_robin",
    "weighted_round_robin",
    "random",
    "power_of_two_choices",
    "consistent_hash",
    "peak_ewma",
)

#: How long a connection to a backend that is down takes to be refused: about one round trip
#: inside a data centre (an RST comes back at once; nothing waits for a timeout).
CONNECT_REFUSED_SECONDS: Final = 0.001

#: The columns of a recorded workload, in this order, after a header line naming them:
#:
#: * ``time``: when the request arrived, in seconds (any origin: the earliest row is time 0;
#:   rows need not be sorted);
#: * ``key``: the request's hash key, as ``consistent_hash`` would see it (may be empty);
#: * ``latency``: how long the backend took to answer, in seconds;
#: * ``backend`` (optional column): which backend answered (any label, such as its URL; may
#:   be empty). With it, the replay has one backend per label, each as fast as its median
#:   latency in the recording; without it, ``backends`` alike backends (default 3).
RECORDED_FIELDS: Final = ("time", "key", "latency", "backend")

#: Requests per strategy when ``requests`` is not given (recorded workloads replay every row).
DEFAULT_REQUESTS: Final = 20_000

#: Share of the backends' capacity the synthetic arrival rate uses: busy enough that queueing
#: matters, idle enough that a good strategy keeps every queue short.
DEFAULT_UTILISATION: Final = 0.7

#: Distinct request keys of the synthetic workloads (clients, for ``consistent_hash``).
SYNTHETIC_KEYS: Final = 1000

#: Health checking in the simulation: probes every second (the proxy's default is 5 s; a
#: simulated run lasts about 20 s), HAProxy's default rise and fall.
HEALTH_INTERVAL: Final = 1.0
HEALTH_RISE: Final = 2
HEALTH_FALL: Final = 3

#: The virtual clock runs due probes this often (a tenth of the probe interval).
_HEALTH_TICK: Final = HEALTH_INTERVAL / 10

#: Tries after the first one that a request may make, the proxy's ``retries`` default.
DEFAULT_RETRIES: Final = 2

#: Slots per backend of the synthetic scenarios.
DEFAULT_CONCURRENCY: Final = 4

#: The recorded scenario's backends without a ``backend`` column.
DEFAULT_RECORDED_BACKENDS: Final = 3

#: Service-time distributions; "recorded" backends replay a CSV's latencies (scaled by median).
_DISTRIBUTIONS: Final = ("lognormal", "exponential", "recorded")
_NORMAL: Final = statistics.NormalDist()


class PlotUnavailable(ImportError):
    """:func:`plot` needs matplotlib, which is an optional extra."""


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class BackendSpec:
    """One simulated backend: ``concurrency`` parallel slots, each serving one request at a
    time, with service times drawn from ``distribution`` (``"lognormal"`` with shape
    ``sigma``, or ``"exponential"``) around ``median`` seconds."""

    name: str
    median: float = 0.010
    concurrency: int = DEFAULT_CONCURRENCY
    distribution: str = "lognormal"
    sigma: float = 0.5
    weight: int = 1

    def __post_init__(self) -> None:
        if self.distribution not in _DISTRIBUTIONS:
            raise ValueError(
                f"backend {self.name}: distribution must be one of {', '.join(_DISTRIBUTIONS)},"
                f" got {self.distribution!r}"
            )
        if self.median <= 0 or self.concurrency < 1 or self.sigma < 0:
            raise ValueError(f"backend {self.name}: median, concurrency and sigma must be > 0")

    @property
    def mean(self) -> float:
        """Mean service time in seconds."""
        if self.distribution == "exponential":
            return self.median / math.log(2)
        if self.distribution == "recorded":
            return self.median  # not used: a recording's rate comes from its rows
        return self.median * math.exp(self.sigma**2 / 2)

    def quantile(self, u: float) -> float:
        """Service time at quantile ``u`` (0 < u < 1) of the distribution."""
        if self.distribution == "exponential":
            return self.median * -math.log1p(-u) / math.log(2)
        if self.distribution == "recorded":
            raise ValueError(f"backend {self.name} replays recorded latencies: no quantiles")
        return self.median * math.exp(self.sigma * _NORMAL.inv_cdf(u))

    def describe(self) -> str:
        shape = {
            "lognormal": f"lognormal, sigma {self.sigma:g}",
            "exponential": "exponential",
            "recorded": "recorded latencies",
        }[self.distribution]
        slots = f"{self.concurrency} slot{'' if self.concurrency == 1 else 's'}"
        return f"median {self.median * 1000:.3g} ms ({shape}), {slots}"


@dataclass(frozen=True)
class Slowdown:
    """Backend number ``backend`` (0-based) serves ``factor`` times slower from ``start`` to
    ``end``, both fractions of the run (0 = first arrival, 1 = last)."""

    backend: int
    factor: float
    start: float = 0.0
    end: float = math.inf


@dataclass(frozen=True)
class Outage:
    """Backend number ``backend`` is down from ``start`` to ``end`` (fractions of the run):
    it refuses connections and cuts off the requests it held when it went down."""

    backend: int
    start: float
    end: float


@dataclass(frozen=True)
class Scenario:
    """A named synthetic workload: the backends, what happens to them, and how busy they are
    (the Poisson arrival rate is ``utilisation`` of their capacity at the start of the run)."""

    name: str
    description: str
    backends: tuple[BackendSpec, ...]
    slowdowns: tuple[Slowdown, ...] = ()
    outages: tuple[Outage, ...] = ()
    utilisation: float = DEFAULT_UTILISATION

    def __post_init__(self) -> None:
        if not self.backends:
            raise ValueError(f"scenario {self.name}: no backends")
        events: list[Slowdown | Outage] = [*self.slowdowns, *self.outages]
        for event in events:
            if not 0 <= event.backend < len(self.backends):
                raise ValueError(f"scenario {self.name}: no backend number {event.backend}")
        if not 0 < self.utilisation < 1:
            raise ValueError(f"scenario {self.name}: utilisation must be between 0 and 1")

    def capacity(self) -> float:
        """Requests per second the backends can serve at the start of the run."""
        total = 0.0
        for index, spec in enumerate(self.backends):
            factor = math.prod(
                s.factor for s in self.slowdowns if s.backend == index and s.start <= 0
            )
            total += spec.concurrency / (spec.mean * factor)
        return total


def _five(slow: BackendSpec | None = None) -> tuple[BackendSpec, ...]:
    fast = [BackendSpec(f"b{i}") for i in range(1, 5)]
    return (*fast, slow or BackendSpec("b5"))


#: The synthetic scenarios by name (``recorded`` reads a CSV instead; see
#: :data:`RECORDED_FIELDS`).
SCENARIOS: Final[dict[str, Scenario]] = {
    s.name: s
    for s in (
        Scenario(
            "slow-backend",
            "5 backends, b5 10x slower than the others for the whole run",
            _five(BackendSpec("b5", median=0.100)),
        ),
        Scenario(
            "slowdown",
            "5 alike backends; b5 becomes 10x slower half way through the run",
            _five(),
            slowdowns=(Slowdown(4, 10.0, start=0.5),),
        ),
        Scenario(
            "failure",
            "5 alike backends; b5 dies at 30 % of the run and comes back at 60 %",
            _five(),
            outages=(Outage(4, 0.3, 0.6),),
        ),
        Scenario("baseline", "5 alike backends, nothing goes wrong", _five()),
    )
}

#: Every scenario name :func:`simulate` accepts.
SCENARIO_NAMES: Final = (*SCENARIOS, "recorded")


# --------------------------------------------------------------------------- workloads


@dataclass
class _Workload:
    """What every strategy replays: arrival times, keys, and a service time for request ``i``
    on backend ``b`` before slowdowns."""

    scenario: Scenario
    arrivals: list[float]
    keys: list[str | None]
    service: Callable[[int, int], float]
    labels: tuple[str, ...]  # what each backend is called where it came from (CSV backends)
    utilisation: float
    rate: float


@dataclass(frozen=True)
class _Recorded:
    times: list[float]
    keys: list[str | None]
    latencies: list[float]
    sources: list[int | None]  # index into labels, None without a backend column
    labels: tuple[str, ...]


def _read_csv(path: Path) -> _Recorded:
    """Read a recorded workload (the format of :data:`RECORDED_FIELDS`), sorted by time.

    A bad file or row raises :class:`ValueError` naming the file and line.
    """
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    rows: list[tuple[float, int, str | None, float, str | None]] = []
    with handle:
        reader = csv.reader(handle)
        try:
            header = [h.strip().lower() for h in next(reader)]
        except StopIteration:
            raise ValueError(f"{path}: empty file; expected a header time,key,latency") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a CSV file: {exc}") from None
        if header not in (list(RECORDED_FIELDS[:3]), list(RECORDED_FIELDS)):
            raise ValueError(
                f"{path}: header must be time,key,latency or time,key,latency,backend; "
                f"got {','.join(header)}"
            )
        width = len(header)
        try:
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != width:
                    raise ValueError(f"{path} line {line}: expected {width} fields, got {len(row)}")
                when = _number(row[0], path, line, "time")
                latency = _number(row[2], path, line, "latency")
                if latency < 0:
                    raise ValueError(f"{path} line {line}: latency {row[2]!r} is negative")
                key = row[1] or None
                backend = row[3].strip() or None if width == 4 else None
                rows.append((when, len(rows), key, latency, backend))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a CSV file: {exc}") from None
    if not rows:
        raise ValueError(f"{path}: no requests after the header")
    rows.sort()  # by time; the row number keeps equal times in file order
    start = rows[0][0]
    names = sorted({r[4] for r in rows if r[4] is not None})
    labels = {name: index for index, name in enumerate(names)}
    sources = [None if r[4] is None else labels[r[4]] for r in rows]
    return _Recorded(
        times=[r[0] - start for r in rows],
        keys=[r[2] for r in rows],
        latencies=[r[3] for r in rows],
        sources=sources,
        labels=tuple(labels),
    )


def _number(text: str, path: Path, line: int, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path} line {line}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{path} line {line}: {what} {text!r} is not a finite number")
    return value


def _rng(seed: int, concern: str) -> random.Random:
    """The random source of one concern, derived from the master seed (str seeds hash the
    same in every process, unlike ``hash()``)."""
    return random.Random(f"softlb-simulate:{seed}:{concern}")


def _synthetic(scenario: Scenario, seed: int, requests: int) -> _Workload:
    rate = scenario.utilisation * scenario.capacity()
    arrivals_rng = _rng(seed, "arrivals")
    keys_rng = _rng(seed, "keys")
    service_rng = _rng(seed, "service")
    now = 0.0
    arrivals: list[float] = []
    keys: list[str | None] = []
    quantiles: list[float] = []
    for _ in range(requests):
        now += arrivals_rng.expovariate(rate)
        arrivals.append(now)
        keys.append(f"client-{keys_rng.randrange(SYNTHETIC_KEYS)}")
        quantiles.append(min(max(service_rng.random(), 1e-12), 1 - 1e-12))
    specs = scenario.backends

    def service(i: int, b: int) -> float:
        return specs[b].quantile(quantiles[i])

    return _Workload(
        scenario, arrivals, keys, service, tuple(s.name for s in specs),
        scenario.utilisation, rate,
    )  # fmt: skip


def _recorded(
    path: str | Path, requests: int | None, backends: int | None, concurrency: int | None
) -> _Workload:
    rec = _read_csv(Path(path))
    count = len(rec.times) if requests is None else min(requests, len(rec.times))
    times, keys, latencies = rec.times[:count], rec.keys[:count], rec.latencies[:count]
    sources = rec.sources[:count]
    overall = statistics.median(latencies) or 1e-6
    if rec.labels:
        if backends is not None and backends != len(rec.labels):
            raise ValueError(
                f"{path}: the CSV names {len(rec.labels)} backends; do not ask for {backends}"
            )
        labels = rec.labels
        # Each backend's speed is its median latency in the recording; a request recorded on
        # one backend and replayed on another takes the other's time (scaled by the ratio).
        by_source: list[list[float]] = [[] for _ in labels]
        for latency, source in zip(latencies, sources, strict=True):
            if source is not None:
                by_source[source].append(latency)
        speeds = [statistics.median(x) if x else overall for x in by_source]
        speeds = [s or overall for s in speeds]
    else:
        count_b = DEFAULT_RECORDED_BACKENDS if backends is None else backends
        if count_b < 1:
            raise ValueError(f"backends must be 1 or more, got {count_b}")
        labels = tuple(f"b{i}" for i in range(1, count_b + 1))
        speeds = [overall] * count_b
    n = len(labels)
    duration = times[-1] if times[-1] > 0 else 1.0
    rate = count / duration
    mean = statistics.fmean(latencies)
    if concurrency is None:
        # Enough slots that the recorded traffic keeps them ~70 % busy, as the synthetic
        # scenarios are; the recorded latencies already include the backends' own waits.
        concurrency = max(1, math.ceil(rate * mean / (n * DEFAULT_UTILISATION)))
    names = labels if not rec.labels else tuple(f"b{i}" for i in range(1, n + 1))
    specs = tuple(
        BackendSpec(names[i], median=speeds[i], concurrency=concurrency, distribution="recorded")
        for i in range(n)
    )
    scenario = Scenario("recorded", f"{count} requests replayed from {path}", specs)
    utilisation = rate * mean / (n * concurrency)

    def service(i: int, b: int) -> float:
        source = sources[i]
        reference = overall if source is None else speeds[source]
        return latencies[i] * speeds[b] / reference

    return _Workload(scenario, times, keys, service, labels, utilisation, rate)


# --------------------------------------------------------------------------- the simulation


class _Clock:
    """The virtual clock every pool, balancer and health checker of a run reads."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Job:
    """One client request, through its tries."""

    __slots__ = ("arrival", "index", "key", "lease", "server", "token", "tried")

    def __init__(self, index: int, arrival: float, key: str | None) -> None:
        self.index = index
        self.arrival = arrival
        self.key = key
        self.tried: list[Backend] = []
        self.lease: Lease | None = None
        self.server: _Server | None = None
        self.token = 0  # bumped when the job leaves a server, to void its completion event


class _Server:
    """A simulated backend: slots, a FIFO queue, slowdowns and outages in absolute time."""

    __slots__ = ("backend", "busy", "down", "index", "queue", "running", "slowdowns", "spec")

    def __init__(self, index: int, spec: BackendSpec, backend: Backend) -> None:
        self.index = index
        self.spec = spec
        self.backend = backend
        self.busy = 0
        self.down = False
        self.queue: deque[_Job] = deque()
        self.running: dict[_Job, None] = {}  # ordered, so a death fails them in a fixed order
        self.slowdowns: list[tuple[float, float, float]] = []  # (start, end, factor)

    def factor(self, now: float) -> float:
        factor = 1.0
        for start, end, slow in self.slowdowns:
            if start <= now < end:
                factor *= slow
        return factor


# Event kinds, in the order events at the same instant are handled.
_DONE, _REFUSED, _DOWN, _UP = 0, 1, 2, 3


@dataclass(frozen=True)
class StrategyResult:
    """What one strategy did with the workload. Latencies are in seconds, from arrival to the
    answer (queueing and failed tries included), over the requests that got an answer."""

    strategy: str
    requests: int
    answered: int
    #: Requests that got no answer: every try failed, or nothing was in rotation.
    errors: int
    #: Tries sent to a backend that was down (refused, or cut off when it died).
    down_hits: int
    #: Tries after the first, over all requests.
    retries: int
    #: Backends taken out of rotation by the health checker (passive or active).
    ejections: int
    p50: float
    p95: float
    p99: float
    max: float
    mean: float
    #: Tries each backend got, by backend name.
    routed: dict[str, int]

    @property
    def shares(self) -> dict[str, float]:
        """Each backend's share of the tries, from 0 to 1."""
        total = sum(self.routed.values()) or 1
        return {name: count / total for name, count in self.routed.items()}

    def as_dict(self) -> dict[str, object]:
        return {
            "strategy": self.strategy,
            "requests": self.requests,
            "answered": self.answered,
            "errors": self.errors,
            "down_hits": self.down_hits,
            "retries": self.retries,
            "ejections": self.ejections,
            "p50_ms": _ms(self.p50),
            "p95_ms": _ms(self.p95),
            "p99_ms": _ms(self.p99),
            "max_ms": _ms(self.max),
            "mean_ms": _ms(self.mean),
            "routed": dict(self.routed),
            "share_percent": {k: round(v * 100, 3) for k, v in self.shares.items()},
        }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


@dataclass(frozen=True)
class SimulationReport:
    """The outcome of :func:`simulate`: one :class:`StrategyResult` per strategy, in order."""

    scenario: str
    description: str
    seed: int
    requests: int
    #: Virtual seconds from the first arrival to the last.
    duration: float
    #: Mean arrival rate, requests per second.
    rate: float
    #: How busy the backends' slots would be if the load were spread perfectly.
    utilisation: float
    backends: tuple[BackendSpec, ...]
    #: What each backend is called in the recording (its name for synthetic scenarios).
    labels: tuple[str, ...]
    events: tuple[str, ...]
    health_check: bool
    retries: int
    results: tuple[StrategyResult, ...] = field(default=())

    def result(self, strategy: str) -> StrategyResult:
        """The result of one strategy (``KeyError`` if it was not simulated)."""
        for result in self.results:
            if result.strategy == strategy:
                return result
        raise KeyError(strategy)

    def as_dict(self) -> dict[str, object]:
        """Everything in the report, as JSON-ready values (latencies in milliseconds)."""
        return {
            "scenario": self.scenario,
            "description": self.description,
            "seed": self.seed,
            "requests": self.requests,
            "duration_s": round(self.duration, 6),
            "rate_per_s": round(self.rate, 3),
            "utilisation": round(self.utilisation, 4),
            "health_check": self.health_check,
            "retries": self.retries,
            "backends": [
                {
                    "name": spec.name,
                    "label": label,
                    "median_ms": _ms(spec.median),
                    "distribution": spec.distribution,
                    "sigma": spec.sigma,
                    "concurrency": spec.concurrency,
                    "weight": spec.weight,
                }
                for spec, label in zip(self.backends, self.labels, strict=True)
            ],
            "events": list(self.events),
            "results": [r.as_dict() for r in self.results],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`as_dict` as JSON text."""
        return json.dumps(self.as_dict(), indent=indent)

    def table(self) -> str:
        """A plain-text table: one row per strategy, with a header saying what was run."""
        names = [spec.name for spec in self.backends]
        show_errors = any(r.errors for r in self.results)
        head = ["strategy", "p50 ms", "p95 ms", "p99 ms", "max ms"]
        head += [f"{n} %" for n in names]
        head += ["hit down"] + (["errors"] if show_errors else [])
        rows: list[list[str]] = []
        for r in self.results:
            shares = r.shares
            row = [r.strategy] + [_fmt_ms(x) for x in (r.p50, r.p95, r.p99, r.max)]
            row += [f"{shares[n] * 100:.1f}" for n in names]
            row += [str(r.down_hits)] + ([str(r.errors)] if show_errors else [])
            rows.append(row)
        widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
        lines = list(self._preamble())
        lines.append("")
        for row in [head, *rows]:
            cells = [row[0].ljust(widths[0])]
            cells += [cell.rjust(widths[i]) for i, cell in enumerate(row) if i]
            lines.append("  ".join(cells).rstrip())
        lines.append("")
        lines.append(
            "latency: arrival to answer, queueing and failed tries included; "
            "b %: share of the tries;"
        )
        lines.append(
            "hit down: tries sent to a backend that was down (each retried elsewhere"
            f", up to {self.retries} times)"
            + ("; errors: requests that got no answer" if show_errors else "")
        )
        return "\n".join(lines) + "\n"

    def _preamble(self) -> Iterator[str]:
        yield f"scenario {self.scenario}: {self.description}"
        for group, spec in _grouped(self.backends):
            yield f"  {group}: {spec.describe()}"
        if any(label != spec.name for label, spec in zip(self.labels, self.backends, strict=True)):
            for label, spec in zip(self.labels, self.backends, strict=True):
                yield f"  {spec.name} = {label}"
        for event in self.events:
            yield f"  {event}"
        arrivals = "replayed" if self.scenario == "recorded" else "Poisson arrivals"
        yield (
            f"  {self.requests} requests over {self.duration:.1f} s, {arrivals} at "
            f"{self.rate:.0f}/s ({self.utilisation * 100:.0f} % of capacity), seed {self.seed}"
        )
        health = (
            f"health checks every {HEALTH_INTERVAL:g} s (rise {HEALTH_RISE}, fall {HEALTH_FALL}, "
            "passive on)"
            if self.health_check
            else "no health checks"
        )
        yield f"  {health}, retries {self.retries}"


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _grouped(specs: Sequence[BackendSpec]) -> Iterator[tuple[str, BackendSpec]]:
    """Runs of backends described alike: ``("b1-b4", spec)``, ``("b5", spec)``."""
    i = 0
    while i < len(specs):
        j = i
        while j + 1 < len(specs) and specs[j + 1].describe() == specs[i].describe():
            j += 1
        yield (specs[i].name if i == j else f"{specs[i].name}-{specs[j].name}"), specs[i]
        i = j + 1


def _percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of a sorted sequence (0 for an empty one)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _make_balancer(name: str, seed: int) -> Balancer:
    cls = BALANCERS[name]
    if "seed" in inspect.signature(cls).parameters:
        seeded: Callable[..., Balancer] = cls
        return seeded(seed=_rng(seed, f"balancer:{name}").getrandbits(64))
    return cls()


class _Silence(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextmanager
def _quiet_health_log() -> Iterator[None]:
    """Drop the health checker's "backend ... is down" warnings while simulating: they are
    about virtual backends at virtual times, and would flood the terminal."""
    logger = logging.getLogger("softlb.health")
    silence = _Silence()
    logger.addFilter(silence)
    try:
        yield
    finally:
        logger.removeFilter(silence)


def _run(
    workload: _Workload, name: str, seed: int, *, health_check: bool, retries: int
) -> StrategyResult:
    """Replay the workload through a fresh pool with strategy ``name``."""
    scenario = workload.scenario
    clock = _Clock()
    backends = [Backend(f"http://{spec.name}.simulated", spec.weight) for spec in scenario.backends]
    pool = Pool(backends, balancer=_make_balancer(name, seed), clock=clock)
    servers = [
        _Server(i, spec, b)
        for i, (spec, b) in enumerate(zip(scenario.backends, backends, strict=True))
    ]
    by_backend = {s.backend: s for s in servers}
    duration = workload.arrivals[-1] if workload.arrivals else 0.0

    events: list[tuple[float, int, int, int, object]] = []  # (time, kind, seq, token, target)
    seq = 0

    def push(when: float, kind: int, target: object, token: int = 0) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (when, kind, seq, token, target))

    for slow in scenario.slowdowns:
        servers[slow.backend].slowdowns.append(
            (_at(slow.start, duration), _at(slow.end, duration), slow.factor)
        )
    for outage in scenario.outages:
        push(_at(outage.start, duration), _DOWN, servers[outage.backend])
        push(_at(outage.end, duration), _UP, servers[outage.backend])

    ejections = 0

    def on_event(event: PoolEvent) -> None:
        nonlocal ejections
        if event.backend is not None and not event.backend.healthy:
            ejections += 1

    pool.subscribe(on_event, ("health",))
    checker: HealthChecker | None = None
    if health_check:

        def probe(backend: Backend) -> ProbeResult:
            if by_backend[backend].down:
                return ProbeResult(False, "connection refused")
            return ProbeResult(True, "HTTP 200")

        checker = HealthChecker(
            pool,
            interval=HEALTH_INTERVAL,
            rise=HEALTH_RISE,
            fall=HEALTH_FALL,
            probe=probe,
            clock=clock,
            seed=_rng(seed, f"health:{name}").getrandbits(64),
        )

    latencies: list[float] = []
    routed = [0] * len(servers)
    errors = down_hits = tries_after_first = 0

    def start(server: _Server, job: _Job, now: float) -> None:
        server.busy += 1
        server.running[job] = None
        service = workload.service(job.index, server.index) * server.factor(now)
        push(now + service, _DONE, job, job.token)

    def dispatch(job: _Job, now: float) -> None:
        nonlocal errors, tries_after_first
        try:
            lease = pool.lease(job.key, exclude=job.tried)
        except NoBackendAvailable:
            errors += 1
            return
        if job.tried:
            tries_after_first += 1
        server = by_backend[lease.backend]
        job.tried.append(lease.backend)
        job.lease = lease
        job.server = server
        routed[server.index] += 1
        if server.down:
            push(now + CONNECT_REFUSED_SECONDS, _REFUSED, job, job.token)
        elif server.busy < server.spec.concurrency:
            start(server, job, now)
        else:
            server.queue.append(job)

    def failed(job: _Job, reason: str, now: float) -> None:
        nonlocal down_hits, errors
        down_hits += 1
        job.token += 1
        assert job.lease is not None
        job.lease.fail(reason)
        job.lease.release()
        job.lease = job.server = None
        if len(job.tried) <= retries:
            dispatch(job, now)
        else:
            errors += 1

    arrivals, keys = workload.arrivals, workload.keys
    total = len(arrivals)
    next_arrival = 0
    next_tick = 0.0 if checker is not None else math.inf
    while next_arrival < total or events:
        t_arrival = arrivals[next_arrival] if next_arrival < total else math.inf
        t_event = events[0][0] if events else math.inf
        if next_tick <= t_event and next_tick <= t_arrival:
            clock.now = next_tick
            assert checker is not None
            checker.run_pending()
            next_tick += _HEALTH_TICK
            continue
        if t_event <= t_arrival:
            when, kind, _, token, target = heapq.heappop(events)
            clock.now = when
            if kind in (_DONE, _REFUSED):
                assert isinstance(target, _Job)
                job = target
                if token != job.token:  # the backend died under it: already handled
                    continue
                if kind == _REFUSED:
                    failed(job, "connect", when)
                    continue
                server = job.server
                assert server is not None and job.lease is not None
                del server.running[job]
                server.busy -= 1
                job.token += 1
                job.lease.release()
                latencies.append(when - job.arrival)
                if server.queue:
                    start(server, server.queue.popleft(), when)
            else:
                assert isinstance(target, _Server)
                server = target
                if kind == _UP:
                    server.down = False
                    continue
                server.down = True
                cut = [*server.running, *server.queue]
                server.running.clear()
                server.queue.clear()
                server.busy = 0
                for job in cut:
                    failed(job, "reset", when)
            continue
        clock.now = t_arrival
        dispatch(_Job(next_arrival, t_arrival, keys[next_arrival]), t_arrival)
        next_arrival += 1

    latencies.sort()
    return StrategyResult(
        strategy=name,
        requests=total,
        answered=len(latencies),
        errors=errors,
        down_hits=down_hits,
        retries=tries_after_first,
        ejections=ejections,
        p50=_percentile(latencies, 50),
        p95=_percentile(latencies, 95),
        p99=_percentile(latencies, 99),
        max=latencies[-1] if latencies else 0.0,
        mean=statistics.fmean(latencies) if latencies else 0.0,
        routed={s.spec.name: routed[s.index] for s in servers},
    )


def _at(fraction: float, duration: float) -> float:
    """The virtual time at ``fraction`` of the run (``inf`` stays ``inf``)."""
    return math.inf if fraction == math.inf else fraction * duration


def _events(scenario: Scenario, duration: float) -> tuple[str, ...]:
    out: list[str] = []
    names = [spec.name for spec in scenario.backends]
    for s in scenario.slowdowns:
        until = "" if s.end == math.inf else f" to {s.end * duration:.1f} s"
        out.append(
            f"{names[s.backend]} {s.factor:g}x slower from {s.start * duration:.1f} s{until}"
        )
    for o in scenario.outages:
        out.append(
            f"{names[o.backend]} down from {o.start * duration:.1f} s to {o.end * duration:.1f} s"
        )
    return tuple(out)


def _strategies(strategies: Sequence[str] | None) -> tuple[str, ...]:
    if strategies is None:
        return STRATEGIES
    chosen: list[str] = []
    for name in strategies:
        if name not in BALANCERS:
            known = ", ".join(STRATEGIES)
            raise ValueError(f"unknown strategy {name!r}; choose from: {known}")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise ValueError("no strategy given")
    return tuple(chosen)


def simulate(
    scenario: str | Scenario,
    *,
    strategies: Sequence[str] | None = None,
    seed: int = 1,
    requests: int | None = None,
    csv_path: str | Path | None = None,
    backends: int | None = None,
    concurrency: int | None = None,
    health_check: bool = True,
    retries: int = DEFAULT_RETRIES,
) -> SimulationReport:
    """Replay one workload against each strategy and report latencies and shares.

    ``scenario`` is a name from :data:`SCENARIO_NAMES` or a :class:`Scenario`;
    ``"recorded"`` replays ``csv_path`` (see :data:`RECORDED_FIELDS`), with ``backends``
    backends when the CSV has no ``backend`` column (default 3) and ``concurrency`` slots each
    (default: enough for ~70 % utilisation). ``strategies`` are config names, run in the order
    given (default: all seven, :data:`STRATEGIES`). ``requests`` defaults to 20,000 (every row
    for a recording). ``health_check`` runs a :class:`~softlb.health.HealthChecker` on the
    virtual clock; ``retries`` is the proxy's setting.

    The same arguments give the same report. Raises :class:`ValueError` for a bad argument or
    a bad CSV.
    """
    if requests is not None and requests < 1:
        raise ValueError(f"requests must be 1 or more, got {requests}")
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, got {retries}")
    names = _strategies(strategies)
    if isinstance(scenario, str):
        if scenario == "recorded":
            if csv_path is None:
                raise ValueError("the recorded scenario needs a CSV file (--csv FILE)")
            workload = _recorded(csv_path, requests, backends, concurrency)
        elif scenario in SCENARIOS:
            if backends is not None:
                raise ValueError(f"backends is only for the recorded scenario, not {scenario}")
            if csv_path is not None:
                raise ValueError(
                    f"a CSV file is only read by the recorded scenario, not {scenario}"
                )
            workload = _synthetic(
                _with(SCENARIOS[scenario], concurrency), seed, requests or DEFAULT_REQUESTS
            )
        else:
            raise ValueError(
                f"unknown scenario {scenario!r}; choose from: {', '.join(SCENARIO_NAMES)}"
            )
    else:
        workload = _synthetic(_with(scenario, concurrency), seed, requests or DEFAULT_REQUESTS)
    spec = workload.scenario
    duration = workload.arrivals[-1] if workload.arrivals else 0.0
    with _quiet_health_log():
        results = tuple(
            _run(workload, name, seed, health_check=health_check, retries=retries) for name in names
        )
    return SimulationReport(
        scenario=spec.name,
        description=spec.description,
        seed=seed,
        requests=len(workload.arrivals),
        duration=duration,
        rate=workload.rate,
        utilisation=workload.utilisation,
        backends=spec.backends,
        labels=workload.labels,
        events=_events(spec, duration),
        health_check=health_check,
        retries=retries,
        results=results,
    )


def _with(scenario: Scenario, concurrency: int | None) -> Scenario:
    if concurrency is None:
        return scenario
    if concurrency < 1:
        raise ValueError(f"concurrency must be 1 or more, got {concurrency}")
    specs = tuple(
        BackendSpec(s.name, s.median, concurrency, s.distribution, s.sigma, s.weight)
        for s in scenario.backends
    )
    return Scenario(
        scenario.name, scenario.description, specs, scenario.slowdowns, scenario.outages,
        scenario.utilisation,
    )  # fmt: skip


# --------------------------------------------------------------------------- the chart


def plot(report: SimulationReport, path: str | Path) -> None:
    """Draw the report as a PNG: latency percentiles (log scale) and backend shares per
    strategy. Needs matplotlib (``pip install softlb[plot]``); uses the Agg renderer and does
    not touch pyplot's global state."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib, which is not installed: pip install softlb[plot]"
        ) from None
    results = report.results
    names = [r.strategy for r in results]
    rows = list(range(len(results)))
    figure = Figure(figsize=(12, 1.6 + 0.55 * len(results)), layout="constrained")
    left, right = figure.subplots(1, 2, sharey=True, width_ratios=(3, 2))

    height = 0.26
    colours = ("#9ecae1", "#4292c6", "#08306b")
    percentiles = {
        "p50": [r.p50 * 1000 for r in results],
        "p95": [r.p95 * 1000 for r in results],
        "p99": [r.p99 * 1000 for r in results],
    }
    for k, (label, values) in enumerate(percentiles.items()):
        offsets = [y + (k - 1) * height for y in rows]
        bars = left.barh(offsets, values, height=height, color=colours[k], label=label)
        left.bar_label(bars, labels=[_short_ms(v) for v in values], padding=2, fontsize=7)
    left.set_xscale("log")
    left.set_xlabel("latency, ms (log scale)")
    left.set_yticks(rows, labels=names)
    left.invert_yaxis()
    left.legend(loc="lower right", fontsize=8)
    left.grid(axis="x", which="major", alpha=0.3)
    low = min((r.p50 for r in results), default=0.001) * 1000
    high = max((r.p99 for r in results), default=0.001) * 1000
    left.set_xlim(low / 2, high * 4)

    backend_names = [spec.name for spec in report.backends]
    palette = _palette(len(backend_names))
    starts = [0.0] * len(results)
    for b, backend in enumerate(backend_names):
        widths = [r.shares[backend] * 100 for r in results]
        right.barh(rows, widths, left=starts, height=0.6, color=palette[b], label=backend)
        for y, (x0, w) in enumerate(zip(starts, widths, strict=True)):
            if w >= 6:
                right.text(x0 + w / 2, y, f"{w:.0f}", ha="center", va="center", fontsize=7)
        starts = [s + w for s, w in zip(starts, widths, strict=True)]
    right.set_xlim(0, 100)
    right.set_xlabel("share of tries, %")
    right.legend(
        loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.02 * (7 - len(results))),
        ncols=min(len(backend_names), 8), fontsize=8, frameon=False,
    )  # fmt: skip
    for y, r in enumerate(results):
        if r.down_hits:
            right.text(101, y, f"{r.down_hits} hit down", va="center", fontsize=7)

    figure.suptitle(
        f"softlb simulate --scenario {report.scenario} --seed {report.seed}: "
        f"{report.requests} requests, {report.utilisation * 100:.0f} % utilised"
        f"{'' if report.health_check else ', no health checks'}\n"
        f"{report.description}",
        fontsize=10,
    )
    figure.savefig(str(path), dpi=110)


def _short_ms(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:.1f} s"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}"


def _palette(n: int) -> list[str]:
    base = ["#4e79a7", "#f28e2b", "#59a14f", "#76b7b2", "#e15759",
            "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]  # fmt: skip
    return [base[i % len(base)] for i in range(n)]
