"""Keeping one process's pool in step with a shared store.

:class:`SharedState` is what a worker runs so that what a user sees does not depend on which
worker (or host) answered:

* **membership**: admin changes go to the store first, then to the local pool; a background
  thread polls the store's version a few times a second and applies other processes' changes.
  If the store comes back empty (it lost its data), the first process to notice writes back
  the membership it last knew.
* **health**: one process holds the prober lease and runs the active checks; its verdicts,
  and the passive ejections any process decides, are written to the store and applied by all.
* **in-flight counts**: each process writes its own counts to the host's memory-mapped
  :class:`~softlb.state.slots.SlotTable` under the pool's lock (no I/O); the thread reads the
  other processes' counts every 100 ms, and exchanges host snapshots through a multi-host
  store, so least connections and the other load-aware strategies see the whole host.

When the store fails, traffic goes on with the last known membership and health, admin writes
are refused with :class:`~softlb.state.base.StoreUnavailable` (503), and :attr:`stale` says so
until the store answers again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Final

from softlb.backend import Backend
from softlb.pool import Pool, PoolEvent
from softlb.state.base import (
    MAX_SLOTS,
    HealthVerdict,
    Membership,
    StateStore,
    StoreUnavailable,
)
from softlb.stats import DURATION_BUCKETS, ProxyStats

if TYPE_CHECKING:
    from softlb.health import HealthChecker
    from softlb.state.slots import SlotTable

__all__ = [
    "LOAD_INTERVAL",
    "POLL_INTERVAL",
    "PROBER_TTL",
    "WRITE_BACK_GAP",
    "SharedState",
    "node_name",
    "remove_stale_runs",
    "runtime_dir",
    "slot_path",
    "sqlite_path",
]

log = logging.getLogger("softlb.state")

#: How often the store's membership version and health verdicts are read. An admin change made
#: anywhere is applied everywhere within this (plus a store round trip): SPEC §7 asks for 1 s.
POLL_INTERVAL: Final = 0.25

#: How often other processes' in-flight counts are read from the slot table (and, with a
#: multi-host store, this host's snapshot published): the age of what least connections sees.
LOAD_INTERVAL: Final = 0.1

#: Life of the prober lease; renewed every poll, so a dead prober is replaced within this.
PROBER_TTL: Final = 3.0

#: How often the whole membership is read even when its version has not changed.
FULL_READ_INTERVAL: Final = 5.0

#: How far past the version it last knew a process writes back a membership the store lost.
#: Versions restart at 1 in an empty store; a write-back at version 1 would let a process
#: that knew version N take the store's version N, reached again by changes made after the
#: write-back, for the one it has seen, and miss those changes (hardening item 8). Another
#: process may know a few versions more than the writer (changes made within its last poll
#: interval); no one makes a thousand admin changes in a quarter of a second.
WRITE_BACK_GAP: Final = 1000

#: How long a process that has never read the store (it was unreachable when the process
#: started) leaves an empty store to the processes that know its membership before it seeds
#: the config's: the store may have lost data they still hold (admin changes the config does
#: not have). A few polls: a process that knew it writes back within one.
SEED_DEFER: Final = 1.0

#: Proxy-wide counters shared through the slot table, two per column (its requests and
#: failures cells, which readers sum over every row, dead and retired ones included, so the
#: host-wide totals never go down when a worker dies): retries, answered requests, the error
#: answers the proxy made by status, the duration histogram's buckets and its sum in µs.
PROXY_STATUSES: Final = (400, 500, 502, 503, 504)
_PROXY_VALUES: Final = 2 + len(PROXY_STATUSES) + len(DURATION_BUCKETS) + 1 + 1
#: Columns of the slot table after the backends' that hold the proxy counters.
PROXY_COLUMNS: Final = (_PROXY_VALUES + 1) // 2

#: Marker on health changes this module applies, so they are not written back to the store.
_SHARED: Final = "shared: "


def runtime_dir() -> str:
    """A private directory for files that live as long as the balancer: under
    ``$XDG_RUNTIME_DIR`` when set, else the temporary directory, per user."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        path = os.path.join(base, "softlb")
    else:
        path = os.path.join(tempfile.gettempdir(), f"softlb-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


#: The files ``softlb serve --workers N`` makes for one run in :func:`runtime_dir`, named after
#: the run's process: ``CLUSTER-PID.db``, its ``-wal`` and ``-shm``, and its in-flight table
#: ``CLUSTER-PID.db.CLUSTER.slots`` (1.6 MB).
_RUN_FILE: Final = re.compile(r".+-(?P<pid>[0-9]+)\.db(?:-wal|-shm|\..+\.slots)?")


def remove_stale_runs(directory: str | None = None, *, min_age: float = 60.0) -> list[str]:
    """Delete the files of earlier runs whose process is gone; return the paths deleted.

    A run deletes its own files when it ends; one that was killed (``SIGKILL``, a crash, a
    power cut) leaves them in ``directory`` (default :func:`runtime_dir`). A file is stale when
    the process named in it no longer exists, or exists but started after the file was last
    written (its pid was reused), and the file was not written in the last ``min_age``
    seconds (a margin for a run in another pid namespace sharing the directory). Files of live
    runs, and files not named like a run's, are left alone; one that cannot be deleted is
    skipped. ``softlb serve --workers N`` calls it before it makes its own files.
    """
    directory = directory or runtime_dir()
    now = time.time()
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    verdicts: dict[int, bool] = {}  # pid -> alive
    for name in names:
        match = _RUN_FILE.fullmatch(name)
        if match is None:
            continue
        pid = int(match["pid"])
        path = os.path.join(directory, name)
        try:
            written = os.stat(path).st_mtime
        except OSError:
            continue
        if now - written < min_age:
            continue
        if pid not in verdicts:
            verdicts[pid] = _process_started(pid) is not None
        started = _process_started(pid) if verdicts[pid] else None
        if verdicts[pid] and (started is None or started <= written + 1.0):
            continue  # its run is alive (or cannot be told apart from it)
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(path)
    return removed


def _process_started(pid: int) -> float | None:
    """``None`` if ``pid`` is not a live process; else when it started (``time.time()``
    scale), or ``0.0`` when that cannot be told (no ``/proc``)."""
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:  # PermissionError: it exists, as another user
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        if fields[0] == b"Z":
            return None  # a zombie: its run is over
        with open("/proc/stat", "rb") as boot:
            btime = next(int(line.split()[1]) for line in boot if line.startswith(b"btime"))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return 0.0


def sqlite_path(state_url: str) -> str:
    """The file of a ``sqlite:///relative`` or ``sqlite:////absolute`` URL (SQLAlchemy's
    convention: three slashes, then the path; a fourth makes it absolute)."""
    rest = state_url[len("sqlite:///") :]
    return rest if rest.startswith("/") else os.path.abspath(rest)


def slot_path(state_url: str, cluster: str, node: str) -> str:
    """Where the in-flight table of this host lives for a store: beside a SQLite file, or in
    the runtime directory, named after the store, the cluster and the node."""
    if state_url.startswith("sqlite:"):
        return f"{sqlite_path(state_url)}.{cluster}.slots"
    digest = hashlib.sha1(state_url.encode(), usedforsecurity=False).hexdigest()[:10]
    safe_node = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in node)
    return os.path.join(runtime_dir(), f"{cluster}-{safe_node}-{digest}.slots")


def node_name() -> str:
    """This host's name in a shared store: ``$SOFTLB_NODE`` or the host name."""
    return os.environ.get("SOFTLB_NODE") or socket.gethostname()


class SharedState:
    """Binds a :class:`Pool` (and its :class:`HealthChecker`) to a :class:`StateStore`.

    ``seed`` is the config's ``(url, weight)`` list, written to a store that has no membership
    yet. ``slots`` is the host's in-flight table, when several processes share this host.
    Create it in the process that serves requests (after ``fork()``), then :meth:`start`.
    """

    def __init__(
        self,
        pool: Pool,
        store: StateStore,
        *,
        checker: HealthChecker | None = None,
        seed: Iterable[tuple[str, int]] = (),
        slots: SlotTable | None = None,
        node: str | None = None,
        poll_interval: float = POLL_INTERVAL,
        load_interval: float = LOAD_INTERVAL,
        prober_ttl: float = PROBER_TTL,
        stats: ProxyStats | None = None,
    ) -> None:
        self.pool = pool
        self.store = store
        self.checker = checker
        self.seed = [(url, weight) for url, weight in seed]
        self.slots = slots
        self.node = node or node_name()
        self.owner = f"{self.node}:{os.getpid()}"
        self.poll_interval = poll_interval
        self.load_interval = load_interval
        self.prober_ttl = prober_ttl
        #: This process's proxy counters, published in the slot table for host-wide totals.
        self.stats = stats
        if checker is not None:
            self.health_ttl = 3 * checker.interval + 2 * checker.timeout
        else:
            self.health_ttl = 30.0
        #: Whether the last attempt to reach the store failed.
        self.stale = False
        #: What went wrong, while :attr:`stale`.
        self.last_error: str | None = None
        self._known: Membership | None = None  # the membership last applied
        #: The store was unreachable before this process ever read it (_write_back).
        self._blind = False
        self._empty_since: float | None = None  # when a blind process first found it empty
        self._apply_lock = threading.RLock()  # one membership application at a time
        self._local = threading.local()  # .applying: health changes made by this module
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._next_poll = 0.0
        self._next_full_read = 0.0
        self._remote: dict[str, int] = {}  # other hosts' in-flight counts, by URL
        #: The backends of the last in-flight read and their slots (the pool's eligible
        #: tuple is the same object from one rebuild to the next).
        self._slots_of: tuple[Sequence[Backend] | None, list[int | None]] = (None, [])
        self._pending: dict[str, tuple[Backend, HealthVerdict]] = {}  # verdicts to write
        self._pending_lock = threading.Lock()
        self._stale_since: float | None = None

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> SharedState:
        """Read (or seed) the store once, then keep in step from a background thread."""
        if self._unsubscribe is None:
            self._unsubscribe = self.pool.subscribe(self._on_event, ("health",))
        if self.slots is not None:
            try:
                self.slots.claim()
            except StoreUnavailable as exc:  # table full or unusable: counts stay local
                log.warning("in-flight counts will not be shared by this process: %s", exc)
                self.slots = None
        if self.slots is not None:
            self.pool.count_sink = self._write_counts
            self.pool.shared_in_flight = self._others_in_flight_each
        if self.checker is not None:
            self.checker.on_verdict = self._publish_verdict
        self.poll()
        if self.store.kind != "memory" and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="softlb-state", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread, give up the prober lease and close the store."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(5)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self.pool.count_sink = None
        self.pool.shared_in_flight = None
        with contextlib.suppress(StoreUnavailable):
            self.store.release_prober(self.owner)
        self.store.close()
        if self.slots is not None:
            self.slots.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.load_interval):
            try:
                self._flush_verdicts()
                if time.monotonic() >= self._next_poll:
                    self.poll()
                self.refresh_loads()
            except Exception:  # the thread must outlive any surprise
                log.exception("shared state update failed")

    # -- the store ----------------------------------------------------------------------

    def _failed(self, exc: StoreUnavailable) -> None:
        if self._known is None:
            self._blind = True
        now = time.monotonic()
        if not self.stale:
            log.warning("state store unavailable, serving with the last known state: %s", exc)
            self._stale_since = now
        self.stale = True
        self.last_error = str(exc)
        checker = self.checker
        since = self._stale_since if self._stale_since is not None else now
        if checker is not None and not checker.active and now - since >= self.prober_ttl:
            # No lease can be won or seen: whoever probed may be gone. Rather than run blind,
            # every process probes for itself until the store is back and elects again.
            log.warning(
                "state store unavailable for %.0f s: probing from this process", now - since
            )
            checker.set_active(True)

    def poll(self) -> None:
        """One round with the store: membership, health verdicts, prober lease, load."""
        self._next_poll = time.monotonic() + self.poll_interval
        store = self.store
        try:
            version = store.version()
            if version is None:
                self._write_back()
            elif (
                self._known is None
                or version != self._known.version
                or time.monotonic() >= self._next_full_read
            ):
                # A differing version means a change. Every few seconds the membership is
                # read anyway: a store that lost its data and was written back can reach the
                # version this process knew with different contents.
                self._next_full_read = time.monotonic() + FULL_READ_INTERVAL
                membership = store.membership()
                if membership is not None:
                    self.apply(membership)
            self._apply_health(store.health())
            if self.checker is not None:
                self._elect(store.claim_prober(self.owner, self.prober_ttl))
            if store.multi_host and self.slots is not None:
                store.publish_load(self.node, self._host_loads(), 2 * self.poll_interval + 1)
                self._remote = store.remote_load(self.node)
        except StoreUnavailable as exc:
            self._failed(exc)
            return
        if self.stale:
            log.warning("state store available again")
        self.stale = False
        self.last_error = None
        self._stale_since = None

    def _write_back(self) -> None:
        """Seed the store, which has no membership, with the one this process last knew
        (or the config's, at the first start), and apply what the store then holds: this
        process's, or that of another one that got there first."""
        known = self._known
        if known is None:
            if self._blind:
                # This process started while the store was unreachable: an empty store may
                # have lost a membership that other processes still know and write back (a
                # backend added or removed by the admin API). Seeding the config's at once
                # would undo those changes everywhere; wait for them a moment first.
                now = time.monotonic()
                if self._empty_since is None:
                    self._empty_since = now
                if now - self._empty_since < SEED_DEFER:
                    raise StoreUnavailable(
                        "the store is empty and this process never read it: waiting "
                        f"{SEED_DEFER:g} s for a process that knows the membership to write it"
                    )
            self.apply(self.store.seed(self.seed))
            return
        log.warning(
            "state store has no membership (data lost?): writing back the %d backends last known",
            len(known.members),
        )
        entries = [(m.url, m.weight, m.draining) for m in known.members]
        self.apply(self.store.seed(entries, after=known.version + WRITE_BACK_GAP))

    def _write_back_if_lost(self) -> None:
        """Before an admin change: if the store lost its membership, write back the last
        known one first, so that the change is made to it rather than to an empty store
        (which would drop every other backend everywhere)."""
        if self.store.version() is None:
            with self._apply_lock:
                if self.store.version() is None:
                    self._write_back()

    def _elect(self, prober: bool) -> None:
        checker = self.checker
        assert checker is not None
        if prober != checker.active:
            log.info(
                "%s active health checks in this process (%s)",
                "running" if prober else "leaving",
                self.owner,
            )
            checker.set_active(prober)

    # -- membership ----------------------------------------------------------------------

    def apply(self, membership: Membership) -> None:
        """Make the local pool match ``membership`` (order, weights, draining, slots).

        A member whose weight or draining flag changed is changed in place: it keeps its
        counters, its requests in flight and its health.
        """
        with self._apply_lock:
            local = {b.url: b for b in self.pool.backends}
            wanted = {m.url: m for m in membership.members}
            for url, backend in local.items():
                if backend.origin is not None:  # found by this process's DNS discovery
                    continue
                if url not in wanted:
                    self._drop(backend)
            for member in membership.members:
                present = local.get(member.url)
                if present is not None:
                    if present.weight != member.weight:
                        self.pool.set_weight(present, member.weight)
                    if present.draining != member.draining:
                        self.pool.drain(present, member.draining)
                    if present._slot != member.slot:  # renumbered (a store written back)
                        self._move_slot(present, member.slot)
                    continue
                fresh = Backend(member.url, member.weight)
                fresh.draining = member.draining
                fresh._slot = member.slot
                try:
                    self.pool.add(fresh)
                except Exception:  # already there by a concurrent path: keep it
                    log.debug("backend %s already present", member.url)
            self._reorder([m.url for m in membership.members])
            self._known = membership

    def _reorder(self, order: list[str]) -> None:
        """Keep the pool's members in the store's order, so every worker lists (and rotates
        through) the backends the same way."""
        pool = self.pool
        with pool._lock:
            members = pool._members
            wanted = [url for url in order if url in members]
            if list(members)[: len(wanted)] == wanted:
                return
            reordered = {url: members[url] for url in wanted}
            for url, backend in members.items():
                reordered.setdefault(url, backend)
            pool._members = reordered
            pool._rebuild(pool.clock())

    def _move_slot(self, backend: Backend, slot: int) -> None:
        """Give a backend a new slot: its counts leave the old column for the new one."""
        with self.pool._lock:
            old, backend._slot = backend._slot, slot
            if self.slots is not None:
                if old is not None:
                    self.slots.clear_slot(old)
                self.slots.set(slot, backend.active, backend.requests, backend.failures)

    def _drop(self, backend: Backend) -> None:
        slot = backend._slot
        with self.pool._lock:  # no count may be written to the slot after it is cleared
            backend._slot = None
            if slot is not None and self.slots is not None:
                self.slots.clear_slot(slot)
        try:
            self.pool.remove(backend)
        except Exception:
            return

    def add(self, url: str, weight: int) -> Backend:
        """Add a backend everywhere: to the store first, then here.

        Raises :class:`StoreUnavailable` (nothing changes anywhere),
        :class:`~softlb.errors.BackendExists`, :class:`~softlb.errors.InvalidBackend`.
        """
        self._write_back_if_lost()
        membership = self.store.add(url, weight)
        self.apply(membership)
        return self.pool.get(url)

    def remove(self, url: str) -> Backend:
        """Remove a backend everywhere; its requests in flight finish."""
        self._write_back_if_lost()
        backend = self.pool.get(url) if url in self.pool else None
        membership = self.store.remove(url)
        self.apply(membership)
        return backend if backend is not None else Backend(url)

    def update(
        self, url: str, *, weight: int | None = None, draining: bool | None = None
    ) -> Backend:
        """Change a backend's weight and/or draining flag everywhere (``None``: leave it);
        here it is changed in place, keeping its counters.

        Raises :class:`StoreUnavailable` (nothing changes anywhere) and
        :class:`~softlb.errors.UnknownBackend`.
        """
        self._write_back_if_lost()
        membership = self.store.update(url, weight=weight, draining=draining)
        self.apply(membership)
        return self.pool.get(url)

    # -- health --------------------------------------------------------------------------

    def _apply_health(self, verdicts: Mapping[str, HealthVerdict]) -> None:
        self._local.applying = True
        try:
            for backend in self.pool.backends:
                verdict = verdicts.get(backend.url)
                if verdict is not None and verdict.healthy != backend.healthy:
                    self.pool.set_healthy(backend, verdict.healthy, _SHARED + verdict.reason)
        finally:
            self._local.applying = False

    def _on_event(self, event: PoolEvent) -> None:
        backend = event.backend
        if backend is None or getattr(self._local, "applying", False):
            return
        if event.reason.startswith(_SHARED):
            return
        # A verdict decided here (passive failures, or this process's probes): share it. This
        # may run on a request's thread (a passive ejection), which must never wait for the
        # store: the state thread writes it on its next tick.
        if self._thread is None:  # no thread (the memory store): it cannot block anyway
            self._write_verdict(backend, backend.healthy, event.reason)
            return
        with self._pending_lock:
            self._pending[backend.url] = (
                backend,
                HealthVerdict(backend.healthy, event.reason),
            )

    def _flush_verdicts(self) -> None:
        """Write the verdicts decided here since the last tick (on the state thread)."""
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for backend, verdict in pending.values():
            self._write_verdict(backend, verdict.healthy, verdict.reason)

    def _publish_verdict(self, backend: Backend, healthy: bool, detail: str) -> None:
        """The prober's verdict after each probe, refreshed in the store."""
        self._write_verdict(backend, healthy, detail)

    def _write_verdict(self, backend: Backend, healthy: bool, detail: str) -> None:
        try:
            self.store.set_health(backend.url, HealthVerdict(healthy, detail), self.health_ttl)
        except StoreUnavailable as exc:
            self._failed(exc)

    # -- in-flight counts ----------------------------------------------------------------

    def _write_counts(self, backend: Backend) -> None:
        """Called by the pool, under its lock, whenever a backend's counts change."""
        slot = backend._slot
        if slot is not None and self.slots is not None:
            self.slots.set(slot, backend.active, backend.requests, backend.failures)

    def _host_loads(self) -> dict[str, int]:
        slots = self.slots
        if slots is None:
            return {b.url: b.active for b in self.pool.backends}
        by_slot = {b._slot: b.url for b in self.pool.backends if b._slot is not None}
        totals = slots.totals(by_slot)
        return {url: totals[slot][0] for slot, url in by_slot.items() if slot in totals}

    def _others_in_flight_each(self, backends: Sequence[Backend]) -> list[int]:
        """Requests every other process has in flight on each of ``backends``: this host's,
        read from the in-flight table now, and other hosts', as last polled. The pool reads
        them at each pick (:attr:`Pool.shared_in_flight <softlb.pool.Pool.shared_in_flight>`)
        and the state thread at each tick."""
        slots = self.slots
        if slots is None:
            counts = [0] * len(backends)
        else:
            cached = self._slots_of
            if cached[0] is not backends:  # (the pool hands the same tuple until a rebuild)
                cached = self._slots_of = (backends, [b._slot for b in backends])
            counts = slots.in_flight_of_others_each(cached[1])
        remote = self._remote
        if remote:
            counts = [n + remote.get(b.url, 0) for n, b in zip(counts, backends, strict=True)]
        return counts

    def refresh_loads(self) -> None:
        """Read the other processes' in-flight counts and hand the balancer a new snapshot."""
        slots = self.slots
        if slots is not None:
            slots.heartbeat()
            self._write_proxy_counters()
        changed = False
        backends = self.pool.backends
        for backend, others in zip(backends, self._others_in_flight_each(backends), strict=True):
            if others != backend.shared_active:
                backend.shared_active = others
                changed = True
        if changed:
            self.pool.refresh()

    def _proxy_columns(self) -> range | None:
        slots = self.slots
        if slots is None or self.stats is None or slots.columns < MAX_SLOTS + PROXY_COLUMNS:
            return None
        return range(MAX_SLOTS, MAX_SLOTS + PROXY_COLUMNS)

    def _write_proxy_counters(self) -> None:
        columns = self._proxy_columns()
        if columns is None or self.slots is None or self.stats is None:
            return
        values = _encode(self.stats.snapshot())
        for n, column in enumerate(columns):
            self.slots.set(column, 0, values[2 * n], values[2 * n + 1])

    def proxy_snapshot(self) -> dict[str, object]:
        """The proxy counters summed over every process of the host (this one's as of now,
        the others' as of their last tick, ≤ 100 ms ago); in ProxyStats.snapshot()'s shape."""
        stats = self.stats if self.stats is not None else ProxyStats()
        mine = stats.snapshot()
        columns = self._proxy_columns()
        if columns is None or self.slots is None:
            return mine
        totals = self.slots.totals(columns)
        summed: list[int] = []
        for column in columns:
            _, requests, failures = totals[column]
            _, own_requests, own_failures = self.slots.own(column)
            summed += [requests - own_requests, failures - own_failures]
        live = _encode(mine)
        return _decode([a + b for a, b in zip(summed, live, strict=False)])

    def figures(self) -> list[dict[str, object]]:
        """Every backend as the admin API reports it, with host-wide counts."""
        backends = self.pool.backends
        slots = self.slots
        if slots is None:
            return [b.as_dict() for b in backends]
        totals = slots.totals([b._slot for b in backends if b._slot is not None])
        out = []
        for backend in backends:
            entry = backend.as_dict()
            if backend._slot is not None and backend._slot in totals:
                entry["active"], entry["requests"], entry["failures"] = totals[backend._slot]
            out.append(entry)
        return out

    def __repr__(self) -> str:
        state = "stale" if self.stale else "in step"
        version = self._known.version if self._known else None
        return f"<SharedState {self.store!r} v{version} {state} owner={self.owner}>"


def _encode(snapshot: dict[str, object]) -> list[int]:
    """ProxyStats.snapshot() as the flat list of integers the slot table holds (even length)."""
    errors = snapshot["errors_by_status"]
    buckets = snapshot["bucket_counts"]
    assert isinstance(errors, dict) and isinstance(buckets, list)
    values = [int(snapshot["retries"]), int(snapshot["requests"])]  # type: ignore[call-overload]
    values += [int(errors.get(status, 0)) for status in PROXY_STATUSES]
    values += [int(count) for count in buckets]
    values.append(round(float(snapshot["duration_sum"]) * 1e6))  # type: ignore[arg-type]
    if len(values) % 2:
        values.append(0)
    return values


def _decode(values: list[int]) -> dict[str, object]:
    """The inverse of :func:`_encode`."""
    n = len(PROXY_STATUSES)
    buckets = len(DURATION_BUCKETS) + 1
    errors = {s: c for s, c in zip(PROXY_STATUSES, values[2 : 2 + n], strict=True) if c}
    return {
        "retries": values[0],
        "requests": values[1],
        "errors_by_status": errors,
        "bucket_counts": values[2 + n : 2 + n + buckets],
        "duration_sum": values[2 + n + buckets] / 1e6,
    }
