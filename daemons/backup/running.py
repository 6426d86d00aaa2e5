"""Is the suite running on this state? Restore must not swap files under daemons that
hold them open: their writes would go to the replaced files, and the ingestion daemon
would compare the restored inboxes with the old index.

Two looks, because either may miss: the router's sockets (something accepts a connection
on api.sock or bus.sock), and every process holding one of the databases open (the
ingestion daemon, say, when the router is down; /proc shows another user's processes to
root only, which is who restores a production box)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path

from daemons.backup.layout import Layout


def answering(path: Path) -> str | None:
    """Why `path` looks served ("answers", "permission denied"), or None when nothing
    listens there."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(str(path))
    except PermissionError:
        return "cannot be checked (permission denied; run as root)"
    except OSError:
        return None  # missing, or a stale socket file nobody listens on
    finally:
        s.close()
    return "answers"


def holders(paths: Iterable[Path]) -> list[str]:
    """"pid N (command)" for each other process with one of `paths` (or its -wal/-shm) open."""
    wanted: set[str] = set()
    for p in paths:
        real = os.path.realpath(p)
        wanted |= {real, f"{real}-wal", f"{real}-shm"}
    found: list[str] = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
            with fds:
                hit = next((t for fd in fds if (t := _link(fd.path)) in wanted), None)
            if hit is None:
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or not ours to look at
            continue
        found.append(f"pid {entry.name} ({_short(cmd)}) has {hit} open")
    return found


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _short(cmd: str, width: int = 60) -> str:
    return cmd if len(cmd) <= width else cmd[:width - 3] + "..."


def busy(box: Layout) -> list[str]:
    """What says the suite runs on `box`'s state (empty when nothing does)."""
    reasons = []
    for name in ("api.sock", "bus.sock"):
        why = answering(box.runtime / name)
        if why is not None:
            reasons.append(f"{box.runtime / name} {why}")
    reasons += holders(d.path for d in box.databases)
    return reasons
