"""From a queued file to indexed chunks, in stages that run at the same time:

    claim (two lanes) -> parse or OCR -> markdown cache -> chunk  ─┐
                                                                  ├─ embed queue -> embed -> store queue -> store
    text lane: text_workers threads; ocr lane: ocr_workers threads ┘

The lanes keep a 300-page scan from holding up small text files; the queues between
stages are bounded (`queue`), so a stage that falls behind makes the one before it wait
instead of filling memory. The store stage is the index's only writer: one transaction
per document (daemons/index/write.py).

A failure is sorted into permanent (the file can never work: corrupt, unsupported,
empty, too big, refused by OCR as such) -> quarantined at once with the reason, or
transient (OCR or embedding daemon overloaded or lost mid-call, a deadline, a bug) ->
retried with backoff, quarantined after max_attempts (daemons/ingest/queue.py). What is
not the file's fault is waited out and never counted against it: a service with no
worker at all (restarting), and a full state disk (daemons/ingest/space.py).
"""

from __future__ import annotations

import logging
import os
import queue as queue_mod
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from daemons.bus.client import BusClient
from daemons.bus.errors import BusError, NoWorker, RemoteError
from daemons.config import IngestConfig
from daemons.index.write import IndexWriter, NewChunk, NewDocument
from daemons.ingest import chunk as chunking
from daemons.ingest import parse
from daemons.ingest.cache import MarkdownCache
from daemons.ingest.gate import InferenceGate
from daemons.ingest.inbox import open_inside, sha256_limited
from daemons.ingest.queue import LANES, Job, JobQueue
from daemons.ingest.space import Space, is_full
from daemons.ingest.tokens import Tokenizer

log = logging.getLogger(__name__)

OCR_LANE_KINDS = ("pdf", "image")
WAIT_S = 1.0  # longest sleep of an idle stage: bounds how long stop() waits for it


class Permanent(Exception):
    """This file can never be indexed as it is: quarantine it with this reason."""


class Stale(Exception):
    """The file changed or went while it was being read: its newer job does the work."""


@dataclass
class Prepared:
    job: Job
    doc: NewDocument
    chunks: list[chunking.Chunk]
    started: float
    vectors: np.ndarray | None = None


@dataclass
class Counters:
    indexed: int = 0
    duplicates: int = 0
    removed: int = 0
    retried: int = 0
    quarantined: int = 0
    chunks: int = 0
    ocr_pages: int = 0
    recent: deque[float] = field(default_factory=deque)  # when recent files were indexed


def lane_of(path: Path, folder: Path) -> str:
    """Which lane a file goes to, from its name and first bytes (a link out of the inbox,
    or a named pipe, is not read: the text lane quarantines it)."""
    try:
        with open_inside(path, folder) as f:
            head = f.read(parse.HEAD_BYTES)
    except (OSError, parse.ParseError):
        head = b""
    return "ocr" if parse.kind_of(path, head) in OCR_LANE_KINDS else "text"


class Pipeline:
    def __init__(self, settings: IngestConfig, queue: JobQueue, writer: IndexWriter, bus: BusClient,
                 embed_service: str, tokenizer: Tokenizer, cache: MarkdownCache, ocr_enabled: bool,
                 folders: dict[str, Path], space: Space | None = None) -> None:
        self.s = settings
        self.space = space or Space(cache.root.parent, settings.min_free_mb * 1024 * 1024)
        self.paused: str | None = None  # why ingestion waits (the state disk is full), if it does
        self._deferred: list[Job] = []  # jobs a full disk kept from being queued again
        self.folders = {name: folder.resolve() for name, folder in folders.items()}  # files never leave these
        self.docx_limits = parse.DocxLimits(settings.max_docx_xml_bytes, settings.max_zip_ratio)
        self.queue = queue
        self.writer = writer
        self.lock = queue.lock
        self.bus = bus
        self.embed_service = embed_service
        self.tokenizer = tokenizer
        self.cache = cache
        self.ocr_enabled = ocr_enabled
        self.gate = InferenceGate(bus, settings.max_yield_s, settings.yield_to_inference)
        # What one chunk may hold: the setting, cut to what the model embeds whole.
        self.chunk_tokens = max(8, min(settings.chunk_tokens, tokenizer.n_ctx_train - tokenizer.specials))
        self.overlap = min(settings.chunk_overlap, self.chunk_tokens // 2)
        self.embed_q: queue_mod.Queue[Prepared] = queue_mod.Queue(settings.queue)
        self.store_q: queue_mod.Queue[Prepared] = queue_mod.Queue(settings.queue)
        self.counters = Counters()
        self.busy: dict[str, str] = {}  # thread name -> path it works on
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        for lane, n in (("text", settings.text_workers), ("ocr", settings.ocr_workers)):
            for i in range(n):
                self._threads.append(self._thread(f"{lane}-{i}", self._lane, lane))
        self._threads.append(self._thread("embed", self._stage, self.embed_q, self._embed))
        self._threads.append(self._thread("store", self._stage, self.store_q, self._store))

    def _thread(self, name: str, target: Callable[..., None], *args: Any) -> threading.Thread:
        return threading.Thread(target=target, args=args, name=name, daemon=True)

    # ---- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout: float) -> bool:
        """Stop every stage after its current step; True when all have stopped. Work in
        flight stays `processing` in the queue and is redone at the next start."""
        self._stop.set()
        for lane in LANES:
            self.queue.wake[lane].set()
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        self.bus.close()  # fails any call still waiting, so its stage can end
        return not any(t.is_alive() for t in self._threads)

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads) or self._stop.is_set()

    # ---- file events (from the watcher's thread) -----------------------------------

    def file_ready(self, path: str, collection: str, st: os.stat_result) -> None:
        lane = lane_of(Path(path), self.folders[collection])
        try:
            queued = self.queue.seen(path, collection, lane, st.st_size, st.st_mtime_ns)
        except Exception as exc:
            if is_full(exc):
                self.space.full_error()  # pauses the stages too; the watcher keeps the file for later
            raise
        if queued:
            log.info("queued %s (collection %s, %d bytes)", path, collection, st.st_size)

    def file_gone(self, path: str) -> None:
        """A file, or a folder with every file under it, left its inbox."""
        with self.lock:
            ids = [(int(i), str(p)) for i, p in self.writer.db.execute(
                "SELECT id, path FROM files WHERE path = ? OR path LIKE ? ESCAPE '\\'",
                (path, _like_prefix(path)))]
            for file_id, p in ids:
                self.writer.remove_file(file_id)
                self.counters.removed += 1
                log.info("removed %s from the index (the file is gone)", p)

    # ---- stage 1: claim, read, chunk ----------------------------------------------

    def _lane(self, lane: str) -> None:
        wake = self.queue.wake[lane]
        me = threading.current_thread().name
        while not self._stop.is_set():
            if self._hold():
                self._stop.wait(WAIT_S)
                continue
            try:
                job = self.queue.claim(lane)
            except Exception as exc:
                if is_full(exc):
                    self._disk_full(exc, None)
                else:
                    log.exception("cannot claim a job")
                self._stop.wait(WAIT_S)
                continue
            if job is None:
                due = self.queue.next_due(lane)
                wait = WAIT_S if due is None else min(WAIT_S, max(0.01, due - time.time()))
                wake.wait(wait)
                wake.clear()
                continue
            self.busy[me] = job.path
            try:
                prepared = self._prepare(job)
                if prepared is not None:
                    self._put(self.embed_q, prepared)
            except Exception as exc:
                self._failed(job, exc)
            finally:
                self.busy.pop(me, None)

    def _prepare(self, job: Job) -> Prepared | None:
        folder = self.folders.get(job.collection)
        if folder is None:
            raise Permanent(f"collection {job.collection} is no longer configured")
        try:
            f = open_inside(Path(job.path), folder)
        except FileNotFoundError:
            raise Stale("the file is gone") from None
        with f:
            return self._prepare_open(job, f)

    def _prepare_open(self, job: Job, f: BinaryIO) -> Prepared | None:
        started = time.monotonic()
        path = Path(job.path)
        before = os.fstat(f.fileno())
        if before.st_size > self.s.max_file_bytes:
            raise Permanent(parse.too_big(before.st_size, self.s.max_file_bytes))
        if before.st_size == 0:
            raise Permanent("empty file")
        sha = sha256_limited(f, self.s.max_file_bytes)
        self.queue.set_hash(job, sha)
        with self.lock:
            existing = self.writer.document_for(job.collection, sha)
            if existing is not None:
                if self.queue.current(job):
                    self.writer.link(job.id, existing)
                    self.counters.duplicates += 1
                    log.info("%s: same bytes as document %d, indexed once", job.path, existing)
                return None
        cached = self.cache.get(sha)
        if cached is None:
            head = f.read(parse.HEAD_BYTES)
            kind = parse.kind_of(path, head)
            if kind is None:
                raise parse.unsupported(path, head)
            if kind in OCR_LANE_KINDS:
                parsed = self._ocr(job)  # by name: the OCR daemon checks where it leads itself
            else:
                parsed = parse.to_markdown(path, kind, self.s.max_file_bytes, f, self.docx_limits)
            try:
                after = path.stat()
            except FileNotFoundError:
                raise Stale("the file went while it was read") from None
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                raise Stale("the file changed while it was read")
            cached = self.cache.put(sha, parsed.markdown, parsed.title, parsed.pages, kind)
        chunks = chunking.chunk_markdown(cached.markdown, self.tokenizer.count, self.chunk_tokens, self.overlap)
        if not chunks:
            raise Permanent("no text found (an empty document, or a scan OCR could not read)")
        doc = NewDocument(collection=job.collection, sha256=sha, title=cached.title, kind=cached.kind,
                          pages=cached.pages, bytes=before.st_size, markdown=str(cached.path))
        return Prepared(job, doc, chunks, started)

    def _ocr(self, job: Job) -> parse.Parsed:
        if not self.ocr_enabled:
            raise Permanent("PDFs and images need the OCR daemon, which is off ([ocr] enabled = false)")
        pages: list[str] = []
        final: dict[str, Any] = {}
        self.gate.wait(self._stop)
        call = self.bus.call("ocr", {"path": job.path}, timeout=self.s.call_timeout_s)
        try:
            for kind, data in call:
                if kind == "partial":
                    pages.append(str(data.get("markdown", "")))
                    with self.lock:
                        current = self.queue.current(job)
                    if not current:  # deleted or changed meanwhile: the rest of a long scan is not read
                        raise Stale(f"the file changed or went after {len(pages)} page(s) were read")
                else:
                    final = data
        finally:
            call.cancel()  # no effect once the FINAL came
        self.counters.ocr_pages += len(pages)
        markdown = "".join(pages)
        title = _first_line(markdown) or Path(job.path).stem
        return parse.Parsed(markdown=markdown, title=title, pages=int(final.get("pages", len(pages)) or len(pages)))

    # ---- stage 2: embed ------------------------------------------------------------

    def _embed(self, item: Prepared) -> None:
        texts = [c.text for c in item.chunks]
        rows: list[np.ndarray] = []
        start = 0
        while start < len(texts):
            # Inference still busy after the longest wait: a small batch, so it is held up briefly.
            size = self.s.embed_batch if self.gate.wait(self._stop) else max(1, self.s.embed_batch // 4)
            batch = texts[start:start + size]
            start += len(batch)
            parts, final = self.bus.call(self.embed_service, {"input": batch}, timeout=self.s.call_timeout_s).result()
            dim = int(final["dim"])
            for part in sorted(parts, key=lambda p: int(p["index"])):
                rows.append(np.frombuffer(part["vectors"], dtype="<f4").reshape(int(part["count"]), dim))
            if self._stop.is_set():
                raise Stale("stopping")
        item.vectors = np.vstack(rows)
        self._put(self.store_q, item)

    # ---- stage 3: store ------------------------------------------------------------

    def _store(self, item: Prepared) -> None:
        assert item.vectors is not None
        new_chunks = [NewChunk(c.seq, c.text, c.heading, c.page, c.page_end, c.tokens) for c in item.chunks]
        with self.lock:
            if not self.queue.current(item.job):
                log.info("%s changed while it was indexed: its newer version is queued", item.job.path)
                return
            doc_id = self.writer.replace(item.job.id, item.doc, new_chunks, item.vectors)
        self.counters.indexed += 1
        self.counters.chunks += len(new_chunks)
        now = time.monotonic()
        self.counters.recent.append(now)
        while self.counters.recent and now - self.counters.recent[0] > 60:
            self.counters.recent.popleft()
        log.info("indexed %s as document %d: %d chunk(s), %s page(s), %.2f s", item.job.path, doc_id,
                 len(new_chunks), item.doc.pages, now - item.started)

    # ---- shared --------------------------------------------------------------------

    def _stage(self, inbox: queue_mod.Queue[Prepared], work: Callable[[Prepared], None]) -> None:
        while not self._stop.is_set():
            try:
                item = inbox.get(timeout=WAIT_S)
            except queue_mod.Empty:
                continue
            try:
                work(item)
            except Exception as exc:
                self._failed(item.job, exc)

    def _put(self, q: queue_mod.Queue[Prepared], item: Prepared) -> None:
        while True:
            try:
                q.put(item, timeout=WAIT_S)
                return
            except queue_mod.Full:
                if self._stop.is_set():
                    raise Stale("stopping") from None

    def _hold(self) -> bool:
        """Whether to wait for space on the state disk (and say so once when it starts and ends)."""
        why = self.space.low()
        deferred: list[Job] = []
        with self.lock:
            was, self.paused = self.paused, why
            if why is None and was is not None:
                deferred, self._deferred = self._deferred, []
        if why is not None:
            if was is None:
                log.error("ingestion paused: %s; queued files wait and nothing is lost. It resumes by itself "
                          "once space is free.", why)
            return True
        if was is not None:
            log.warning("ingestion resumed: %.0f MiB free on the state disk", self.space.free() / (1024 * 1024))
            for job in deferred:
                self._put_back(job)
        return False

    def _disk_full(self, exc: BaseException, job: Job | None) -> None:
        self.space.full_error()
        log.error("%s: no space left on the state disk (%s): ingestion pauses", job.path if job else "claim",
                  exc)
        if job is not None:
            self._put_back(job)

    def _put_back(self, job: Job) -> None:
        try:
            self.queue.put_back(job, "waited for space on the state disk")
        except Exception as exc:  # noqa: BLE001 - the disk is still full: keep it for the resume
            if not is_full(exc):
                log.exception("%s: cannot queue it again (it is, at the next start)", job.path)
                return
            with self.lock:
                self._deferred.append(job)
            return
        self.queue.wake[job.lane].set()

    def _failed(self, job: Job, exc: Exception) -> None:
        if is_full(exc):
            self._disk_full(exc, job)
            return
        if isinstance(exc, NoWorker) and not self._stop.is_set():
            # The OCR or embedding daemon is not there (restarting, not started yet): not the
            # file's fault, so not counted against it; tried again after the first backoff.
            log.warning("%s waits: %s; tried again in %.0f s", job.path, exc, self.s.backoff_s)
            try:
                self.queue.put_back(job, f"waiting: {exc}", self.s.backoff_s)
                self.queue.wake[job.lane].set()
            except Exception:
                log.exception("%s: cannot queue it again (it is, at the next start)", job.path)
            return
        if isinstance(exc, Stale):
            if self._stop.is_set():
                return  # left `processing`: redone at the next start
            with self.lock:
                if self.queue.current(job) and not Path(job.path).exists():
                    self.writer.remove_file(job.id)
            log.info("%s: %s", job.path, exc)
            return
        permanent = isinstance(exc, (Permanent, parse.ParseError))
        if isinstance(exc, RemoteError) and exc.code in (400, 413, 415, 422):
            permanent = True  # the OCR daemon says this file cannot be read (corrupt, a bomb...)
        if isinstance(exc, (Permanent, parse.ParseError, BusError)):
            reason = str(exc)
        else:
            log.exception("%s: unexpected failure", job.path)
            reason = f"internal error: {type(exc).__name__}: {exc}"
        try:
            outcome = self.queue.fail(job, reason, permanent)
        except Exception:
            log.exception("%s: cannot record the failure (the job is retried at the next start)", job.path)
            return
        if outcome == "quarantined":
            self.counters.quarantined += 1
            log.warning("quarantined %s: %s", job.path, reason)
        elif outcome == "retry":
            self.counters.retried += 1
            log.warning("%s failed (attempt %d of %d), retried in %.0f s: %s", job.path, job.attempts,
                        self.s.max_attempts, self.queue.retry.delay(job.attempts), reason)

    def status_map(self) -> dict[str, Any]:
        c = self.counters
        return {"indexed": c.indexed, "duplicates": c.duplicates, "removed": c.removed, "retried": c.retried,
                "quarantined": c.quarantined, "chunks": c.chunks, "ocr_pages": c.ocr_pages,
                "paused": self.paused, "files_per_min": len(c.recent), "yielded_s": round(self.gate.waited_s, 1), "embed_queue": self.embed_q.qsize(), "store_queue": self.store_q.qsize(),
                "busy": dict(self.busy)}


def _like_prefix(path: str) -> str:
    escaped = path.rstrip("/").replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "/%"


def _first_line(markdown: str) -> str:
    for line in markdown.splitlines():
        line = line.strip().lstrip("#").strip()
        if line and not line.startswith("<!--"):
            return line[:200]
    return ""
