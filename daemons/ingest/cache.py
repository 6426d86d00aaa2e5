"""The markdown cache: every file's extracted text, kept by the sha256 of its bytes in
STATE_DIR/markdown/ab/abcdef....md (with a small .json beside it: title, pages, kind).

Nothing is ever parsed or OCR'd twice: a retried job, a restart, the same bytes under
another name or in another collection, and a rebuild of the index after the embedding
model changed all start from here. Entries are written to a temporary name and renamed,
so a crash never leaves half a file under a real name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Cached:
    path: Path
    markdown: str
    title: str
    pages: int | None
    kind: str


class MarkdownCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _paths(self, sha256: str) -> tuple[Path, Path]:
        folder = self.root / sha256[:2]
        return folder / f"{sha256}.md", folder / f"{sha256}.json"

    def get(self, sha256: str) -> Cached | None:
        md, meta = self._paths(sha256)
        try:
            info = json.loads(meta.read_text())
            text = md.read_text(encoding="utf-8")
        except (OSError, ValueError):
            return None
        return Cached(md, text, str(info.get("title", "")), info.get("pages"), str(info.get("kind", "")))

    def put(self, sha256: str, markdown: str, title: str, pages: int | None, kind: str) -> Cached:
        md, meta = self._paths(sha256)
        md.parent.mkdir(parents=True, exist_ok=True)
        _write(md, markdown)
        _write(meta, json.dumps({"title": title, "pages": pages, "kind": kind}))
        return Cached(md, markdown, title, pages, kind)


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
