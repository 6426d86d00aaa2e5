"""The state disk's free space. Ingestion writes index.db and the markdown cache there;
when the disk is nearly full it pauses — before SQLite or a cache write hits ENOSPC —
says why in its log and status, and resumes by itself once space is back. Files wait in
the queue meanwhile: a full disk is never counted as a file's failed attempt, so nothing
is quarantined for it. A write that hits a full disk anyway (another process filled it
between two checks) pauses ingestion the same way and its file is queued again."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import apsw

MIB = 1024 * 1024
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
RETRY_S = 5.0  # after a write failed on a full disk: how soon one is tried again


def is_full(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it) is the disk being full."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, apsw.FullError) or (isinstance(exc, OSError) and exc.errno in FULL_ERRNOS):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class Space:
    def __init__(self, path: Path, min_free_bytes: int) -> None:
        self.path = path
        self.min_free_bytes = min_free_bytes
        self._failed_at = 0.0

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def full_error(self) -> None:
        """A write just failed for want of space."""
        self._failed_at = time.monotonic()

    def low(self) -> str | None:
        """Why ingestion must wait, or None when it may go on."""
        try:
            free = self.free()
        except OSError as exc:
            return f"cannot read the free space of {self.path}: {exc.strerror}"
        if free < self.min_free_bytes:
            return (f"the state disk is full: {free / MIB:.0f} MiB free in {self.path}, below "
                    f"[ingest] min_free_mb = {self.min_free_bytes // MIB}")
        if time.monotonic() - self._failed_at < RETRY_S:
            return f"the state disk is full: a write to {self.path} failed with no space left ({free / MIB:.0f} MiB free now)"
        return None
