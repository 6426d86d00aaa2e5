"""The ingestion daemon's engine: the watcher and the pipeline, and the bus service
`ingest` through which the router and the commands ask it to act.

Requests on the bus ({"op": ...}):
- "status": the queue's counts and what each stage is doing;
- "delete", "id": delete a file from its inbox, and so from the index (the ingestion
  daemon is the index's only writer; the router reads);
- "rescan": list every inbox again (after a bulk copy onto a network share, say).
They run on one thread of their own, never on the bus's.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from daemons.bus.errors import RequestError
from daemons.bus.worker import Emitter, Request
from daemons.index.schema import STATES, file_counts
from daemons.ingest.pipeline import Pipeline
from daemons.ingest.queue import JobQueue
from daemons.ingest.watch import Watcher
from daemons.store import Database

log = logging.getLogger(__name__)


class IngestEngine:
    def __init__(self, emitter: Emitter, queue: JobQueue, pipeline: Pipeline, watcher: Watcher,
                 index_path: Path) -> None:
        self.emit = emitter
        self.queue = queue
        self.pipeline = pipeline
        self.watcher = watcher
        self.index_path = index_path
        self._ops = ThreadPoolExecutor(1, thread_name_prefix="ops")
        self._reader: Database | None = None  # status reads: WAL, never waits for the writer
        self._failed: str | None = None

    def start(self) -> None:
        recovered = self.queue.recover()
        if recovered:
            log.info("%d file(s) were being indexed when the daemon last stopped: queued again", recovered)
        self.watcher.start(self.queue.known())
        self.pipeline.start()
        counts = self.queue.counts()
        log.info("ingestion running: %s", ", ".join(f"{n} {s}" for s, n in counts.items()))

    def stop(self, timeout: float) -> None:
        self.watcher.stop()
        if not self.pipeline.stop(timeout):
            log.warning("a stage was still busy after %.0f s; its file is picked up at the next start", timeout)
        self._ops.shutdown(wait=False, cancel_futures=True)

    # ---- bus requests --------------------------------------------------------------

    def submit(self, request: Request) -> None:
        op = request.body.get("op")
        if op not in ("status", "delete", "rescan"):
            raise RequestError(f'unknown op {op!r} (known: "status", "delete", "rescan")', 400)
        self._ops.submit(self._run_op, request)

    def cancel(self, request_id: str) -> None:
        pass  # every op is short

    def _run_op(self, request: Request) -> None:
        try:
            op = request.body["op"]
            if op == "status":
                result: dict[str, Any] = {"counts": self.queue.counts(), **self.pipeline.status_map()}
            elif op == "delete":
                result = self._delete(request.body.get("id"))
            else:
                added, gone = self.watcher.rescan(self.queue.known())
                result = {"pending": added, "gone": gone}
            self.emit.final(request.id, result)
        except RequestError as exc:
            self.emit.error(request.id, exc.code, exc.message)
        except Exception as exc:
            log.exception("op %s failed", request.body.get("op"))
            self.emit.error(request.id, 500, f"{type(exc).__name__}: {exc}")

    def _delete(self, file_id: Any) -> dict[str, Any]:
        if not isinstance(file_id, int) or isinstance(file_id, bool):
            raise RequestError('"id" must be a document id (an integer)', 400)
        if not 0 < file_id < 2**63:  # past SQLite's 64-bit integers no row can have it
            raise RequestError(f"no document {file_id}", 404)
        with self.queue.lock:
            path = self.queue.db.value("SELECT path FROM files WHERE id = ?", (file_id,))
        if path is None:
            raise RequestError(f"no document {file_id}", 404)
        if self.watcher.collection_of(Path(path)) is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise RequestError(f"cannot delete {path}: {exc.strerror}", 409) from None
        self.pipeline.file_gone(str(path))
        log.info("deleted %s (document %d) on request", path, file_id)
        return {"id": file_id, "path": path, "deleted": True}

    # ---- health --------------------------------------------------------------------

    def alive(self) -> bool:
        return self.pipeline.alive() and self.watcher.alive()

    def failed(self) -> str | None:
        if not self.watcher.alive():
            return "the inbox watcher stopped"
        return None

    def _counts(self) -> dict[str, int]:
        try:
            if self._reader is None:
                self._reader = Database(self.index_path, readonly=True)
            return file_counts(self._reader)
        except Exception as exc:
            log.debug("status read failed: %s", exc)
            return dict.fromkeys(STATES, 0)

    def status(self) -> str:
        c = self._counts()
        paused = f"paused: {self.pipeline.paused}; " if self.pipeline.paused else ""
        return (f"{paused}{c['indexed']} indexed, {c['queued']} queued, {c['processing']} in progress, "
                f"{c['quarantined']} quarantined")

    def status_map(self) -> dict[str, Any]:
        p = self.pipeline.status_map()
        return {"files": self._counts(), "pending": self.watcher.pending, "watch": self.watcher.methods,
                **{k: p[k] for k in ("paused", "indexed", "chunks", "quarantined", "files_per_min", "embed_queue",
                                     "store_queue")}}

