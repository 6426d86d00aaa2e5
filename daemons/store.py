"""SQLite, the way every database of the suite opens it (index.db now, ledger.db next).

- apsw, not the standard sqlite3: it bundles a current SQLite and can load extensions;
  sqlite-vec is loaded into every connection, so any of them can read vectors.
- WAL journal, set outside any transaction (SQLite ignores the pragma inside one):
  readers never block the one writer, and the writer never blocks them.
- A busy timeout, so two writers (a daemon and a command) wait for each other instead of
  failing at once with SQLITE_BUSY.
- synchronous=NORMAL, on purpose: in WAL mode a commit is durable once the WAL is synced
  at checkpoint; a power cut can lose the last transactions before it but never corrupts
  the database, and an application crash (kill -9) loses nothing that was committed.
  FULL would fsync on every commit — for the ledger's batched writes and the index's
  per-document transactions that cost buys nothing a job queue needs: work that was not
  durable is simply done again. A database that must survive power loss commit by commit
  passes synchronous="FULL".
- One transaction helper: `with db.transaction():` is BEGIN IMMEDIATE ... COMMIT at the
  outermost level and a SAVEPOINT when nested; any exception, KeyboardInterrupt and
  SystemExit included (BaseException), rolls that level back and propagates.
- Named migrations, applied in order once each and recorded in `migrations` with the time.

Read-only connections (`readonly=True`, the router's) open the file with
SQLITE_OPEN_READONLY: they can never take the write lock, so they never wait for the
writer and it never waits for them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import apsw
import sqlite_vec

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]


class StoreError(Exception):
    """A database that cannot be opened or migrated: the message names the file."""


@dataclass(frozen=True)
class Migration:
    """One step of a schema, by name; its SQL runs in the same transaction as its record."""

    name: str
    sql: str


class Database:
    """One apsw connection with the suite's settings. Not shared between threads without
    the caller's own lock (apsw serialises calls, but a transaction spans several)."""

    def __init__(self, path: Path | str, *, readonly: bool = False, migrations: Sequence[Migration] = (),
                 synchronous: Synchronous = "NORMAL", busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.path = Path(path)
        self.readonly = readonly
        flags = apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
        try:
            if not readonly:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = apsw.Connection(str(self.path), flags=flags)
            self.conn.set_busy_timeout(busy_timeout_ms)
            self.conn.enable_load_extension(True)
            self.conn.load_extension(sqlite_vec.loadable_path())
            self.conn.enable_load_extension(False)
            if not readonly:
                # Outside any transaction: inside one SQLite silently keeps the old mode.
                mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()
                if mode is None or str(mode[0]).lower() != "wal":
                    raise StoreError(f"{self.path}: cannot switch to WAL (journal_mode is {mode})")
                self.conn.execute(f"PRAGMA synchronous={synchronous}")
            self.conn.execute("PRAGMA foreign_keys=ON")
        except apsw.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from None
        self._depth = 0
        self._savepoints = 0
        if migrations:
            if readonly:
                self.check_migrated(migrations)
            else:
                self.migrate(migrations)

    # ---- queries -------------------------------------------------------------------

    def execute(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> apsw.Cursor:
        return self.conn.execute(sql, args)

    def all(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self.conn.execute(sql, args).fetchall()
        return rows

    def one(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self.conn.execute(sql, args).fetchone()
        return row

    def value(self, sql: str, args: Sequence[Any] | dict[str, Any] = (), default: Any = None) -> Any:
        row = self.one(sql, args)
        return default if row is None else row[0]

    def rows(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts keyed by column name."""
        cur = self.conn.execute(sql, args)
        out: list[dict[str, Any]] = []
        names: list[str] | None = None
        for row in cur:
            if names is None:
                names = [d[0] for d in cur.getdescription()]
            out.append(dict(zip(names, row)))
        return out

    # ---- transactions --------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Database]:
        """BEGIN IMMEDIATE (the write lock up front, so a transaction never fails half-way
        on SQLITE_BUSY) at the outermost level, a SAVEPOINT inside another; rolled back on
        any BaseException, which is re-raised."""
        if self._depth == 0:
            self.conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self
            except BaseException:
                self._depth = 0
                with contextlib.suppress(apsw.Error):
                    self.conn.execute("ROLLBACK")
                raise
            self._depth = 0
            try:
                self.conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(apsw.Error):
                    self.conn.execute("ROLLBACK")
                raise
            return
        self._savepoints += 1
        name = f"sp{self._savepoints}"
        self.conn.execute(f"SAVEPOINT {name}")
        self._depth += 1
        try:
            yield self
        except BaseException:
            self._depth -= 1
            self.conn.execute(f"ROLLBACK TO {name}")
            self.conn.execute(f"RELEASE {name}")
            raise
        self._depth -= 1
        self.conn.execute(f"RELEASE {name}")

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Database]:
        """A read transaction: every query inside sees the same committed state (in WAL,
        without blocking or waiting for the writer). Inside a transaction, that one."""
        if self._depth:
            yield self
            return
        self.conn.execute("BEGIN DEFERRED")
        self._depth = 1
        try:
            yield self
        finally:
            self._depth = 0
            with contextlib.suppress(apsw.Error):
                self.conn.execute("COMMIT")

    @property
    def in_transaction(self) -> bool:
        return self._depth > 0

    # ---- migrations ----------------------------------------------------------------

    def migrate(self, migrations: Sequence[Migration]) -> list[str]:
        """Apply the migrations not yet recorded, in order, each in its own transaction;
        returns the names applied."""
        names = [m.name for m in migrations]
        if len(set(names)) != len(names):
            raise StoreError(f"{self.path}: migration names repeat: {names}")
        self.conn.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
        done = {str(r[0]) for r in self.conn.execute("SELECT name FROM migrations")}
        unknown = done - set(names)
        if unknown:
            raise StoreError(f"{self.path} was migrated by a newer onebox (unknown migrations: "
                             f"{', '.join(sorted(unknown))}); upgrade, or restore a backup")
        applied = []
        for m in migrations:
            if m.name in done:
                continue
            try:
                with self.transaction():
                    self.conn.execute(m.sql)
                    self.conn.execute("INSERT INTO migrations (name, applied_at) VALUES (?, ?)", (m.name, time.time()))
            except apsw.Error as exc:
                raise StoreError(f"{self.path}: migration {m.name} failed: {exc}") from None
            log.info("%s: applied migration %s", self.path.name, m.name)
            applied.append(m.name)
        return applied

    def check_migrated(self, migrations: Sequence[Migration]) -> None:
        """For a read-only reader: the schema it expects is there (the writer migrates)."""
        try:
            done = {str(r[0]) for r in self.conn.execute("SELECT name FROM migrations")}
        except apsw.SQLError:
            done = set()
        missing = [m.name for m in migrations if m.name not in done]
        if missing:
            raise StoreError(f"{self.path} is not migrated yet (missing: {', '.join(missing)}); "
                             "the daemon that writes it creates it at start")

    def close(self) -> None:
        self.conn.close()


class ThreadLocal:
    """One read-only connection per thread, opened on first use: what a multi-threaded
    reader (the router's search, run in a thread pool) needs, since a connection is used
    by one thread at a time."""

    def __init__(self, path: Path | str, migrations: Sequence[Migration] = ()) -> None:
        self.path = Path(path)
        self.migrations = migrations
        self._local = threading.local()
        self._all: list[Database] = []
        self._lock = threading.Lock()

    def get(self) -> Database:
        db: Database | None = getattr(self._local, "db", None)
        if db is None:
            db = Database(self.path, readonly=True, migrations=self.migrations)
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                with contextlib.suppress(apsw.Error):
                    db.close()
            self._all.clear()
