"""The tar side: compression by suffix, members written and read through sha256, and the
archive itself written under a temporary name, 0600, and renamed into place when whole."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import lzma
import os
import secrets
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, BinaryIO, Protocol

from daemons.backup.errors import BackupError

CHUNK = 1024 * 1024
# gzip -6: level 9 (tarfile's default) costs about twice the CPU for a few percent.
GZIP_LEVEL = 6
SUFFIXES = {".tar": "", ".tar.gz": "gz", ".tgz": "gz", ".tar.bz2": "bz2", ".tar.xz": "xz", ".tar.zst": "zst"}

Progress = Callable[[int], object]


class Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


def compression(path: Path) -> str:
    """"" (plain tar), "gz", "bz2" or "xz", from the file name."""
    name = path.name.lower()
    for suffix, kind in sorted(SUFFIXES.items(), key=lambda s: -len(s[0])):
        if name.endswith(suffix):
            if kind == "zst" and "zst" not in tarfile.TarFile.OPEN_METH:
                raise BackupError(f"{path}: zstd needs Python 3.14's tarfile; name it .tar.gz (or .tar, and "
                                  "compress it with zstd yourself)")
            return kind
    raise BackupError(f"{path}: the name must end in {', '.join(SUFFIXES)} (it says how it is compressed)")


class HashingReader:
    """Reads exactly `size` bytes of `source` for tarfile, hashing them on the way. The size
    was taken before reading: a file that shrank meanwhile ends the backup (a member's
    size is in its header, already written), one that grew is read as it was."""

    def __init__(self, source: BinaryIO, size: int, name: str, progress: Progress | None = None) -> None:
        self.source = source
        self.left = size
        self.name = name
        self.digest = hashlib.sha256()
        self.progress = progress

    def read(self, n: int = -1) -> bytes:
        want = self.left if n is None or n < 0 else min(n, self.left)
        data = self.source.read(want) if want else b""
        if want and not data:
            raise BackupError(f"{self.name} shrank while it was being read: run the backup again")
        self.left -= len(data)
        self.digest.update(data)
        if self.progress is not None:
            self.progress(len(data))
        return data


def tar_info(name: str, size: int, mtime_ns: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime_ns / 1e9
    info.mode = mode & 0o7777
    # Owners are not kept: restore gives everything to the onebox user, as install does.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def add_file(tar: tarfile.TarFile, name: str, f: BinaryIO, st: os.stat_result,
             progress: Progress | None = None) -> str:
    """Add an open file as `name` with its stat; returns the sha256 of what went in."""
    reader = HashingReader(f, st.st_size, name, progress)
    tar.addfile(tar_info(name, st.st_size, st.st_mtime_ns, st.st_mode), reader)
    return reader.digest.hexdigest()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime_ns: int, mode: int = 0o600) -> str:
    tar.addfile(tar_info(name, len(data), mtime_ns, mode), io.BytesIO(data))
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def writing(path: Path, replace: bool) -> Iterator[tarfile.TarFile]:
    """A tar being written to a dot-name beside `path` (0600 from the first byte: it holds
    the key secret and every document), fsynced and renamed to `path` once complete."""
    kind = compression(path)
    if path.exists() and not replace:
        raise BackupError(f"{path} exists: pass --force to replace it, or choose another name")
    if path.is_dir():
        raise BackupError(f"{path} is a folder: give the backup file's name")
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as raw:
            wrapped: BinaryIO | gzip.GzipFile | bz2.BZ2File | lzma.LZMAFile = raw
            if kind == "gz":
                wrapped = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=GZIP_LEVEL, mtime=0)
            elif kind == "bz2":
                wrapped = bz2.BZ2File(raw, "wb")
            elif kind == "xz":
                wrapped = lzma.LZMAFile(raw, "wb")
            if kind == "zst":
                tar = tarfile.open(fileobj=raw, mode="w:zst", format=tarfile.PAX_FORMAT)  # type: ignore[call-overload]
            else:
                tar = tarfile.TarFile(fileobj=wrapped, mode="w", format=tarfile.PAX_FORMAT)
            with tar:
                yield tar
            if wrapped is not raw:
                wrapped.close()  # the compressor's trailer; `raw` stays open
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def copy_member(source: IO[bytes], dest: Sink, progress: Progress | None = None) -> tuple[str, int]:
    """Copy a member's data; returns its sha256 and length."""
    digest = hashlib.sha256()
    n = 0
    while chunk := source.read(CHUNK):
        digest.update(chunk)
        dest.write(chunk)
        n += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return digest.hexdigest(), n


class Discard:
    """A sink for checking a member without writing it anywhere (restore --verify)."""

    def write(self, data: bytes) -> int:
        return len(data)
