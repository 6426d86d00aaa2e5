"""`onebox backup` / `onebox restore` on real databases made by the real schema modules
and writers (index, ledger with its writer thread, keys), no daemons: a backup taken
while the ledger is being written is consistent, a restore into another place brings
back rows, keys, search results and an inbox the watcher finds unchanged, and damaged,
future-version, busy and non-empty cases are refused with clear messages."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import apsw
import numpy as np
import pytest

from daemons.backup import running
from daemons.backup.layout import SECTIONS, Layout
from daemons.config import load
from daemons.ctl import backup_cmd, restore_cmd
from daemons.index.search import Searcher
from daemons.index.write import IndexWriter, NewChunk, NewDocument, open_index
from daemons.ingest.cache import MarkdownCache
from daemons.ingest.queue import JobQueue, Retry
from daemons.ingest.watch import Watcher
from daemons.ledger import CallRecord, KeyStore, Ledger, load_secret, open_keys
from daemons.store import Database

DIMS = 8
TEXTS = {"apollo.txt": "The Apollo guidance computer flew to the moon.",
         "notes/basalt.md": "# Basalt\n\nBasalt is a volcanic rock rich in iron."}


@dataclass
class Box:
    root: Path
    config: Path
    key: str

    @property
    def state(self) -> Path:
        return self.root / "state"

    def layout(self) -> Layout:
        return Layout.of(load(self.config, env={}, sections=SECTIONS), self.config)


def write_config(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "onebox.toml"
    path.write_text(f'[paths]\nruntime_dir = "{root / "run"}"\nstate_dir = "{root / "state"}"\n'
                    "[collections.docs]\n")
    return path


def vector(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIMS).astype("<f4")


def call(i: int) -> CallRecord:
    return CallRecord(f"req-{i}", 1_700_000_000.0 + i, "alice", "interactive", "smollm2", "local", "smollm2",
                      "chat", 10, 5, 0, 0.001, 0.1, 0.2, 200)


def make_box(root: Path, calls: int = 5) -> Box:
    """A state as the daemons leave it: an inbox with files, their documents in index.db
    (with the knn table), the markdown cache, calls in ledger.db, a key in keys.db."""
    config = write_config(root)
    state = root / "state"
    inbox = state / "inbox" / "docs"
    db = open_index(state / "index.db")
    writer = IndexWriter(db)
    writer.set_collections([("docs", str(inbox), False)])
    writer.prepare_vectors("test-model", DIMS, "exact")
    queue = JobQueue(db, threading.RLock(), Retry())
    cache = MarkdownCache(state / "markdown")
    for n, (rel, text) in enumerate(TEXTS.items()):
        path = (inbox / rel).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        st = path.stat()
        queue.seen(str(path), "docs", "text", st.st_size, st.st_mtime_ns)
        file_id = int(db.value("SELECT id FROM files WHERE path = ?", (str(path),)))
        sha = f"{n:064x}"
        cached = cache.put(sha, text, rel, None, "text")
        writer.replace(file_id, NewDocument("docs", sha, rel, "text", None, st.st_size, str(cached.path)),
                       [NewChunk(0, text, "", None, None, 12)], np.stack([vector(n)]))
    db.close()
    ledger = Ledger(state / "ledger.db", flush_s=0.01)
    ledger.open()
    for i in range(calls):
        ledger.record(call(i))
    ledger.close()
    keys_db = open_keys(state / "keys.db")
    _, key = KeyStore(keys_db, load_secret(state / "keys.secret")).create("alice", "laptop")
    keys_db.close()
    return Box(root, config, key)


def rows(path: Path, table: str) -> list[tuple[object, ...]]:
    db = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return list(db.execute(f"SELECT * FROM {table} ORDER BY rowid"))
    finally:
        db.close()


def backup(box: Box, out: Path, *extra: str) -> int:
    return backup_cmd.main([str(out), "--config", str(box.config), *extra])


def restore(config: Path, archive: Path, *extra: str) -> int:
    return restore_cmd.main([str(archive), "--config", str(config), *extra])


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return make_box(tmp_path / "a")


@pytest.fixture
def archive(box: Box, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp_path / "b.tar"
    assert backup(box, out) == 0
    capsys.readouterr()
    return out


def rewrite(src: Path, dest: Path, manifest_edit: object = None, data_edit: str | None = None) -> None:
    """A copy of an archive with its manifest changed (a callable on the dict) or one
    byte of member `data_edit` flipped."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tout:
        for m in tin.getmembers():
            f = tin.extractfile(m)
            assert f is not None
            data = f.read()
            if m.name == "manifest.json" and callable(manifest_edit):
                raw = json.loads(data)
                manifest_edit(raw)
                data = json.dumps(raw).encode()
                m.size = len(data)
            if m.name == data_edit:
                data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
            tout.addfile(m, io.BytesIO(data))


# ---- backup --------------------------------------------------------------------------

def test_backup_while_the_ledger_is_written_is_a_consistent_prefix(box: Box, tmp_path: Path) -> None:
    ledger_db = box.state / "ledger.db"
    # A few thousand rows first, so the copy takes long enough to overlap the writes.
    db = Database(ledger_db)
    with db.transaction():
        for i in range(5, 20_000):
            db.execute("INSERT INTO calls (request_id, at, principal, principal_class, model, provider, served_by, "
                       "kind, cost, duration_s, status) VALUES (?, ?, 'bob', 'batch', 'm', 'local', 'm', 'chat', "
                       "0, 0, 200)", (f"bulk-{i}", float(i)))
    db.close()
    ledger = Ledger(ledger_db, flush_s=0.001, batch=7)
    ledger.open()
    stop = threading.Event()
    written = [0]

    def write() -> None:
        i = 100_000
        while not stop.is_set():
            ledger.record(call(i))
            i += 1
            written[0] += 1
            time.sleep(0.0005)
    writer = threading.Thread(target=write)
    writer.start()
    try:
        while written[0] < 50:
            time.sleep(0.01)
        before = len(rows(ledger_db, "calls"))
        assert backup(box, tmp_path / "b.tar") == 0
        time.sleep(0.05)
    finally:
        stop.set()
        writer.join()
        ledger.close()
    final = rows(ledger_db, "calls")
    with tarfile.open(tmp_path / "b.tar") as tar:
        member = tar.extractfile("state/ledger.db")
        assert member is not None
        (tmp_path / "copy.db").write_bytes(member.read())
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    copy = apsw.Connection(str(tmp_path / "copy.db"))
    assert [r[0] for r in copy.execute("PRAGMA integrity_check")] == ["ok"]
    copy.close()
    got = rows(tmp_path / "copy.db", "calls")
    # Every row committed before the backup is in it, and it is exactly the first rows
    # of the ledger as it went on: one commit's state, no holes, nothing half-written.
    assert before <= len(got) < len(final)
    assert got == final[:len(got)]
    assert [r[0] for r in got] == list(range(1, len(got) + 1))
    assert manifest["databases"]["ledger.db"]["counts"] == {"calls": len(got)}
    assert manifest["databases"]["index.db"]["migrations"] == ["0001-index", "0002-fts-vocab"]


def test_backup_archive_layout_manifest_and_mode(box: Box, archive: Path) -> None:
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600  # it holds keys.secret
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert names[-1] == "manifest.json"
    assert {"state/index.db", "state/ledger.db", "state/keys.db", "state/keys.secret", "config/onebox.toml",
            "inbox/docs/apollo.txt", "inbox/docs/notes/basalt.md"} <= set(names)
    assert sum(n.startswith("markdown/") for n in names) == 4  # .md and .json per document
    assert set(manifest["members"]) == set(names) - {"manifest.json"}
    assert manifest["onebox_version"] and manifest["hostname"] and manifest["created_at"] > 0
    assert manifest["databases"]["keys.db"]["counts"] == {"keys": 1}
    inbox_file = box.state / "inbox" / "docs" / "apollo.txt"
    assert manifest["members"]["inbox/docs/apollo.txt"]["mtime_ns"] == inbox_file.stat().st_mtime_ns
    assert not list(archive.parent.glob(".b.tar*"))  # no staging left behind


def test_backup_refuses_bad_names_and_existing_files(box: Box, archive: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert backup(box, archive) == 1
    assert "exists: pass --force" in capsys.readouterr().err
    assert backup(box, archive, "--force") == 0
    assert backup(box, tmp_path / "b.zip") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must end in .tar" in err
    assert backup(box, tmp_path / "nowhere" / "b.tar") == 1
    assert backup_cmd.main([str(tmp_path / "x.tar"), "--config", str(tmp_path / "missing.toml")]) == 78
    for cmd in (backup_cmd, restore_cmd):
        with pytest.raises(SystemExit) as exc:
            cmd.main(["--help"])
        assert exc.value.code == 0


def test_gzip_backup_verifies(box: Box, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.tar.gz"
    assert backup(box, out) == 0
    with open(out, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"
    assert restore_cmd.main([str(out), "--verify"]) == 0
    assert "every sha256 matches" in capsys.readouterr().out


# ---- restore -------------------------------------------------------------------------

def test_restore_into_a_fresh_box_elsewhere_brings_everything_back(box: Box, archive: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    fresh = write_config(tmp_path / "fresh")
    assert restore(fresh, archive, "--keep-config") == 0
    out = capsys.readouterr().out
    assert "ledger.db: 5 calls" in out and "inbox: 2 files" in out and "start the suite" in out
    new = tmp_path / "fresh" / "state"
    for name, table in (("ledger.db", "calls"), ("keys.db", "keys"), ("index.db", "chunks"),
                        ("index.db", "chunk_vectors"), ("index.db", "meta")):
        assert rows(new / name, table) == rows(box.state / name, table), (name, table)
    # Another state directory: the paths index.db records moved with it.
    old_files, new_files = rows(box.state / "index.db", "files"), rows(new / "index.db", "files")
    assert [str(r[1]).replace(str(box.state), str(new)) for r in old_files] == [r[1] for r in new_files]
    for doc in rows(new / "index.db", "documents"):
        assert str(doc[7]).startswith(str(new / "markdown")) and Path(str(doc[7])).is_file()
    # A key made before still authenticates, with the restored secret.
    keys = open_keys(new / "keys.db", readonly=True)
    info = KeyStore(keys, load_secret(new / "keys.secret")).authenticate(box.key)
    keys.close()
    assert info is not None and info.principal == "alice"
    assert stat.S_IMODE((new / "keys.secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((new / "index.db").stat().st_mode) == 0o600
    # Search answers the same.
    for state in (box.state, new):
        db = Database(state / "index.db", readonly=True)
        found = Searcher(db).search(text="volcanic basalt", vector=vector(1), collection="docs", k=2)
        db.close()
        if state == box.state:
            before = [(r["title"], r["text"], r["score"]) for r in found]
        else:
            assert [(r["title"], r["text"], r["score"]) for r in found] == before
            assert all(str(r["path"]).startswith(str(new)) for r in found)
    # The ingestion daemon's first rescan finds every file as recorded: nothing is
    # indexed again and, above all, nothing is dropped.
    db = open_index(new / "index.db")
    known = JobQueue(db, threading.RLock(), Retry()).known()
    db.close()
    seen: list[str] = []
    watcher = Watcher({"docs": new / "inbox" / "docs"}, lambda p, c, s: seen.append(p), seen.append, mode="poll")
    assert watcher.rescan(known) == (0, 0) and len(known) == 2
    assert not [p for p in new.rglob(".*")]  # no staging left behind


def test_restore_puts_the_config_back(box: Box, archive: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "etc" / "onebox.toml"
    target.parent.mkdir()
    target.write_text("# the fresh install's config\n")
    monkeypatch.setenv("ONEBOX_STATE_DIR", str(tmp_path / "other"))
    assert restore(target, archive) == 0
    out = capsys.readouterr().out
    assert target.read_bytes() == box.config.read_bytes()
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert (target.parent / "onebox.toml.before-restore").read_text() == "# the fresh install's config\n"
    assert f"written to {target}" in out and "re-run scripts/install" in out
    assert len(rows(tmp_path / "other" / "ledger.db", "calls")) == 5  # the environment's override applies


def test_restore_refuses_a_state_that_holds_something_unless_force(box: Box, archive: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    ledger = Ledger(box.state / "ledger.db", flush_s=0.01)
    ledger.open()
    ledger.record(call(99))  # made after the backup
    ledger.close()
    assert restore(box.config, archive) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty" in err and "ledger.db: 6 calls" in err and "--force" in err
    assert len(rows(box.state / "ledger.db", "calls")) == 6
    assert restore(box.config, archive, "--force") == 0
    assert len(rows(box.state / "ledger.db", "calls")) == 5  # back to the backup's
    assert "(unchanged)" in capsys.readouterr().out


def test_restore_onto_a_fresh_install_needs_no_force(box: Box, archive: Path, tmp_path: Path) -> None:
    """What a fresh install leaves (empty databases, a key secret no key was made with,
    an empty inbox) holds nothing to lose."""
    fresh = write_config(tmp_path / "fresh")
    state = tmp_path / "fresh" / "state"
    open_index(state / "index.db").close()
    Ledger(state / "ledger.db").open()
    KeyStore(open_keys(state / "keys.db"), load_secret(state / "keys.secret"))
    (state / "inbox" / "docs").mkdir(parents=True)
    assert restore(fresh, archive, "--keep-config") == 0
    keys = open_keys(state / "keys.db", readonly=True)
    assert KeyStore(keys, load_secret(state / "keys.secret")).authenticate(box.key) is not None
    keys.close()


def test_a_tampered_archive_is_refused_and_changes_nothing(archive: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.tar"
    rewrite(archive, bad, data_edit="state/ledger.db")
    fresh = write_config(tmp_path / "fresh")
    assert restore(fresh, bad, "--keep-config") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "state/ledger.db does not match its sha256" in err and "nothing was restored" in err
    assert not (tmp_path / "fresh" / "state").exists()
    assert restore_cmd.main([str(bad), "--verify"]) == 1
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(archive.read_bytes()[:archive.stat().st_size // 2])
    assert restore(fresh, truncated, "--keep-config") == 1
    assert "onebox restore:" in capsys.readouterr().err


def test_a_backup_from_a_newer_onebox_is_refused(archive: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    def newer(m: dict[str, object]) -> None:
        m["onebox_version"] = "9.9.9"
        dbs = m["databases"]
        assert isinstance(dbs, dict)
        dbs["ledger.db"]["migrations"].append("0099-future")
    future = tmp_path / "future.tar"
    rewrite(archive, future, manifest_edit=newer)
    fresh = write_config(tmp_path / "fresh")
    assert restore(fresh, future, "--keep-config") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "made by onebox 9.9.9 with migrations ledger.db: 0099-future; this is onebox 0.1.0" in err
    assert "upgrade onebox first" in err
    assert not (tmp_path / "fresh" / "state").exists()

    def format2(m: dict[str, object]) -> None:
        m["format"] = 2
    rewrite(archive, future, manifest_edit=format2)
    assert restore(fresh, future, "--keep-config") == 1
    assert "backup format 2" in capsys.readouterr().err


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[Path]:
    run = tmp_path / "fresh" / "run"
    run.mkdir(parents=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(run / "api.sock"))
    s.listen(1)
    try:
        yield run / "api.sock"
    finally:
        s.close()


def test_restore_refuses_while_the_suite_runs(archive: Path, tmp_path: Path, listening: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    fresh = write_config(tmp_path / "fresh")
    assert restore(fresh, archive, "--keep-config") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{listening} answers" in err and "systemctl stop onebox.target" in err
    assert restore(fresh, archive, "--keep-config", "--force") == 0
    assert "restart it now" in capsys.readouterr().out


def test_a_process_holding_a_database_counts_as_running(box: Box) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import apsw, sys, time; c = apsw.Connection(sys.argv[1]); "
         "c.execute('SELECT count(*) FROM calls').fetchall(); print('open', flush=True); time.sleep(60)",
         str(box.state / "ledger.db")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        reasons = running.busy(box.layout())
        assert any(f"pid {holder.pid} " in r and "ledger.db" in r for r in reasons), reasons
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert running.busy(box.layout()) == []


def test_a_backup_without_inbox_says_what_to_do(box: Box, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.tar"
    assert backup(box, out, "--no-inbox") == 0
    with tarfile.open(out) as tar:
        assert not [n for n in tar.getnames() if n.startswith("inbox/")]
    capsys.readouterr()
    assert restore(write_config(tmp_path / "fresh"), out, "--keep-config") == 0
    assert "put the collection folders back" in capsys.readouterr().out


def test_restore_as_root_gives_files_to_onebox(archive: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    import pwd
    try:
        user = pwd.getpwnam("onebox")
    except KeyError:
        pytest.skip("no onebox user here (scripts/install makes it; the system test checks this)")
    fresh = write_config(tmp_path / "fresh")
    assert restore(fresh, archive, "--keep-config") == 0
    state = tmp_path / "fresh" / "state"
    for p in (state / "keys.secret", state / "index.db", state / "inbox" / "docs" / "apollo.txt"):
        assert p.stat().st_uid == user.pw_uid, p


def test_odd_file_names_and_mtimes_come_back_exactly(box: Box, tmp_path: Path) -> None:
    inbox = box.state / "inbox" / "docs"
    odd = inbox / "sub dir" / "back\\slash é.txt"
    odd.parent.mkdir()
    odd.write_bytes(b"odd\n")
    os.utime(odd, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    assert backup(box, tmp_path / "b.tar") == 0
    assert restore(write_config(tmp_path / "fresh"), tmp_path / "b.tar", "--keep-config") == 0
    back = tmp_path / "fresh" / "state" / "inbox" / "docs" / "sub dir" / "back\\slash é.txt"
    assert back.read_bytes() == b"odd\n"
    assert back.stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert stat.S_IMODE(back.stat().st_mode) == stat.S_IMODE(odd.stat().st_mode)
