"""The state directory: its filesystem and mount options, the I/O scheduler of the disk
under it, and whether it sits on dm-crypt.

From the path to its mount (/proc/self/mountinfo), from the mount's major:minor to
/sys/dev/block/M:m, then down `slaves/` (dm-crypt, LVM, RAID) to the physical disks,
whose queue/ holds the scheduler. Everything here is world-readable: no privilege needed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from daemons.doctor import mounts
from daemons.doctor.mounts import Mount
from daemons.doctor.result import Result, Status, bracketed, under

AREA = "state directory"
NETWORK = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "fuse.glusterfs", "fuse.sshfs", "9p",
           "afs", "lustre"}
RAM = {"tmpfs", "ramfs"}
RANK: dict[Status, int] = {"ok": 0, "skipped": 0, "warn": 1, "fail": 2}
UDEV = "/etc/udev/rules.d/60-onebox-iosched.rules"


@dataclass(frozen=True)
class Place:
    state: Path          # the configured directory
    checked: Path        # it, or its nearest existing parent
    mount: Mount | None

    def describe(self) -> str:
        where = str(self.state) if self.checked == self.state else f"{self.state} (not made yet: {self.checked})"
        if self.mount is None:
            return f"{where}: no mount found"
        m = self.mount
        return f"{where} is on {m.point} ({m.fstype}, {m.source})"


@dataclass(frozen=True)
class BlockDev:
    name: str
    sys: Path            # its /sys/class/block directory, resolved
    dm_uuid: str
    dm_name: str
    disk: Path | None    # the physical disk's directory (queue/ lives there), for a leaf


def locate(root: Path, state_dir: Path) -> Place:
    checked = mounts.existing(root, state_dir)
    return Place(state_dir, checked, mounts.containing(mounts.mounts(root), str(checked)))


def _text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return ""


def device_dir(root: Path, m: Mount) -> Path | None:
    """The mount's block device in sysfs; None for tmpfs, overlay, network filesystems.
    btrfs reports an anonymous 0:N device, so the source (/dev/...) is used there."""
    if m.major != 0:
        found = under(root, f"sys/dev/block/{m.major}:{m.minor}")
    elif m.source.startswith("/dev/"):
        name = Path(os.path.realpath(m.source) if root == Path("/") else m.source).name
        found = under(root, f"sys/class/block/{name}")
    else:
        return None
    return found.resolve() if found.exists() else None


def chain(start: Path) -> Iterator[BlockDev]:
    """The device and everything under it (dm-crypt over LVM over a partition of a disk)."""
    slaves = sorted((start / "slaves").iterdir()) if (start / "slaves").is_dir() else []
    disk = None
    if not slaves:
        # A partition's queue/ is its disk's, the directory above it.
        disk = start.parent if (start / "partition").exists() else start
    yield BlockDev(start.name, start, _text(start / "dm" / "uuid"), _text(start / "dm" / "name"), disk)
    for s in slaves:
        yield from chain(s.resolve())


def check_filesystem(root: Path, state_dir: Path) -> Result:
    name = "filesystem"
    place = locate(root, state_dir)
    if place.mount is None:
        return Result(AREA, name, "skipped", f"{place.describe()} (nothing in /proc/self/mountinfo covers it)")
    m, where = place.mount, place.describe()
    if m.read_only:
        return Result(AREA, name, "fail", f"{where}, mounted read-only: the daemons cannot write index.db, "
                                          "ledger.db or the inbox",
                      f"mount -o remount,rw {m.point}, or set paths.state_dir to a writable filesystem")
    if m.fstype in NETWORK or m.fstype.startswith("nfs"):
        return Result(AREA, name, "fail", f"{where}: a network filesystem; SQLite's WAL mode (index.db, ledger.db) "
                                          "needs its shared-memory index and locks on a local one",
                      "set paths.state_dir to a local disk")
    if m.fstype in RAM:
        return Result(AREA, name, "warn", f"{where}: in RAM, so index.db, ledger.db (API keys, usage), the inbox "
                                          "and the documents' markdown are gone at the next reboot",
                      "set paths.state_dir to a disk-backed filesystem (the default /var/lib/onebox)")
    return Result(AREA, name, "ok", f"{where}: a local filesystem")


def check_mount_options(root: Path, state_dir: Path) -> Result:
    name = "mount options (atime)"
    place = locate(root, state_dir)
    if place.mount is None:
        return Result(AREA, name, "skipped", f"{place.describe()} (nothing in /proc/self/mountinfo covers it)")
    m = place.mount
    options = set(m.options) | set(m.super_options)
    evidence = f"{m.point} ({m.fstype}) mounted {','.join(m.options)}"
    if m.fstype in RAM or m.fstype in NETWORK:
        return Result(AREA, name, "ok", f"{evidence}: access times cost no disk write here")
    if "noatime" in options:
        return Result(AREA, name, "ok", f"{evidence}: no access-time writes")
    mode = "strictatime" if "strictatime" in options else "relatime"
    cost = ("strictatime: every read also writes the file's inode" if mode == "strictatime" else
            "with relatime a read of a file written since its last read also writes its inode, and SQLite's "
            "WAL files (index.db, ledger.db) are written all the time")
    lazy = " (lazytime keeps those in memory a while, but still writes them)" if "lazytime" in options else ""
    return Result(AREA, name, "warn", f"{evidence}: {cost}{lazy}",
                  f"add noatime to {m.point}'s options in /etc/fstab, then mount -o remount,noatime {m.point}")


def _scheduler_verdict(dev: str, text: str, rotational: bool) -> tuple[Status, str, str]:
    active = bracketed(text) if text else "unknown"
    choices = text.replace("[", "").replace("]", "").split()
    kind = ("NVMe" if dev.startswith("nvme") else "virtual disk" if dev.startswith(("vd", "xvd")) else
            "rotational disk" if rotational else "SSD")
    said = f"{dev} ({kind}): scheduler {text or 'unknown'}"
    if not text or len(choices) == 1:
        return "ok", f"{said} (nothing to choose)", ""

    def setting(want: str, pattern: str) -> str:
        return (f"echo {want} > /sys/block/{dev}/queue/scheduler now; keep it with "
                f'ACTION=="add|change", KERNEL=="{pattern}", ATTR{{queue/scheduler}}="{want}" in {UDEV}')

    if kind == "NVMe":
        if active == "none":
            return "ok", f"{said}: the drive's own queues do the scheduling", ""
        return ("warn", f"{said}: on NVMe a scheduler adds a lock and per-request work the drive's parallel "
                        "queues make pointless (slower model loads and SQLite syncs)",
                setting("none", "nvme[0-9]*n[0-9]*"))
    if kind == "rotational disk" and active == "none":
        return ("warn", f"{said}: nothing merges or orders requests for a spinning disk",
                setting("mq-deadline", "sd[a-z]*"))
    if kind == "SSD" and active == "bfq":
        return ("warn", f"{said}: bfq's per-request cost is high at an SSD's rates",
                setting("mq-deadline", "sd[a-z]*"))
    return "ok", said, ""


def check_scheduler(root: Path, state_dir: Path) -> Result:
    name = "I/O scheduler"
    place = locate(root, state_dir)
    start = device_dir(root, place.mount) if place.mount is not None else None
    if place.mount is None or start is None:
        return Result(AREA, name, "skipped", f"{place.describe()}: no block device to look at")
    disks = {d.disk for d in chain(start) if d.disk is not None}
    verdicts = [_scheduler_verdict(d.name, _text(d / "queue" / "scheduler"), _text(d / "queue" / "rotational") == "1")
                for d in sorted(disks)]
    if not verdicts:
        return Result(AREA, name, "skipped", f"{place.describe()}: no physical disk found under {start.name}")
    status = max((v[0] for v in verdicts), key=lambda s: RANK[s])
    return Result(AREA, name, status, f"{place.describe()}; " + "; ".join(v[1] for v in verdicts),
                  "; ".join(v[2] for v in verdicts if v[2]))


def check_encryption(root: Path, state_dir: Path) -> Result:
    name = "encryption at rest (dm-crypt)"
    place = locate(root, state_dir)
    m = place.mount
    if m is None:
        return Result(AREA, name, "skipped", f"{place.describe()} (nothing in /proc/self/mountinfo covers it)")
    if m.fstype == "ecryptfs":
        return Result(AREA, name, "ok", f"{place.describe()}: eCryptfs, encrypted per file")
    if m.fstype in RAM:
        return Result(AREA, name, "ok", f"{place.describe()}: in RAM, nothing reaches a disk")
    start = device_dir(root, m)
    if start is None:
        return Result(AREA, name, "skipped", f"{place.describe()}: no block device to look at"
                      + (" (a network filesystem: the server's disks decide)" if m.fstype in NETWORK else ""))
    devs = list(chain(start))
    path = " -> ".join(d.dm_name or d.name for d in devs)
    crypt = [d for d in devs if d.dm_uuid.startswith("CRYPT-")]
    if crypt:
        kind = crypt[0].dm_uuid.split("-")[1] if crypt[0].dm_uuid.count("-") >= 2 else "dm-crypt"
        return Result(AREA, name, "ok",
                      f"{place.describe()}; devices {path}: {crypt[0].dm_name or crypt[0].name} is dm-crypt "
                      f"({kind}), so the documents, their index and the ledger are encrypted at rest (on an SSD, "
                      "cryptsetup refresh --perf-no_read_workqueue --perf-no_write_workqueue --persistent NAME "
                      "takes kcryptd's queues out of each read)")
    return Result(AREA, name, "warn",
                  f"{place.describe()}; devices {path}: no dm-crypt, so the inbox, the documents' markdown, "
                  "index.db (their text and vectors) and ledger.db sit on the disk in the clear",
                  "put paths.state_dir on a LUKS volume (cryptsetup luksFormat, /etc/crypttab, a filesystem on "
                  "/dev/mapper/NAME); leave it if the disk is protected otherwise (a self-encrypting drive)")
