"""The host's in-flight table: layout, rows and their owners, sums, dead owners, fork."""

from __future__ import annotations

import multiprocessing
import os
import signal
import struct
import threading
import time
import warnings
from collections.abc import Iterator
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from softlb.state import MAX_SLOTS, StoreUnavailable
from softlb.state import slots as slots_module
from softlb.state.slots import (
    DEAD_AFTER,
    LAYOUT_VERSION,
    MAGIC,
    MAX_COLUMNS,
    SlotTable,
    SlotTableFull,
)

ctx = multiprocessing.get_context("spawn")


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "inflight.slots")


@pytest.fixture
def table(path: str) -> Iterator[SlotTable]:
    """A table that sees a dead owner at once (no liveness cache)."""
    table = SlotTable(path, rows=8, columns=16, liveness_ttl=0)
    yield table
    table.close()


def header(path: str) -> tuple[int, ...]:
    with open(path, "rb") as f:
        return struct.unpack("=8q", f.read(64))


def _hold_row(
    path: str, rows: int, columns: int, cells: dict[int, tuple[int, int, int]], ready: Event
) -> None:
    """In a spawned process: claim a row, write ``cells``, say so, then wait to be ended."""
    table = SlotTable(path, rows=rows, columns=columns)
    table.claim()
    for slot, (in_flight, requests, failures) in cells.items():
        table.set(slot, in_flight, requests, failures)
    ready.set()
    time.sleep(60)


class Holder:
    """A spawned process that owns a row of the table with the given counts."""

    def __init__(
        self, path: str, cells: dict[int, tuple[int, int, int]], rows: int = 8, columns: int = 16
    ) -> None:
        self._ready = ctx.Event()
        self.process = ctx.Process(target=_hold_row, args=(path, rows, columns, cells, self._ready))
        self.process.start()

    def wait(self) -> Holder:
        assert self._ready.wait(30), "the child did not claim its row"
        return self

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def kill(self, *, reap: bool = True) -> None:
        os.kill(self.pid, signal.SIGKILL)
        if reap:
            self.process.join(10)
        else:  # wait until it has exited, but leave it a zombie
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)

    def end(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.process.close()


class Holders(list[Holder]):
    def start(self, path: str, *cells: dict[int, tuple[int, int, int]], rows: int = 8) -> None:
        """Start a holder per ``cells``, all at once, and wait until each holds its row."""
        started = [Holder(path, c, rows=rows) for c in cells]
        self.extend(started)
        for holder in started:
            holder.wait()


@pytest.fixture
def holders() -> Iterator[Holders]:
    """Child processes started by a test, ended at teardown."""
    started = Holders()
    yield started
    for holder in started:
        holder.end()


# -- the file -----------------------------------------------------------------------------


def test_nothing_is_opened_before_first_use(tmp_path: Path) -> None:
    """Building a table creates no file; the first claim creates the directory and file."""
    table = SlotTable(str(tmp_path / "run" / "t.slots"))
    assert not (tmp_path / "run").exists()
    assert repr(table) == f"<SlotTable {tmp_path}/run/t.slots [1024 slots | closed]>"
    try:
        assert table.claim() == 1
        assert (
            repr(table)
            == f"<SlotTable {tmp_path}/run/t.slots [1024 slots | 1/64 rows owned, row 1]>"
        )
    finally:
        table.close()


def test_header_and_size_describe_the_layout(table: SlotTable, path: str) -> None:
    """The header holds magic, layout version, rows, columns and the row length."""
    table.claim()
    row_words = 8 + 3 * 16
    assert header(path)[:5] == (MAGIC, LAYOUT_VERSION, 8, 16, row_words)
    assert os.path.getsize(path) == 8 * (8 + 9 * row_words)


def test_default_table_is_1_6_megabytes(path: str) -> None:
    """64 rows by MAX_SLOTS columns, as base.MAX_SLOTS promises."""
    table = SlotTable(path)
    try:
        table.claim()
        assert header(path)[2:4] == (64, MAX_SLOTS)
        assert 1.5e6 < os.path.getsize(path) < 1.7e6
    finally:
        table.close()


def test_a_file_of_another_layout_is_replaced(path: str) -> None:
    """A table opened with other dimensions replaces the file; the old mapping still works."""
    old = SlotTable(path, rows=4, columns=8)
    new = SlotTable(path, rows=8, columns=16)
    try:
        old.set(1, 1, 1, 0)
        new.set(1, 2, 2, 0)
        assert header(path)[2:4] == (8, 16)
        assert new.totals([1]) == {1: (2, 2, 0)}
        assert old.totals([1]) == {1: (1, 1, 0)}
    finally:
        old.close()
        new.close()


@pytest.mark.parametrize(
    "content",
    [b"\xff" * 64, b"", struct.pack("=8q", MAGIC, LAYOUT_VERSION + 1, 8, 16, 56, 0, 0, 0)],
)
def test_a_file_with_a_bad_header_is_recreated(path: str, content: bytes) -> None:
    """Garbage, an empty file or another layout version is started afresh."""
    Path(path).write_bytes(content)
    table = SlotTable(path, rows=8, columns=16)
    try:
        table.set(0, 1, 2, 3)
        assert header(path)[:2] == (MAGIC, LAYOUT_VERSION)
        assert table.totals([0]) == {0: (1, 2, 3)}
    finally:
        table.close()


def test_an_unusable_path_is_store_unavailable(tmp_path: Path) -> None:
    """A path under a regular file raises StoreUnavailable naming the file."""
    (tmp_path / "file").write_text("x")
    table = SlotTable(str(tmp_path / "file" / "t.slots"))
    with pytest.raises(StoreUnavailable, match=r"t\.slots"):
        table.claim()


@pytest.mark.parametrize("kwargs", [{"rows": 0}, {"columns": 0}, {"columns": MAX_COLUMNS + 1}])
def test_bad_dimensions_are_refused(path: str, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        SlotTable(path, **kwargs)


@pytest.mark.parametrize("slot", [-1, 16])
def test_slots_outside_the_table_are_refused(table: SlotTable, slot: int) -> None:
    """A slot past the row would write into another owner's row: IndexError instead."""
    with pytest.raises(IndexError):
        table.set(slot, 1, 1, 1)
    with pytest.raises(IndexError):
        table.totals([slot])
    with pytest.raises(IndexError):
        table.in_flight_of_others(slot)
    with pytest.raises(IndexError):
        table.clear_slot(slot)


# -- one process ---------------------------------------------------------------------------


def test_claim_is_idempotent_and_set_claims_on_first_use(table: SlotTable) -> None:
    """A process has one row; set() takes it if claim() was not called."""
    assert table.row is None
    table.set(3, 1, 1, 0)
    assert table.row == 1
    assert table.claim() == 1
    assert table.claim() == 1


def test_a_process_gets_its_own_row_back(table: SlotTable, path: str) -> None:
    """After close(), or from another table object, the process finds its row and counts."""
    table.set(2, 1, 10, 1)
    table.close()
    assert table.claim() == 1
    again = SlotTable(path, rows=8, columns=16)
    try:
        assert again.claim() == 1
        assert again.totals([2]) == {2: (1, 10, 1)}
    finally:
        again.close()


def test_totals_and_in_flight_of_others_in_one_process(table: SlotTable) -> None:
    """Own counts are in the totals but not in in_flight_of_others."""
    table.set(0, 3, 100, 2)
    table.set(5, 1, 7, 0)
    assert table.totals([0, 5, 6]) == {0: (3, 100, 2), 5: (1, 7, 0), 6: (0, 0, 0)}
    assert table.in_flight_of_others(0) == 0
    assert table.totals()[0] == (3, 100, 2)
    assert len(table.totals()) == 16


def test_clear_slot_zeroes_the_slot(table: SlotTable) -> None:
    """A removed backend's counts are gone from the totals."""
    table.set(4, 2, 9, 1)
    table.set(5, 1, 1, 1)
    table.clear_slot(4)
    assert table.totals([4, 5]) == {4: (0, 0, 0), 5: (1, 1, 1)}


def test_threads_of_one_process_share_its_row(table: SlotTable) -> None:
    """16 threads writing (one at a time, as the pool does under its lock) land in one row."""
    lock = threading.Lock()

    def writer(slot: int) -> None:
        for n in range(1, 201):
            with lock:
                table.set(slot, n % 3, n, n // 10)

    threads = [threading.Thread(target=writer, args=(slot,)) for slot in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert table.row == 1
    assert table.totals() == dict.fromkeys(range(16), (200 % 3, 200, 20))


def test_heartbeat_is_written(table: SlotTable) -> None:
    """heartbeat() claims a row if needed and stamps it with the time."""
    before = time.time_ns()
    table.heartbeat()
    assert table.row == 1
    stamp = table._q[8 + 1 * (8 + 3 * 16) + 2]
    assert before <= stamp <= time.time_ns()


# -- several processes --------------------------------------------------------------------


def test_each_process_writes_its_own_row_and_totals_are_exact(
    table: SlotTable, path: str, holders: Holders
) -> None:
    """Four processes' counts add up; this process's own are left out of the others'."""
    holders.start(path, *({3: (n, 10 * n, n), 7: (1, 1, 0)} for n in range(1, 5)))
    assert table.totals([3, 7]) == {3: (10, 100, 10), 7: (4, 4, 0)}
    assert table.in_flight_of_others(3) == 10
    table.set(3, 5, 5, 0)
    assert table.row == 5
    assert table.totals([3]) == {3: (15, 105, 10)}
    assert table.in_flight_of_others(3) == 10
    # Several slots in one read (a pool's pick): the same figures, 0 for a backend with none.
    assert table.in_flight_of_others_each([3, None, 7, 0]) == [10, 0, 4, 0]
    with pytest.raises(IndexError):
        table.in_flight_of_others_each([3, table.columns])


def test_a_killed_owner_leaks_no_in_flight_and_keeps_its_requests(
    table: SlotTable, path: str, holders: Holders
) -> None:
    """SIGKILL a worker: its in-flight count leaves the totals, its requests stay for good."""
    holders.start(path, {3: (5, 7, 2)}, {3: (1, 1, 0)})
    assert table.totals([3]) == {3: (6, 8, 2)}
    holders[0].kill()
    assert table.totals([3]) == {3: (1, 8, 2)}  # dead, not yet folded
    assert table.in_flight_of_others(3) == 1
    assert table.claim() in {1, 2}  # folds the dead row into row 0, then takes it
    assert table.totals([3]) == {3: (1, 8, 2)}
    table.set(3, 0, 4, 0)
    assert table.totals([3]) == {3: (1, 12, 2)}


def test_a_zombie_owner_is_dead(table: SlotTable, path: str, holders: Holders) -> None:
    """An owner that exited but was not reaped yet counts as dead."""
    holders.start(path, {0: (3, 3, 0)})
    holders[0].kill(reap=False)
    assert table.totals([0]) == {0: (0, 3, 0)}
    assert table.reap() == 1
    assert table.totals([0]) == {0: (0, 3, 0)}


def test_the_liveness_cache_delays_noticing_a_death(path: str, holders: Holders) -> None:
    """Readers trust what they learnt about owners for liveness_ttl seconds."""
    table = SlotTable(path, rows=8, columns=16, liveness_ttl=60)
    try:
        holders.start(path, {1: (2, 2, 0)})
        assert table.in_flight_of_others(1) == 2
        holders[0].kill()
        assert table.in_flight_of_others(1) == 2  # still believed alive
        assert table.reap() == 1  # a claim or reap looks afresh
        assert table.in_flight_of_others(1) == 0
    finally:
        table.close()


def test_clear_slot_also_clears_retired_and_dead_rows(
    table: SlotTable, path: str, holders: Holders
) -> None:
    """A slot's counts left by dead workers go too, so the slot's next backend starts at 0."""
    holders.start(path, {2: (1, 5, 1)}, {2: (1, 6, 0)})
    holders[0].kill()
    table.claim()  # folds the first into row 0
    holders[1].kill()
    table.set(2, 0, 1, 0)
    assert table.totals([2]) == {2: (0, 12, 1)}
    table.clear_slot(2)
    assert table.totals([2]) == {2: (0, 0, 0)}


def test_a_full_table_is_refused_clearly(path: str, holders: Holders) -> None:
    """When every row belongs to a live process, claim() says so."""
    holders.start(path, {}, rows=1)
    table = SlotTable(path, rows=1, columns=16)
    try:
        with pytest.raises(SlotTableFull, match="all 1 rows belong to live processes"):
            table.claim()
        assert table.totals([0]) == {0: (0, 0, 0)}  # reading needs no row
        holders[0].kill()
        assert table.claim() == 1
    finally:
        table.close()


def test_forked_child_takes_a_row_of_its_own(table: SlotTable) -> None:
    """After fork() the child writes to a new row, never to its parent's."""
    table.set(1, 1, 1, 0)
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():  # Python 3.12+ warns when a threaded process forks
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            os.close(read_end)
            assert table.row is None
            table.set(1, 2, 2, 0)
            os.write(write_end, str(table.row).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        child_row = os.read(read_end, 16)
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_row == b"2"
    assert table.row == 1
    assert table.totals([1]) == {1: (1, 3, 0)}  # the child is dead: its requests stay


# -- liveness rules -----------------------------------------------------------------------


def test_owner_liveness_rules() -> None:
    """pid + start time decide in our pid namespace; the heartbeat decides elsewhere."""
    pid, start, ns = slots_module._identity()
    now = time.time_ns()
    stale = now - int(2 * DEAD_AFTER * 1e9)
    alive = slots_module._alive
    assert alive(pid, start, ns, stale, my_ns=ns, now=now)  # checked by pid: heartbeat unused
    if start:  # /proc available
        assert not alive(pid, start + 1, ns, now, my_ns=ns, now=now)  # pid reused
    assert not alive(-5, 0, ns, now, my_ns=ns, now=now)  # never os.kill() a group
    assert alive(pid, start, ns + 1, now, my_ns=ns, now=now)  # other namespace: heartbeat
    assert not alive(pid, start, ns + 1, stale, my_ns=ns, now=now)


# -- files of runs that did not end cleanly -------------------------------------------------------


def test_remove_stale_runs(tmp_path: Path) -> None:
    """Files of `softlb serve --workers N` runs whose process is gone are deleted; live runs'
    files, fresh files and other files are kept (issue #14, item 8)."""
    import subprocess
    import sys

    from softlb.state.sync import remove_stale_runs

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = int(gone.stdout)
    old = time.time() - 3600
    stale = [
        f"softlb-{dead}.db",
        f"softlb-{dead}.db-wal",
        f"softlb-{dead}.db-shm",
        f"softlb-{dead}.db.softlb.slots",
    ]
    live = f"softlb-{os.getpid()}.db.softlb.slots"
    reused = f"my-cluster-{os.getpid()}.db"  # our pid, but written before this process started
    fresh = f"softlb-{dead}-fresh-{dead}.db"  # a dead pid, written a moment ago
    other = "softlb-node1-0123456789.slots"  # a Redis store's table: not a run's file
    for name in [*stale, live, reused, fresh, other]:
        (tmp_path / name).write_bytes(b"x")
    for name in [*stale, reused, other]:
        os.utime(tmp_path / name, (old, old))
    started = Path(f"/proc/{os.getpid()}/stat").exists()
    removed = remove_stale_runs(str(tmp_path))
    expected = {*stale, reused} if started else set(stale)
    assert {Path(p).name for p in removed} == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {*stale, live, reused, fresh, other} - expected
    )
    # Without the margin the fresh file of a dead run goes too; the live run's file stays.
    assert [Path(p).name for p in remove_stale_runs(str(tmp_path), min_age=0)] == [fresh]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {live, other} | ({reused} - expected)
    )
    assert remove_stale_runs(str(tmp_path / "missing")) == []
