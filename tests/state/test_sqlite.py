"""What only the SQLite store has: its URLs, clusters sharing a file, errors, fork, the clock."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import time
import warnings
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from softlb.state import HealthVerdict, StoreUnavailable, open_store
from softlb.state.sqlite import SqliteStore

SEED = [("http://a:1", 1), ("http://b:2", 2)]


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "state.db")


def test_relative_url_is_relative_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sqlite:///sub/state.db names a file under the current directory, fixed at once."""
    monkeypatch.chdir(tmp_path)
    store = SqliteStore.from_url("sqlite:///sub/state.db", cluster="c")
    monkeypatch.chdir("/")
    try:
        store.seed(SEED)
        assert store.path == str(tmp_path / "sub" / "state.db")
        assert (tmp_path / "sub" / "state.db").is_file()
    finally:
        store.close()


def test_absolute_url_has_four_slashes(tmp_path: Path) -> None:
    """sqlite:////abs/path names an absolute path, and url gives it back."""
    url = f"sqlite:///{tmp_path}/state.db"
    assert url.startswith("sqlite:////")
    store = SqliteStore.from_url(url)
    assert store.path == str(tmp_path / "state.db")
    assert store.url == url
    assert store.cluster == "softlb"


def test_open_store_builds_a_sqlite_store(tmp_path: Path) -> None:
    """The config's state URL opens a SqliteStore with the cluster given."""
    store = open_store(f"sqlite:///{tmp_path}/s.db", cluster="blue")
    assert isinstance(store, SqliteStore)
    assert store.cluster == "blue"


@pytest.mark.parametrize(
    "url", ["sqlite://", "sqlite:///", "sqlite:relative.db", "postgres:///x.db"]
)
def test_bad_urls_are_refused(url: str) -> None:
    """Anything but sqlite:///PATH is a ValueError that shows the accepted forms."""
    with pytest.raises(ValueError, match="sqlite:///relative/path"):
        SqliteStore.from_url(url)


def test_in_memory_database_is_refused() -> None:
    """A database that only one connection sees cannot be shared."""
    with pytest.raises(ValueError, match="file path"):
        SqliteStore(":memory:")


def test_nothing_is_opened_before_first_use(tmp_path: Path) -> None:
    """Building a store creates no file and no directory."""
    store = SqliteStore(str(tmp_path / "later" / "state.db"))
    assert not (tmp_path / "later").exists()
    assert (
        repr(store)
        == f"<SqliteStore sqlite:///{tmp_path}/later/state.db cluster='softlb' [closed]>"
    )
    assert store.version() is None
    assert "[connected]" in repr(store)
    store.close()
    assert "[closed]" in repr(store)


def test_database_runs_in_wal_mode(db: str) -> None:
    """The file is in WAL mode, so readers never wait for a writer."""
    store = SqliteStore(db)
    store.seed(SEED)
    store.close()
    raw = sqlite3.connect(db)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()


def test_two_clusters_in_one_file_stay_apart(db: str) -> None:
    """Membership, verdicts, the lease and clear() of one cluster leave the other alone."""
    blue, green = SqliteStore(db, cluster="blue"), SqliteStore(db, cluster="green")
    try:
        blue.seed(SEED)
        assert green.membership() is None
        green.seed([("http://g:1", 1)])
        green.add("http://g:2", 1)
        assert blue.version() == 1
        assert green.version() == 2
        blue.set_health("http://a:1", HealthVerdict(False, "down"), 60)
        assert dict(green.health()) == {}
        assert blue.claim_prober("me", 60)
        assert green.claim_prober("someone else", 60)
        blue.clear()
        assert blue.membership() is None
        membership = green.membership()
        assert membership is not None
        assert membership.urls() == ["http://g:1", "http://g:2"]
    finally:
        blue.close()
        green.close()


def test_expiry_follows_the_injected_clock(db: str) -> None:
    """Verdicts and the lease expire by the store's clock (wall-clock seconds)."""
    now = [1_000_000.0]
    store = SqliteStore(db, clock=lambda: now[0])
    try:
        store.set_health("http://a:1", HealthVerdict(False, "down"), 10)
        assert store.claim_prober("a", 10)
        now[0] += 9.9
        assert "http://a:1" in store.health()
        assert not store.claim_prober("b", 10)
        now[0] += 0.2
        assert dict(store.health()) == {}
        assert store.claim_prober("b", 10)
    finally:
        store.close()


def test_path_under_a_regular_file_is_store_unavailable(tmp_path: Path) -> None:
    """A directory that cannot be created makes every call a one-line StoreUnavailable."""
    (tmp_path / "file").write_text("not a directory")
    store = SqliteStore(str(tmp_path / "file" / "state.db"))
    with pytest.raises(StoreUnavailable) as caught:
        store.version()
    message = str(caught.value)
    assert str(tmp_path / "file" / "state.db") in message
    assert "\n" not in message
    assert caught.value.status == 503
    with pytest.raises(StoreUnavailable):
        store.add("http://a:1", 1)


def test_corrupt_file_is_store_unavailable(db: str) -> None:
    """A file that is not a database is StoreUnavailable, not a crash."""
    Path(db).write_bytes(b"this is not a database\n" * 200)
    store = SqliteStore(db)
    with pytest.raises(StoreUnavailable, match="not a database"):
        store.membership()
    with pytest.raises(StoreUnavailable):
        store.seed(SEED)
    assert "[closed]" in repr(store)


def test_a_write_locked_past_the_busy_timeout_is_store_unavailable(db: str) -> None:
    """A writer that holds the lock too long makes writes fail; reads go on; it recovers."""
    store = SqliteStore(db, timeout=0.1)
    store.seed(SEED)
    raw = sqlite3.connect(db, isolation_level=None)
    try:
        raw.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            store.add("http://c:3", 1)
        assert time.monotonic() - started < 2.0
        assert store.version() == 1  # WAL: a reader does not wait for the writer
        raw.execute("COMMIT")
        assert store.add("http://c:3", 1).version == 2
    finally:
        raw.close()
        store.close()


def test_a_deleted_file_is_noticed_and_comes_back_empty(db: str) -> None:
    """When the file goes away the store reopens a new, empty one (and can be re-seeded)."""
    store = SqliteStore(db)
    try:
        store.seed(SEED)
        for suffix in ("", "-wal", "-shm"):
            Path(db + suffix).unlink(missing_ok=True)
        assert store.membership() is None
        assert store.seed(SEED).version == 1
        assert Path(db).is_file()
    finally:
        store.close()


def test_close_then_use_reopens(db: str) -> None:
    """close() is not final: the next call opens a new connection."""
    store = SqliteStore(db)
    store.seed(SEED)
    store.close()
    store.close()  # twice is fine
    assert store.version() == 1
    store.close()


def test_forked_child_opens_its_own_connection(db: str) -> None:
    """After fork() the child never uses its parent's connection, and both keep working."""
    store = SqliteStore(db)
    try:
        store.seed(SEED)
        parents = store._conn
        assert parents is not None
        read_end, write_end = os.pipe()
        with warnings.catch_warnings():  # Python 3.12+ warns when a threaded process forks
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return into pytest
            code = 1
            try:
                os.close(read_end)
                assert store._conn is None
                store.add("http://child:1", 1)
                assert store._conn is not None and store._conn is not parents
                store.close()
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert store._conn is parents
        membership = store.membership()
        assert membership is not None
        assert membership.urls()[-1] == "http://child:1"
        assert membership.version == 2
    finally:
        store.close()


def _start_worker(path: str, n: int, together: Barrier) -> None:
    """In a spawned process: as a worker does at start, seed then add, all at once."""
    store = SqliteStore(path, cluster="c")
    try:
        together.wait(30)
        store.seed([("http://seed:1", 1)])
        store.add(f"http://w{n}:80", 1)
    finally:
        store.close()


def test_workers_starting_together_on_a_new_file(tmp_path: Path) -> None:
    """Four processes creating the file, switching it to WAL and seeding at once all succeed."""
    path = str(tmp_path / "fresh" / "state.db")
    ctx = multiprocessing.get_context("spawn")
    together = ctx.Barrier(4)
    children = [ctx.Process(target=_start_worker, args=(path, n, together)) for n in range(4)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0] * 4
    store = SqliteStore(path, cluster="c")
    try:
        membership = store.membership()
        assert membership is not None
        assert membership.version == 5
        assert membership.urls()[0] == "http://seed:1"
        assert sorted(membership.urls()[1:]) == [f"http://w{n}:80" for n in range(4)]
    finally:
        store.close()


def test_a_file_written_before_draining_existed_gets_the_column(db: str) -> None:
    """A file whose member table has no draining column (written by an earlier softlb) is
    upgraded when opened: its membership reads back with draining false, and can drain."""
    with sqlite3.connect(db) as old:
        old.executescript(
            """
            CREATE TABLE softlb_cluster (cluster TEXT PRIMARY KEY, version INTEGER NOT NULL,
                last_slot INTEGER NOT NULL, next_position INTEGER NOT NULL);
            CREATE TABLE softlb_member (cluster TEXT NOT NULL, url TEXT NOT NULL,
                weight INTEGER NOT NULL, slot INTEGER NOT NULL, position INTEGER NOT NULL,
                PRIMARY KEY (cluster, url));
            CREATE TABLE softlb_health (cluster TEXT NOT NULL, url TEXT NOT NULL,
                healthy INTEGER NOT NULL, reason TEXT NOT NULL, expires REAL NOT NULL,
                PRIMARY KEY (cluster, url));
            CREATE TABLE softlb_prober (cluster TEXT PRIMARY KEY, owner TEXT NOT NULL,
                expires REAL NOT NULL);
            INSERT INTO softlb_cluster VALUES ('softlb', 4, 0, 1);
            INSERT INTO softlb_member VALUES ('softlb', 'http://a:1', 2, 0, 0);
            """
        )
    old.close()
    store = SqliteStore(db)
    try:
        membership = store.membership()
        assert membership is not None
        assert [(m.url, m.weight, m.draining) for m in membership.members] == [
            ("http://a:1", 2, False)
        ]
        drained = store.update("http://a:1", draining=True)
        assert (drained.version, drained.members[0].draining) == (5, True)
    finally:
        store.close()
