"""Making a backup of a running box (`onebox backup FILE`)."""

from __future__ import annotations

import os
import socket
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from daemons import __version__
from daemons.backup import archive, layout
from daemons.backup.errors import BackupError
from daemons.backup.layout import Layout
from daemons.backup.manifest import DatabaseInfo, Manifest, Member
from daemons.backup.sqlite import Snapshot, snapshot

# Called with the total bytes to archive, once known; returns what to call per byte count.
ProgressFactory = Callable[[int], archive.Progress]


@dataclass
class Written:
    path: Path
    bytes: int
    manifest: Manifest
    markdown_files: int = 0
    inbox_files: int = 0
    notes: list[str] = field(default_factory=list)


def walk(top: Path) -> Iterator[tuple[Path, str]]:
    """Regular files under `top` (symlinks followed, as the watcher's stat does), sorted,
    leaving out dot-files and dot-folders as the watcher does: they are files being
    written (the ingest copy's and the cache's temporary names) or restore's staging."""
    for folder, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(folder)
        for name in sorted(files):
            if not name.startswith("."):
                path = here / name
                yield path, path.relative_to(top).as_posix()


def backup(box: Layout, out: Path, *, inbox: bool = True, replace: bool = False,
           progress: ProgressFactory | None = None) -> Written:
    archive.compression(out)  # a bad name fails before any work
    if out.exists() and not replace:
        raise BackupError(f"{out} exists: pass --force to replace it, or choose another name")
    if not out.parent.is_dir():
        raise BackupError(f"{out.parent}: no such folder")
    if not any(d.path.exists() for d in box.databases):
        raise BackupError(f"no database in {box.state} (index.db, ledger.db, keys.db): is this the state directory "
                          "of a box that ran? (--config, or ONEBOX_STATE_DIR)")
    notes: list[str] = []
    # Copies staged beside the archive, not in /tmp: often a small tmpfs, and the same
    # filesystem keeps the disk-space question to one place.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        snaps: dict[str, Snapshot] = {}
        for spec in box.databases:
            if spec.path.exists():
                snaps[spec.name] = snapshot(spec, Path(tmp) / spec.name)
        secret = box.secret if box.secret.is_file() else None
        if secret is None and "keys.db" in snaps and snaps["keys.db"].counts.get("keys"):
            notes.append(f"no key secret at {box.secret}: the API keys in keys.db cannot be checked without it")
        config = box.config.read_bytes()
        markdown = list(walk(box.markdown)) if box.markdown.is_dir() else []
        inboxes: list[tuple[str, Path, str]] = []
        if inbox:
            for name, folder in box.inboxes.items():
                if folder.is_dir():
                    inboxes += [(name, p, rel) for p, rel in walk(folder)]
        total = sum(s.path.stat().st_size for s in snaps.values()) + sum(_size(p) for p, _ in markdown) \
            + sum(_size(p) for _, p, _ in inboxes)
        tick = progress(total) if progress is not None else None
        now_ns = time.time_ns()
        members: dict[str, Member] = {}
        counts = {"markdown": 0, "inbox": 0}

        def add(tar: tarfile.TarFile, name: str, path: Path, keep_mode: bool) -> bool:
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                return False  # gone since it was listed: the restored index will not miss it either
            with f:
                st = os.fstat(f.fileno())
                digest = archive.add_file(tar, name, f, st, tick)
            members[name] = Member(digest, st.st_size, st.st_mtime_ns, (st.st_mode & 0o777) if keep_mode else 0o600)
            return True

        with archive.writing(out, replace) as tar:
            for name, snap in snaps.items():
                add(tar, f"state/{name}", snap.path, False)
            if secret is not None:
                members[layout.SECRET] = Member(archive.add_bytes(tar, layout.SECRET, secret.read_bytes(), now_ns),
                                                secret.stat().st_size, now_ns, 0o600)
            members[layout.CONFIG] = Member(archive.add_bytes(tar, layout.CONFIG, config, now_ns, 0o640),
                                            len(config), box.config.stat().st_mtime_ns, 0o640)
            for path, rel in markdown:
                counts["markdown"] += add(tar, f"{layout.MARKDOWN}/{rel}", path, False)
            for name, path, rel in inboxes:
                counts["inbox"] += add(tar, f"{layout.INBOX}/{name}/{rel}", path, True)
            manifest = Manifest(
                onebox_version=__version__, created_at=time.time(), hostname=socket.gethostname(),
                state_dir=str(box.state), config_path=str(box.config), inbox=inbox,
                # Resolved, as the watcher records files' paths (relocate compares them).
                collections={name: str(folder.resolve()) for name, folder in box.inboxes.items()},
                databases={name: DatabaseInfo(s.migrations, s.counts) for name, s in snaps.items()},
                members=members)
            archive.add_bytes(tar, layout.MANIFEST, manifest.to_json(), now_ns)
    return Written(out, out.stat().st_size, manifest, counts["markdown"], counts["inbox"], notes)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
