"""The store the workers of one host share: an SQLite file, embedded, no server to run.

Tables, keyed by cluster so that several clusters can share a file::

    softlb_cluster  (cluster PK, version, last_slot, next_position)   the membership's version
    softlb_member   (cluster, url) PK, weight, slot, position,         its members, in order
                    draining
    softlb_health   (cluster, url) PK, healthy, reason, expires        verdicts, until expires
    softlb_prober   (cluster PK, owner, expires)                       the prober lease

A cluster has a membership when it has a ``softlb_cluster`` row. Every read-modify-write runs
in one ``BEGIN IMMEDIATE`` transaction (the version is bumped in the same one); a read is one
statement, so it sees one committed state. The database runs in WAL mode (readers never wait
for the writer) with ``synchronous=NORMAL`` (a commit costs no fsync; a power cut may lose the
last commits, never corrupt the file) and a busy timeout (a writer waits for another one).

Expiry times are wall-clock seconds (``time.time()`` by default): several processes compare
them, and a monotonic clock is only comparable within one process (or one boot).

In-flight counts do not come here at all: see :mod:`softlb.state.slots`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final

from softlb.errors import BackendExists, UnknownBackend
from softlb.forking import after_fork_in_child
from softlb.state.base import (
    HealthVerdict,
    Member,
    Membership,
    SeedEntry,
    StateStore,
    StoreUnavailable,
    next_free_slot,
    seed_entries,
)

__all__ = ["BUSY_TIMEOUT", "SqliteStore"]

#: Seconds a write waits for another process's write before the store counts as unavailable.
#: Writes are rare and short (admin changes, verdicts, the lease), so a wait this long means
#: something is wrong; callers run in background threads and can afford it.
BUSY_TIMEOUT: Final = 5.0

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS softlb_cluster (
        cluster TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        last_slot INTEGER NOT NULL,
        next_position INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS softlb_member (
        cluster TEXT NOT NULL,
        url TEXT NOT NULL,
        weight INTEGER NOT NULL,
        slot INTEGER NOT NULL,
        position INTEGER NOT NULL,
        draining INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (cluster, url)
    )""",
    """CREATE TABLE IF NOT EXISTS softlb_health (
        cluster TEXT NOT NULL,
        url TEXT NOT NULL,
        healthy INTEGER NOT NULL,
        reason TEXT NOT NULL,
        expires REAL NOT NULL,
        PRIMARY KEY (cluster, url)
    )""",
    """CREATE TABLE IF NOT EXISTS softlb_prober (
        cluster TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        expires REAL NOT NULL
    )""",
)
_TABLES: Final = ("softlb_cluster", "softlb_member", "softlb_health", "softlb_prober")

#: Columns added to a table after its first release, with their definitions: a file written
#: by an older softlb gets them when first opened (ALTER TABLE ... ADD COLUMN).
_ADDED_COLUMNS: Final = (("softlb_member", "draining", "INTEGER NOT NULL DEFAULT 0"),)

_MEMBERSHIP: Final = """
    SELECT c.version, m.url, m.weight, m.slot, m.draining
    FROM softlb_cluster AS c LEFT JOIN softlb_member AS m ON m.cluster = c.cluster
    WHERE c.cluster = ?
    ORDER BY m.position
"""

#: Connections a forked child inherited: never used, and never closed by the child either
#: (closing a connection its parent still uses would touch the parent's locks).
_INHERITED: list[sqlite3.Connection] = []


class SqliteStore(StateStore):
    """Membership, health verdicts and the prober lease in an SQLite file.

    ``path`` is made absolute at once (a later ``chdir`` does not move the store). Nothing is
    opened until first use; the directory is created then if missing. ``clock`` gives the
    wall-clock seconds that expiry times are written in; ``timeout`` is the busy timeout.

    One connection per process, used by one thread at a time: ``_lock`` guards ``_conn``,
    ``_pid`` and ``_file`` and is held for a whole call. The store is called from a few
    background threads (never per request), so they can take turns; one connection keeps
    ``close()`` simple and one file descriptor per process. The connection remembers the pid
    that opened it: a forked child opens its own.

    Every :mod:`sqlite3` error (locked past the busy timeout, disk I/O, a corrupt file, a
    directory that cannot be created...) is raised as :class:`StoreUnavailable` with a
    one-line message, and the connection is dropped so that the next call starts afresh.
    """

    kind = "sqlite"

    def __init__(
        self,
        path: str,
        *,
        cluster: str = "softlb",
        clock: Callable[[], float] = time.time,
        timeout: float = BUSY_TIMEOUT,
    ) -> None:
        if not path or path == ":memory:":
            raise ValueError("a shared SQLite store needs a file path, not an in-memory database")
        self.path = os.path.abspath(path)
        self.cluster = cluster
        self.clock = clock
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        #: The process that opened ``_conn``.
        self._pid = 0
        #: ``(st_dev, st_ino)`` of the file ``_conn`` opened: a file deleted or replaced
        #: under us is noticed and the store reopened (it comes back empty).
        self._file: tuple[int, int] | None = None
        _STORES.add(self)

    @classmethod
    def from_url(cls, url: str, *, cluster: str = "softlb") -> SqliteStore:
        """``sqlite:///relative/path`` (from the current directory) or
        ``sqlite:////absolute/path``: SQLAlchemy's convention."""
        prefix = "sqlite:///"
        if not url.startswith(prefix) or len(url) == len(prefix):
            raise ValueError(
                f"not an SQLite store URL: {url!r}; use sqlite:///relative/path "
                "or sqlite:////absolute/path"
            )
        return cls(url[len(prefix) :], cluster=cluster)

    @property
    def url(self) -> str:
        """The URL that names this store (always the absolute form)."""
        return f"sqlite:///{self.path}"

    # -- membership ----------------------------------------------------------------------

    def membership(self) -> Membership | None:
        with self._connection() as db:
            return _read_membership(db, self.cluster)

    def version(self) -> int | None:
        with self._connection() as db:
            row = db.execute(
                "SELECT version FROM softlb_cluster WHERE cluster = ?", (self.cluster,)
            ).fetchone()
        return None if row is None else int(row[0])

    def seed(self, members: Iterable[SeedEntry], *, after: int = 0) -> Membership:
        with self._transaction() as db:
            existing = _read_membership(db, self.cluster)
            if existing is not None:
                return existing
            # Members left without a cluster row are not a membership: start afresh.
            db.execute("DELETE FROM softlb_member WHERE cluster = ?", (self.cluster,))
            seeded: list[Member] = []
            last = -1
            for url, weight, draining in seed_entries(members):
                last = next_free_slot((m.slot for m in seeded), last)
                seeded.append(Member(url, weight, last, draining))
            db.executemany(
                "INSERT INTO softlb_member (cluster, url, weight, slot, position, draining) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (self.cluster, m.url, m.weight, m.slot, i, int(m.draining))
                    for i, m in enumerate(seeded)
                ],
            )
            db.execute(
                "INSERT INTO softlb_cluster (cluster, version, last_slot, next_position) "
                "VALUES (?, ?, ?, ?)",
                (self.cluster, after + 1, last, len(seeded)),
            )
            return Membership(after + 1, tuple(seeded))

    def add(self, url: str, weight: int) -> Membership:
        with self._transaction() as db:
            row = db.execute(
                "SELECT last_slot, next_position FROM softlb_cluster WHERE cluster = ?",
                (self.cluster,),
            ).fetchone()
            last, position = (-1, 0) if row is None else (int(row[0]), int(row[1]))
            members = db.execute(
                "SELECT url, slot FROM softlb_member WHERE cluster = ?", (self.cluster,)
            ).fetchall()
            if any(u == url for u, _slot in members):
                raise BackendExists(f"backend {url} is already in the pool")
            slot = next_free_slot((s for _url, s in members), last)
            db.execute(
                "INSERT INTO softlb_member (cluster, url, weight, slot, position) "
                "VALUES (?, ?, ?, ?, ?)",
                (self.cluster, url, weight, slot, position),
            )
            if row is None:
                db.execute(
                    "INSERT INTO softlb_cluster (cluster, version, last_slot, next_position) "
                    "VALUES (?, 1, ?, ?)",
                    (self.cluster, slot, position + 1),
                )
            else:
                db.execute(
                    "UPDATE softlb_cluster SET version = version + 1, last_slot = ?, "
                    "next_position = ? WHERE cluster = ?",
                    (slot, position + 1, self.cluster),
                )
            membership = _read_membership(db, self.cluster)
            assert membership is not None
            return membership

    def remove(self, url: str) -> Membership:
        with self._transaction() as db:
            gone = db.execute(
                "DELETE FROM softlb_member WHERE cluster = ? AND url = ?", (self.cluster, url)
            ).rowcount
            if not gone:
                raise UnknownBackend(f"no backend {url} in the pool")
            db.execute(
                "DELETE FROM softlb_health WHERE cluster = ? AND url = ?", (self.cluster, url)
            )
            db.execute(
                "UPDATE softlb_cluster SET version = version + 1 WHERE cluster = ?",
                (self.cluster,),
            )
            membership = _read_membership(db, self.cluster)
            assert membership is not None
            return membership

    def update(
        self, url: str, *, weight: int | None = None, draining: bool | None = None
    ) -> Membership:
        with self._transaction() as db:
            found = db.execute(
                "UPDATE softlb_member SET weight = COALESCE(?, weight), "
                "draining = COALESCE(?, draining) WHERE cluster = ? AND url = ?",
                (weight, None if draining is None else int(draining), self.cluster, url),
            ).rowcount
            if not found:
                raise UnknownBackend(f"no backend {url} in the pool")
            db.execute(
                "UPDATE softlb_cluster SET version = version + 1 WHERE cluster = ?",
                (self.cluster,),
            )
            membership = _read_membership(db, self.cluster)
            if membership is None:  # members without a cluster row: no membership
                raise UnknownBackend(f"no backend {url} in the pool")
            return membership

    # -- health --------------------------------------------------------------------------

    def health(self) -> Mapping[str, HealthVerdict]:
        now = self.clock()
        with self._connection() as db:
            rows = db.execute(
                "SELECT url, healthy, reason FROM softlb_health WHERE cluster = ? AND expires > ?",
                (self.cluster, now),
            ).fetchall()
        return {url: HealthVerdict(bool(healthy), reason) for url, healthy, reason in rows}

    def set_health(self, url: str, verdict: HealthVerdict, ttl: float) -> None:
        now = self.clock()
        with self._transaction() as db:
            db.execute(
                "DELETE FROM softlb_health WHERE cluster = ? AND expires <= ?",
                (self.cluster, now),
            )
            db.execute(
                "INSERT OR REPLACE INTO softlb_health (cluster, url, healthy, reason, expires) "
                "VALUES (?, ?, ?, ?, ?)",
                (self.cluster, url, int(verdict.healthy), verdict.reason, now + ttl),
            )

    # -- the prober lease ----------------------------------------------------------------

    def claim_prober(self, owner: str, ttl: float) -> bool:
        now = self.clock()
        with self._transaction() as db:
            row = db.execute(
                "SELECT owner, expires FROM softlb_prober WHERE cluster = ?", (self.cluster,)
            ).fetchone()
            if row is not None and row[0] != owner and row[1] > now:
                return False
            db.execute(
                "INSERT OR REPLACE INTO softlb_prober (cluster, owner, expires) VALUES (?, ?, ?)",
                (self.cluster, owner, now + ttl),
            )
            return True

    def release_prober(self, owner: str) -> None:
        with self._connection() as db:
            db.execute(
                "DELETE FROM softlb_prober WHERE cluster = ? AND owner = ?", (self.cluster, owner)
            )

    # -- life cycle ----------------------------------------------------------------------

    def clear(self) -> None:
        with self._transaction() as db:
            for table in _TABLES:
                db.execute(
                    f"DELETE FROM {table} WHERE cluster = ?", (self.cluster,)
                )  # table names are ours

    def close(self) -> None:
        """Close this process's connection (the store reopens on next use)."""
        with self._lock:
            self._drop()

    def __repr__(self) -> str:
        state = "connected" if self._conn is not None and self._pid == os.getpid() else "closed"
        return f"<SqliteStore {self.url} cluster={self.cluster!r} [{state}]>"

    # -- the connection ------------------------------------------------------------------

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """This process's connection, in autocommit mode, for the length of one call."""
        with self._lock, self._errors():
            yield self._connect()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: committed if the block ends normally, rolled
        back if it raises (a :class:`BackendExists` as much as an sqlite3 error)."""
        with self._lock, self._errors():
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            self._drop()
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise StoreUnavailable(f"SQLite store {self.path}: {message}") from exc

    def _connect(self) -> sqlite3.Connection:
        """Open the connection if this process has none, or if the file was replaced."""
        if self._conn is not None and self._pid != os.getpid():
            _INHERITED.append(self._conn)  # a fork the at-fork hook did not see
            self._conn = None
        if self._conn is not None:
            try:
                stat = os.stat(self.path)
                same = (stat.st_dev, stat.st_ino) == self._file
            except FileNotFoundError:
                same = False
            if same:
                return self._conn
            self._drop()
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            _switch_to_wal(conn, self.timeout)
            conn.execute("PRAGMA synchronous = NORMAL")
            present = conn.execute(
                f"SELECT count(*) FROM sqlite_master WHERE type = 'table' "
                f"AND name IN ({', '.join('?' * len(_TABLES))})",
                _TABLES,
            ).fetchone()[0]
            if present != len(_TABLES) or _missing_columns(conn):
                # A write: only when needed, so reads work while another process holds
                # the write lock.
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    conn.execute(statement)
                for table, column, definition in _missing_columns(conn):
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                conn.execute("COMMIT")
            stat = os.stat(self.path)
        except BaseException:
            conn.close()
            raise
        self._conn, self._pid, self._file = conn, os.getpid(), (stat.st_dev, stat.st_ino)
        return conn

    def _drop(self) -> None:
        conn, self._conn, self._file = self._conn, None, None
        if conn is None:
            return
        if self._pid != os.getpid():
            _INHERITED.append(conn)
            return
        with contextlib.suppress(sqlite3.Error):
            conn.close()


def _switch_to_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """Put the database in WAL mode, waiting out other processes doing the same.

    Changing the journal mode needs an exclusive lock and does not go through the busy
    handler: several workers opening a new file at once would see "database is locked".
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def _missing_columns(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
    """The columns of :data:`_ADDED_COLUMNS` that a table present in the file lacks."""
    missing = []
    for table, column, definition in _ADDED_COLUMNS:
        names = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if names and column not in names:
            missing.append((table, column, definition))
    return missing


def _read_membership(db: sqlite3.Connection, cluster: str) -> Membership | None:
    rows = db.execute(_MEMBERSHIP, (cluster,)).fetchall()
    if not rows:
        return None
    members = tuple(
        Member(url, int(weight), int(slot), bool(draining))
        for _v, url, weight, slot, draining in rows
        if url is not None
    )
    return Membership(int(rows[0][0]), members)


_STORES: weakref.WeakSet[SqliteStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child must not use its parent's connection, nor a lock a parent's thread
    may have held at the fork."""
    for store in list(_STORES):
        store._lock = threading.Lock()
        if store._conn is not None:
            _INHERITED.append(store._conn)
            store._conn, store._file = None, None


after_fork_in_child(_after_fork_in_child)
