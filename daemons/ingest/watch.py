"""Watching the inbox folders: which files are complete, which are gone.

watchdog gives the events: inotify on local filesystems, or a polling observer that
lists each folder every poll_interval_s (network filesystems, where inotify sees nothing;
`watch = "auto"` picks it for folders on NFS, CIFS, FUSE and the like). At start every
folder is rescanned, so files added or removed while the daemon was down are found.

A file is complete, and handed on, only once it has stopped changing:
- inotify: every open of it has been closed, and the last close was after a write
  (IN_CLOSE_WRITE), or it was renamed into the folder (a rename is atomic);
- otherwise (polling, files found at start): size and mtime unchanged for settle_s.
A file still open by a writer is never read, however long the writer pauses. Files
being written under a temporary name (".name", "*.part", "*.tmp", "*.crdownload", "~$*")
are ignored until renamed.

inotify's kernel queue holds 16,384 events by default; a burst bigger than the daemon
reads in time (thousands of files copied at once) overflows it and the events are lost.
watchdog then rebuilds its watches but replays nothing, and says so only in a log line:
the watcher listens for that line and lists every folder again, so no file is missed.
Open counts are unreliable after an overflow (a lost close), so a file open at that
moment waits for at most OVERFLOW_OPEN_DRIFT_S of quiet instead of OPEN_DRIFT_S.

Links are listed like files (a link to a folder too: watchdog does not follow it); the
pipeline refuses those that lead out of the inbox (daemons/ingest/inbox.py).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

log = logging.getLogger(__name__)

TICK_S = 0.25
RETRY_S = 2.0  # a file that could not be queued (the state disk full) is tried again this often
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "afs", "lustre", "sshfs")
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".download", ".swp", "~")
# An open count that never comes back to zero (an event lost to an inotify overflow)
# stops blocking a file whose size and mtime have not moved for this long.
OPEN_DRIFT_S = 300.0
OVERFLOW_OPEN_DRIFT_S = 30.0
INOTIFY_LOGGER = "watchdog.observers.inotify_c"  # where watchdog reports an overflow

Ready = Callable[[str, str, os.stat_result], None]  # path, collection, its stat
Gone = Callable[[str], None]  # a file's path, or a folder's: every file under it is gone
Known = Callable[[], dict[str, tuple[int | None, int | None]]]  # path -> size, mtime as last recorded


def ignored(path: Path) -> bool:
    name = path.name
    return name.startswith((".", "~$")) or name.endswith(TEMP_SUFFIXES)


def filesystem_type(path: Path) -> str:
    """The type of the filesystem `path` lies on, from /proc/self/mounts ("" if unknown)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    real = str(path.resolve())
    best, kind = "", ""
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind


def stat_entry(path: str | Path) -> os.stat_result:
    """os.stat; for a link that leads nowhere (its target missing, or a loop of links) the
    link's own lstat, so it is handed on like a file and refused with its reason rather
    than waited on for ever. FileNotFoundError when the entry itself is gone."""
    try:
        return os.stat(path)
    except OSError:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return st
        raise


def needs_polling(path: Path) -> bool:
    kind = filesystem_type(path)
    return kind in NETWORK_FS or kind.startswith("fuse")


def make_inbox(folder: Path) -> None:
    """Create a missing inbox folder (and missing parents) group-writable, so members of
    the daemon's group (onebox) can drop files in. (Not setgid: the units forbid setting
    it, RestrictSUIDSGID=yes; files dropped in stay readable as long as the dropper's
    umask leaves them world-readable, as the usual 022 does.)"""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for p in missing:
        try:
            os.chmod(p, 0o770)
        except OSError as exc:
            log.warning("cannot make %s group-writable: %s", p, exc)


@dataclass
class Pending:
    collection: str
    opens: int = 0
    closed_write: bool = False  # the last event was a close after writing, or a rename in
    # Written, created or renamed in since it was last handed on; an entry made only by an
    # open (a reader: this daemon hashing it, the OCR daemon) is dropped at its close.
    modified: bool = True
    changed_at: float = field(default_factory=time.monotonic)
    size: int = -1
    mtime_ns: int = -1
    open_drift_s: float = OPEN_DRIFT_S  # an open count older than this much quiet is not trusted
    retry_at: float = 0.0  # after queueing it failed (e.g. the state disk full): not before this


class Watcher:
    """Calls `ready(path, collection, stat)` once per completed version of a file and
    `gone(path)` when a file leaves an inbox, from its own thread."""

    def __init__(self, folders: dict[str, Path], ready: Ready, gone: Gone, *, mode: str = "auto",
                 poll_interval_s: float = 5.0, settle_s: float = 2.0, known: Known | None = None) -> None:
        self.folders = {name: folder.resolve() for name, folder in folders.items()}
        self.ready = ready
        self.gone = gone
        self.mode = mode
        self.poll_interval_s = poll_interval_s
        self.settle_s = settle_s
        self._pending: dict[str, Pending] = {}
        self._unqueued: dict[str, str] = {}  # path -> why queueing it failed (logged once per cause)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observers: list[BaseObserver] = []
        self._thread = threading.Thread(target=self._run, name="watch", daemon=True)
        self.methods: dict[str, str] = {}
        self.known = known  # for the rescan after an overflow (none: every file is pending again)
        self._overflowed = threading.Event()
        self._overflow_hook = _OverflowHook(self._overflowed)
        self.overflows = 0

    # ---- lifecycle -----------------------------------------------------------------

    def start(self, known: dict[str, tuple[int | None, int | None]]) -> None:
        """Watch every folder, then rescan them against `known` (path -> size, mtime as
        last recorded): new and changed files become pending, missing ones are gone."""
        handler = _Handler(self)
        hooked = logging.getLogger(INOTIFY_LOGGER)
        hooked.addHandler(self._overflow_hook)
        if not hooked.isEnabledFor(logging.WARNING):
            hooked.setLevel(logging.WARNING)  # else the line that tells of an overflow is never made
        for name, folder in self.folders.items():
            make_inbox(folder)
            polling = self.mode == "poll" or (self.mode == "auto" and needs_polling(folder))
            observer: BaseObserver = PollingObserver(timeout=self.poll_interval_s) if polling else Observer()
            observer.schedule(handler, str(folder), recursive=True)
            observer.daemon = True
            observer.start()
            self._observers.append(observer)
            self.methods[name] = "polling" if polling else "inotify"
            log.info("watching %s for collection %s (%s)", folder, name, self.methods[name])
        self.rescan(known)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        logging.getLogger(INOTIFY_LOGGER).removeHandler(self._overflow_hook)
        for observer in self._observers:
            observer.stop()
        for observer in self._observers:
            observer.join(timeout=5)
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def alive(self) -> bool:
        return self._thread.is_alive() and all(o.is_alive() for o in self._observers)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    # ---- what is where -------------------------------------------------------------

    def collection_of(self, path: Path) -> str | None:
        for name, folder in self.folders.items():
            if path == folder or folder in path.parents:
                return name
        return None

    def rescan(self, known: dict[str, tuple[int | None, int | None]]) -> tuple[int, int]:
        """List every folder: files not recorded, or recorded with another size or mtime,
        become pending; recorded files no longer there are gone. Returns (pending, gone)."""
        found: set[str] = set()
        added = 0
        for name, folder in self.folders.items():
            for root, dirs, files in os.walk(folder):
                # os.walk does not descend into a link to a folder; it is an entry of its own.
                links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for fname in files + links:
                    path = Path(root) / fname
                    if ignored(path):
                        continue
                    try:
                        st = stat_entry(path)
                    except OSError:
                        continue
                    found.add(str(path))
                    if known.get(str(path)) != (st.st_size, st.st_mtime_ns):
                        self._touch(str(path), name, closed=False, at=_changed_at(st))
                        added += 1
        # Including files of folders no longer configured: the index mirrors the inboxes.
        missing = [p for p in known if p not in found]
        for p in missing:
            self.gone(p)
        return added, len(missing)

    # ---- events (from watchdog's threads) ------------------------------------------

    def _touch(self, path: str, collection: str, *, closed: bool, opened: int = 0, at: float | None = None,
               modified: bool = True) -> None:
        with self._lock:
            p = self._pending.get(path)
            if p is None:
                p = self._pending[path] = Pending(collection, modified=modified)
            p.modified = p.modified or modified
            p.collection = collection
            p.opens = max(0, p.opens + opened)
            p.closed_write = closed
            p.changed_at = time.monotonic() if at is None else at

    def _event(self, kind: str, path: str) -> None:
        p = Path(path)
        collection = self.collection_of(p)
        if collection is None or ignored(p):
            if kind in ("deleted", "moved_from"):
                self.gone(path)
            return
        if kind in ("deleted", "moved_from"):
            with self._lock:
                self._pending.pop(path, None)
            self.gone(path)
        elif kind == "opened":
            self._touch(path, collection, closed=False, opened=1, modified=False)
        elif kind == "closed_write":
            self._touch(path, collection, closed=True, opened=-1)
        elif kind == "closed_nowrite":
            with self._lock:
                pending = self._pending.get(path)
                if pending is not None:
                    pending.opens = max(0, pending.opens - 1)
                    if not pending.opens and not pending.modified:
                        del self._pending[path]  # only read, never written
        elif kind == "moved_to":
            self._touch(path, collection, closed=True)
        else:  # created, modified
            with self._lock:
                pending = self._pending.get(path)
                opens = pending.opens if pending else 0
            self._touch(path, collection, closed=False, opened=0)
            with self._lock:
                self._pending[path].opens = opens

    def _dir_moved_in(self, path: str) -> None:
        collection = self.collection_of(Path(path))
        if collection is None:
            return
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for fname in files:
                full = Path(root) / fname
                if not ignored(full):
                    self._touch(str(full), collection, closed=True)

    # ---- the settle loop -----------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                if self._overflowed.is_set():
                    self._overflowed.clear()
                    self._after_overflow()
                self._settle()
            except Exception:  # a bug here must not stop the watching: logged, next tick
                log.exception("watcher tick failed")

    def _after_overflow(self) -> None:
        self.overflows += 1
        with self._lock:
            for p in self._pending.values():
                p.open_drift_s = min(p.open_drift_s, OVERFLOW_OPEN_DRIFT_S)
        added, gone = self.rescan(self.known() if self.known is not None else {})
        log.warning("inotify lost events (its queue overflowed): listed the inboxes again, %d file(s) to check, "
                    "%d gone", added, gone)

    def _settle(self) -> None:
        now = time.monotonic()
        with self._lock:
            items = list(self._pending.items())
        for path, p in items:
            if not p.modified or now < p.retry_at:
                continue  # open, not (yet) written; or queueing it failed a moment ago
            try:
                st = stat_entry(path)
            except FileNotFoundError:
                with self._lock:
                    self._pending.pop(path, None)
                continue
            except OSError as exc:
                log.warning("cannot stat %s: %s", path, exc)
                continue
            if (st.st_size, st.st_mtime_ns) != (p.size, p.mtime_ns):
                with self._lock:
                    p.size, p.mtime_ns = st.st_size, st.st_mtime_ns
                    if not p.closed_write:
                        p.changed_at = max(p.changed_at, min(now, _changed_at(st)))
                if not p.closed_write:
                    continue
            quiet = now - p.changed_at
            if p.opens > 0 and quiet < p.open_drift_s:
                continue  # a writer still has it open
            if not p.closed_write and quiet < self.settle_s:
                continue
            with self._lock:
                if self._pending.get(path) is not p:
                    continue
                del self._pending[path]
            try:
                self.ready(path, p.collection, st)
            except Exception as exc:  # noqa: BLE001 - e.g. the state disk full: kept, tried next tick
                cause = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    # Back in, over an entry that only our own read of it made meanwhile.
                    current = self._pending.get(path)
                    if current is None or not current.modified:
                        self._pending[path] = p
                    p.retry_at = time.monotonic() + RETRY_S
                    new_cause = self._unqueued.get(path) != cause
                    self._unqueued[path] = cause
                if new_cause:
                    log.warning("%s: cannot queue it yet (%s); tried again until it can be", path, cause,
                                exc_info=not isinstance(exc, OSError) and "full" not in cause)
                continue
            if self._unqueued:
                with self._lock:
                    self._unqueued.pop(path, None)


def _changed_at(st: os.stat_result) -> float:
    """The file's mtime on the monotonic clock (how long ago it last changed)."""
    return time.monotonic() - max(0.0, time.time() - st.st_mtime_ns / 1e9)


class _OverflowHook(logging.Handler):
    """Hears watchdog's "Inotify queue overflowed" warning (its only report of one)."""

    def __init__(self, flag: threading.Event) -> None:
        super().__init__(logging.WARNING)
        self.flag = flag

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.flag.set()


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher) -> None:
        self.w = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        src = os.fsdecode(event.src_path)
        if isinstance(event, DirMovedEvent):
            self.w._event("moved_from", src)  # what was known under it goes
            for known in list(self.w._pending):
                if known.startswith(src.rstrip("/") + "/"):
                    self.w._event("moved_from", known)
            self.w._dir_moved_in(os.fsdecode(event.dest_path))
            return
        if isinstance(event, DirDeletedEvent):
            self.w._event("deleted", src)
            return
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            self.w._event("moved_from", src)
            self.w._event("moved_to", os.fsdecode(event.dest_path))
        elif isinstance(event, FileDeletedEvent):
            self.w._event("deleted", src)
        elif isinstance(event, FileClosedEvent):
            self.w._event("closed_write", src)
        elif isinstance(event, FileClosedNoWriteEvent):
            self.w._event("closed_nowrite", src)
        elif isinstance(event, FileOpenedEvent):
            self.w._event("opened", src)
        elif isinstance(event, (FileCreatedEvent, FileModifiedEvent)):
            self.w._event("modified", src)
