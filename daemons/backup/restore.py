"""Restoring a backup (`onebox restore FILE`): read and check the manifest, stage and check
every member, then rename them into place (see stage.py)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import lzma
import os
import secrets
import shutil
import tarfile
import tomllib
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import apsw

from daemons import __version__
from daemons import config as config_mod
from daemons.backup import archive, layout
from daemons.backup.errors import BackupError
from daemons.backup.layout import Layout
from daemons.backup.manifest import Manifest, check_compatible
from daemons.backup.sqlite import as_int
from daemons.backup.stage import PRIVATE_DIR, PRIVATE_FILE, Owner, Staging
from daemons.config import Config, ConfigError
from daemons.store import Database, StoreError

# What a damaged or truncated archive raises while it is read.
DAMAGED = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)
# Room kept free beyond the restored bytes (the databases' -wal, the journal of the relocation).
SPARE = 64 * 1024 * 1024


@dataclass
class Backup:
    """An archive whose manifest has been read and checked against this onebox."""

    path: Path
    tar: tarfile.TarFile
    manifest: Manifest
    members: list[tarfile.TarInfo]  # in archive order, the manifest left out
    config_text: bytes

    @property
    def size(self) -> int:
        return sum(m.size for m in self.members)


@contextlib.contextmanager
def opened(path: Path) -> Iterator[Backup]:
    """The archive at `path`, with its manifest checked (pass one: headers only, which a
    plain tar skips through by seeking; a compressed one is read through once)."""
    if not path.is_file():
        raise BackupError(f"{path}: no such file")
    try:
        tar = tarfile.open(path, "r:*")
    except DAMAGED as exc:
        raise BackupError(f"{path}: not a tar archive, or damaged ({exc})") from None
    try:
        yield _check(path, tar)
    except DAMAGED as exc:
        raise BackupError(f"{path}: damaged or truncated ({type(exc).__name__}: {exc})") from None
    finally:
        tar.close()


def _check(path: Path, tar: tarfile.TarFile) -> Backup:
    members = tar.getmembers()
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise BackupError(f"{path}: a member appears twice: not an archive `onebox backup` wrote")
    found = {m.name: m for m in members}
    if layout.MANIFEST not in found:
        raise BackupError(f"{path}: no manifest.json: not a onebox backup")
    manifest = Manifest.from_json(_read(tar, found[layout.MANIFEST], 16 * 1024 * 1024), str(path))
    check_compatible(manifest, layout.known_migrations(), __version__, str(path))
    data = [m for m in members if m.name != layout.MANIFEST]
    listed, present = set(manifest.members), {m.name for m in data}
    if listed != present:
        extra, missing = sorted(present - listed), sorted(listed - present)
        raise BackupError(f"{path}: the archive and its manifest disagree (not listed: {', '.join(extra[:3]) or '-'}; "
                          f"missing: {', '.join(missing[:3]) or '-'}): damaged, or changed after it was made")
    for m in data:
        if not m.isreg() or not _kind_ok(m.name, manifest):
            raise BackupError(f"{path}: unexpected member {m.name!r}: not an archive `onebox backup` wrote")
        if m.size != manifest.members[m.name].size:
            raise BackupError(f"{path}: {m.name} is {m.size} bytes, the manifest says {manifest.members[m.name].size}:"
                              " damaged, or changed after it was made")
    if layout.CONFIG not in found:
        raise BackupError(f"{path}: no config/onebox.toml in the archive")
    config_text = _read(tar, found[layout.CONFIG], 16 * 1024 * 1024)
    _verify(path, layout.CONFIG, hashlib.sha256(config_text).hexdigest(), manifest)
    return Backup(path, tar, manifest, data, config_text)


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    if member.size > limit:
        raise BackupError(f"{member.name} is {member.size} bytes: not a onebox backup")
    f = tar.extractfile(member)
    if f is None:
        raise BackupError(f"{member.name} is not a regular file: not a onebox backup")
    with f:
        return f.read()


def _kind_ok(name: str, manifest: Manifest) -> bool:
    parts = layout.parts(name)
    if not parts:
        return False
    if name in (layout.CONFIG, layout.SECRET):
        return True
    if parts[0] == "state":
        return len(parts) == 2 and parts[1] in manifest.databases
    if parts[0] == layout.MARKDOWN:
        return len(parts) > 1
    if parts[0] == layout.INBOX:
        return len(parts) > 2 and parts[1] in manifest.collections
    return False


def _verify(path: Path, name: str, digest: str, manifest: Manifest) -> None:
    if digest != manifest.members[name].sha256:
        raise BackupError(f"{path}: {name} does not match its sha256 in the manifest: the archive is damaged or was "
                          "changed after it was made; nothing was restored")


# ---- what the restored box's config is ------------------------------------------------

def backup_config(backup: Backup, env: Mapping[str, str]) -> Config:
    """The backup's own config (with this environment's overrides), which restore puts
    back and whose paths it restores to."""
    source = f"{backup.path}:{layout.CONFIG}"
    try:
        raw = tomllib.loads(backup.config_text.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BackupError(f"{source}: not valid TOML ({exc})") from None
    try:
        config_mod.apply_env(raw, env)
    except ConfigError as exc:
        raise ConfigError(f"environment: {exc}") from None
    try:
        return config_mod.parse(raw, source, sections=layout.SECTIONS)
    except ConfigError as exc:
        raise BackupError(f"the backup's config does not read with this onebox ({exc}); upgrade onebox, or restore "
                          "with --keep-config") from None


# ---- is the target empty? ----------------------------------------------------------

def count_rows(spec: layout.DatabaseSpec) -> dict[str, int]:
    try:
        db = apsw.Connection(str(spec.path), flags=apsw.SQLITE_OPEN_READONLY)
    except apsw.Error as exc:
        raise BackupError(f"{spec.path}: cannot be read ({exc})") from None
    counts: dict[str, int] = {}
    try:
        for what, sql in spec.counts:
            try:
                counts[what] = as_int(db.execute(sql).fetchall()[0][0])
            except apsw.SQLError:
                counts[what] = 0  # created but not migrated: holds nothing
    except apsw.Error as exc:
        raise BackupError(f"{spec.path}: cannot be read ({exc})") from None
    finally:
        db.close()
    return counts


def contents(box: Layout) -> list[str]:
    """What the target state already holds ("ledger.db: 12 calls"), empty when nothing
    would be lost: a fresh install's empty databases and unused key secret count as empty."""
    found = []
    for spec in box.databases:
        if spec.path.exists():
            try:
                held = {k: v for k, v in count_rows(spec).items() if v}
            except BackupError as exc:
                found.append(str(exc))
                continue
            if held:
                found.append(f"{spec.name}: " + ", ".join(f"{v} {k}" for k, v in held.items()))
    n = _count_files(box.markdown)
    if n:
        found.append(f"markdown/: {n} files")
    for name, folder in box.inboxes.items():
        n = _count_files(folder)
        if n:
            found.append(f"inbox {name} ({folder}): {n} files")
    return found


def _count_files(top: Path) -> int:
    return sum(len([f for f in files if not f.startswith(".")]) for _, _, files in os.walk(top))


# ---- restoring -----------------------------------------------------------------------

@dataclass
class Restored:
    databases: dict[str, dict[str, int]] = field(default_factory=dict)
    secret: bool = False
    config: str = "kept"  # "written", "unchanged" or "kept"
    markdown_files: int = 0
    inbox_files: int = 0
    notes: list[str] = field(default_factory=list)


def verify(backup: Backup, progress: archive.Progress | None = None) -> None:
    """Read every member and check its sha256, writing nothing (restore --verify)."""
    for m in backup.members:
        _verify(backup.path, m.name, _copy(backup, m, archive.Discard(), progress), backup.manifest)


def _copy(backup: Backup, m: tarfile.TarInfo, dest: archive.Sink, progress: archive.Progress | None) -> str:
    f: IO[bytes] | None = backup.tar.extractfile(m)
    if f is None:
        raise BackupError(f"{backup.path}: {m.name} is not a regular file")
    with f:
        digest, n = archive.copy_member(f, dest, progress)
    if n != m.size:
        raise BackupError(f"{backup.path}: {m.name} is cut short: the archive is truncated")
    return digest


def restore(backup: Backup, box: Layout, *, write_config: bool, progress: archive.Progress | None = None) -> Restored:
    """Stage and check every member, then put them in place. Nothing is in place until
    every sha256 matched; a failure while renaming (rare: a rename only fails on a full
    or read-only disk) is reported as such."""
    owner, note = Owner.detect()
    done = Restored(notes=[note] if note else [])
    _check_room(backup, box)
    stage = Staging(owner, secrets.token_hex(4))
    try:
        staged_dbs = _stage_all(backup, box, stage, done, progress)
        config_staged = _stage_config(backup, box, stage, done) if write_config else None
        index = staged_dbs.get("index.db")
        if index is not None:
            moved = relocate(index, backup.manifest, box)
            if moved:
                done.notes.append(moved)
            owner.give(index, PRIVATE_FILE)
    except BaseException:
        stage.abort()
        raise
    try:
        # Inboxes and the cache before the index: were this cut short, the index in place
        # would never point at files or markdown that are not there yet.
        stage.commit_merges()
        stage.commit_trees()
        databases = set(staged_dbs.values())
        # index.db last, for the same reason; the config after everything it describes.
        for staged, final in sorted(stage.files, key=lambda f: f[0] == staged_dbs.get("index.db")):
            if staged != config_staged:
                stage.commit_file(staged, final, database=staged in databases)
        if config_staged is not None:
            _commit_config(config_staged, box.config, done)
    except OSError as exc:
        raise BackupError(f"restore stopped half-way ({exc}): fix that, then run it again with --force") from None
    done.databases = {name: backup.manifest.databases[name].counts for name in staged_dbs}
    return done


def _check_room(backup: Backup, box: Layout) -> None:
    probe = next((p for p in (box.state, *box.state.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    need = backup.size + SPARE
    if need > free:
        raise BackupError(f"not enough room in {probe}: the backup needs {need / 1e6:.0f} MB, {free / 1e6:.0f} MB "
                          "are free")


def _stage_all(backup: Backup, box: Layout, stage: Staging, done: Restored,
               progress: archive.Progress | None) -> dict[str, Path]:
    manifest = backup.manifest
    staged_dbs: dict[str, Path] = {}
    markdown: Path | None = None
    inboxes: dict[str, Path] = {}
    skipped: dict[str, int] = {}
    stage.mkdirs(box.state, 0o750)
    for m in backup.members:
        info = manifest.members[m.name]
        parts = layout.parts(m.name)
        mode = PRIVATE_FILE
        if m.name == layout.CONFIG:
            if progress is not None:
                progress(m.size)
            continue  # read in pass one; written by _stage_config
        if m.name == layout.SECRET:
            dest = stage.file(box.secret, 0o700)
            done.secret = True
        elif parts[0] == "state":
            spec = box.database(parts[1])
            if spec is None:  # known to check_compatible, so never: a guard
                raise BackupError(f"{backup.path}: {m.name}: no such database here")
            dest = stage.file(spec.path)
            staged_dbs[spec.name] = dest
        elif parts[0] == layout.MARKDOWN:
            markdown = markdown or stage.tree(box.markdown)
            dest = _under(stage, markdown, parts[1:], PRIVATE_DIR)
            done.markdown_files += 1
        else:
            collection = parts[1]
            folder = box.inboxes.get(collection)
            if folder is None:
                skipped[collection] = skipped.get(collection, 0) + 1
                _verify(backup.path, m.name, _copy(backup, m, archive.Discard(), progress), manifest)
                continue
            _no_folder_in_the_way(folder, parts[2:])
            if collection not in inboxes:
                inboxes[collection] = stage.merge(folder)
            dest = _under(stage, inboxes[collection], parts[2:], PRIVATE_DIR)
            mode = info.mode & 0o777
            done.inbox_files += 1
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
        with os.fdopen(fd, "wb") as out:
            digest = _copy(backup, m, out, progress)
            out.flush()
            os.fsync(out.fileno())
        _verify(backup.path, m.name, digest, manifest)
        stage.owner.give(dest, mode)
        # The exact mtime: the ingestion daemon indexes again a file whose size or mtime
        # differs from what index.db recorded.
        os.utime(dest, ns=(info.mtime_ns, info.mtime_ns))
    for collection, n in skipped.items():
        done.notes.append(f"collection {collection} is not in this config: its {n} inbox file(s) were not restored, "
                          "and the ingestion daemon drops its documents from the index at start")
    if not manifest.inbox:
        done.notes.append("this backup has no inbox files (--no-inbox): put the collection folders back (same paths, "
                          "same modification times) before starting the suite, or the ingestion daemon removes "
                          "their documents from the index")
    return staged_dbs


def _under(stage: Staging, top: Path, parts: tuple[str, ...], dir_mode: int) -> Path:
    dest = top.joinpath(*parts)
    if not dest.parent.is_dir():
        missing = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
        for p in reversed(missing):
            p.mkdir(mode=dir_mode)
            stage.owner.give(p, dir_mode)
    return dest


def _no_folder_in_the_way(folder: Path, parts: tuple[str, ...]) -> None:
    dest = folder.joinpath(*parts)
    if dest.is_dir():
        raise BackupError(f"{dest} is a folder here, where the backup has a file: move it away, then restore")
    for parent in list(dest.parents)[:len(parts) - 1]:
        if parent.exists() and not parent.is_dir():
            raise BackupError(f"{parent} is a file here, where the backup has a folder: move it away, then restore")


def _stage_config(backup: Backup, box: Layout, stage: Staging, done: Restored) -> Path | None:
    try:
        if box.config.read_bytes() == backup.config_text:
            done.config = "unchanged"
            return None
    except FileNotFoundError:
        pass
    dest = stage.file(box.config, 0o755, give_parents=False)  # /etc/onebox stays root's
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(backup.config_text)
        out.flush()
        os.fsync(out.fileno())
    stage.owner.give_config(dest)
    done.config = "written"
    return dest


def _commit_config(staged: Path, final: Path, done: Restored) -> None:
    if final.exists():
        keep = final.with_name(final.name + ".before-restore")
        shutil.copy2(final, keep)
        done.notes.append(f"the config that was there is kept as {keep}")
    os.replace(staged, final)


def relocate(index: Path, manifest: Manifest, box: Layout) -> str | None:
    """index.db records absolute paths: each file's, under its collection folder, and each
    document's cached markdown, under STATE/markdown. Restored elsewhere (another
    state_dir, a collection folder moved in the config), they are rewritten to the new
    places: else the first rescan would find none of the files and drop every document."""
    moves: list[tuple[str, str, str | None]] = []  # (old prefix, new prefix, collection or None for markdown)
    old_md, new_md = str(Path(manifest.state_dir) / "markdown"), str(box.markdown)
    if old_md != new_md:
        moves.append((old_md, new_md, None))
    for name, was in manifest.collections.items():
        now = box.inboxes.get(name)
        # Resolved, as the watcher resolves its folders before recording files' paths;
        # the markdown path is recorded as the config says (daemons/ingest/main.py).
        if now is not None and str(now.resolve()) != was:
            moves.append((was, str(now.resolve()), name))
    if not moves:
        return None
    try:
        db = Database(index)
    except StoreError as exc:
        raise BackupError(f"cannot open the restored index: {exc}") from None
    try:
        with db.transaction():
            for old, new, collection in moves:
                old_p, new_p = old.rstrip("/") + "/", new.rstrip("/") + "/"
                if collection is None:
                    db.execute("UPDATE documents SET markdown = ? || substr(markdown, ?) WHERE substr(markdown, 1, ?) = ?",
                               (new_p, len(old_p) + 1, len(old_p), old_p))
                else:
                    db.execute("UPDATE files SET path = ? || substr(path, ?) WHERE collection = ? "
                               "AND substr(path, 1, ?) = ?", (new_p, len(old_p) + 1, collection, len(old_p), old_p))
                    db.execute("UPDATE collections SET folder = ? WHERE name = ?", (new, collection))
    finally:
        db.close()
    return "index.db's paths rewritten for the new places: " + "; ".join(f"{o} -> {n}" for o, n, _ in moves)
