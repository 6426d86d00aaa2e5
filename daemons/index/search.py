"""Searching index.db: vector nearest neighbours, BM25 full text, and the two fused.

Hybrid search runs both and fuses their rankings by reciprocal-rank fusion (Cormack et
al. 2009): a chunk's score is the sum over the rankings it appears in of
weight / (rrf_k + rank). An exact rare term (a part number, a name) that the embedding
blurs is found by BM25; a paraphrase sharing no word with the text is found by the
vectors. Both filter by collection inside the index (a vec0 partition key, a hidden
FTS5 column), so a filter costs nothing extra.

With `knn` in binary mode (schema.py) the Hamming scan returns `rescore` times more
candidates than asked, which are then ranked by exact cosine distance from their float
vectors.

Readers open the database read-only (store.ThreadLocal): WAL lets them read a consistent
snapshot while the ingestion daemon writes, without waiting for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from daemons.index import schema
from daemons.store import Database

MODES = ("hybrid", "vector", "text")
MAX_QUERY_TERMS = 32
COMMON_SHARE = 0.05
VERY_COMMON_SHARE = 0.2
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Fusion:
    vector_weight: float = 1.0
    text_weight: float = 1.0
    rrf_k: int = 60
    candidates: int = 50  # from each side before fusing (at least k)
    rescore: int = 8  # binary mode: Hamming candidates per exact result


def query_terms(text: str) -> list[str]:
    return list(dict.fromkeys(t.lower() for t in _WORD.findall(text)))[:MAX_QUERY_TERMS]


def fts_query(terms: list[str]) -> str | None:
    """Terms as an FTS5 query of quoted terms joined by OR (so any word can match and BM25
    ranks by how many and how rare); None when there are none. Quoting makes FTS5 syntax
    in the query (AND, NEAR, *, :) plain text."""
    if not terms:
        return None
    return " OR ".join(f'"{t}"' for t in terms)


class Searcher:
    def __init__(self, db: Database) -> None:
        self.db = db

    def knn_mode(self) -> str | None:
        return schema.meta(self.db, "knn_mode")

    def vector_ranking(self, vector: np.ndarray, collection: str | None, n: int, fusion: Fusion,
                       k: int | None = None) -> list[tuple[int, float]]:
        """(chunk id, cosine distance), nearest first: n of them, the first k (all, by
        default) from `rescore` times as many binary candidates. (sqlite-vec's top-k scan
        costs about N x k, so the pool is sized by the k that is shown, not by n.)"""
        mode = self.knn_mode()
        if mode is None:
            return []
        q = np.ascontiguousarray(vector, dtype="<f4")
        blob = q.tobytes()
        want = max(n, (k or n) * fusion.rescore) if mode == "binary" else n
        where = " AND collection = ?" if collection is not None else ""
        args: tuple[Any, ...] = (blob, want) + ((collection,) if collection is not None else ())
        rows = self.db.all(
            f"SELECT rowid, distance FROM knn WHERE embedding MATCH {schema.knn_value(mode)} AND k = ?{where}", args)
        if mode != "binary" or not rows:
            return [(int(r), float(d)) for r, d in rows]
        ids = [int(r[0]) for r in rows]
        found = self.db.all(f"SELECT id, embedding FROM chunk_vectors WHERE id IN ({','.join('?' * len(ids))})", ids)
        if not found:
            return []
        mat = np.frombuffer(b"".join(bytes(e) for _, e in found), dtype="<f4").reshape(len(found), -1)
        norms = np.linalg.norm(mat, axis=1) * (np.linalg.norm(q) or 1.0)
        dist = 1.0 - (mat @ q) / np.where(norms == 0, 1.0, norms)
        order = np.argsort(dist, kind="stable")[:n]
        return [(int(found[i][0]), float(dist[i])) for i in order]

    def text_ranking(self, text: str, collection: str | None, n: int,
                     beside_vectors: bool = False) -> list[tuple[int, float]]:
        """(chunk id, BM25 score: lower is better, as FTS5 gives it), best first."""
        query = fts_query(self.selective(query_terms(text), beside_vectors))
        if query is None:
            return []
        query = f"text : ({query})"
        if collection is not None:
            query = f'coll : "{schema.coll_token(collection)}" AND {query}'
        rows = self.db.all("SELECT rowid, bm25(chunks_fts, 1.0, 0.0) AS s FROM chunks_fts "
                           "WHERE chunks_fts MATCH ? ORDER BY s LIMIT ?", (query, n))
        return [(int(r), float(s)) for r, s in rows]

    def selective(self, terms: list[str], beside_vectors: bool = False) -> list[str]:
        """The terms worth matching: those in at most COMMON_SHARE of the chunks, else the
        rarest one. A word in most chunks adds almost nothing to BM25 (its IDF is near
        zero) but costs the most: its whole posting list is walked and scored. Beside a
        vector search (hybrid), a query of nothing but very common words (the rarest in
        over VERY_COMMON_SHARE of the chunks) has no lexical signal worth that cost: the
        vectors rank it alone. Terms the index has never seen are kept (they cost nothing)."""
        total = int(self.db.value("SELECT max(id) FROM chunks", default=0) or 0)
        if not terms or total < 1000:  # a small index: everything is cheap
            return terms
        found = {str(t): int(d) for t, d in self.db.all(
            f"SELECT term, doc FROM chunks_vocab WHERE term IN ({','.join('?' * len(terms))})", terms)}
        keep = [t for t in terms if found.get(t, 0) <= COMMON_SHARE * total]
        if keep:
            return keep
        rarest = min(terms, key=lambda t: found.get(t, 0))
        if beside_vectors and found.get(rarest, 0) > VERY_COMMON_SHARE * total:
            return []
        return [rarest]

    def search(self, *, text: str, vector: np.ndarray | None, collection: str | None = None, k: int = 10,
               mode: str = "hybrid", fusion: Fusion = Fusion()) -> list[dict[str, Any]]:
        """Ranked chunks with their document: best first, at most k."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        n = max(k, fusion.candidates) if mode == "hybrid" else k
        with self.db.snapshot():  # every read below sees the same commit
            return self._search(text, vector, collection, k, n, mode, fusion)

    def _search(self, text: str, vector: np.ndarray | None, collection: str | None, k: int, n: int, mode: str,
                fusion: Fusion) -> list[dict[str, Any]]:
        scores: dict[int, float] = {}
        detail: dict[int, dict[str, Any]] = {}
        if mode in ("hybrid", "vector"):
            if vector is None:
                raise ValueError("a vector search needs the query's vector")
            for rank, (cid, dist) in enumerate(self.vector_ranking(vector, collection, n, fusion, k), 1):
                scores[cid] = scores.get(cid, 0.0) + (fusion.vector_weight / (fusion.rrf_k + rank)
                                                      if mode == "hybrid" else 1.0 - dist)
                detail.setdefault(cid, {})["vector"] = {"rank": rank, "distance": round(dist, 6)}
        if mode in ("hybrid", "text"):
            for rank, (cid, bm25) in enumerate(self.text_ranking(text, collection, n, mode == "hybrid"), 1):
                scores[cid] = scores.get(cid, 0.0) + (fusion.text_weight / (fusion.rrf_k + rank)
                                                      if mode == "hybrid" else -bm25)
                detail.setdefault(cid, {})["text"] = {"rank": rank, "bm25": round(-bm25, 6)}
        best = sorted(scores, key=lambda c: (-scores[c], c))[:k]
        rows = {r["id"]: r for r in self.chunks(best)}
        out = []
        for cid in best:
            row = rows.get(cid)
            if row is None:  # deleted between the two reads (a newer snapshot)
                continue
            out.append({**row, "score": round(scores[cid], 6), "ranks": detail[cid]})
        return out

    def chunks(self, ids: list[int]) -> list[dict[str, Any]]:
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        return self.db.rows(
            "SELECT c.id, c.document_id, c.seq, c.heading, c.page, c.page_end, c.text, d.title, d.collection, "
            "col.local_only, f.id AS file_id, f.path AS path "
            "FROM chunks c JOIN documents d ON d.id = c.document_id "
            "LEFT JOIN collections col ON col.name = d.collection "
            # The file a document is listed as (the first of its duplicates).
            "LEFT JOIN files f ON f.id = (SELECT min(id) FROM files WHERE document_id = d.id) "
            f"WHERE c.id IN ({marks})", ids)
