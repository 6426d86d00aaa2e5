"""Writing an uploaded file into a collection's inbox folder, where the ingestion daemon
picks it up.

The watcher must never see half a file, nor a file replaced under a name it already
indexed: the bytes go to a temporary dot-name in the same folder (the watcher ignores
dot-files), are synced, and are renamed to their final name in one step. A name taken by
different bytes is never overwritten: the file becomes "stem (2).ext", "stem (3).ext"...;
a name holding the very same bytes is the upload already done, and is answered as such.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import hashlib
import logging
import os
import stat
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from starlette.concurrency import run_in_threadpool

from daemons.router.errors import APIError

log = logging.getLogger(__name__)

TEMP_PREFIX = ".upload-"
MAX_NAME_BYTES = 240  # NAME_MAX (255) less room for " (1000)"
MAX_COPIES = 1000
WRITE_BYTES = 1 << 20

# Choosing a free name and renaming into it must be one step for the uploads of this
# router (two threads could otherwise pick the same free name and the second rename
# would replace the first file). Outside writers are not excluded; a rename that races
# one is as likely as two people copying the same name into the folder at once.
_placing = threading.Lock()


@dataclass(frozen=True)
class Placed:
    path: Path
    bytes: int
    sha256: str
    existed: bool  # the same bytes were already there under this name


def plain_name(name: str | None) -> str:
    """A file name an upload may take: one path component, not hidden, not a parent."""
    if not name:
        raise APIError(400, "the upload needs a file name (?filename=NAME, or the file part's filename)",
                       "invalid_request", "filename")
    if "/" in name or "\0" in name or ".." in name or name.startswith(".") \
            or any(ord(c) < 32 for c in name) or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise APIError(400, f"filename {name!r}: must be a plain file name (no '/', no '..', no control "
                            f"characters, not starting with '.', at most {MAX_NAME_BYTES} bytes)",
                       "invalid_request", "filename")
    return name


async def save(chunks: AsyncIterator[bytes], folder: Path, name: str, limit: int) -> Placed:
    """Stream `chunks` into `folder` under `name` (or "name (N)"), at most `limit` bytes
    (413 past it, and nothing left behind). Disk writes run on worker threads, a MiB at a
    time: a disk throttling writeback must not stall the event loop."""
    temp = folder / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    digest = hashlib.sha256()
    size = 0
    pending = bytearray()
    try:
        f = await run_in_threadpool(_create, temp)
        try:
            with f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise APIError(413, f"file larger than {limit} bytes ([ingest] max_file_bytes)",
                                       "file_too_large")
                    digest.update(chunk)
                    pending += chunk
                    if len(pending) >= WRITE_BYTES:
                        await run_in_threadpool(f.write, pending)
                        pending.clear()
                await run_in_threadpool(_finish, f, pending)
        except OSError as exc:  # the disk is full, say
            raise unwritable(folder, exc) from None
        path, existed = await run_in_threadpool(place, temp, folder, name, size)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    return Placed(path, size, digest.hexdigest(), existed)


def _create(temp: Path) -> BinaryIO:
    try:
        temp.parent.mkdir(parents=True, exist_ok=True)
        return open(temp, "xb")  # closed by save()'s `with`
    except OSError as exc:
        raise unwritable(temp.parent, exc) from None


def _finish(f: BinaryIO, rest: bytearray) -> None:
    """The last bytes, then fsync: the rename that follows must not publish a file whose
    data a crash could still lose."""
    f.write(rest)
    f.flush()
    os.fsync(f.fileno())


def place(temp: Path, folder: Path, name: str, size: int) -> tuple[Path, bool]:
    """Rename `temp` to the first of NAME, "STEM (2).EXT", ... that is free, or to none if
    one of them already holds the same bytes (then `temp` is removed). Returns the path
    and whether it existed."""
    stem, ext = Path(name).stem, Path(name).suffix
    with _placing:
        for n in range(1, MAX_COPIES + 1):
            candidate = folder / (name if n == 1 else f"{stem} ({n}){ext}")
            try:
                st = candidate.lstat()
            except FileNotFoundError:
                try:
                    os.rename(temp, candidate)
                    _sync_dir(folder)
                except OSError as exc:
                    raise unwritable(folder, exc) from None
                return candidate, False
            # A symlink or a folder under that name is "different": never followed or compared.
            if stat.S_ISREG(st.st_mode) and st.st_size == size and filecmp.cmp(temp, candidate, shallow=False):
                temp.unlink()
                return candidate, True
    raise APIError(409, f"{name}: {MAX_COPIES} files of that name already exist in {folder}; pick another name",
                   "name_taken", "filename")


def _sync_dir(folder: Path) -> None:
    """The rename is durable once the folder's entry is on disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unwritable(folder: Path, exc: OSError) -> APIError:
    log.warning("cannot write an upload into %s: %s", folder, exc)
    message = f"cannot write into the inbox folder {folder}: {exc.strerror}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return APIError(507, message, "insufficient_storage")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        # Under systemd the router may write only to its state directory (ProtectSystem=strict):
        # a collection folder elsewhere needs ReadWritePaths= in a drop-in.
        return APIError(403, message, "inbox_unwritable")
    return APIError(500, message, "inbox_unwritable")
