"""The durable job queue: the `files` table of index.db (daemons/index/schema.py).

A file seen in an inbox is a row; its `state` is the job's: queued -> processing ->
indexed, or back to queued with a later `next_at` after a failure, or quarantined with
the reason after `max_attempts` failures (or at once for a file that can never work).
An attempt is counted when a job is claimed, so a file that crashes the daemon every
time (kill -9, OOM) is quarantined too instead of looping; at start, jobs left
`processing` by a crash go back to `queued` and are retried.

The retry wait doubles from backoff_s to backoff_max_s. It is a time stored with the
job, not a sleep in a retry loop: the queue outlives the process, so a retry library's
in-process loop is not what is needed here.

Every method takes the one lock that guards the writer connection (shared with the
index writer), so threads never interleave inside a transaction.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from daemons.index.schema import file_counts
from daemons.store import Database

LANES = ("text", "ocr")


@dataclass(frozen=True)
class Job:
    id: int
    path: str
    collection: str
    lane: str
    version: int
    attempts: int


@dataclass(frozen=True)
class Retry:
    max_attempts: int = 5
    backoff_s: float = 5.0
    backoff_max_s: float = 600.0

    def delay(self, attempts: int) -> float:
        return float(min(self.backoff_max_s, self.backoff_s * 2 ** max(0, attempts - 1)))


class JobQueue:
    def __init__(self, db: Database, lock: threading.RLock, retry: Retry) -> None:
        self.db = db
        self.lock = lock
        self.retry = retry
        self.wake = {lane: threading.Event() for lane in LANES}

    def recover(self) -> int:
        """Jobs a crash left in `processing` are queued again (their attempt counted)."""
        with self.lock, self.db.transaction():
            n = int(self.db.value("SELECT count(*) FROM files WHERE state = 'processing'"))
            self.db.execute("UPDATE files SET state = 'queued', next_at = 0, updated_at = ? WHERE state = 'processing'",
                            (time.time(),))
        return n

    def seen(self, path: str, collection: str, lane: str, size: int, mtime_ns: int) -> bool:
        """A complete file at `path`: queued when new or changed since last seen (a changed
        file is indexed again, even from quarantine). True when it was queued."""
        now = time.time()
        with self.lock, self.db.transaction():
            row = self.db.one("SELECT id, size, mtime_ns, collection FROM files WHERE path = ?", (path,))
            if row is None:
                self.db.execute(
                    "INSERT INTO files (path, collection, state, lane, size, mtime_ns, queued_at, updated_at) "
                    "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)", (path, collection, lane, size, mtime_ns, now, now))
            elif (row[1], row[2], row[3]) != (size, mtime_ns, collection):
                self.db.execute(
                    "UPDATE files SET state = 'queued', collection = ?, lane = ?, size = ?, mtime_ns = ?, "
                    "version = version + 1, attempts = 0, next_at = 0, reason = NULL, queued_at = ?, updated_at = ? "
                    "WHERE id = ?", (collection, lane, size, mtime_ns, now, now, row[0]))
            else:
                return False
        self.wake[lane].set()
        return True

    def file_id(self, path: str) -> int | None:
        with self.lock:
            value = self.db.value("SELECT id FROM files WHERE path = ?", (path,))
        return None if value is None else int(value)

    def known(self) -> dict[str, tuple[int | None, int | None]]:
        """Every file path in the queue with the size and mtime last seen (for a rescan)."""
        with self.lock:
            return {str(p): (s, m) for p, s, m in self.db.execute("SELECT path, size, mtime_ns FROM files")}

    def claim(self, lane: str) -> Job | None:
        """The next due job of this lane, now `processing`; None when none is due."""
        now = time.time()
        with self.lock, self.db.transaction():
            row = self.db.one(
                "SELECT id, path, collection, lane, version, attempts FROM files "
                "WHERE state = 'queued' AND lane = ? AND next_at <= ? ORDER BY next_at, id LIMIT 1", (lane, now))
            if row is None:
                return None
            self.db.execute("UPDATE files SET state = 'processing', attempts = attempts + 1, updated_at = ? "
                            "WHERE id = ?", (now, row[0]))
        return Job(int(row[0]), str(row[1]), str(row[2]), str(row[3]), int(row[4]), int(row[5]) + 1)

    def next_due(self, lane: str) -> float | None:
        with self.lock:
            value = self.db.value("SELECT min(next_at) FROM files WHERE state = 'queued' AND lane = ?", (lane,))
        return None if value is None else float(value)

    def current(self, job: Job) -> bool:
        """Whether the job is still the file's latest version and still ours."""
        row = self.db.one("SELECT version, state FROM files WHERE id = ?", (job.id,))
        return row is not None and int(row[0]) == job.version and row[1] == "processing"

    def set_hash(self, job: Job, sha256: str) -> None:
        with self.lock:
            self.db.execute("UPDATE files SET sha256 = ? WHERE id = ? AND version = ?", (sha256, job.id, job.version))

    def fail(self, job: Job, reason: str, permanent: bool) -> str:
        """Record a failure: "retry" (queued again after the backoff), "quarantined", or
        "stale" (the file changed or went meanwhile: its newer job stands)."""
        now = time.time()
        with self.lock, self.db.transaction():
            if not self.current(job):
                return "stale"
            if permanent or job.attempts >= self.retry.max_attempts:
                if not permanent:
                    reason = f"{reason} (failed {job.attempts} times)"
                self.db.execute("UPDATE files SET state = 'quarantined', reason = ?, updated_at = ? WHERE id = ?",
                                (reason, now, job.id))
                return "quarantined"
            self.db.execute("UPDATE files SET state = 'queued', reason = ?, next_at = ?, updated_at = ? WHERE id = ?",
                            (reason, now + self.retry.delay(job.attempts), now, job.id))
        self.wake[job.lane].set()
        return "retry"

    def put_back(self, job: Job, reason: str, delay_s: float = 0.0) -> None:
        """Queue a claimed job again without counting the attempt: what failed was not the
        file's fault (the state disk full, a service missing while it restarts)."""
        now = time.time()
        with self.lock, self.db.transaction():
            if self.current(job):
                self.db.execute("UPDATE files SET state = 'queued', attempts = max(0, attempts - 1), reason = ?, "
                                "next_at = ?, updated_at = ? WHERE id = ?", (reason, now + delay_s, now, job.id))

    def counts(self) -> dict[str, int]:
        with self.lock:
            return file_counts(self.db)
