"""A child process that writes ledger.db or index.db through the daemons' own writers
as fast as it can and prints the id of each row once its commit returned ("acked"), so
tests/faults/test_durability.py can kill it with SIGKILL at any moment and check that
every acknowledged row survived, nothing is half-written and the file is intact.

    python -m tests.faults.writer ledger|index PATH
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import threading
from pathlib import Path

import numpy as np

from daemons.index.write import IndexWriter, NewChunk, NewDocument, open_index
from daemons.ingest.queue import JobQueue, Retry
from daemons.ledger import CallRecord, Ledger, open_ledger

CHUNKS = 6  # per document
DIMS = 16


def ack(ids: list[str]) -> None:
    sys.stdout.write("".join(f"acked {i}\n" for i in ids))
    sys.stdout.flush()


def call(request_id: str) -> CallRecord:
    return CallRecord(request_id=request_id, at=1_000.0, principal="alice", principal_class="interactive",
                      model="m", provider="local", served_by="m", kind="chat", prompt_tokens=10,
                      completion_tokens=5, cached_tokens=0, cost=0.01, ttft_s=0.1, duration_s=1.0, status=200)


async def ledger(path: Path) -> None:
    """The router's pattern: calls ending together, each answered once its row commits."""
    db = open_ledger(path)  # creates and migrates it; count what earlier runs left
    start = int(db.value("SELECT count(*) FROM calls"))
    db.close()
    book = Ledger(path, flush_s=0.05, batch=50)
    book.open()
    n = start
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        ids = [f"r{n + i}" for i in range(1 + n % 17)]
        n += len(ids)
        tickets = [book.record(call(i)) for i in ids]
        results = await asyncio.gather(*(book.committed(t, timeout=10) for t in tickets))
        if not all(results):
            raise SystemExit("a commit was not confirmed")
        ack(ids)


def index(path: Path) -> None:
    """The ingestion daemon's pattern: a file queued, then its document, chunks, vectors,
    knn and full-text rows in one transaction."""
    db = open_index(path)
    writer = IndexWriter(db)
    writer.set_collections([("docs", "/inbox/docs", False)])
    writer.prepare_vectors("test-model", DIMS, "binary")
    queue = JobQueue(db, threading.RLock(), Retry())
    n = int(db.value("SELECT count(*) FROM files"))
    rng = np.random.default_rng(n)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        name = f"/inbox/docs/f{n}.md"
        queue.seen(name, "docs", "text", 100 + n, n)
        file_id = queue.file_id(name)
        assert file_id is not None
        text = [f"document {n} chunk {j} " + " ".join(f"w{n}x{j}x{k}" for k in range(30)) for j in range(CHUNKS)]
        doc = NewDocument("docs", hashlib.sha256(name.encode()).hexdigest(), f"f{n}", "markdown", 1, 100 + n,
                          f"/markdown/{n}.md")
        chunks = [NewChunk(j, t, "", 1, 1, 40) for j, t in enumerate(text)]
        writer.replace(file_id, doc, chunks, rng.standard_normal((CHUNKS, DIMS)).astype("float32"))
        ack([name])
        n += 1


def main() -> None:
    kind, path = sys.argv[1], Path(sys.argv[2])
    if kind == "ledger":
        asyncio.run(ledger(path))
    else:
        index(path)


if __name__ == "__main__":
    main()
