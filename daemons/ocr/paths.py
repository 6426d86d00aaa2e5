"""Which files a request may have read: regular files under the allowed directories.

`check_path` runs when a request arrives, so most refusals come at once. A path can
still change while the document waits (a symlink swapped in), so the worker opens it
with `open_checked`, which checks again what the opened descriptor really is.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from daemons.bus.errors import RequestError

MIB = 1024 * 1024


def _under(real: Path, allowed_dirs: Sequence[str]) -> bool:
    return any(real.is_relative_to(os.path.realpath(d)) for d in allowed_dirs)


def _check_under(real: Path, allowed_dirs: Sequence[str], shown: str) -> None:
    if not allowed_dirs:
        raise RequestError("no directory is allowed for OCR (the daemon's allowed_dirs is empty)", 400)
    if not _under(real, allowed_dirs):
        raise RequestError(f"{shown} is outside the allowed directories ({', '.join(allowed_dirs)})", 400)


def _check_stat(st: os.stat_result, shown: str, max_bytes: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise RequestError(f"{shown} is {kind}", 400)
    if max_bytes is not None and st.st_size > max_bytes:
        raise RequestError(f"{shown} is too large: {st.st_size / MIB:.1f} MiB, the limit is "
                           f"{max_bytes / MIB:.1f} MiB", 413)


def check_path(path: object, allowed_dirs: Sequence[str], max_bytes: int | None = None) -> Path:
    """The real path of `path`, or RequestError (400, or 413 when too large) saying why not."""
    if not isinstance(path, str) or not path:
        raise RequestError('"path" must be a non-empty string', 400)
    if "\0" in path:
        raise RequestError('"path" must not contain NUL', 400)
    if not os.path.isabs(path):
        raise RequestError(f'"path" must be absolute, not {path!r}', 400)
    real = Path(os.path.realpath(path))
    # Containment first: a refusal must not tell whether a file outside exists.
    _check_under(real, allowed_dirs, path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise RequestError(f"{path}: not found", 400) from None
    except OSError as exc:
        raise RequestError(f"{path}: cannot read: {exc.strerror}", 400) from None
    _check_stat(st, path, max_bytes)
    return real


def open_checked(path: Path, allowed_dirs: Sequence[str], max_bytes: int | None = None) -> BinaryIO:
    """Open `path` for reading and check the file actually opened, not the name."""
    try:
        # O_NONBLOCK: opening a FIFO swapped in must not hang the worker.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise RequestError(f"{path}: not found", 400) from None
    except OSError as exc:
        raise RequestError(f"{path}: cannot read: {exc.strerror}", 400) from None
    try:
        _check_under(Path(os.readlink(f"/proc/self/fd/{fd}")), allowed_dirs, str(path))
        _check_stat(os.fstat(fd), str(path), max_bytes)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
