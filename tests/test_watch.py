"""The inbox watcher on real folders with watchdog's real observers: inotify and the
polling fallback, complete files only, rescans at start, deletions."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from daemons.ingest.watch import Watcher, ignored


class Seen:
    def __init__(self) -> None:
        self.ready: list[tuple[str, str, int]] = []
        self.gone: list[str] = []
        self.lock = threading.Lock()

    def on_ready(self, path: str, collection: str, st: os.stat_result) -> None:
        with self.lock:
            self.ready.append((path, collection, st.st_size))

    def on_gone(self, path: str) -> None:
        with self.lock:
            self.gone.append(path)

    def wait(self, what: str, check: object, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while not check():  # type: ignore[operator]
            assert time.monotonic() < end, f"timed out waiting for {what}: ready={self.ready} gone={self.gone}"
            time.sleep(0.05)


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_complete_files_only_renames_and_deletions(tmp_path: Path, mode: str) -> None:
    folder = tmp_path / "inbox"
    seen = Seen()
    w = Watcher({"docs": folder}, seen.on_ready, seen.on_gone, mode=mode, poll_interval_s=0.2, settle_s=1.0)
    w.start({})
    try:
        assert w.methods == {"docs": "polling" if mode == "poll" else "inotify"}
        path = folder / "big.txt"
        with open(path, "w") as f:
            f.write("x" * 1000)
            f.flush()
            time.sleep(2.5 if mode == "inotify" else 0.5)  # inotify: open longer than settle_s
            assert seen.ready == [], "a file still being written was handed on"
            f.write("y" * 1000)
        seen.wait("the finished file", lambda: seen.ready)
        assert seen.ready == [(str(path), "docs", 2000)]
        # A download under a temporary name, renamed when done: only the final name counts.
        part = folder / "report.pdf.part"
        part.write_bytes(b"%PDF" + b"0" * 100)
        os.rename(part, folder / "report.pdf")
        seen.wait("the renamed file", lambda: len(seen.ready) == 2)
        assert seen.ready[1][0] == str(folder / "report.pdf")
        (folder / "sub").mkdir()
        (folder / "sub" / "deep.md").write_text("# deep")
        seen.wait("a file in a subfolder", lambda: len(seen.ready) == 3)
        path.unlink()
        seen.wait("the deletion", lambda: str(path) in seen.gone)
        assert all(not ignored(Path(p)) for p, _, _ in seen.ready)
    finally:
        w.stop()


def test_rescan_at_start_finds_new_changed_and_missing_files(tmp_path: Path) -> None:
    folder = tmp_path / "inbox"
    folder.mkdir()
    same = folder / "same.txt"
    same.write_text("unchanged")
    changed = folder / "changed.txt"
    changed.write_text("new contents")
    (folder / "new.txt").write_text("added while down")
    (folder / ".hidden").write_text("skipped")
    old = time.time() - 60
    for p in folder.iterdir():
        os.utime(p, (old, old))
    st = same.stat()
    known = {str(same): (st.st_size, st.st_mtime_ns), str(changed): (1, 1), str(folder / "removed.txt"): (5, 5)}
    seen = Seen()
    w = Watcher({"docs": folder}, seen.on_ready, seen.on_gone, mode="inotify", settle_s=5.0)
    w.start(known)
    try:
        # Files last modified long ago are complete at once, without waiting settle_s.
        seen.wait("the rescan", lambda: len(seen.ready) == 2, timeout=3)
        assert sorted(Path(p).name for p, _, _ in seen.ready) == ["changed.txt", "new.txt"]
        assert seen.gone == [str(folder / "removed.txt")]
    finally:
        w.stop()
