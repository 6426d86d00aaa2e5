"""Writing ledger.db: the router records every call, one thread writes them.

The router records a call from its asyncio loop as the call ends, so `record` must never
touch the disk: it appends to an in-memory queue under a lock (microseconds) and, when a
batch is ready, wakes the writer thread. The writer owns the one connection that writes
ledger.db and commits the queue in batches, one transaction each — a commit costs about
the same for one row as for five hundred, and one per call would put the fsync of a WAL
checkpoint on every request.

A call's row is committed before the client sees the end of its answer: the route
awaits `committed(ticket)` after `record`, which wakes the writer at once instead of at
the next flush. Calls ending together share one transaction (group commit), so under
load a commit still carries many rows, and with the WAL at synchronous=NORMAL a commit
is a write(2) to ledger.db-wal, no fsync: it survives the router being killed (`kill -9`,
the OOM killer), not a power cut. The wait is bounded (`ACK_TIMEOUT_S`) and skipped
while the ledger is failing, so a slow or full disk delays no answer for long; such a
row stays queued in memory and is written when the disk is back.

Rows leave the queue only once their transaction committed: a batch that fails (disk
full, the database locked beyond the busy timeout) stays queued and is tried again at
the next flush, with one error logged per distinct cause. `close` writes everything
still queued before the thread stops, so a clean stop loses nothing; what a crash loses
is at most the rows of calls whose answers had not ended, and, while the disk is
failing, the rows kept in memory meanwhile.

A row the database can never take (a value of a type SQLite cannot hold, a NULL in a
NOT NULL column) is a bug in the caller, not an outage: retrying would wedge every row
behind it forever, so it alone is skipped, with an error naming its request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import operator
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import apsw

from daemons.ledger import schema
from daemons.store import BUSY_TIMEOUT_MS, Database

log = logging.getLogger(__name__)

# Past this many queued rows something has been wrong for a long time; they are kept all
# the same (about 300 bytes each: a million is a few hundred MB, not a crash).
PENDING_ALARM = 1_000_000
# How long an answer waits for its row's commit before it goes out all the same: a commit
# takes well under a millisecond; longer means a disk in trouble (the row stays queued).
ACK_TIMEOUT_S = 1.0

_INSERT = (f"INSERT INTO calls ({', '.join(schema.CALL_COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in schema.CALL_COLUMNS)})")
# The errors of one row, not of the database: binding a value apsw cannot convert, or a
# constraint. SQLite aborts only that statement; the transaction goes on without it.
_ROW_ERRORS = (TypeError, ValueError, OverflowError, apsw.ConstraintError, apsw.MismatchError)


@dataclass(frozen=True)
class CallRecord:
    """One call, as the router saw it (a row of `calls`, less its id)."""

    request_id: str
    at: float  # unix time the call started
    principal: str
    principal_class: str  # "interactive" or "batch"
    model: str  # what the client asked for
    provider: str  # "local" or an upstream provider's name
    served_by: str  # the model that answered: differs from `model` after a fallback
    kind: str  # "chat", "completion", "embedding"
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    cost: float  # in the configured currency
    ttft_s: float | None
    duration_s: float
    status: int  # HTTP status
    error: str | None = None
    user: str | None = None  # the request's `user` field, as the client sent it


if tuple(f.name for f in dataclasses.fields(CallRecord)) != schema.CALL_COLUMNS:
    raise AssertionError("CallRecord's fields and schema.CALL_COLUMNS differ")


# The row's values in column order (not dataclasses.astuple: that deep-copies each value).
_row: Callable[[CallRecord], tuple[object, ...]] = operator.attrgetter(*schema.CALL_COLUMNS)


class Ledger:
    """The router's cost ledger: `record` from any thread, one writer thread commits."""

    def __init__(self, path: Path, flush_s: float = 0.5, batch: int = 500, *,
                 busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        if flush_s <= 0 or batch < 1:
            raise ValueError(f"ledger: flush_s must be > 0 and batch >= 1 (got {flush_s}, {batch})")
        self.path = Path(path)
        self.flush_s = flush_s
        self.batch = batch
        self.busy_timeout_ms = busy_timeout_ms
        self.written = 0  # rows committed since open
        self.batches = 0  # transactions that committed them
        self.rejected = 0  # rows the database could never take (see the module docstring)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # `_done` moved
        self._wake = threading.Event()
        self._pending: deque[CallRecord] = deque()
        self._recorded = 0  # rows ever recorded; `flush` waits for `_done` to reach it
        self._done = 0  # rows ever taken off the queue (committed or rejected)
        self._failing = False  # the last batch failed: retry at the next flush, not per record
        self._alarmed = False
        self._seen_errors: set[str] = set()  # the causes logged during the current outage
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None
        # (ticket, loop, future) of callers awaiting `committed`, resolved by the writer.
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[bool]]] = []

    # ---- the router's side -----------------------------------------------------------

    def open(self) -> None:
        """Create or migrate ledger.db and start the writer. Opening here, not in the thread,
        so a database that cannot be opened stops the router's start with its reason."""
        if self._thread is not None:
            raise RuntimeError("ledger: already open")
        db = Database(self.path, migrations=schema.MIGRATIONS, busy_timeout_ms=self.busy_timeout_ms)
        # From here on the connection is the thread's alone.
        self._thread = threading.Thread(target=self._run, args=(db,), name="ledger-writer", daemon=True)
        self._thread.start()
        log.info("ledger: writing %s (every %.2gs or %d calls)", self.path, self.flush_s, self.batch)

    def record(self, rec: CallRecord) -> int:
        """Queue one call; returns its ticket for `committed`. Never blocks on the disk:
        safe on the asyncio loop."""
        with self._lock:
            closed = self._closed
            if not closed:
                self._pending.append(rec)
                self._recorded += 1
            ticket = self._recorded
            n = len(self._pending)
            wake = n >= self.batch and not self._failing and not closed
            alarm = n > PENDING_ALARM and not self._alarmed
            if alarm:
                self._alarmed = True
        # Logged outside the lock: a slow log handler must not hold up other callers.
        if closed:
            # A call that ended after the router closed its ledger: say so, never silently.
            log.error("ledger: closed, call %s (%s, cost %s) is not recorded", rec.request_id, rec.principal, rec.cost)
            return ticket
        if alarm:
            log.error("ledger: %d calls wait to be written to %s (kept in memory; see the errors above)", n, self.path)
        if wake:
            self._wake.set()
        return ticket

    async def committed(self, ticket: int, timeout: float = ACK_TIMEOUT_S) -> bool:
        """Wait until the row of `ticket` (and every row before it) is committed; False at
        once while the ledger is failing or not running, or after `timeout`."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._done >= ticket:
                return True
            if self._failing or self._closed or self._thread is None:
                return False
            future: asyncio.Future[bool] = loop.create_future()
            self._waiters.append((ticket, loop, future))
        self._wake.set()
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return False

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every call recorded before this one is committed; False if that took
        longer than `timeout` (or the writer is not running)."""
        with self._changed:
            target = self._recorded
            if self._done >= target:
                return True
            if self._thread is None or not self._thread.is_alive():
                return False
            self._wake.set()
            return self._changed.wait_for(lambda: self._done >= target, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write everything still queued, then stop the writer."""
        with self._lock:
            self._closed = True
        thread = self._thread
        if thread is None:
            if self._pending:
                log.error("ledger: closed before it was opened, %d calls not written", len(self._pending))
            return
        self.flush(timeout)
        with self._lock:
            self._stopping = True
        self._wake.set()
        # The writer makes one last try (which may wait out the busy timeout) and exits.
        thread.join(self.busy_timeout_ms / 1000 + 1.0)
        left = self.pending()
        if left or thread.is_alive():
            log.error("ledger: stopped with %d calls not written to %s", left, self.path)
        log.info("ledger: wrote %d calls in total to %s", self.written, self.path)

    def spend_by_principal(self, since: float) -> dict[str, float]:
        """Cost per principal of the committed calls with at >= since (the router seeds its
        budgets with it at start). Its own short-lived read-only connection: WAL readers
        never wait for the writer, and the writer's connection stays its thread's alone."""
        db = Database(self.path, readonly=True, migrations=schema.MIGRATIONS, busy_timeout_ms=self.busy_timeout_ms)
        try:
            return {str(p): float(c) for p, c in db.all(
                "SELECT principal, sum(cost) FROM calls WHERE at >= ? GROUP BY principal", (since,))}
        finally:
            db.close()

    # ---- the writer thread ---------------------------------------------------------

    def _run(self, db: Database) -> None:
        try:
            while True:
                # During an outage a retry comes from the timer (or a flush), not from each
                # record: the queue stays over `batch` the whole time.
                self._wake.wait(self.flush_s)
                self._wake.clear()
                with self._lock:
                    stopping = self._stopping
                try:
                    self._drain(db)
                except Exception:
                    # A bug here must not end the thread: the queue would then grow unseen.
                    log.exception("ledger: unexpected error in the writer; its rows stay queued")
                if stopping:
                    return
        finally:
            with contextlib.suppress(apsw.Error):
                db.close()

    def _drain(self, db: Database) -> None:
        """Commit the queue batch by batch; stop at the first batch that fails."""
        while True:
            with self._lock:
                # Peek, don't pop: rows leave the queue only once committed. `record` only
                # appends on the right, so these stay the first len(take) rows.
                take = list(itertools.islice(self._pending, self.batch))
            if not take:
                return
            try:
                rejected = self._write(db, take)
            except Exception as exc:  # noqa: BLE001 - any failure keeps the rows; the cause is logged
                self._failed(exc)
                return
            with self._changed:
                for _ in take:
                    self._pending.popleft()
                self._done += len(take)
                self.written += len(take) - rejected
                self.rejected += rejected
                self.batches += 1
                if self._failing:
                    log.info("ledger: %s writable again, writing the %d calls kept meanwhile", self.path.name,
                             len(self._pending) + len(take))
                self._failing = False
                self._seen_errors.clear()
                if len(self._pending) <= PENDING_ALARM:
                    self._alarmed = False
                self._changed.notify_all()
                due = self._take_waiters(lambda t: t <= self._done)
            _resolve(due, True)

    def _take_waiters(self, due: Callable[[int], bool],
                      ) -> dict[asyncio.AbstractEventLoop, list[asyncio.Future[bool]]]:
        """The waiters whose ticket is `due`, by loop, off the list (under the lock)."""
        taken: dict[asyncio.AbstractEventLoop, list[asyncio.Future[bool]]] = {}
        keep = []
        for waiter in self._waiters:
            if due(waiter[0]):
                taken.setdefault(waiter[1], []).append(waiter[2])
            else:
                keep.append(waiter)
        self._waiters = keep
        return taken

    def _write(self, db: Database, take: list[CallRecord]) -> int:
        """One transaction for the batch; returns how many rows were skipped as bad."""
        rejected = 0
        with db.transaction():
            for rec in take:
                try:
                    db.execute(_INSERT, _row(rec))
                except _ROW_ERRORS as exc:
                    rejected += 1
                    log.error("ledger: call %s cannot be stored and is skipped: %s: %s (%r)", rec.request_id,
                              type(exc).__name__, exc, rec)
        return rejected

    def _failed(self, exc: Exception) -> None:
        cause = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._failing = True
            first = cause not in self._seen_errors
            self._seen_errors.add(cause)
            waiting = len(self._pending)
            due = self._take_waiters(lambda t: True)
        _resolve(due, False)  # their answers go out now; the rows stay queued
        if first:
            log.error("ledger: cannot write %s (%s): %d calls kept, retried every %.2gs", self.path, cause,
                      waiting, self.flush_s)


def _resolve(due: dict[asyncio.AbstractEventLoop, list[asyncio.Future[bool]]], result: bool) -> None:
    """Wake the awaiting callers, one hop onto each event loop (not one per call)."""
    for loop, futures in due.items():
        with contextlib.suppress(RuntimeError):  # a loop that has closed meanwhile
            loop.call_soon_threadsafe(_settle, futures, result)


def _settle(futures: list[asyncio.Future[bool]], result: bool) -> None:
    for future in futures:
        if not future.done():  # not already given up on (timeout, cancel)
            future.set_result(result)
