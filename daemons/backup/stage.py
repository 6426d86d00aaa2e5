"""Restore's writes: everything is first written beside where it goes, under a dot-name
(the watcher and the rescans skip those), and renamed into place only once the whole
archive has been checked, so a damaged backup leaves the box as it was. Ownership and
modes are those the install and the daemons give (units: UMask=0077, User=onebox)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
from dataclasses import dataclass, field
from pathlib import Path

USER = "onebox"
STATE_MODE = 0o750  # scripts/install and StateDirectoryMode=
PRIVATE_DIR = 0o700  # what the daemons' UMask=0077 makes (markdown/)
PRIVATE_FILE = 0o600  # databases, keys.secret, the cache
INBOX_DIR = 0o770  # daemons/ingest/watch.py make_inbox: the onebox group drops files in
CONFIG_MODE = 0o640  # scripts/install: root, group onebox


@dataclass(frozen=True)
class Owner:
    """Who restored files belong to: the onebox user when run as root, else whoever runs."""

    uid: int | None = None
    gid: int | None = None

    @classmethod
    def detect(cls) -> tuple[Owner, str | None]:
        if os.geteuid() != 0:
            return cls(), None
        try:
            pw = pwd.getpwnam(USER)
        except KeyError:
            return cls(), (f"there is no {USER} user, so the restored files stay root's: fine for `onebox up` run "
                           f"as root, but the systemd units run as {USER}; run scripts/install, then restore again "
                           "with --force")
        return cls(pw.pw_uid, pw.pw_gid), None

    def give(self, path: Path, mode: int) -> None:
        os.chmod(path, mode)
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def give_config(self, path: Path) -> None:
        """root's, readable by the onebox group (the daemons read it, only root edits it)."""
        os.chmod(path, CONFIG_MODE)
        if self.gid is not None:
            os.chown(path, -1, self.gid)


def sync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class Staging:
    owner: Owner
    token: str
    files: list[tuple[Path, Path]] = field(default_factory=list)  # (staged, final), replaced one by one
    trees: list[tuple[Path, Path]] = field(default_factory=list)  # (staged, final) folders swapped whole
    merges: list[tuple[Path, Path]] = field(default_factory=list)  # (staged, final) folders moved in file by file
    created: list[Path] = field(default_factory=list)  # folders made; removed on abort if still empty

    def mkdirs(self, path: Path, mode: int, give: bool = True) -> None:
        """Make `path` and its missing parents with `mode`, given to the owner (or left
        root's: /etc/onebox)."""
        missing = [p for p in (path, *path.parents) if not p.exists()]
        for p in reversed(missing):
            p.mkdir(mode=mode)
            os.chmod(p, mode)  # whatever the umask
            if give:
                self.owner.give(p, mode)
            self.created.append(p)

    def file(self, final: Path, parent_mode: int = STATE_MODE, give_parents: bool = True) -> Path:
        self.mkdirs(final.parent, parent_mode, give_parents)
        staged = final.parent / f".{final.name}.restore-{self.token}"
        self.files.append((staged, final))
        return staged

    def tree(self, final: Path) -> Path:
        """A folder replaced whole at commit (the markdown cache)."""
        self.mkdirs(final.parent, STATE_MODE)
        staged = final.parent / f".{final.name}.restore-{self.token}"
        staged.mkdir(mode=PRIVATE_DIR)
        self.owner.give(staged, PRIVATE_DIR)
        self.trees.append((staged, final))
        return staged

    def merge(self, final: Path) -> Path:
        """A folder whose files are moved in at commit, next to what is there (an inbox:
        files a person put there are never removed)."""
        self.mkdirs(final, INBOX_DIR)
        staged = final / f".onebox-restore-{self.token}"
        staged.mkdir(mode=PRIVATE_DIR)
        self.merges.append((staged, final))
        return staged

    def abort(self) -> None:
        for staged, _ in self.files:
            staged.unlink(missing_ok=True)
        for staged, _ in self.trees + self.merges:
            shutil.rmtree(staged, ignore_errors=True)
        for p in reversed(self.created):
            with contextlib.suppress(OSError):
                p.rmdir()

    # ---- commit: renames only ------------------------------------------------------

    def commit_merges(self) -> None:
        for staged, final in self.merges:
            for folder, dirs, files in os.walk(staged):
                here = Path(folder)
                rel = here.relative_to(staged)
                for d in dirs:
                    target = final / rel / d
                    if not target.is_dir():
                        target.mkdir(mode=INBOX_DIR)
                        self.owner.give(target, INBOX_DIR)
                for name in files:
                    os.replace(here / name, final / rel / name)
            shutil.rmtree(staged)
            sync_dir(final)

    def commit_trees(self) -> None:
        for staged, final in self.trees:
            old = final.parent / f".{final.name}.old-{self.token}"
            if final.exists():
                os.rename(final, old)
            os.rename(staged, final)
            sync_dir(final.parent)
            shutil.rmtree(old, ignore_errors=True)

    def commit_file(self, staged: Path, final: Path, database: bool = False) -> None:
        if database:
            # A -wal left by the replaced database would be replayed into the new one.
            for suffix in ("-wal", "-shm"):
                Path(f"{final}{suffix}").unlink(missing_ok=True)
        os.replace(staged, final)
        sync_dir(final.parent)
