"""`onebox backup FILE`: every database (SQLite's online backup API), the key secret, the
config, the markdown cache and the inbox folders in one tar, while the suite runs
(daemons/backup/ says what is in it and why it is consistent)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from daemons.backup import BackupError, create
from daemons.backup.layout import SECTIONS, Layout
from daemons.backup.progress import Bar
from daemons.config import ConfigError
from daemons.ctl import api
from daemons.store import StoreError

EX_USAGE = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="onebox backup",
        description=("Write a backup of this box to FILE while the suite runs: index.db, ledger.db and keys.db "
                     "(each a consistent copy taken with SQLite's online backup API), the API key secret, the "
                     "config file, the markdown cache and every collection's inbox files, with a manifest "
                     "(onebox version, migrations, sha256 of every member). FILE's name says how it is compressed: "
                     ".tar, .tar.gz (or .tgz), .tar.bz2, .tar.xz. It is written 0600 and appears only when complete. "
                     "Provider credentials (/etc/onebox/credentials/) are never in it. Run as root (or onebox)."),
        epilog=("Restore with `onebox restore FILE` (docs/runbook.md). Exit status: 0 written, 1 failed, "
                "2 bad arguments, 78 config error."),
    )
    p.add_argument("file", type=Path, metavar="FILE", help="the archive to write")
    p.add_argument("--no-inbox", action="store_true",
                   help="leave the inbox files out (when the collection folders are backed up some other way; they "
                        "must then be back in place, with their modification times, before the restored suite starts)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.add_argument("--config", help="config file (default: $ONEBOX_CONFIG, else /etc/onebox/onebox.toml, "
                                    "else the suite `onebox up` runs from this checkout)")
    return p


def summary(written: create.Written) -> str:
    m = written.manifest
    parts = [f"{name} ({', '.join(f'{n} {what}' for what, n in info.counts.items())})"
             for name, info in m.databases.items()]
    if "state/keys.secret" in m.members:
        parts.append("keys.secret")
    parts += ["config", f"{written.markdown_files} markdown files"]
    parts.append(f"{written.inbox_files} inbox files" if m.inbox else "no inbox files (--no-inbox)")
    return f"wrote {written.path} ({size(written.bytes)}): {', '.join(parts)}"


def size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def credentials_note(box: Layout) -> str | None:
    creds = box.config.parent / "credentials"
    try:
        if not creds.is_dir() or not any(creds.iterdir()):
            return None
    except PermissionError:
        pass
    return f"provider credentials ({creds}/) are not in the backup: keep a copy of them yourself"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = api.load_config(args.config, SECTIONS)
        box = Layout.of(config, Path(config.source))
        with Bar("backup") as bar:
            written = create.backup(box, args.file, inbox=not args.no_inbox, replace=args.force, progress=bar.start)
    except ConfigError as exc:
        return api.failure("onebox backup", exc)
    except PermissionError as exc:
        print(f"onebox backup: {exc} (run it as root, or as the onebox user)", file=sys.stderr)
        return 1
    except (BackupError, StoreError, OSError) as exc:
        print(f"onebox backup: {exc}", file=sys.stderr)
        return 1
    print(summary(written))
    print("it holds the API key secret and every document: keep it as safe as the box itself")
    for note in [*written.notes, credentials_note(box)]:
        if note:
            print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
