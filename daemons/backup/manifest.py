"""manifest.json: what a backup holds and which onebox made it, and the check that this
onebox can restore it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from daemons.backup.errors import BackupError, IncompatibleBackup

# Bumped when the archive's layout changes in a way an older restore would get wrong.
FORMAT = 1


@dataclass(frozen=True)
class Member:
    sha256: str
    size: int
    mtime_ns: int
    mode: int


@dataclass(frozen=True)
class DatabaseInfo:
    migrations: list[str]  # applied, in the order they were
    counts: dict[str, int]  # e.g. {"documents": 3, "files": 3}


@dataclass(frozen=True)
class Manifest:
    onebox_version: str
    created_at: float
    hostname: str
    state_dir: str
    config_path: str
    inbox: bool  # the collection folders' files are in (not --no-inbox)
    collections: dict[str, str]  # name -> the folder it had
    databases: dict[str, DatabaseInfo]
    members: dict[str, Member] = field(default_factory=dict)
    format: int = FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, source: str) -> Manifest:
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise BackupError(f"{source}: manifest.json is not JSON ({exc}): not a onebox backup, or damaged") from None
        if not isinstance(raw, dict):
            raise BackupError(f"{source}: manifest.json is not an object: not a onebox backup")
        fmt = raw.get("format")
        if not isinstance(fmt, int):
            raise BackupError(f"{source}: manifest.json has no format number: not a onebox backup")
        if fmt > FORMAT:
            raise IncompatibleBackup(
                f"{source}: made by onebox {raw.get('onebox_version', '?')} in backup format {fmt}; this onebox "
                f"reads format {FORMAT} and older: upgrade onebox first, then restore")
        try:
            return cls(
                onebox_version=str(raw["onebox_version"]), created_at=float(raw["created_at"]),
                hostname=str(raw["hostname"]), state_dir=str(raw["state_dir"]), config_path=str(raw["config_path"]),
                inbox=bool(raw["inbox"]), collections={str(k): str(v) for k, v in _map(raw["collections"]).items()},
                databases={str(k): DatabaseInfo([str(m) for m in _map(v)["migrations"]],
                                                {str(c): int(n) for c, n in _map(_map(v)["counts"]).items()})
                           for k, v in _map(raw["databases"]).items()},
                members={str(k): Member(str(_map(v)["sha256"]), int(_map(v)["size"]), int(_map(v)["mtime_ns"]),
                                        int(_map(v)["mode"])) for k, v in _map(raw["members"]).items()},
                format=fmt)
        except (KeyError, TypeError, ValueError) as exc:
            raise BackupError(f"{source}: manifest.json is incomplete or malformed ({type(exc).__name__}: {exc})") \
                from None


def _map(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value


def check_compatible(manifest: Manifest, known: Mapping[str, tuple[str, ...]], version: str, source: str) -> None:
    """Refuse a backup holding a database this onebox does not know, or migrations it has
    never heard of: its schema is newer, and the daemons here would refuse it at start
    (daemons/store.py). Fewer migrations is fine: the daemons apply the rest at start."""
    unknown_dbs = sorted(set(manifest.databases) - set(known))
    unknown = {name: [m for m in info.migrations if m not in known.get(name, ())]
               for name, info in manifest.databases.items() if name in known}
    unknown = {name: found for name, found in unknown.items() if found}
    if not unknown_dbs and not unknown:
        return
    what = [f"{name}: {', '.join(found)}" for name, found in sorted(unknown.items())]
    what += [f"{name} (a database this version does not have)" for name in unknown_dbs]
    raise IncompatibleBackup(
        f"{source}: made by onebox {manifest.onebox_version} with migrations {'; '.join(what)}; this is onebox "
        f"{version}, which does not know them: upgrade onebox first, then restore")
