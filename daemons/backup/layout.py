"""What a box's state is, for backup and restore: where each part lives by the config,
and the name it has in an archive. One table, so the two commands cannot disagree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from daemons.config import Config
from daemons.index import schema as index_schema
from daemons.ledger import schema as ledger_schema
from daemons.ledger.files import key_paths, ledger_path

MANIFEST = "manifest.json"
CONFIG = "config/onebox.toml"
SECRET = "state/keys.secret"
MARKDOWN = "markdown"
INBOX = "inbox"
# The config sections both commands read: where the state is, the inboxes, the key secret.
SECTIONS = ("paths", "collections", "auth")
# Every database of the suite: the migrations this version knows, in order, and what
# counts as holding something (a fresh install's databases hold nothing).
DATABASES: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]] = {
    "index.db": (tuple(m.name for m in index_schema.MIGRATIONS),
                 (("files", "SELECT count(*) FROM files"), ("documents", "SELECT count(*) FROM documents"))),
    "ledger.db": (tuple(m.name for m in ledger_schema.MIGRATIONS), (("calls", "SELECT count(*) FROM calls"),)),
    "keys.db": (tuple(m.name for m in ledger_schema.KEY_MIGRATIONS), (("keys", "SELECT count(*) FROM keys"),)),
}


def known_migrations() -> dict[str, tuple[str, ...]]:
    return {name: migrations for name, (migrations, _) in DATABASES.items()}


@dataclass(frozen=True)
class DatabaseSpec:
    name: str  # "index.db"; its member is state/NAME
    path: Path
    migrations: tuple[str, ...]  # the ones this version knows, in order
    counts: tuple[tuple[str, str], ...]  # (what, SQL counting it): what the database holds

    @property
    def member(self) -> str:
        return f"state/{self.name}"


@dataclass(frozen=True)
class Layout:
    state: Path
    runtime: Path
    config: Path
    databases: tuple[DatabaseSpec, ...]
    secret: Path
    markdown: Path
    inboxes: dict[str, Path]

    @classmethod
    def of(cls, config: Config, config_path: Path) -> Layout:
        keys_db, secret = key_paths(config)
        paths = {"index.db": config.paths.state / "index.db", "ledger.db": ledger_path(config), "keys.db": keys_db}
        databases = tuple(DatabaseSpec(name, paths[name], migrations, counts)
                          for name, (migrations, counts) in DATABASES.items())
        return cls(config.paths.state, config.paths.runtime, config_path, databases, secret,
                   config.paths.state / "markdown", config.collection_dirs())

    def database(self, name: str) -> DatabaseSpec | None:
        return next((d for d in self.databases if d.name == name), None)



def parts(member: str) -> tuple[str, ...]:
    """A member name's parts, or () when it is not one a backup writes: relative, no "."
    or ".." parts, no dot-names (backups never hold dot-files; restore stages under them)."""
    path = PurePosixPath(member)
    # (A backslash is an ordinary character in a Linux file name: allowed.)
    if path.is_absolute() or str(path) != member:
        return ()
    if not path.parts or any(p in ("", ".", "..") or p.startswith(".") for p in path.parts):
        return ()
    return path.parts


def relative(member: str, top: str) -> PurePosixPath | None:
    """The path under `top` ("markdown", "inbox/docs") of a member, None if not under it."""
    found = parts(member)
    prefix = tuple(top.split("/"))
    if len(found) <= len(prefix) or found[:len(prefix)] != prefix:
        return None
    return PurePosixPath(*found[len(prefix):])
