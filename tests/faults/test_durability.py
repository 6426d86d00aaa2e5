"""Durability: SIGKILL during ledger and index writes, many times over, then PRAGMA
integrity_check and row counts. Each round a child (tests/faults/writer.py) writes
through the daemons' own writers and prints what was acknowledged; it is killed at a
random moment; the file must be intact, hold every acknowledged row exactly once, and
hold no half-written document. The settings behind this (WAL, synchronous=NORMAL,
one transaction per document, group commit in the ledger) are in docs/guarantees.md."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemons.index.schema import MIGRATIONS as INDEX_MIGRATIONS
from daemons.ledger import open_ledger
from daemons.store import Database
from tests.faults.writer import CHUNKS

ROUNDS = 25


class Writer:
    """The child, with its acknowledged ids read off its stdout by a thread."""

    def __init__(self, kind: str, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.faults.writer", kind, str(path)],
                                     stdout=subprocess.PIPE, text=True)
        self.acked: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("acked "):
                self.acked.append(line[6:].strip())
            elif line.strip() == "ready":
                self.ready.set()

    def kill_after(self, seconds: float) -> None:
        assert self.ready.wait(30), "the writer did not start"
        time.sleep(seconds)
        assert self.proc.poll() is None, f"the writer ended by itself ({self.proc.returncode})"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def rounds(kind: str, path: Path, check: Callable[[Path, list[str]], None]) -> int:
    rng = random.Random(kind)
    acked: list[str] = []
    for _ in range(ROUNDS):
        w = Writer(kind, path)
        w.kill_after(rng.uniform(0.05, 0.6))
        acked += w.acked
        check(path, acked)
    return len(acked)


def check_ledger(path: Path, acked: list[str]) -> None:
    db = open_ledger(path, readonly=True)
    try:
        assert db.value("PRAGMA integrity_check") == "ok"
        ids = [str(r[0]) for r in db.all("SELECT request_id FROM calls")]
    finally:
        db.close()
    assert len(ids) == len(set(ids)), "a row written twice"
    missing = set(acked) - set(ids)
    assert not missing, f"{len(missing)} acknowledged rows lost, e.g. {sorted(missing)[:3]}"


def check_index(path: Path, acked: list[str]) -> None:
    db = Database(path, readonly=True, migrations=INDEX_MIGRATIONS)
    try:
        assert db.value("PRAGMA integrity_check") == "ok"
        indexed = {str(r[0]) for r in db.all("SELECT path FROM files WHERE state = 'indexed'")}
        per_doc = db.all("SELECT document_id, count(*) FROM chunks GROUP BY document_id")
        chunks = db.value("SELECT count(*) FROM chunks")
        counts = (db.value("SELECT count(*) FROM chunk_vectors"), db.value("SELECT count(*) FROM knn"))
        docs = db.value("SELECT count(*) FROM documents")
        pointed = db.value("SELECT count(DISTINCT document_id) FROM files WHERE state = 'indexed'")
        # The full-text index answers for every chunk (it is contentless: query it).
        fts = db.value("SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH 'chunk'")
    finally:
        db.close()
    missing = set(acked) - indexed
    assert not missing, f"{len(missing)} acknowledged documents lost, e.g. {sorted(missing)[:3]}"
    assert all(n == CHUNKS for _, n in per_doc), "a half-written document"
    assert counts == (chunks, chunks) and fts == chunks, (chunks, counts, fts)
    assert docs == pointed == len(indexed), (docs, pointed, len(indexed))


@pytest.mark.parametrize("kind", ["ledger", "index"])
def test_sigkill_while_writing_loses_nothing_acknowledged_and_corrupts_nothing(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.db"
    check = check_ledger if kind == "ledger" else check_index
    n = rounds(kind, path, check)
    print(f"{kind}: {ROUNDS} kills, {n} acknowledged rows, all there, integrity ok")
    assert n > ROUNDS  # the kills landed while it was writing, not before it began
