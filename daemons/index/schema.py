"""index.db: what the ingestion daemon writes and the router reads.

Tables (named migrations, daemons/store.py):
- `collections`: one per inbox folder, with its `local_only` flag (its text must never
  leave the box: upstream providers are refused for it).
- `files`: every file seen in an inbox, which is also the durable job queue: `state`
  queued / processing / indexed / quarantined, `attempts`, `next_at` (backoff), `reason`
  (why it failed or was quarantined), `lane` (text or ocr: scans never hold up text),
  `version` (bumped whenever the file changes, so work on an older version is not
  applied), and the document it currently shows as.
- `documents`: one per distinct content (sha256) per collection; two files with the
  same bytes are one document.
- `chunks`: a document's pieces with their heading trail and pages.
- `chunks_fts`: FTS5 (BM25) over chunk text, contentless (the text lives in `chunks`),
  with a hidden one-token `coll` column so the collection filter runs inside FTS5.
- `chunk_vectors`: each chunk's float32 vector, the source of truth; `knn`, the
  sqlite-vec vec0 table the nearest-neighbour search scans, is built from it and
  rebuilt when the embedding model or the search mode changes (vec0 needs the
  dimension up front, so it is not a migration): `float[D]` cosine for exact search,
  or `bit[D]` (binary quantization, 32× smaller, scanned by Hamming distance) whose
  candidates are rescored exactly from `chunk_vectors`.
"""

from __future__ import annotations

import hashlib

from daemons.store import Database, Migration

MIGRATIONS = (
    Migration("0001-index", """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE collections (
  name TEXT PRIMARY KEY,
  folder TEXT NOT NULL,
  local_only INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE documents (
  id INTEGER PRIMARY KEY,
  collection TEXT NOT NULL,
  sha256 TEXT NOT NULL,
  title TEXT NOT NULL,
  kind TEXT NOT NULL,
  pages INTEGER,
  bytes INTEGER NOT NULL,
  markdown TEXT NOT NULL,
  indexed_at REAL NOT NULL,
  UNIQUE (collection, sha256)
);
CREATE TABLE chunks (
  id INTEGER PRIMARY KEY,
  document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
  seq INTEGER NOT NULL,
  heading TEXT NOT NULL,
  page INTEGER,
  page_end INTEGER,
  tokens INTEGER NOT NULL,
  text TEXT NOT NULL
);
CREATE INDEX chunks_document ON chunks (document_id, seq);
CREATE TABLE chunk_vectors (
  id INTEGER PRIMARY KEY REFERENCES chunks(id) ON DELETE CASCADE,
  embedding BLOB NOT NULL
);
CREATE VIRTUAL TABLE chunks_fts USING fts5(
  text, coll, content='', contentless_delete=1, tokenize='unicode61 remove_diacritics 2'
);
CREATE TABLE files (
  id INTEGER PRIMARY KEY,
  path TEXT NOT NULL UNIQUE,
  collection TEXT NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('queued', 'processing', 'indexed', 'quarantined')),
  lane TEXT NOT NULL DEFAULT 'text',
  size INTEGER,
  mtime_ns INTEGER,
  sha256 TEXT,
  document_id INTEGER REFERENCES documents(id) ON DELETE SET NULL,
  version INTEGER NOT NULL DEFAULT 0,
  attempts INTEGER NOT NULL DEFAULT 0,
  next_at REAL NOT NULL DEFAULT 0,
  reason TEXT,
  queued_at REAL NOT NULL,
  updated_at REAL NOT NULL
);
CREATE INDEX files_ready ON files (state, lane, next_at);
CREATE INDEX files_document ON files (document_id);
"""),
    # Document frequencies of the full-text terms: search drops a query's very common
    # words (search.py) instead of walking posting lists that hold most of the index.
    Migration("0002-fts-vocab", "CREATE VIRTUAL TABLE chunks_vocab USING fts5vocab(chunks_fts, 'row')"),
)

STATES = ("queued", "processing", "indexed", "quarantined")
SEARCH_MODES = ("binary", "exact")


def coll_token(collection: str) -> str:
    """The single FTS5 token standing for a collection (names may hold spaces or
    punctuation that the tokenizer would split into a phrase)."""
    return "c" + hashlib.sha1(collection.encode()).hexdigest()[:16]


def file_counts(db: Database, collection: str | None = None) -> dict[str, int]:
    """Files by state (every state present, 0 when none), of one collection or of all."""
    where, args = (" WHERE collection = ?", (collection,)) if collection is not None else ("", ())
    found = {str(s): int(n) for s, n in db.all(f"SELECT state, count(*) FROM files{where} GROUP BY state", args)}
    return {s: found.get(s, 0) for s in STATES}


def meta(db: Database, key: str) -> str | None:
    value = db.value("SELECT value FROM meta WHERE key = ?", (key,))
    return None if value is None else str(value)


def set_meta(db: Database, key: str, value: str) -> None:
    db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
               (key, value))


def knn_sql(dims: int, mode: str) -> str:
    column = f"embedding bit[{dims}]" if mode == "binary" else f"embedding float[{dims}] distance_metric=cosine"
    return f"CREATE VIRTUAL TABLE knn USING vec0(collection TEXT PARTITION KEY, {column})"


def knn_value(mode: str) -> str:
    """The SQL expression turning a float32 vector parameter into what `knn` holds."""
    return "vec_quantize_binary(?)" if mode == "binary" else "?"
