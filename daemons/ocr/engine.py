"""The OCR engine: a bounded queue of documents in front of a pool of worker processes.

One dispatcher thread (the shared daemons/feeder.py loop: progress for the watchdog and
the bus, and giving up after repeated failures) owns the pool. Each turn it applies deadlines, kills workers that
stopped reporting, replaces dead ones, hands queued documents to idle workers, then
waits on every worker's pipe and process sentinel at once and forwards what arrives:
a PARTIAL per page as it is read, then FINAL or ERROR. A worker that dies takes only
its current document with it.

Requests come from the bus's main thread (submit, cancel); they share the queue and the
set of cancelled ids with the dispatcher under one lock, which is also held while a
reply is sent, so nothing more goes out for a request once cancel() has returned.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from daemons.bus.errors import RequestError
from daemons.bus.worker import Emitter, Request
from daemons.feeder import Feeder, OnFeeder, TestHooks
from daemons.ocr import paths
from daemons.ocr.extract import LANGUAGES_RE, Job
from daemons.ocr.pool import PoolProcess
from daemons.ocr.settings import OcrSettings

log = logging.getLogger(__name__)

TURN_S = 0.5  # longest wait in one turn: bounds how stale the heartbeat (`beat`) gets
RATE_WINDOW_S = 30.0
# A worker that dies this soon after it started, before finishing any document, is
# restarted after a growing pause, so a broken install does not spin.
QUICK_DEATH_S = 10.0
RESPAWN_BACKOFF_MAX_S = 30.0


@dataclass
class Doc:
    req: Request
    job: Job
    queued_at: float
    started_at: float = 0.0
    last_report: float = 0.0  # when its worker last said anything about it
    pages_sent: int = 0
    aborted_at: float | None = None  # cancelled or past its deadline: waiting for the worker to let go


@dataclass
class Slot:
    """One place in the pool: a process, or the time to start the next one."""

    index: int
    proc: PoolProcess | None = None
    doc: Doc | None = None
    respawn_at: float = 0.0
    quick_deaths: int = 0


@dataclass
class Counters:
    documents_done: int = 0
    documents_failed: int = 0
    documents_cancelled: int = 0
    pages_done: int = 0
    ocr_pages: int = 0
    text_pages: int = 0
    restarts: int = 0
    recent: deque[float] = field(default_factory=deque)  # when each recent page arrived


def _int(body: dict[str, Any], key: str, default: int, low: int, high: int | None = None) -> int:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise RequestError(f'"{key}" must be an integer {bounds}, not {value!r}', 400)
    return value


def parse_job(body: Any, settings: OcrSettings) -> Job:
    """The request body as a Job, its path checked; RequestError says what is wrong."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be an object", 400)
    real = paths.check_path(body.get("path"), settings.allowed_dirs, settings.max_file_bytes)
    languages = body.get("languages", settings.languages)
    if not isinstance(languages, str) or not LANGUAGES_RE.fullmatch(languages):
        raise RequestError(f'"languages" must be tesseract pack names joined by "+", e.g. "eng+deu", not '
                           f"{languages!r}", 400)
    dpi = _int(body, "dpi", settings.dpi, settings.min_dpi, settings.max_dpi)
    first_page = _int(body, "first_page", 1, 1)
    max_pages = None if body.get("max_pages") is None else _int(body, "max_pages", 0, 1)
    return Job(path=str(real), languages=languages, dpi=dpi, first_page=first_page, max_pages=max_pages)


class OcrEngine(OnFeeder):
    def __init__(self, settings: OcrSettings, emitter: Emitter, stall_s: float = 2.0,
                 hooks: TestHooks | None = None) -> None:
        if settings.workers < 1 or settings.queue < 0:
            raise ValueError("OcrSettings: workers must be >= 1 and queue >= 0")
        self.settings = settings
        self.emit = emitter
        self._lock = threading.Lock()
        self._queue: deque[Doc] = deque()
        self._running: dict[str, Doc] = {}
        self._cancelled: set[str] = set()
        self._closing = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._slots = [Slot(i) for i in range(settings.workers)]
        self.feeder = Feeder(self._step, self._on_failure, stall_s=stall_s, hooks=hooks, name="ocr-dispatcher")
        self._started = False
        self.counters = Counters()
        self._snapshot: dict[str, Any] = {}
        self._refresh_snapshot()

    # -- Engine seam (bus main thread) ---------------------------------------------------

    def submit(self, request: Request) -> None:
        job = parse_job(request.body, self.settings)
        with self._lock:
            if self._closing:
                raise RequestError("the OCR daemon is stopping", 503)
            if len(self._queue) >= self.settings.queue:
                raise RequestError(f"the OCR queue is full ({len(self._queue)} documents waiting)", 503)
            self._queue.append(Doc(request, job, time.monotonic()))
        self._wake()

    def cancel(self, request_id: str) -> None:
        with self._lock:
            for doc in self._queue:
                if doc.req.id == request_id:
                    self._queue.remove(doc)
                    self.counters.documents_cancelled += 1
                    log.info("request %s cancelled while queued", request_id)
                    return
            if request_id in self._running:
                self._cancelled.add(request_id)
        self._wake()

    def start(self) -> None:
        log.info("OCR dispatcher starting: %d worker process(es), queue of %d", self.settings.workers,
                 self.settings.queue)
        self._started = True
        self.feeder.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._closing = True
        if not self._started:  # never started: nothing runs, nothing to answer
            self._wake_r.close()
            self._wake_w.close()
            return
        self._wake()
        if self.feeder.stop(timeout):
            self._shutdown()  # the dispatcher has ended: this thread owns the pool now
        else:
            log.warning("the OCR dispatcher did not stop within %.1f s; killing its workers", timeout)
            for slot in self._slots:
                if slot.proc is not None:
                    slot.proc.kill()

    def status(self) -> str:
        st = self._snapshot
        return (f"{st['busy']}/{st['workers']} workers busy, {st['queue']} queued; {st['pages']['done']} pages "
                f"({st['pages']['ocr']} OCR), {st['pages_per_s']:.2f} pages/s; {st['documents']['done']} documents "
                f"done, {st['documents']['failed']} failed; {st['restarts']} worker restarts")

    def status_map(self) -> dict[str, Any]:
        return dict(self._snapshot)

    # -- the dispatcher thread ----------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # a wake-up is pending already, or the engine has stopped
            pass

    def _step(self) -> None:
        try:
            self._turn()
        finally:
            self._refresh_snapshot()

    def _on_failure(self, exc: Exception) -> None:
        # The pool and its documents stay as they are; the next turn picks them up (the
        # feeder gives up, and the daemon restarts, if every turn fails).
        time.sleep(0.1)

    def _turn(self) -> None:
        self._apply_cancels()
        self._expire()
        self._watch()
        self._respawn()
        self._dispatch()
        self._wait()

    def _reply(self, doc: Doc, kind: str, *args: Any) -> None:
        """Send one reply for `doc`, unless it was cancelled or has been answered already."""
        with self._lock:
            if doc.aborted_at is not None or doc.req.id in self._cancelled:
                return
            if kind == "partial":
                self.emit.partial(doc.req.id, args[0])
            elif kind == "final":
                self.emit.final(doc.req.id, args[0])
            else:
                self.emit.error(doc.req.id, args[0], args[1])

    def _fail(self, doc: Doc, code: int, message: str) -> None:
        if doc.aborted_at is None and doc.req.id not in self._cancelled:
            self.counters.documents_failed += 1
        self._reply(doc, "error", code, message)

    def _abort(self, slot: Slot, why: str) -> None:
        """Stop the worker's document between pages; its pages are no longer sent."""
        doc = slot.doc
        assert doc is not None and slot.proc is not None
        if doc.aborted_at is None:
            doc.aborted_at = time.monotonic()
            slot.proc.send(("cancel", doc.req.id))
            log.info("request %s %s after %d page(s)", doc.req.id, why, doc.pages_sent)

    def _release(self, slot: Slot) -> None:
        """The slot's document is over: forget it."""
        doc = slot.doc
        slot.doc = None
        if doc is not None:
            with self._lock:
                self._running.pop(doc.req.id, None)
                self._cancelled.discard(doc.req.id)

    def _apply_cancels(self) -> None:
        with self._lock:
            cancelled = set(self._cancelled)
        for slot in self._slots:
            if slot.doc is not None and slot.doc.req.id in cancelled and slot.doc.aborted_at is None:
                with self._lock:  # cancel() counts queued ones under it too
                    self.counters.documents_cancelled += 1
                self._abort(slot, "cancelled")

    def _expire(self) -> None:
        now = time.time()
        expired: list[Doc] = []
        with self._lock:
            for doc in list(self._queue):
                if doc.req.deadline <= now:
                    self._queue.remove(doc)
                    expired.append(doc)
        for doc in expired:
            self._fail(doc, 504, f"the deadline passed while the document waited for a worker "
                                 f"({time.monotonic() - doc.queued_at:.1f} s in the queue)")
        for slot in self._slots:
            running = slot.doc
            if running is not None and running.aborted_at is None and running.req.deadline <= now:
                self._fail(running, 504, f"the deadline passed after {running.pages_sent} page(s) of the document "
                                         f"({time.monotonic() - running.started_at:.1f} s reading it)")
                self._abort(slot, "past its deadline")

    def _watch(self) -> None:
        """Kill workers that stopped reporting: stuck in a page, or ignoring a cancel."""
        limit = self.settings.page_timeout_s + self.settings.kill_grace_s
        now = time.monotonic()
        for slot in self._slots:
            doc, proc = slot.doc, slot.proc
            if doc is None or proc is None:
                continue
            if doc.aborted_at is not None:
                if now - doc.aborted_at > limit:
                    log.warning("worker %d did not let go of request %s %.0f s after it was stopped; killing it",
                                proc.pid, doc.req.id, now - doc.aborted_at)
                    self._replace(slot)
            elif now - doc.last_report > limit:
                page = doc.job.first_page + doc.pages_sent
                log.warning("worker %d silent for %.0f s on page %d of request %s; killing it", proc.pid,
                            now - doc.last_report, page, doc.req.id)
                self._fail(doc, 422, f"page {page} took longer than the page timeout "
                                     f"({self.settings.page_timeout_s:g} s)")
                self._replace(slot)

    def _replace(self, slot: Slot) -> None:
        assert slot.proc is not None
        slot.proc.kill()
        slot.proc = None
        slot.respawn_at = 0.0
        self.counters.restarts += 1
        self._release(slot)

    def _respawn(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if slot.proc is None and now >= slot.respawn_at and not self.feeder.stopping:
                slot.proc = PoolProcess(self.settings, f"ocr-worker-{slot.index}")
                log.debug("started OCR worker %d (pid %d)", slot.index, slot.proc.pid)

    def _dispatch(self) -> None:
        for slot in self._slots:
            if slot.proc is None or slot.doc is not None or not slot.proc.open:
                continue
            with self._lock:
                if not self._queue:
                    return
                doc = self._queue.popleft()
                self._running[doc.req.id] = doc
            if not slot.proc.send(("job", doc.req.id, doc.job)):
                with self._lock:  # the process is gone: the document waits for the next one
                    self._running.pop(doc.req.id, None)
                    self._queue.appendleft(doc)
                continue
            doc.started_at = doc.last_report = time.monotonic()
            slot.doc = doc

    def _wait(self) -> None:
        watched: list[Any] = [self._wake_r]
        for slot in self._slots:
            if slot.proc is not None:
                watched.append(slot.proc.proc.sentinel)
                if slot.proc.open:
                    watched.append(slot.proc.conn)
        ready = wait(watched, timeout=self._wait_timeout())
        if self._wake_r in ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except BlockingIOError:
                pass
        for slot in self._slots:
            if slot.proc is None:
                continue
            # Messages first: a worker may have finished its document just before it died.
            for message in slot.proc.receive():
                self._on_message(slot, message)
            if slot.proc.dead():
                self._on_death(slot)

    def _wait_timeout(self) -> float:
        now = time.monotonic()
        timeout = TURN_S
        for slot in self._slots:
            if slot.proc is None:
                timeout = min(timeout, max(0.0, slot.respawn_at - now))
        return timeout

    def _on_message(self, slot: Slot, message: tuple[Any, ...]) -> None:
        doc = slot.doc
        kind, job_id = message[0], message[1]
        if doc is None or job_id != doc.req.id:
            log.debug("stale %s message for %s from worker %d", kind, job_id, slot.proc.pid if slot.proc else 0)
            return
        now = time.monotonic()
        doc.last_report = now
        if kind == "page":
            data: dict[str, Any] = message[2]
            if doc.aborted_at is None:
                doc.pages_sent += 1
                c = self.counters
                c.pages_done += 1
                c.recent.append(now)
                if data["method"] == "ocr":
                    c.ocr_pages += 1
                else:
                    c.text_pages += 1
            self._reply(doc, "partial", data)
            return
        if kind == "done":
            summary: dict[str, Any] = message[2]
            if doc.aborted_at is None:
                self.counters.documents_done += 1
            self._reply(doc, "final", {**summary, "seconds": round(now - doc.started_at, 3)})
            log.info("request %s: %d page(s) (%d OCR) in %.1f s", job_id, summary["pages"], summary["ocr_pages"],
                     now - doc.started_at)
        elif kind == "error":
            code, text, detail = message[2], message[3], message[4]
            if detail:
                log.error("request %s failed in worker %d: %s", job_id, slot.proc.pid if slot.proc else 0, detail)
            else:
                log.info("request %s refused: %d %s", job_id, code, text)
            self._fail(doc, code, text)
        if slot.proc is not None:
            slot.proc.jobs_done += 1
        slot.quick_deaths = 0
        self._release(slot)

    def _on_death(self, slot: Slot) -> None:
        proc = slot.proc
        assert proc is not None
        how = proc.how_it_ended()
        proc.reap_group()
        doc = slot.doc
        if doc is not None:
            page = doc.job.first_page + doc.pages_sent
            log.error("OCR worker %d died (%s) on page %d of request %s", proc.pid, how, page, doc.req.id)
            self._fail(doc, 500, f"the OCR worker process died ({how}) on page {page}; perhaps out of memory?")
        elif not self.feeder.stopping:
            log.error("OCR worker %d died (%s) while idle", proc.pid, how)
        now = time.monotonic()
        if proc.jobs_done == 0 and now - proc.started < QUICK_DEATH_S:
            slot.quick_deaths += 1
            slot.respawn_at = now + min(RESPAWN_BACKOFF_MAX_S, 0.5 * 2 ** slot.quick_deaths)
        else:
            slot.respawn_at = now
        proc.close()
        slot.proc = None
        self.counters.restarts += 1
        self._release(slot)

    def _shutdown(self) -> None:
        with self._lock:
            queued = list(self._queue)
            self._queue.clear()
        for doc in queued:
            self._fail(doc, 503, "the OCR daemon is stopping")
        for slot in self._slots:
            if slot.doc is not None and slot.doc.aborted_at is None:
                self._fail(slot.doc, 503, "the OCR daemon is stopping")
                slot.doc.aborted_at = time.monotonic()
            if slot.proc is not None:
                slot.proc.send(("stop",))
        deadline = time.monotonic() + 2.0
        for slot in self._slots:
            if slot.proc is not None:
                slot.proc.proc.join(max(0.0, deadline - time.monotonic()))
                slot.proc.kill()
                slot.proc = None
            self._release(slot)
        self._wake_r.close()
        self._wake_w.close()
        self._refresh_snapshot()
        log.info("OCR engine stopped")

    # -- status ---------------------------------------------------------------------------------

    def _refresh_snapshot(self) -> None:
        c = self.counters
        now = time.monotonic()
        while c.recent and now - c.recent[0] > RATE_WINDOW_S:
            c.recent.popleft()
        with self._lock:
            queued = len(self._queue)
        processes = [{"pid": s.proc.pid if s.proc else None,
                      "request": s.doc.req.id if s.doc else None,
                      "page": s.doc.job.first_page + s.doc.pages_sent if s.doc else None} for s in self._slots]
        # A new dict each time: readers on other threads hold a consistent one.
        self._snapshot = {
            "workers": len(self._slots), "busy": sum(1 for s in self._slots if s.doc is not None),
            "queue": queued, "queue_limit": self.settings.queue,
            "documents": {"done": c.documents_done, "failed": c.documents_failed,
                          "cancelled": c.documents_cancelled},
            "pages": {"done": c.pages_done, "ocr": c.ocr_pages, "text": c.text_pages},
            "pages_per_s": round(len(c.recent) / RATE_WINDOW_S, 3),
            "restarts": c.restarts, "processes": processes,
        }
