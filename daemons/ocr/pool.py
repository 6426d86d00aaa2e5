"""The pool's processes: one document at a time each, talking to the parent over a Pipe.

Processes are spawned, not forked: the parent runs ZeroMQ and threads, and a forked
copy of those is not safe to use. Each worker leads its own process group, so killing
the group also ends a tesseract it left running, and SIGINT from a terminal reaches
only the parent, which decides what happens to the work.

Parent to worker: ("job", id, Job), ("cancel", id), ("stop",).
Worker to parent: ("page", id, message), then ("done", id, summary) or ("error", id,
code, message, detail) or, after a cancel, ("cancelled", id).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
import traceback
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any

from daemons.bus.errors import RequestError
from daemons.ocr import extract
from daemons.ocr.extract import Job
from daemons.ocr.settings import OcrSettings

log = logging.getLogger(__name__)

JOIN_AFTER_KILL_S = 2.0
_ctx: SpawnContext = multiprocessing.get_context("spawn")


class PoolProcess:
    """The parent's handle on one worker process."""

    def __init__(self, settings: OcrSettings, name: str) -> None:
        self.conn, child = _ctx.Pipe(duplex=True)
        self.proc: SpawnProcess = _ctx.Process(target=child_main, args=(child, settings), name=name, daemon=True)
        self.proc.start()
        child.close()
        self.started = time.monotonic()
        self.jobs_done = 0
        self.open = True  # False once the pipe said EOF: only the sentinel is watched then

    @property
    def pid(self) -> int:
        return self.proc.pid or 0

    def send(self, message: tuple[Any, ...]) -> bool:
        if not self.open:
            return False
        try:
            self.conn.send(message)
            return True
        except OSError:  # the process is gone; its sentinel says so next
            self.open = False
            return False

    def receive(self) -> list[tuple[Any, ...]]:
        """Every message waiting in the pipe, without blocking."""
        messages: list[tuple[Any, ...]] = []
        try:
            while self.open and self.conn.poll():
                messages.append(self.conn.recv())
        except (EOFError, OSError):
            self.open = False
        return messages

    def dead(self) -> bool:
        return self.proc.exitcode is not None

    def how_it_ended(self) -> str:
        code = self.proc.exitcode
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"signal {-code}, {signal.Signals(-code).name}"
            except ValueError:
                return f"signal {-code}"
        return f"exit status {code}"

    def kill(self) -> None:
        """SIGKILL the worker and whatever it started (tesseract), and reap it."""
        pid = self.proc.pid
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:  # no group yet (not set up) or no longer: the process alone
                pass
        self.proc.kill()
        self.proc.join(JOIN_AFTER_KILL_S)
        if not self.dead():
            log.warning("OCR worker %d still there %.0f s after SIGKILL (stuck in the kernel?)", pid or 0,
                        JOIN_AFTER_KILL_S)
        self.close()

    def reap_group(self) -> None:
        """After the worker died on its own: end a tesseract it left orphaned."""
        if self.proc.pid:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass

    def close(self) -> None:
        self.open = False
        self.conn.close()
        if self.dead():
            self.proc.close()


# -- the worker process ----------------------------------------------------------------


class _ParentGone(Exception):
    pass


def _send(conn: Connection, message: tuple[Any, ...]) -> None:
    try:
        conn.send(message)
    except OSError as exc:
        raise _ParentGone from exc


def child_main(conn: Connection, settings: OcrSettings) -> None:
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if settings.nice:
        os.nice(settings.nice)
    extract.configure_process(settings)
    stopping = False
    try:
        while not stopping:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            if message[0] == "job":
                stopping = _run(conn, message[1], message[2], settings)
            elif message[0] == "stop":
                stopping = True
            # A "cancel" for a job that already ended crossed its reply; nothing to do.
    except _ParentGone:
        return


def _run(conn: Connection, job_id: str, job: Job, settings: OcrSettings) -> bool:
    """Read one document, reporting as it goes; True when the parent asked to stop."""
    cancelled = stopping = False

    def should_stop() -> bool:
        nonlocal cancelled, stopping
        try:
            while conn.poll():
                message = conn.recv()
                if message[0] == "stop":
                    stopping = True
                elif message[0] == "cancel" and message[1] == job_id:
                    cancelled = True
        except (EOFError, OSError) as exc:
            raise _ParentGone from exc
        return cancelled or stopping

    pages = ocr_pages = words = 0
    weighted = 0.0
    try:
        for page in extract.read_document(job, settings, should_stop):
            _send(conn, ("page", job_id, page.message()))
            pages += 1
            if page.method == "ocr":
                ocr_pages += 1
                if page.confidence is not None:
                    weighted += page.confidence * page.words
                    words += page.words
        if should_stop():
            _send(conn, ("cancelled", job_id))
        else:
            _send(conn, ("done", job_id, {"pages": pages, "ocr_pages": ocr_pages, "text_pages": pages - ocr_pages,
                                          "mean_confidence": round(weighted / words, 1) if words else None}))
    except RequestError as exc:
        _send(conn, ("error", job_id, exc.code, exc.message, None))
    except _ParentGone:
        raise
    except Exception:
        _send(conn, ("error", job_id, 500, "internal error in the OCR worker", traceback.format_exc()))
    return stopping
