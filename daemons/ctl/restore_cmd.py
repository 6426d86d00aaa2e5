"""`onebox restore FILE`: put a backup made by `onebox backup` back, on a stopped suite
(docs/runbook.md: bringing a dead box back, step by step)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from daemons import __version__
from daemons import config as config_mod
from daemons.backup import BackupError, restore, running
from daemons.backup.layout import CONFIG, SECTIONS, Layout
from daemons.backup.progress import Bar
from daemons.config import Config, ConfigError
from daemons.ctl import api, up
from daemons.store import StoreError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="onebox restore",
        description=("Restore a backup made by `onebox backup`: the databases, the API key secret, the markdown "
                     "cache, the inbox files (with their modification times, so nothing is indexed again) and the "
                     "config, each checked against its sha256 before anything is replaced, with the owner and modes "
                     "the install gives (the onebox user when run as root). Refuses a backup made by a newer onebox, "
                     "a suite that is running, and a state that already holds something, unless --force. Inbox "
                     "files already there and not in the backup are left alone. Start the suite afterwards."),
        epilog=("The backup's config goes to the config file (the one there is kept as NAME.before-restore) and "
                "says where the state goes (ONEBOX_STATE_DIR and the like still apply); --keep-config keeps this "
                "box's. Exit status: 0 restored (or verified), 1 refused or failed, 2 bad arguments, "
                "78 config error."),
    )
    p.add_argument("file", type=Path, metavar="FILE", help="the archive `onebox backup` wrote")
    p.add_argument("--force", action="store_true",
                   help="restore even over a state that holds documents, calls or keys (they are replaced), or "
                        "while the suite runs (restart it at once afterwards)")
    p.add_argument("--keep-config", action="store_true",
                   help="keep this box's config file, and restore to the places it names")
    p.add_argument("--verify", action="store_true",
                   help="only check the archive (manifest, version, every member's sha256); change nothing")
    p.add_argument("--config", help="config file (default: $ONEBOX_CONFIG, else /etc/onebox/onebox.toml, "
                                    "else the suite `onebox up` runs from this checkout)")
    return p


def config_target(arg: str | None) -> tuple[Path, bool]:
    """The config file restore writes, and whether it is the checkout's (development),
    which is source code, not state: then the backup's config is not written over it."""
    if arg:
        return Path(arg), False
    if os.environ.get("ONEBOX_CONFIG"):
        return Path(os.environ["ONEBOX_CONFIG"]), False
    if config_mod.DEFAULT_CONFIG.exists():
        return config_mod.DEFAULT_CONFIG, False
    found = up.default_config()
    return found, found != config_mod.DEFAULT_CONFIG


def when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) + "Z"


def report(b: restore.Backup, box: Layout, done: restore.Restored) -> list[str]:
    m = b.manifest
    lines = [f"restored the backup of {m.hostname} made {when(m.created_at)} by onebox {m.onebox_version} "
             f"into {box.state}:"]
    for name, counts in done.databases.items():
        lines.append(f"  {name}: {', '.join(f'{n} {what}' for what, n in counts.items())}")
    if done.secret:
        lines.append(f"  keys.secret: {box.secret}")
    lines.append(f"  markdown cache: {done.markdown_files} files")
    if m.inbox:
        lines.append(f"  inbox: {done.inbox_files} files ({', '.join(sorted(m.collections)) or 'no collections'})")
    config = {"written": f"written to {box.config}", "unchanged": f"{box.config} (unchanged)",
              "kept": f"{box.config} kept (--keep-config)"}[done.config]
    lines.append(f"  config: {config}")
    return lines


def run(args: argparse.Namespace) -> int:
    with restore.opened(args.file) as b:
        if args.verify:
            with Bar("verifying") as bar:
                restore.verify(b, bar.start(b.size))
            m = b.manifest
            print(f"{args.file}: ok: {len(m.members)} members, every sha256 matches; made {when(m.created_at)} on "
                  f"{m.hostname} by onebox {m.onebox_version}; restorable by this onebox ({__version__})")
            return 0
        target, checkout = config_target(args.config)
        keep = args.keep_config or checkout
        config: Config = (api.load_config(args.config, SECTIONS) if keep
                          else restore.backup_config(b, os.environ))
        box = Layout.of(config, target)
        busy = running.busy(box)
        if busy and not args.force:
            raise BackupError(f"the suite is running on {box.state} ({'; '.join(busy)}): stop it first "
                              "(systemctl stop onebox.target, or Ctrl-C onebox up), or pass --force")
        held = restore.contents(box)
        if held and not args.force:
            raise BackupError(f"{box.state} is not empty ({'; '.join(held)}): restoring replaces it; pass --force "
                              "to do so (onebox backup FILE first, if you may want it back)")
        with Bar("restoring") as bar:
            done = restore.restore(b, box, write_config=not keep, progress=bar.start(b.size))
    for line in report(b, box, done):
        print(line)
    for note in done.notes:
        print(f"note: {note}")
    if checkout and not args.keep_config:
        print(f"note: the backup's config was not written over this checkout's {target}; it is "
              f"{CONFIG} in the archive")
    if busy:
        print("the suite was running: restart it now (systemctl restart onebox.target)")
    elif done.config == "written":
        print("next: re-run scripts/install (it enables the units the restored config runs, and starts the suite); "
              "development: onebox up")
    else:
        print("next: start the suite: systemctl start onebox.target (development: onebox up)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except ConfigError as exc:
        return api.failure("onebox restore", exc)
    except (BackupError, StoreError, OSError) as exc:
        print(f"onebox restore: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
