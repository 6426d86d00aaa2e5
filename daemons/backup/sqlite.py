"""One database copied while its daemon writes it, with SQLite's online backup API.

`step(-1)` copies every page in one call, inside one read transaction on the source: in
WAL mode that transaction sees one commit and neither waits for the writer nor makes it
wait. Copying a few pages per step instead would restart from the first page whenever
another connection commits between two steps, and the router's ledger commits every
half second: a large database might never finish. The price of one step is that the WAL
cannot be checkpointed past the copy's snapshot until it ends (it grows meanwhile, and
shrinks at the next checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import apsw

from daemons.backup.errors import BackupError
from daemons.backup.layout import DatabaseSpec
from daemons.store import Database, StoreError


@dataclass(frozen=True)
class Snapshot:
    path: Path  # the copy
    migrations: list[str]
    counts: dict[str, int]


def snapshot(spec: DatabaseSpec, dest: Path) -> Snapshot:
    """Copy `spec`'s database to `dest` (which must not exist), check the copy and read
    what it holds. Raises BackupError."""
    try:
        source = Database(spec.path, readonly=True)
    except StoreError as exc:
        raise BackupError(f"cannot open {exc}") from None
    try:
        copy = apsw.Connection(str(dest))
        try:
            with copy.backup("main", source.conn, "main") as b:
                b.step(-1)
        finally:
            copy.close()
    except apsw.Error as exc:
        raise BackupError(f"{spec.path}: the online backup failed: {exc}") from None
    finally:
        source.close()
    return inspect(spec, dest)


def inspect(spec: DatabaseSpec, path: Path) -> Snapshot:
    """quick_check, the migrations applied and the row counts of a copy."""
    try:
        db = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE)
        try:
            check = [str(r[0]) for r in db.execute("PRAGMA quick_check")]
            if check != ["ok"]:
                raise BackupError(f"{spec.path} is damaged (quick_check: {'; '.join(check[:3])}): it was not backed "
                                  "up; see https://sqlite.org/recovery.html")
            migrations = [str(r[0]) for r in db.execute("SELECT name FROM migrations ORDER BY applied_at, name")]
            counts = {what: as_int(db.execute(sql).fetchall()[0][0]) for what, sql in spec.counts}
        finally:
            db.close()
    except apsw.SQLError as exc:
        raise BackupError(f"{spec.path}: not a onebox {spec.name} ({exc})") from None
    except apsw.Error as exc:
        raise BackupError(f"{spec.path}: {exc}") from None
    return Snapshot(path, migrations, counts)


def as_int(value: object) -> int:
    """A count(*) from SQLite (always an int; a guard for the type checker)."""
    return value if isinstance(value, int) else 0
