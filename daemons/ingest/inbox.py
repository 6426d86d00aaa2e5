"""Opening an inbox file without leaving the inbox.

Anyone who can drop a file can drop a symbolic link, or a folder link, whose target is
outside: /etc/passwd, another user's home, /dev/zero. Such a file is refused, never read,
and so is anything that is not a regular file (a named pipe would block the reader for
ever). The check is made on the descriptor actually opened (/proc/self/fd), not on the
name, so a link swapped in between the check and the read cannot slip through, and the
same descriptor is then hashed and parsed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import BinaryIO

from daemons.ingest.parse import ParseError

CHUNK = 1024 * 1024
OUTSIDE = "a link to a file outside the inbox folder: not read"


def open_inside(path: Path, folder: Path) -> BinaryIO:
    """`path` opened for reading; ParseError (so: quarantined) if what it names lies
    outside `folder` (after every link and ".." is resolved) or is not a regular file."""
    try:
        # O_NONBLOCK: opening a named pipe must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        if (isinstance(exc, FileNotFoundError) or exc.errno == errno.ELOOP) and os.path.islink(path):
            # Where it leads is checked first: the reason must not tell what exists outside.
            if not Path(os.path.realpath(path)).is_relative_to(folder.resolve()):
                raise ParseError(OUTSIDE) from None
            raise ParseError("a link that leads nowhere (its target does not exist, or links loop): not read") \
                from None
        raise  # gone (the job is stale), or not readable yet (retried: a chmod does not change it)
    try:
        if not Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(folder.resolve()):
            raise ParseError(OUTSIDE)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder (folder links are not followed)" if stat.S_ISDIR(st.st_mode) else \
                "a named pipe" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
            raise ParseError(f"not a regular file but {kind}: not read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def sha256_limited(f: BinaryIO, max_bytes: int) -> str:
    """The sha256 of the whole file from its start; ParseError once it passes max_bytes
    (a file still growing after its size was checked)."""
    f.seek(0)
    digest = hashlib.sha256()
    total = 0
    while chunk := f.read(CHUNK):
        total += len(chunk)
        if total > max_bytes:
            raise ParseError(f"the file grew past max_file_bytes = {max_bytes} while it was read")
        digest.update(chunk)
    f.seek(0)
    return digest.hexdigest()
