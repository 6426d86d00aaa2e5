"""Resource faults: the state disk full (a small tmpfs as the state dir) and a memory
cgroup limit hit by one daemon.

Disk full: ingestion pauses and says why (log and status), files wait queued and none is
quarantined, calls answered meanwhile keep their ledger rows (in memory, written once
space is back), nothing is corrupted, and work resumes by itself when space returns.
Memory: the embedding daemon alone in a cgroup with a limit it then exceeds is killed
by the kernel; the rest of the suite goes on serving, and the daemon restarted is used."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons.index.schema import MIGRATIONS as INDEX_MIGRATIONS
from daemons.ledger import open_ledger
from daemons.store import Database
from tests.harness import Suite, write_config

EMBED = 'path = "all_minilm_l6_v2/all-MiniLM-L6-v2.f16.gguf"\nthreads = 1\n'
MEMORY_CGROUP = Path("/sys/fs/cgroup/memory")


def mount_tmpfs(path: Path, size_mb: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here to fill ({r.stderr.strip()}): needs root or CAP_SYS_ADMIN")


def fill(path: Path) -> Path:
    """Write a file until the filesystem has no space left at all."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096):  # megabytes, then the last pages
            block = b"\0" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def rows(root: Path) -> dict[str, dict[str, object]]:
    db = Database(root / "state" / "index.db", readonly=True, migrations=INDEX_MIGRATIONS)
    try:
        return {str(r["path"]): r for r in db.rows("SELECT * FROM files")}
    finally:
        db.close()


def until(check: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def drop(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        p = folder / f"{name}.md"
        p.write_text(f"# {name}\n\nThe {name} report: " + " ".join(f"{name}w{i}" for i in range(40)) + "\n")
        out.append(p)
    return out


def embed(c: object, n: int) -> list[str]:
    ids = []
    for i in range(n):
        r = c.post("/v1/embeddings", json={"model": "minilm", "input": f"sentence {i}"})  # type: ignore[attr-defined]
        assert r.status_code == 200, r.text
        ids.append(r.headers["x-request-id"])
    return ids


@pytest.fixture
def small_disk() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="onebox-") as d:
        root = Path(d)
        mount_tmpfs(root / "state", 48)
        try:
            yield root
        finally:
            subprocess.run(["umount", "-l", str(root / "state")], check=False)


def test_a_full_state_disk_pauses_ingestion_keeps_the_ledger_and_resumes(small_disk: Path) -> None:
    root = small_disk
    inbox = root / "inbox" / "docs"
    extra = (f"[embeddings.minilm]\n{EMBED}[ocr]\nenabled = false\n"
             "[ingest]\nsettle_s = 0.2\nbackoff_s = 0.2\nbackoff_max_s = 1.0\nmax_attempts = 2\nmin_free_mb = 4\n"
             f'[collections.docs]\nfolder = "{inbox}"\n')
    suite = Suite(root, write_config(root, extra=extra))
    try:
        suite.start_documents(ocr=False)
        before = drop(inbox, [f"before{i}" for i in range(4)])
        until(lambda: all(rows(root).get(str(p), {}).get("state") == "indexed" for p in before), 120, "first files")
        with suite.client(timeout=60) as c:
            acked = embed(c, 8)
            filler = fill(root / "state")
            during = drop(inbox, [f"during{i}" for i in range(4)])
            status = suite.wait_status(lambda s: "state disk is full" in str(
                s["services"]["ingest"]["workers"][0].get("paused")), timeout=30, what="ingest to say it paused")
            print("ingest while full:", status["services"]["ingest"]["workers"][0]["paused"])
            # Answers go on while the ledger cannot write: their rows wait in memory.
            acked += embed(c, 8)
            r = c.post("/v1/chat/completions", json={"model": "smollm2", "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 200, r.text
            acked.append(r.headers["x-request-id"])
            time.sleep(3)  # several retries of the ledger and the ingestion stages meanwhile
            known = rows(root)
            assert not [p for p, r_ in known.items() if r_["state"] == "quarantined"], known
            assert not [p for p in during if known.get(str(p), {}).get("state") == "indexed"]
            os.unlink(filler)
            until(lambda: all(rows(root).get(str(p), {}).get("state") == "indexed" for p in during), 120,
                  "the files dropped while the disk was full")
            suite.wait_status(lambda s: s["services"]["ingest"]["workers"][0].get("paused") is None, timeout=30,
                              what="ingest to say it resumed")
            assert c.get("/v1/usage").status_code == 200  # flushes the ledger first
        log = suite.log_text("ingest")
        assert "ingestion paused: the state disk is full" in log and "ingestion resumed" in log
        assert "cannot write" in suite.log_text("router")  # the ledger said why it waited
        for child in suite.children.values():
            assert child.exit_code() is None, f"{child.name} {child.describe_exit()}"
    finally:
        suite.stop()
    ledger = open_ledger(root / "state" / "ledger.db", readonly=True)
    try:
        assert ledger.value("PRAGMA integrity_check") == "ok"
        counts = dict(ledger.all("SELECT request_id, count(*) FROM calls GROUP BY request_id"))
    finally:
        ledger.close()
    assert all(counts.get(i) == 1 for i in acked), {i: counts.get(i) for i in acked}
    db = Database(root / "state" / "index.db", readonly=True, migrations=INDEX_MIGRATIONS)
    try:
        assert db.value("PRAGMA integrity_check") == "ok"
        assert db.value("SELECT count(*) FROM files WHERE state = 'indexed'") == len(before) + len(during)
    finally:
        db.close()


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    if not os.access(MEMORY_CGROUP, os.W_OK):
        pytest.skip(f"no writable cgroup v1 memory controller at {MEMORY_CGROUP} (under systemd the units' "
                    "MemoryMax= does this)")
    group = MEMORY_CGROUP / f"onebox-test-{os.getpid()}"
    group.mkdir()
    try:
        yield group
    finally:
        for _ in range(50):  # empty once its process is gone
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_a_daemon_over_its_memory_limit_is_killed_alone_and_its_restart_is_used(
        fresh_dir: Path, memory_cgroup: Path) -> None:
    """The ingestion daemon in a cgroup with 64 MiB more than it holds, given a 120 MB text
    file (under max_file_bytes: it must read it to index it)."""
    inbox = fresh_dir / "inbox" / "docs"
    extra = (f"[embeddings.minilm]\n{EMBED}[ocr]\nenabled = false\n[ingest]\nsettle_s = 0.2\n"
             f'[collections.docs]\nfolder = "{inbox}"\n')
    suite = Suite(fresh_dir, write_config(fresh_dir, extra=extra))
    try:
        suite.start_documents(ocr=False)
        ingest = suite.children["ingest"]
        (memory_cgroup / "cgroup.procs").write_text(str(ingest.pid))
        usage = int((memory_cgroup / "memory.usage_in_bytes").read_text())
        (memory_cgroup / "memory.limit_in_bytes").write_text(str(usage + (64 << 20)))
        inbox.mkdir(parents=True, exist_ok=True)
        big = inbox / "huge.txt"
        line = ("The quick brown fox jumps over the lazy dog. " * 20 + "\n").encode()
        with open(big, "wb") as f:
            for _ in range(120_000_000 // len(line)):
                f.write(line)
        until(lambda: ingest.exit_code() is not None, 120, "the kernel to kill the ingestion daemon")
        assert ingest.exit_code() == -signal.SIGKILL, ingest.describe_exit()
        assert int((memory_cgroup / "memory.failcnt").read_text()) > 0
        with suite.client(timeout=120) as c:
            chat = c.post("/v1/chat/completions", json={"model": "smollm2", "max_tokens": 4,
                                                        "messages": [{"role": "user", "content": "Hi"}]})
            assert chat.status_code == 200, chat.text
            assert embed(c, 2)
            assert c.post("/v1/search", json={"query": "fox"}).status_code == 200
        for name in ("router", "infer@smollm2", "embed@minilm"):
            assert suite.children[name].exit_code() is None, name
        big.unlink()  # what a sysadmin does about it (or raise max_file_bytes / the limit)
        suite.start_daemon("ingest")  # as systemd's Restart= would, outside the small cgroup
        small = drop(inbox, ["after"])
        until(lambda: rows(fresh_dir).get(str(small[0]), {}).get("state") == "indexed", 120, "the restart to index")
    finally:
        suite.stop()
