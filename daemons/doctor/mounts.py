"""/proc/self/mountinfo, parsed: which filesystem a path is on (cgroups, the state dir)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from daemons.doctor.result import read, under


@dataclass(frozen=True)
class Mount:
    major: int
    minor: int
    point: str
    options: tuple[str, ...]        # per mount: ro, noatime, nosuid ...
    fstype: str
    source: str
    super_options: tuple[str, ...]  # the filesystem's own: discard, errors=, cgroup v1 controllers ...

    @property
    def read_only(self) -> bool:
        return "ro" in self.options or "ro" in self.super_options


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \040 \011 \012 \134.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        major, _, minor = fields[2].partition(":")
        if len(fields) < sep + 3 or not (major.isdigit() and minor.isdigit()):
            continue
        mounts.append(Mount(int(major), int(minor), _unescape(fields[4]), tuple(fields[5].split(",")),
                            fields[sep + 1], _unescape(fields[sep + 2]),
                            tuple(fields[sep + 3].split(",")) if len(fields) > sep + 3 else ()))
    return mounts


def mounts(root: Path) -> list[Mount]:
    return parse(read(root, "proc/self/mountinfo") or "")


def containing(all_mounts: list[Mount], path: str) -> Mount | None:
    """The mount `path` is on: the longest mount point above it, the last mounted one when
    several sit on the same point (it covers the others), as `findmnt -T` answers."""
    best: Mount | None = None
    for m in all_mounts:
        point = m.point.rstrip("/") or "/"
        if path == point or path.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) >= len(best.point.rstrip("/") or "/"):
                best = m
    return best


def existing(root: Path, path: Path) -> Path:
    """`path`, or its nearest existing parent (a state dir not made yet is on its parent's
    filesystem), with symlinks resolved when looking at the real host."""
    p = Path(os.path.normpath(path))
    while p != p.parent and not under(root, p).exists():
        p = p.parent
    return Path(os.path.realpath(p)) if root == Path("/") else p
