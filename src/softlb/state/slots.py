"""The host's in-flight table: one row per worker process, written by its owner, summed by all.

In-flight counts change twice per request, far too often for a database. Every worker of a host
maps the same file (``mmap``, ``MAP_SHARED``) and writes the counts of each backend into *its
own* row; a reader sums one column over the rows. A write is three aligned 8-byte stores
(about 0.2 µs from Python), a read of one column a strided sum (a few µs), and no lock is taken
on either path: each row has exactly one writer.

File layout
-----------

Native-endian signed 64-bit words (the file never leaves the host), ``W = 8 + 3 * columns``::

    word 0                  header (8 words)
        0  magic            b"softlbIF" read as a little-endian int64
        1  layout version   LAYOUT_VERSION
        2  rows             owner rows (R), not counting row 0
        3  columns          backend slots (C), MAX_SLOTS by default
        4  row words        W, the length of one row
        5  generation       odd while a row is being folded into row 0 (a seqlock for totals())
        6  created          time.time_ns() when the file was initialized
        7  high water       highest row ever claimed: readers sum rows 0 .. this one only
    word 8 + r * W          row r, for r in 0 .. R (row 0: totals of retired owners)
        0  pid              owner's process id; 0 = the row is free
        1  start time       owner's start time (/proc/PID/stat field 22, clock ticks since
                            boot); 0 = unknown (no /proc)
        2  heartbeat        time.time_ns() of the owner's last claim() or heartbeat()
        3  pid namespace    inode of the owner's /proc/self/ns/pid; 0 = unknown
        4  claimed          time.time_ns() of the claim
        5..7 (reserved)
        8 + 3 * s           for each slot s: in_flight, requests, failures

The file is 1.6 MB at 64 rows by 1,024 slots; it is created, validated and (when a different
layout is found, e.g. after an upgrade) replaced under ``fcntl.flock``, which is also held to
claim a row, fold a dead owner's row into row 0, and clear a slot for every row.

Owners and liveness
-------------------

A process takes a row with :meth:`SlotTable.claim` (or on its first :meth:`~SlotTable.set`):
its own row again if it has one, else a free row once the rows of dead owners were folded into
row 0 (their ``requests`` and ``failures`` are kept, their ``in_flight`` dropped: a crash leaks
no counts). The threads of one process share its row, so its writes must come from one place
at a time (softlb writes under the pool's lock). One table object per file per process: two
objects in one process would share a row.

An owner is dead when, in the same pid namespace, its pid is gone or a zombie, or the pid now
belongs to a process with another start time (pid reuse). When the pid cannot be checked (no
``/proc``, or the owner lives in another pid namespace, e.g. another container sharing the
file) an owner is dead when its heartbeat is older than :data:`DEAD_AFTER`; such owners must
call :meth:`~SlotTable.heartbeat` every few seconds. Liveness is cached for ``liveness_ttl``
seconds so readers stay cheap; a reader's sums count a dead owner's ``in_flight`` until then.

Nothing is opened before first use, and a forked child drops what its parent had opened
(:mod:`softlb.forking`), so a table can be built before gunicorn forks.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Final

from softlb.forking import after_fork_in_child
from softlb.state.base import MAX_SLOTS, StoreUnavailable

__all__ = ["DEAD_AFTER", "LAYOUT_VERSION", "LIVENESS_TTL", "SlotTable", "SlotTableFull"]

#: First word of the file.
MAGIC: Final = int.from_bytes(b"softlbIF", "little")
#: Bumped whenever the layout changes; a file with another version is replaced.
LAYOUT_VERSION: Final = 1
#: Seconds without a heartbeat after which an owner whose pid cannot be checked is dead:
#: five times the 2 s a heartbeat thread may reasonably be late by.
DEAD_AFTER: Final = 10.0
#: How long a reader trusts what it learnt about which owners are alive (the issue: ~1 s).
LIVENESS_TTL: Final = 1.0

#: Widest table accepted: every backend slot plus room for counters kept beside them (the
#: proxy's own, see softlb.state.sync.PROXY_COLUMNS).
MAX_COLUMNS: Final = MAX_SLOTS + 64

_HEADER: Final = 8  # words before row 0
_ROW_HEADER: Final = 8  # words before the cells of a row
_CELLS: Final = 3  # in_flight, requests, failures
# header words
_H_MAGIC, _H_VERSION, _H_ROWS, _H_COLUMNS, _H_ROW_WORDS, _H_GENERATION, _H_CREATED, _H_HIGH = range(
    8
)
# row header words
_R_PID, _R_START, _R_HEARTBEAT, _R_PIDNS, _R_CLAIMED = range(5)
_HEADER_FORMAT: Final = "=8q"
#: ``_own`` when this process has no row: any ``_own + 3 * slot`` stays negative.
_NO_ROW: Final = -(1 << 62)
#: A stand-in for the mapping while nothing is open.
_NOTHING: Final = memoryview(bytearray(8)).cast("q")


class SlotTableFull(StoreUnavailable):
    """Every row of the in-flight table belongs to a live process."""


class SlotTable:
    """The memory-mapped in-flight table of one host; see the module docstring for the layout.

    ``rows`` is how many processes may own a row at once (the workers of the host, plus some
    spare for restarts); ``columns`` how many backend slots each row holds.

    ``_lock`` guards opening, claiming, closing and every section under ``flock`` (a ``flock``
    is per open file, so it does not keep this process's own threads apart); :meth:`set`,
    :meth:`totals` and :meth:`in_flight_of_others` take no lock.
    """

    __slots__ = (
        "__weakref__",
        "_checked",
        "_dead",
        "_fd",
        "_lock",
        "_mmap",
        "_own",
        "_q",
        "_row",
        "_row_words",
        "_words",
        "columns",
        "liveness_ttl",
        "path",
        "rows",
    )

    def __init__(
        self,
        path: str,
        *,
        rows: int = 64,
        columns: int = MAX_SLOTS,
        liveness_ttl: float = LIVENESS_TTL,
    ) -> None:
        if rows < 1:
            raise ValueError(f"an in-flight table needs at least one row, not {rows}")
        if not 1 <= columns <= MAX_COLUMNS:
            raise ValueError(f"columns must be between 1 and {MAX_COLUMNS}, not {columns}")
        self.path = os.path.abspath(path)
        self.rows = rows
        self.columns = columns
        self.liveness_ttl = liveness_ttl
        self._row_words = _ROW_HEADER + _CELLS * columns
        self._words = _HEADER + (rows + 1) * self._row_words
        self._lock = threading.Lock()
        # Set by _open() (under _lock); read without it by the lock-free methods.
        self._fd = -1
        self._mmap: mmap.mmap | None = None
        self._q: memoryview = _NOTHING
        #: Our row (1 .. rows), or 0 while we have none.
        self._row = 0
        #: Index of our row's first cell, or _NO_ROW.
        self._own = _NO_ROW
        #: Rows found dead at the last liveness check, with the pid they had then.
        self._dead: tuple[tuple[int, int], ...] = ()
        self._checked = float("-inf")
        _TABLES.add(self)

    # -- owner side ------------------------------------------------------------------------

    @property
    def row(self) -> int | None:
        """This process's row, or ``None`` before :meth:`claim`."""
        return self._row or None

    def claim(self) -> int:
        """Take a row for this process and return its number (1 .. rows); idempotent.

        Raise :class:`SlotTableFull` when every row belongs to a live process, and
        :class:`StoreUnavailable` when the file cannot be opened.
        """
        with self._lock:
            self._claim_locked()
            return self._row

    def heartbeat(self) -> None:
        """Say this process is alive (needed where pids cannot be checked; cheap anyway).

        If our row was taken from us (we were thought dead), claim a new one.
        """
        with self._lock:
            q = self._q
            base = _HEADER + self._row * self._row_words
            if self._own < 0 or q[base + _R_PID] != _identity()[0]:
                self._row, self._own = 0, _NO_ROW
                self._claim_locked()
                return
            q[base + _R_HEARTBEAT] = time.time_ns()

    def set(self, slot: int, in_flight: int, requests: int, failures: int) -> None:
        """Write this process's counts for ``slot`` (absolute values; claims a row on first
        use). Only one thread of the process may write at a time."""
        if not 0 <= slot < self.columns:
            raise IndexError(f"slot {slot} is outside the table (0 .. {self.columns - 1})")
        i = self._own + 3 * slot
        if i < 0:
            i = self._claimed() + 3 * slot
        q = self._q
        q[i] = in_flight
        q[i + 1] = requests
        q[i + 2] = failures

    def clear_slot(self, slot: int) -> None:
        """Forget a backend's counts: zero this process's cells for ``slot`` and, under the
        file lock, those of the retired row 0 and of dead owners not yet folded, so a backend
        given the slot later starts from zero. Other live owners clear their own."""
        if not 0 <= slot < self.columns:
            raise IndexError(f"slot {slot} is outside the table (0 .. {self.columns - 1})")
        with self._lock:
            self._open_locked()
            q = self._q
            if self._own >= 0:
                i = self._own + 3 * slot
                q[i] = q[i + 1] = q[i + 2] = 0
            with self._flock():
                generation = q[_H_GENERATION]
                q[_H_GENERATION] = generation + 1
                try:
                    dead = {row for row, _pid in self._find_dead()}
                    for row in (0, *sorted(dead)):
                        i = _HEADER + row * self._row_words + _ROW_HEADER + 3 * slot
                        q[i] = q[i + 1] = q[i + 2] = 0
                finally:
                    q[_H_GENERATION] = generation + 2

    # -- reader side -----------------------------------------------------------------------

    def totals(self, slots: Iterable[int] | None = None) -> dict[int, tuple[int, int, int]]:
        """Per slot (every column when ``slots`` is None): ``(in_flight, requests, failures)``,
        in-flight summed over live owners, requests and failures over every row (retired
        owners and dead owners not yet folded included)."""
        q = self._opened()
        wanted = range(self.columns) if slots is None else list(slots)
        for slot in wanted:
            if not 0 <= slot < self.columns:
                raise IndexError(f"slot {slot} is outside the table (0 .. {self.columns - 1})")
        dead = self._live_check()
        rw = self._row_words
        first = _HEADER + _ROW_HEADER
        out: dict[int, tuple[int, int, int]] = {}
        for _attempt in range(100):
            generation = q[_H_GENERATION]
            if generation & 1:  # a row is being folded into row 0 right now
                time.sleep(0)
                continue
            span = (q[_H_HIGH] + 1) * rw  # rows above the high water mark were never used
            out = {}
            for slot in wanted:
                i = first + 3 * slot
                in_flight = sum(q[i : i + span : rw])
                for row, pid in dead:
                    if q[_HEADER + row * rw + _R_PID] == pid:
                        in_flight -= q[i + row * rw]
                requests = sum(q[i + 1 : i + span : rw])
                out[slot] = (in_flight, requests, sum(q[i + 2 : i + span : rw]))
            if q[_H_GENERATION] == generation:
                break
        return out

    def own(self, slot: int) -> tuple[int, int, int]:
        """This process's own ``(in_flight, requests, failures)`` for ``slot`` (zeros before
        it has a row)."""
        if not 0 <= slot < self.columns:
            raise IndexError(f"slot {slot} is outside the table (0 .. {self.columns - 1})")
        if self._own < 0:
            return (0, 0, 0)
        q = self._q
        i = self._own + 3 * slot
        return (q[i], q[i + 1], q[i + 2])

    def in_flight_of_others(self, slot: int) -> int:
        """In-flight requests on ``slot`` of every live owner but this process."""
        if not 0 <= slot < self.columns:
            raise IndexError(f"slot {slot} is outside the table (0 .. {self.columns - 1})")
        return self.in_flight_of_others_each((slot,))[0]

    def in_flight_of_others_each(self, slots: Sequence[int | None]) -> list[int]:
        """:meth:`in_flight_of_others` of each of ``slots`` (0 for ``None``) in one call: a
        pool reads its eligible backends' at every pick, where a call per backend would cost
        as much as the reads. Slots outside the table raise :class:`IndexError`."""
        q = self._opened()
        rw = self._row_words
        span = (q[_H_HIGH] + 1) * rw
        dead = self._live_check()
        own = self._own
        columns = self.columns
        out = []
        for slot in slots:
            if slot is None:
                out.append(0)
                continue
            if not 0 <= slot < columns:
                raise IndexError(f"slot {slot} is outside the table (0 .. {columns - 1})")
            i = _HEADER + _ROW_HEADER + 3 * slot
            total = sum(q[i : i + span : rw])
            for row, pid in dead:
                if q[_HEADER + row * rw + _R_PID] == pid:
                    total -= q[i + row * rw]
            if own >= 0:
                total -= q[own + 3 * slot]
            out.append(total)
        return out

    def reap(self) -> int:
        """Fold the rows of dead owners into row 0 now; return how many were folded."""
        with self._lock:
            self._open_locked()
            with self._flock():
                return self._reap_locked()

    # -- life cycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap the file. Our row stays ours (a later :meth:`claim` in this process takes it
        again) and is folded into row 0 by another process once this one has exited."""
        with self._lock:
            self._drop()

    def __repr__(self) -> str:
        if self._mmap is None:
            state = "closed"
        else:
            owners = sum(
                1
                for row in range(1, self.rows + 1)
                if self._q[_HEADER + row * self._row_words + _R_PID]
            )
            mine = f"row {self._row}" if self._row else "no row"
            state = f"{owners}/{self.rows} rows owned, {mine}"
        return f"<SlotTable {self.path} [{self.columns} slots | {state}]>"

    # -- internals -------------------------------------------------------------------------

    def _opened(self) -> memoryview:
        if self._mmap is None:
            with self._lock:
                self._open_locked()
        return self._q

    def _claimed(self) -> int:
        with self._lock:
            self._claim_locked()
        return self._own

    @contextlib.contextmanager
    def _flock(self) -> Iterator[None]:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise StoreUnavailable(f"in-flight table {self.path}: {_oneline(exc)}") from exc
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _open_locked(self) -> None:
        if self._mmap is not None:
            return
        try:
            self._open_file()
        except OSError as exc:
            raise StoreUnavailable(f"in-flight table {self.path}: {_oneline(exc)}") from exc

    def _open_file(self) -> None:
        size = 8 * self._words
        expected = (MAGIC, LAYOUT_VERSION, self.rows, self.columns, self._row_words)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                stat = os.fstat(fd)
                try:
                    current = os.stat(self.path)
                except FileNotFoundError:
                    current = None
                if current is None or (current.st_dev, current.st_ino) != (
                    stat.st_dev,
                    stat.st_ino,
                ):
                    os.close(fd)  # replaced while we waited for the lock: open the new one
                    continue
                header = struct.unpack(_HEADER_FORMAT, os.pread(fd, 64, 0).ljust(64, b"\0"))
                if stat.st_size != size or header[:5] != expected:
                    if stat.st_size == 0:
                        self._initialize(fd, size)
                    else:  # another layout: replace the file, others keep their old mapping
                        tmp = f"{self.path}.{os.getpid()}.tmp"
                        tmp_fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                        try:
                            self._initialize(tmp_fd, size)
                        finally:
                            os.close(tmp_fd)
                        os.replace(tmp, self.path)
                        os.close(fd)
                        continue
                mapping = mmap.mmap(fd, size)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            self._fd, self._mmap = fd, mapping
            self._q = memoryview(mapping).cast("q")
            return

    def _initialize(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)
        header = (
            MAGIC,
            LAYOUT_VERSION,
            self.rows,
            self.columns,
            self._row_words,
            0,
            time.time_ns(),
            0,
        )
        os.pwrite(fd, struct.pack(_HEADER_FORMAT, *header), 0)

    def _drop(self) -> None:
        mapping, fd = self._mmap, self._fd
        self._q, self._mmap, self._fd = _NOTHING, None, -1
        self._row, self._own = 0, _NO_ROW
        self._dead, self._checked = (), float("-inf")
        if mapping is not None:
            # A reader in another thread may still hold a view: then the mapping goes when
            # that view does (releasing it under the reader would make it raise instead).
            with contextlib.suppress(BufferError):
                mapping.close()
        if fd >= 0:
            os.close(fd)

    def _claim_locked(self) -> None:
        if self._own >= 0:
            return
        self._open_locked()
        pid, start, pidns = _identity()
        q = self._q
        rw = self._row_words
        with self._flock():
            mine = 0
            for row in range(1, min(self.rows, q[_H_HIGH]) + 1):
                base = _HEADER + row * rw
                if (q[base + _R_PID], q[base + _R_START], q[base + _R_PIDNS]) == (
                    pid,
                    start,
                    pidns,
                ):
                    mine = row
                    break
            if not mine:
                self._reap_locked()
                for row in range(1, self.rows + 1):
                    if q[_HEADER + row * rw + _R_PID] == 0:
                        mine = row
                        break
                else:
                    raise SlotTableFull(
                        f"in-flight table {self.path} is full: all {self.rows} rows belong "
                        "to live processes (more workers than rows?)"
                    )
                base = _HEADER + mine * rw
                now = time.time_ns()
                q[base + _R_START] = start
                q[base + _R_PIDNS] = pidns
                q[base + _R_HEARTBEAT] = now
                q[base + _R_CLAIMED] = now
                q[_H_HIGH] = max(q[_H_HIGH], mine)
                q[base + _R_PID] = pid  # last: a non-zero pid makes the row taken
            else:
                q[_HEADER + mine * rw + _R_HEARTBEAT] = time.time_ns()
        self._row = mine
        self._own = _HEADER + mine * rw + _ROW_HEADER

    def _reap_locked(self) -> int:
        """Fold every dead owner's row into row 0 and free it (``_lock`` and flock held)."""
        dead = self._find_dead()
        if not dead:
            return 0
        q = self._q
        rw = self._row_words
        retired = _HEADER + _ROW_HEADER
        generation = q[_H_GENERATION]
        q[_H_GENERATION] = generation + 1
        try:
            for row, _pid in dead:
                base = _HEADER + row * rw
                cells = q[base + _ROW_HEADER : base + rw].tolist()
                for k in range(0, len(cells), 3):
                    if cells[k + 1] or cells[k + 2]:
                        q[retired + k + 1] += cells[k + 1]
                        q[retired + k + 2] += cells[k + 2]
                q[base : base + rw] = _zeros(rw)
        finally:
            q[_H_GENERATION] = generation + 2
        self._checked = float("-inf")
        return len(dead)

    def _live_check(self) -> tuple[tuple[int, int], ...]:
        """The rows whose owner was dead at the last check, refreshed every liveness_ttl."""
        now = time.monotonic()
        if now - self._checked >= self.liveness_ttl:
            self._dead = self._find_dead()
            self._checked = now
        return self._dead

    def _find_dead(self) -> tuple[tuple[int, int], ...]:
        q = self._q
        rw = self._row_words
        _pid, _start, my_ns = _identity()
        now = time.time_ns()
        dead = []
        for row in range(1, min(self.rows, q[_H_HIGH]) + 1):
            base = _HEADER + row * rw
            pid = q[base + _R_PID]
            start, pidns, heartbeat = q[base + _R_START], q[base + _R_PIDNS], q[base + _R_HEARTBEAT]
            if pid and not _alive(pid, start, pidns, heartbeat, my_ns=my_ns, now=now):
                dead.append((row, pid))
        return tuple(dead)


def _zeros(words: int) -> memoryview:
    return memoryview(bytes(8 * words)).cast("q")


def _oneline(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# -- processes -------------------------------------------------------------------------------

_PROC_UNAVAILABLE: Final = (-1, "")


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """``(start time, state)`` of ``pid`` from /proc, None if there is no such process, or
    ``_PROC_UNAVAILABLE`` when /proc cannot tell."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return None if os.path.isdir("/proc/self") else _PROC_UNAVAILABLE
    except OSError:
        return _PROC_UNAVAILABLE
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the
    # last ")". Field 3 (state) is then index 0 and field 22 (starttime) index 19.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19]), fields[0].decode("ascii", "replace")
    except (IndexError, ValueError):
        return _PROC_UNAVAILABLE


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


_identity_cache: tuple[int, int, int] = (0, 0, 0)


def _identity() -> tuple[int, int, int]:
    """This process's ``(pid, start time, pid namespace)`` as written in its row."""
    global _identity_cache
    pid = os.getpid()
    if _identity_cache[0] != pid:
        stat = _proc_stat(pid)
        start = stat[0] if stat is not None and stat[0] >= 0 else 0
        _identity_cache = (pid, start, _pid_namespace())
    return _identity_cache


def _alive(pid: int, start: int, pidns: int, heartbeat: int, *, my_ns: int, now: int) -> bool:
    """Whether a row's owner is alive; see "Owners and liveness" in the module docstring."""
    if pid < 0:
        return False  # not a pid we wrote: never hand it to os.kill()
    if pidns == my_ns:
        stat = _proc_stat(pid)
        if stat is None:
            return False
        if stat is _PROC_UNAVAILABLE:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass  # alive, someone else's
            except OSError:
                pass
        else:
            started, state = stat
            if state in ("Z", "X") or (start and started != start):
                return False
            if start:
                return True
    return now - heartbeat < DEAD_AFTER * 1e9


_TABLES: weakref.WeakSet[SlotTable] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child owns none of its parent's rows and must not share its parent's open
    file (a ``flock`` belongs to the open file, which the child would share)."""
    global _identity_cache
    _identity_cache = (0, 0, 0)
    for table in list(_TABLES):
        table._lock = threading.Lock()
        fd = table._fd
        table._q, table._mmap, table._fd = _NOTHING, None, -1  # the mapping is simply dropped
        table._row, table._own = 0, _NO_ROW
        table._dead, table._checked = (), float("-inf")
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


after_fork_in_child(_after_fork_in_child)
