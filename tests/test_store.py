"""daemons/store.py on real SQLite files: WAL, transactions and savepoints, migrations,
and readers that never wait for the writer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import apsw
import pytest

from daemons.store import Database, Migration, StoreError, ThreadLocal

M1 = Migration("0001-items", "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
M2 = Migration("0002-size", "ALTER TABLE items ADD COLUMN size INTEGER NOT NULL DEFAULT 0")


def names(db: Database) -> list[str]:
    return [r["name"] for r in db.rows("SELECT name FROM items ORDER BY id")]


def test_wal_synchronous_vec_and_migrations_recorded(tmp_path: Path) -> None:
    db = Database(tmp_path / "a.db", migrations=[M1])
    assert db.value("PRAGMA journal_mode") == "wal"
    assert db.value("PRAGMA synchronous") == 1  # NORMAL
    assert db.value("PRAGMA busy_timeout") == 10_000
    assert db.value("SELECT vec_version()").startswith("v")
    assert [r[0] for r in db.all("SELECT name FROM migrations")] == ["0001-items"]
    db.close()
    again = Database(tmp_path / "a.db", migrations=[M1, M2])  # only the new one runs
    assert [r[0] for r in again.all("SELECT name FROM migrations ORDER BY name")] == ["0001-items", "0002-size"]
    again.execute("INSERT INTO items (name, size) VALUES ('x', 3)")
    again.close()
    with pytest.raises(StoreError, match="newer onebox"):
        Database(tmp_path / "a.db", migrations=[M1])


def test_a_failed_migration_leaves_nothing_behind(tmp_path: Path) -> None:
    bad = Migration("0002-bad", "ALTER TABLE items ADD COLUMN x INTEGER; CREATE TABLE oops (")
    with pytest.raises(StoreError, match="0002-bad"):
        Database(tmp_path / "b.db", migrations=[M1, bad])
    db = Database(tmp_path / "b.db", migrations=[M1])
    assert "x" not in [r[1] for r in db.all("PRAGMA table_info(items)")]
    assert [r[0] for r in db.all("SELECT name FROM migrations")] == ["0001-items"]


def test_nested_transactions_are_savepoints_and_any_exception_rolls_back(tmp_path: Path) -> None:
    db = Database(tmp_path / "c.db", migrations=[M1])
    with db.transaction():
        db.execute("INSERT INTO items (name) VALUES ('outer')")
        with pytest.raises(ValueError):
            with db.transaction():
                db.execute("INSERT INTO items (name) VALUES ('inner')")
                raise ValueError
        with db.transaction():
            db.execute("INSERT INTO items (name) VALUES ('kept')")
    assert names(db) == ["outer", "kept"]
    # BaseException too: Ctrl-C or SystemExit in the middle commits nothing.
    for exc in (KeyboardInterrupt, SystemExit):
        with pytest.raises(exc):
            with db.transaction():
                db.execute("INSERT INTO items (name) VALUES ('lost')")
                raise exc
    assert names(db) == ["outer", "kept"]
    assert not db.in_transaction
    with db.transaction():  # usable again
        db.execute("INSERT INTO items (name) VALUES ('after')")
    assert names(db)[-1] == "after"


def test_readers_see_the_last_commit_and_never_wait_for_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    writer = Database(path, migrations=[M1])
    writer.execute("INSERT INTO items (name) VALUES ('committed')")
    reader = Database(path, readonly=True, migrations=[M1])
    with writer.transaction():
        writer.execute("INSERT INTO items (name) VALUES ('uncommitted')")
        t0 = time.monotonic()
        assert names(reader) == ["committed"]
        assert time.monotonic() - t0 < 0.5
        # A second writer waits (busy timeout) instead of failing at once; here it gives up.
        other = Database(path, busy_timeout_ms=200)
        with pytest.raises(apsw.BusyError):
            with other.transaction():
                pass
    assert names(reader) == ["committed", "uncommitted"]
    with pytest.raises(apsw.ReadOnlyError):
        reader.execute("INSERT INTO items (name) VALUES ('nope')")


def test_a_reader_of_an_unmigrated_file_is_told_so(tmp_path: Path) -> None:
    Database(tmp_path / "e.db").close()
    with pytest.raises(StoreError, match="not migrated"):
        Database(tmp_path / "e.db", readonly=True, migrations=[M1])


def test_snapshot_reads_one_commit(tmp_path: Path) -> None:
    path = tmp_path / "f.db"
    writer = Database(path, migrations=[M1])
    reader = Database(path, readonly=True, migrations=[M1])
    with reader.snapshot():
        before = names(reader)
        writer.execute("INSERT INTO items (name) VALUES ('later')")
        assert names(reader) == before
    assert names(reader) == [*before, "later"]


def test_thread_local_gives_each_thread_its_own_reader(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    Database(path, migrations=[M1]).execute("INSERT INTO items (name) VALUES ('x')")
    pool = ThreadLocal(path, [M1])
    seen: list[int] = []

    def read() -> None:
        db = pool.get()
        assert pool.get() is db
        assert names(db) == ["x"]
        seen.append(id(db))

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 4
    pool.close()
