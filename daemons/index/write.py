"""Writing index.db: the ingestion daemon is its only writer.

Every change a reader could see half-done is one transaction: a document's rows (chunks,
full text, vectors) go in together with the file pointing at them, and the document the
file showed before goes out in the same commit, so a search sees the old version or the
new one, never both or neither.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemons.index import schema
from daemons.store import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewChunk:
    seq: int
    text: str
    heading: str
    page: int | None
    page_end: int | None
    tokens: int


@dataclass(frozen=True)
class NewDocument:
    collection: str
    sha256: str
    title: str
    kind: str
    pages: int | None
    bytes: int
    markdown: str  # the cached markdown's path


def open_index(path: Path) -> Database:
    return Database(path, migrations=schema.MIGRATIONS)


class IndexWriter:
    def __init__(self, db: Database) -> None:
        self.db = db

    # ---- configuration -------------------------------------------------------------

    def set_collections(self, collections: Sequence[tuple[str, str, bool]]) -> None:
        """(name, folder, local_only) for each configured inbox. (The files of a folder no
        longer configured leave the index at the next start's rescan.)"""
        with self.db.transaction():
            for name, folder, local_only in collections:
                self.db.execute(
                    "INSERT INTO collections (name, folder, local_only) VALUES (?, ?, ?) ON CONFLICT (name) "
                    "DO UPDATE SET folder = excluded.folder, local_only = excluded.local_only",
                    (name, folder, int(local_only)))

    def prepare_vectors(self, model: str, dims: int, mode: str) -> str:
        """Make `knn` fit this embedding model and search mode. Returns what was done:
        "ok", "rebuilt" (same vectors, new mode: rebuilt from chunk_vectors) or "reset"
        (a different model: every document must be embedded again, so all files are
        queued again; their markdown is cached, nothing is OCR'd twice)."""
        if mode not in schema.SEARCH_MODES:
            raise ValueError(f"search mode {mode!r}")
        if mode == "binary" and dims % 8:
            log.warning("binary quantization needs a dimension divisible by 8, not %d: exact search instead", dims)
            mode = "exact"
        old_model, old_dims, old_mode = (schema.meta(self.db, k) for k in ("embed_model", "dims", "knn_mode"))
        same_vectors = old_model == model and old_dims == str(dims)
        if same_vectors and old_mode == mode and self._has_knn():
            return "ok"
        with self.db.transaction():
            self.db.execute("DROP TABLE IF EXISTS knn")
            self.db.execute(schema.knn_sql(dims, mode))
            if same_vectors:
                value = schema.knn_value(mode)
                self.db.execute(
                    f"INSERT INTO knn (rowid, collection, embedding) SELECT v.id, d.collection, {value.replace('?', 'v.embedding')} "
                    "FROM chunk_vectors v JOIN chunks c ON c.id = v.id JOIN documents d ON d.id = c.document_id")
                outcome = "rebuilt"
            else:
                # Another model's vectors mean nothing to this one.
                self.db.execute("DELETE FROM chunks_fts")
                self.db.execute("DELETE FROM documents")
                self.db.execute("UPDATE files SET state = 'queued', document_id = NULL, attempts = 0, next_at = 0, "
                                "reason = NULL, updated_at = ? WHERE state != 'quarantined'", (time.time(),))
                outcome = "reset" if old_model is not None else "ok"
            schema.set_meta(self.db, "embed_model", model)
            schema.set_meta(self.db, "dims", str(dims))
            schema.set_meta(self.db, "knn_mode", mode)
        return outcome

    def _has_knn(self) -> bool:
        return bool(self.db.value("SELECT count(*) FROM sqlite_master WHERE name = 'knn'") == 1)

    # ---- documents -----------------------------------------------------------------

    def document_for(self, collection: str, sha256: str) -> int | None:
        value = self.db.value("SELECT id FROM documents WHERE collection = ? AND sha256 = ?", (collection, sha256))
        return None if value is None else int(value)

    def link(self, file_id: int, document_id: int) -> None:
        """The file's bytes are a document already indexed (a duplicate): point at it."""
        with self.db.transaction():
            self._point(file_id, document_id)

    def replace(self, file_id: int, doc: NewDocument, chunks: Sequence[NewChunk], vectors: np.ndarray) -> int:
        """Insert the document with its chunks and vectors and point the file at it, in one
        transaction with dropping what the file showed before. Returns the document id."""
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        mode = schema.meta(self.db, "knn_mode") or "binary"
        value = schema.knn_value(mode)
        token = schema.coll_token(doc.collection)
        rows = np.ascontiguousarray(vectors, dtype="<f4")
        with self.db.transaction():
            existing = self.document_for(doc.collection, doc.sha256)
            if existing is not None:  # written meanwhile by a duplicate file
                self._point(file_id, existing)
                return existing
            self.db.execute(
                "INSERT INTO documents (collection, sha256, title, kind, pages, bytes, markdown, indexed_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (doc.collection, doc.sha256, doc.title, doc.kind, doc.pages, doc.bytes, doc.markdown, time.time()))
            doc_id = int(self.db.conn.last_insert_rowid())
            for chunk, vector in zip(chunks, rows):
                self.db.execute(
                    "INSERT INTO chunks (document_id, seq, heading, page, page_end, tokens, text) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (doc_id, chunk.seq, chunk.heading, chunk.page, chunk.page_end, chunk.tokens, chunk.text))
                chunk_id = int(self.db.conn.last_insert_rowid())
                blob = vector.tobytes()
                self.db.execute("INSERT INTO chunk_vectors (id, embedding) VALUES (?, ?)", (chunk_id, blob))
                self.db.execute(f"INSERT INTO knn (rowid, collection, embedding) VALUES (?, ?, {value})",
                                (chunk_id, doc.collection, blob))
                self.db.execute("INSERT INTO chunks_fts (rowid, text, coll) VALUES (?, ?, ?)",
                                (chunk_id, chunk.text, token))
            self._point(file_id, doc_id)
        return doc_id

    def _point(self, file_id: int, document_id: int) -> None:
        old = self.db.value("SELECT document_id FROM files WHERE id = ?", (file_id,))
        self.db.execute("UPDATE files SET state = 'indexed', document_id = ?, reason = NULL, next_at = 0, "
                        "updated_at = ? WHERE id = ?", (document_id, time.time(), file_id))
        if old is not None and old != document_id:
            self._drop_if_orphan(int(old))

    def remove_file(self, file_id: int) -> None:
        """The file left its inbox: it leaves the index, and its document with it unless
        another file has the same bytes."""
        with self.db.transaction():
            old = self.db.value("SELECT document_id FROM files WHERE id = ?", (file_id,))
            self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))
            if old is not None:
                self._drop_if_orphan(int(old))

    def _drop_if_orphan(self, document_id: int) -> None:
        if self.db.value("SELECT count(*) FROM files WHERE document_id = ?", (document_id,)):
            return
        ids = [int(r[0]) for r in self.db.execute("SELECT id FROM chunks WHERE document_id = ?", (document_id,))]
        for chunk_id in ids:
            self.db.execute("DELETE FROM knn WHERE rowid = ?", (chunk_id,))
            self.db.execute("DELETE FROM chunks_fts WHERE rowid = ?", (chunk_id,))
        # chunks and chunk_vectors go by ON DELETE CASCADE.
        self.db.execute("DELETE FROM documents WHERE id = ?", (document_id,))
