"""A hostile inbox: what anyone who can drop files can throw at the ingestion daemon.

One suite for the module (router, inference, embedding, OCR, ingestion, as
tests/test_ingest.py starts them) and one drop, all at once: empty, truncated and
encrypted PDFs, a 10,000-page PDF, PNG and JPEG decompression bombs, zip bombs named
.docx (honest, lying about their sizes, dense XML), binary junk and invalid UTF-8 named
.txt, 1 GB sparse files, links out of the inbox (to /etc/passwd, to a folder outside, up
through "..", a relative "../.." path, a loop, a dangling one), a named pipe, a file
written a few bytes at a time for a minute while the rest is processed, a file deleted
while it is being read, and SMALL_FILES small files at once (ONEBOX_HOSTILE_SMALL_FILES
sets the count: 10000 for the full run); then, with the daemon stopped, an inotify queue
overflow that drops the events of a burst of new files.

Checked: every file ends indexed or quarantined with a reason a person understands;
nothing outside the inbox is read into the index or the markdown cache; the slow file
is never read half-written; the deleted one leaves no trace and its OCR stops; no file
is lost to the overflow; no daemon dies, /ready is 200 and chat and search still answer
at the end; each daemon's memory (its whole process tree, sampled) stays under its
unit's MemoryMax=. The figures (times, peaks, reasons) are printed: run with -s.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.faults import hostile_files as hf
from tests.harness import Suite, write_config
from tests.ocr_docs import PAGES, png_claiming, scanned_pdf, text_pdf
from tests.test_ingest import GGUF, files, names, search, wait_done

REPO = Path(__file__).resolve().parents[2]
# ~30 files/s here (2 cores, the whole suite running): 2,500 keep the module near 120 s;
# the full 10,000 (ONEBOX_HOSTILE_SMALL_FILES=10000) took 342 s after the drop.
SMALL_FILES = int(os.environ.get("ONEBOX_HOSTILE_SMALL_FILES", "2500"))
SMALL_BUDGET_S = 60 + 0.1 * SMALL_FILES
SLOW_WRITE_S = 60.0  # how long the slow file is being written
SLOW_EVERY_S = 2.0
# 1.5 times what the kernel queues for one inotify instance (16,384 by default).
OVERFLOW_EVENTS = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text()) * 3 // 2
BURST_FILES = 50
DELETED_PAGES = 30  # of the scan deleted while it is read: OCR would take ~30 s to read it all
SECRET = "zanzibarquillsecret"  # only in files outside the inbox: never to be indexed
OUTSIDE = r"outside the inbox folder"
GB = 1 << 30

# name -> what it must end as: "indexed", "indexed|quarantined" (either, with a reason
# when quarantined), or a regex the quarantine reason must match.
EXPECTED: dict[str, str] = {
    "empty.pdf": r"^empty file$",
    "truncated.pdf": r"corrupt or truncated",
    "encrypted.pdf": r"PDF is encrypted",
    "pages10k.pdf": r"too many pages: 10000 to read, over max_pages = 2000 in \[ocr\]",
    "giant-page.pdf": r"too many pixels at 300 dpi: .* over max_pixels = 89,478,485 in \[ocr\]",
    "bomb.png": r"too many pixels \(2,500,000,000 pixels, over max_pixels = 89,478,485 in \[ocr\]",
    "bomb-warning.png": r"too many pixels \(100,000,000 pixels, over max_pixels",  # Pillow only warns here
    "bomb.jpg": r"too many pixels \(2,500,000,000 pixels, over max_pixels",
    "bomb.docx": r"docx expands to 1\.1 GB, over the limit of .*\(zip bomb\?\)",
    "lying.docx": r"unzips to more than the 1,000 bytes it declares \(zip bomb\?\)",
    "dense.docx": r"unzips to [\d,]+ times its size, over max_zip_ratio = 100 in \[ingest\] \(zip bomb\?\)",
    "encrypted.docx": r"password-protected \(encrypted\) Office document",
    "junk.txt": r"not UTF-8 or any text encoding",
    "junk-no-nul.txt": r"not UTF-8 or any text encoding",
    "latin1.txt": "indexed",
    "broken-utf8.txt": "indexed",  # stray invalid bytes in UTF-8 text: read as a legacy code page
    "huge.txt": r"file is 1\.1 GB \(1073741824 bytes\), over the limit of .* max_file_bytes in \[ingest\]",
    "huge.pdf": r"file is 1\.1 GB \(1073741824 bytes\), over the limit of .* max_file_bytes in \[ingest\]",
    "passwd.txt": OUTSIDE,
    "secret-link.txt": OUTSIDE,
    "dotdot.txt": OUTSIDE,
    "escape": OUTSIDE,  # a link to a folder outside
    "up": OUTSIDE,  # a link to ".."
    "loop.txt": r"leads nowhere",
    "dangling.txt": r"leads nowhere",
    "pipe.txt": r"named pipe",
    "notes/real.txt": "indexed",
    "alias.txt": "indexed",  # a link that stays inside the inbox is followed
}


def config_text(root: Path) -> str:
    return (f'[embeddings.minilm]\npath = "{GGUF}"\nthreads = 1\n'
            "[ocr]\nworkers = 1\n"
            "[ingest]\nsettle_s = 1.0\nbackoff_s = 0.2\nbackoff_max_s = 1.0\nmax_attempts = 3\n"
            "chunk_tokens = 128\nchunk_overlap = 16\n"
            f'[collections.docs]\nfolder = "{root / "inbox" / "docs"}"\n')


@dataclass
class Drop:
    suite: Suite
    inbox: Path
    outside: Path
    sampler: hf.MemorySampler
    slow: SlowWriter
    deleter: Deleter
    small: list[Path]
    small_written_s: float = 0.0
    dropped_at: float = field(default_factory=time.monotonic)


class SlowWriter(threading.Thread):
    """Writes a file a few bytes at a time for SLOW_WRITE_S, holding it open, and looks
    after each write whether the daemon has started on it (it must not have)."""

    def __init__(self, suite: Suite, path: Path) -> None:
        super().__init__(name="slow-writer", daemon=True)
        self.suite = suite
        self.path = path
        self.written = ""
        self.seen_early: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with open(self.path, "w") as f:
                end = time.monotonic() + SLOW_WRITE_S
                part = 0
                while time.monotonic() < end:
                    text = f"Slow part {part}. "
                    f.write(text)
                    f.flush()
                    self.written += text
                    part += 1
                    time.sleep(SLOW_EVERY_S)
                    row = files(self.suite).get(str(self.path))
                    if row is not None:
                        self.seen_early.append(f"after {part} parts: {row['state']}")
                tail = "The upload ends with the word quetzalfinale.\n"
                f.write(tail)
                self.written += tail
        except BaseException as exc:  # reported by the test that joins it
            self.error = exc


class Deleter(threading.Thread):
    """Deletes a file as soon as the daemon has started reading it."""

    def __init__(self, suite: Suite, path: Path) -> None:
        super().__init__(name="deleter", daemon=True)
        self.suite = suite
        self.path = path
        self.deleted_at: float | None = None
        self.states: list[str] = []

    def run(self) -> None:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            state = files(self.suite).get(str(self.path), {}).get("state")
            if not self.states or self.states[-1] != state:
                self.states.append(str(state))
            if state == "processing":
                self.path.unlink()
                self.deleted_at = time.monotonic()
                return
            time.sleep(0.02)


def build_corpus(inbox: Path, outside: Path) -> None:
    """Every hostile file but the slow one, the deleted one and the small ones."""
    (outside / "secret.txt").write_text(f"Private: the {SECRET} is kept outside the inbox.\n")
    (outside / "sub").mkdir()
    (outside / "sub" / "secret2.txt").write_text(f"Also private: {SECRET} two.\n")
    (inbox / "empty.pdf").write_bytes(b"")
    whole = text_pdf(outside / "whole.pdf", PAGES).read_bytes()
    (inbox / "truncated.pdf").write_bytes(whole[: len(whole) // 2])
    hf.encrypted_pdf(inbox / "encrypted.pdf")
    hf.many_pages_pdf(inbox / "pages10k.pdf", 10_000)
    (inbox / "giant-page.pdf").write_bytes(hf._pdf([b"<< /Type /Catalog /Pages 2 0 R >>",
                                                     b"<< /Type /Pages /Count 1 /Kids [3 0 R] >>",
                                                     b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 14400 14400] >>"]))
    png_claiming(inbox / "bomb.png", 50_000, 50_000)
    png_claiming(inbox / "bomb-warning.png", 10_000, 10_000)
    hf.jpeg_claiming(inbox / "bomb.jpg", 50_000, 50_000)
    hf.zip_bomb_docx(inbox / "bomb.docx")
    hf.lying_docx(inbox / "lying.docx")
    hf.dense_xml_docx(inbox / "dense.docx", 24)
    (inbox / "encrypted.docx").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + os.urandom(4096))
    (inbox / "junk.txt").write_bytes(os.urandom(65536))
    (inbox / "junk-no-nul.txt").write_bytes(os.urandom(65536).replace(b"\0", b"\1"))
    latin1 = "Café crème brûlée, the menu of the quinoacrumble bistro.\n"
    (inbox / "latin1.txt").write_bytes(latin1.encode("cp1252"))
    (inbox / "broken-utf8.txt").write_bytes(b"Mostly fine text \xc3\x28 then \xa0\xa1 and \xf0\x28\x8c\xbc "
                                            b"about the marzipanorama exhibit.\n" * 20)
    for name in ("huge.txt", "huge.pdf"):
        with open(inbox / name, "wb") as f:
            if name.endswith(".pdf"):
                f.write(b"%PDF-1.7\n")
            f.truncate(GB)  # sparse: costs no disk
    os.symlink("/etc/passwd", inbox / "passwd.txt")
    os.symlink(outside / "secret.txt", inbox / "secret-link.txt")
    os.symlink(os.path.relpath(outside / "secret.txt", inbox), inbox / "dotdot.txt")  # "../../outside/secret.txt"
    os.symlink(outside / "sub", inbox / "escape")
    os.symlink("..", inbox / "up")
    os.symlink("loop.txt", inbox / "loop.txt")
    os.symlink(inbox / "nothing-here.txt", inbox / "dangling.txt")
    os.mkfifo(inbox / "pipe.txt")
    (inbox / "notes").mkdir()
    (inbox / "notes" / "real.txt").write_text("The harbour pilot logbook mentions the tugboat Vorgrimler.\n")
    os.symlink("notes/real.txt", inbox / "alias.txt")


@pytest.fixture(scope="module")
def drop() -> Iterator[Drop]:
    with tempfile.TemporaryDirectory(prefix="onebox-") as d:
        root = Path(d)
        # Heartbeats at 0.5 s (not the harness's 0.2): the drop keeps both cores busy, and
        # liveness is not what this module tests.
        suite = Suite(root, write_config(root, extra=config_text(root), heartbeat=0.5))
        sampler: hf.MemorySampler | None = None
        try:
            suite.start_documents()
            sampler = hf.MemorySampler({name: child.pid for name, child in suite.children.items()})
            sampler.start()
            inbox, outside = root / "inbox" / "docs", root / "outside"
            outside.mkdir()
            slow = SlowWriter(suite, inbox / "slow.txt")
            slow.start()
            # First in the OCR lane, and slow to read (pages of OCR): deleted mid-read.
            deleter = Deleter(suite, scanned_pdf(inbox / "deleted-mid-read.pdf",
                                                 [PAGES[i % len(PAGES)] for i in range(DELETED_PAGES)]))
            deleter.start()
            build_corpus(inbox, outside)
            many = inbox / "many"
            many.mkdir()
            t0 = time.monotonic()
            small = []
            for i in range(SMALL_FILES):
                p = many / f"n{i:05d}.txt"
                p.write_text(f"Note {i}: ledger entry smallfile{i}z was filed by the clerk.\n")
                small.append(p)
            yield Drop(suite, inbox, outside, sampler, slow, deleter, small, time.monotonic() - t0)
        finally:
            if sampler is not None:
                sampler.stop()
            suite.stop()


def test_a_file_deleted_while_it_is_read_leaves_no_trace(drop: Drop) -> None:
    drop.deleter.join(130)
    assert drop.deleter.deleted_at is not None, f"never seen processing: {drop.deleter.states}"
    path = str(drop.deleter.path)
    end = time.monotonic() + 60
    while path in files(drop.suite):
        assert time.monotonic() < end, files(drop.suite)[path]
        time.sleep(0.2)
    with drop.suite.client(timeout=120) as c:
        assert "deleted-mid-read.pdf" not in names(search(c, "sphinx of black quartz judge my vow", k=20))
        # Its OCR stopped with the file (no other file in the drop has a page to OCR).
        status: dict[str, Any] = {}
        end = time.monotonic() + 60
        while not status or status["busy"]:
            assert time.monotonic() < end, status
            status = c.get("/v1/status").json()["services"]["ocr"]["workers"][0]
            time.sleep(0.5)
        assert status["pages"]["ocr"] < DELETED_PAGES // 2, status


def test_every_hostile_file_ends_indexed_or_quarantined_with_its_reason(drop: Drop) -> None:
    rows = wait_done(drop.suite, [drop.inbox / n for n in EXPECTED], timeout=240)
    wrong = {}
    for name, want in EXPECTED.items():
        row = rows[str(drop.inbox / name)]
        state, reason = row["state"], row["reason"] or ""
        if want == "indexed":
            ok = state == "indexed"
        elif want == "indexed|quarantined":
            ok = state == "indexed" or bool(reason)
        else:
            ok = state == "quarantined" and re.search(want, reason) is not None
        if not ok:
            wrong[name] = (state, reason)
    assert not wrong, wrong
    print("\nquarantine reasons:")
    for name in EXPECTED:
        row = rows[str(drop.inbox / name)]
        print(f"  {name}: {row['state']} {row['reason'] or ''}")
    with drop.suite.client(timeout=120) as c:
        assert names(search(c, "quinoacrumble", mode="text")) == ["latin1.txt"]  # cp1252, read as such
        assert set(names(search(c, "marzipanorama", mode="text"))) == {"broken-utf8.txt"}
        assert set(names(search(c, "Vorgrimler", mode="text"))) <= {"real.txt", "alias.txt"}


def test_nothing_outside_the_inbox_is_read(drop: Drop) -> None:
    wait_done(drop.suite, [drop.inbox / n for n in ("passwd.txt", "secret-link.txt", "dotdot.txt", "escape", "up")],
              timeout=120)
    rows = files(drop.suite)
    # Nothing under a folder link is listed (watchdog does not follow it, nor does a rescan).
    assert not [p for p in rows if p.startswith((str(drop.inbox / "escape") + "/", str(drop.inbox / "up") + "/"))]
    assert not [p for p in rows if not p.startswith(str(drop.inbox) + "/")]
    with drop.suite.client(timeout=120) as c:
        assert search(c, SECRET, mode="text") == []
        assert SECRET not in str(search(c, f"{SECRET} kept outside the inbox", k=20))
    passwd_line = Path("/etc/passwd").read_text().splitlines()[0]
    cache = drop.suite.dir / "state" / "markdown"
    for md in cache.rglob("*.md"):
        text = md.read_text(errors="replace")
        assert SECRET not in text and passwd_line not in text, md


@pytest.mark.timeout(max(300, int(SMALL_BUDGET_S) + 60))
def test_many_small_files_at_once_are_all_indexed(drop: Drop) -> None:
    rows = wait_done(drop.suite, drop.small, timeout=SMALL_BUDGET_S, poll_s=1.0)
    took = time.monotonic() - drop.dropped_at
    assert {r["state"] for r in rows.values()} == {"indexed"}
    print(f"\n{SMALL_FILES} small files: written in {drop.small_written_s:.1f} s, all indexed "
          f"{took:.1f} s after the drop ({SMALL_FILES / took:.0f} files/s)")
    log = (drop.suite.dir / "ingest.log").read_text(errors="replace")
    print(f"inotify overflows handled: {log.count('inotify lost events')}")
    with drop.suite.client(timeout=120) as c:
        i = SMALL_FILES // 2
        assert names(search(c, f"smallfile{i}z", mode="text")) == [f"n{i:05d}.txt"]


def test_a_slowly_written_file_is_read_only_once_complete(drop: Drop) -> None:
    drop.slow.join(SLOW_WRITE_S + 60)
    assert not drop.slow.is_alive() and drop.slow.error is None, drop.slow.error
    assert drop.slow.seen_early == [], "read while still being written"
    row = wait_done(drop.suite, [drop.slow.path], timeout=60)[str(drop.slow.path)]
    assert row["state"] == "indexed", row
    with drop.suite.client(timeout=120) as c:
        assert names(search(c, "quetzalfinale", mode="text")) == ["slow.txt"]
        r = c.get(f"/v1/documents/{row['id']}/content")
        assert r.status_code == 200, r.text
        assert " ".join(r.text.split()) == " ".join(drop.slow.written.split())


def test_an_inotify_overflow_loses_no_file(drop: Drop) -> None:
    """The kernel's inotify queue (16,384 events by default) overflows while the daemon
    is stopped: the files whose events were dropped are still found."""
    ingest = drop.suite.children["ingest"]
    churn = drop.inbox / ".churn.tmp"  # an ignored name: only its events matter
    burst = drop.inbox / "burst"
    ingest.signal(signal.SIGSTOP)
    try:
        for i in range(OVERFLOW_EVENTS // 3):  # open, modify, close: never two alike in a row
            churn.write_text(str(i))
        burst.mkdir()
        paths = []
        for i in range(BURST_FILES):  # their events come after the overflow: dropped
            p = burst / f"b{i:03d}.txt"
            p.write_text(f"Burst file {i}: the overflowed word burstword{i}q.\n")
            paths.append(p)
    finally:
        ingest.signal(signal.SIGCONT)
    t0 = time.monotonic()
    rows = wait_done(drop.suite, paths, timeout=120)
    assert {r["state"] for r in rows.values()} == {"indexed"}
    log = (drop.suite.dir / "ingest.log").read_text(errors="replace")
    assert "Inotify queue overflowed" in log and "inotify lost events" in log
    print(f"\n{BURST_FILES} files created during an inotify overflow: indexed {time.monotonic() - t0:.1f} s later")


def test_no_daemon_died_and_the_suite_still_answers(drop: Drop) -> None:
    assert {name: child.exit_code() for name, child in drop.suite.children.items()} == \
        dict.fromkeys(drop.suite.children)
    with drop.suite.client(timeout=120) as c:
        assert c.get("/ready").status_code == 200
        # The first chat after minutes of idling has twice (of ~10 runs, under load) lost
        # its worker to missed heartbeats (503): the model's pages come back from disk. A
        # 503 is allowed once; the suite must answer the next.
        for attempt in range(2):
            r = c.post("/v1/chat/completions", json={
                "model": "smollm2", "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": "Say hello."}]})
            if r.status_code != 503:
                break
            print(f"\nchat attempt {attempt + 1}: 503 {r.text}")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        assert names(search(c, "which clerk filed ledger entry smallfile7z", k=5))[0] == "n00007.txt"
        status = c.get("/v1/status").json()["services"]["ingest"]["workers"][0]
        assert status["files"]["processing"] == 0 and status["files"]["queued"] == 0, status["files"]


def test_memory_stays_within_the_units_bounds(drop: Drop) -> None:
    bounds = {"ingest": hf.unit_memory_max(REPO / "units" / "onebox-ingest.service"),
              "ocr": hf.unit_memory_max(REPO / "units" / "onebox-ocr.service")}
    high = {name: hf.high_water(child.pid) for name, child in drop.suite.children.items()}
    peaks = dict(drop.sampler.stop())
    print(f"\nmemory over {drop.sampler.samples} samples (process tree, peak RSS; VmHWM of the daemon itself):")
    for name in peaks:
        print(f"  {name}: {peaks[name] / (1 << 20):.0f} MiB tree, {high[name] / (1 << 20):.0f} MiB VmHWM"
              + (f" (MemoryMax {bounds[name] / (1 << 20):.0f} MiB)" if name in bounds else ""))
    assert drop.sampler.samples > 10
    for name, limit in bounds.items():
        assert max(peaks[name], high[name]) < limit, (name, peaks[name], high[name], limit)
