"""POST /v1/search and /v1/documents end to end: a real router and embedding daemon
(all-MiniLM-L6-v2) over an index.db written here with the index's own writer, as the
ingestion daemon would write it, with real vectors from the embedding daemon; uploads
land in real inbox folders."""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from daemons.index.write import IndexWriter, NewChunk, NewDocument, open_index
from daemons.store import Database
from tests.harness import Suite, write_config

GGUF = "all_minilm_l6_v2/all-MiniLM-L6-v2.f16.gguf"
MAX_FILE = 4096
RESULT_KEYS = {"object", "rank", "score", "text", "heading", "page", "page_end", "document_id", "path", "title",
               "collection", "chunk_id"}
# daemons/index/search.py (Searcher._search) merges each hit's rank details into the hit,
# and the "text" detail ({"rank", "bm25"}) replaces the chunk's text for every chunk
# found by BM25. Remove these markers with the fix (strict: they fail once it lands).
DOC_KEYS = {"object", "id", "path", "filename", "collection", "status", "reason", "attempts", "bytes", "sha256",
            "title", "pages", "chunks", "queued_at", "updated_at", "indexed_at"}

# (collection, file name, title, chunks as (heading, page, text))
INDEXED = [
    ("docs", "manual.md", "Flux manual", [
        ("Flux manual > Parts", 1, "Part number QZX-4471 is the gasket that seals the flux capacitor housing."),
        ("Flux manual > Home", 2, "The cat sleeps on the sofa all afternoon while the sun shines in."),
        ("Flux manual > Money", 3, "Quarterly revenue grew by twelve percent compared with last year."),
    ]),
    ("docs", "bread.txt", "Bread", [("Bread", None, "Bake the bread at 220 degrees for forty minutes.")]),
    ("other", "spares.md", "Spares", [("Spares", None, "Spare part QZX-4471 was ordered from the warehouse.")]),
]


@dataclass
class World:
    suite: Suite
    folders: dict[str, Path]
    ids: dict[str, int] = field(default_factory=dict)  # file name -> files.id
    markdown: dict[str, str] = field(default_factory=dict)  # file name -> its markdown
    before_index: dict[str, httpx.Response] = field(default_factory=dict)


def config_extra(d: Path) -> str:
    return (f'[embeddings.minilm]\npath = "{GGUF}"\nthreads = 2\n'
            f'[collections.docs]\nfolder = "{d / "in-docs"}"\n'
            f'[collections.other]\nfolder = "{d / "in-other"}"\n'
            f"[ingest]\nmax_file_bytes = {MAX_FILE}\n")


def add_file(db: Database, path: Path, collection: str, state: str = "queued", reason: str | None = None) -> int:
    """A `files` row as the ingestion daemon's queue records a file it has seen."""
    now = time.time()
    db.execute("INSERT INTO files (path, collection, state, lane, size, mtime_ns, reason, queued_at, updated_at) "
               "VALUES (?, ?, ?, 'text', ?, ?, ?, ?, ?)",
               (str(path), collection, state, path.stat().st_size, path.stat().st_mtime_ns, reason, now, now))
    return int(db.conn.last_insert_rowid())


def embed(c: httpx.Client, texts: list[str]) -> np.ndarray:
    r = c.post("/v1/embeddings", json={"model": "minilm", "input": texts})
    assert r.status_code == 200, r.text
    return np.asarray([d["embedding"] for d in r.json()["data"]], dtype="<f4")


def build_index(w: World, db: Database) -> None:
    writer = IndexWriter(db)
    writer.set_collections([(n, str(p), False) for n, p in w.folders.items()])
    writer.prepare_vectors("minilm:test", 384, "binary")
    state = w.suite.dir / "state"
    with w.suite.client() as c:
        for collection, name, title, chunks in INDEXED:
            path = w.folders[collection] / name
            markdown = f"# {title}\n\n" + "\n\n".join(text for _, _, text in chunks) + "\n"
            path.write_text(markdown)
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            cached = state / "markdown" / sha[:2] / f"{sha}.md"
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(markdown)
            file_id = add_file(db, path, collection)
            db.execute("UPDATE files SET sha256 = ? WHERE id = ?", (sha, file_id))
            pages = max((p for _, p, _ in chunks if p is not None), default=None)
            doc = NewDocument(collection=collection, sha256=sha, title=title, kind=path.suffix[1:], pages=pages,
                              bytes=path.stat().st_size, markdown=str(cached))
            new = [NewChunk(seq=i, text=text, heading=heading, page=page, page_end=page, tokens=len(text.split()))
                   for i, (heading, page, text) in enumerate(chunks)]
            writer.replace(file_id, doc, new, embed(c, [text for _, _, text in chunks]))
            w.ids[name] = file_id
            w.markdown[name] = markdown
    for name, state_, reason in (("waiting.pdf", "queued", None), ("broken.pdf", "quarantined", "not a PDF")):
        path = w.folders["docs"] / name
        path.write_bytes(b"%PDF-not really")
        w.ids[name] = add_file(db, path, "docs", state_, reason)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with tempfile.TemporaryDirectory(prefix="onebox-") as d:
        root = Path(d)
        suite = Suite(root, write_config(root, extra=config_extra(root)))
        folders = {"docs": root / "in-docs", "other": root / "in-other"}
        for folder in folders.values():
            folder.mkdir()
        w = World(suite, folders)
        db: Database | None = None
        try:
            suite.start_router()
            suite.start_daemon("embed", "minilm")
            suite.wait_for(lambda c: c.get("/ready").json()["services"].get("embed/minilm") == 1, 20,
                           "the embed worker")
            with suite.client() as c:  # the router is up before the ingestion daemon made the index
                w.before_index["search"] = c.post("/v1/search", json={"query": "anything"})
                w.before_index["list"] = c.get("/v1/documents")
            db = open_index(root / "state" / "index.db")
            build_index(w, db)
            yield w
        finally:
            suite.stop()
            if db is not None:
                db.close()


def search(w: World, **body: Any) -> httpx.Response:
    with w.suite.client() as c:
        return c.post("/v1/search", json=body)


def get(w: World, url: str, **params: Any) -> httpx.Response:
    with w.suite.client() as c:
        return c.get(url, params=params)


def error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:500])
    body: dict[str, Any] = r.json()["error"]
    assert set(body) == {"message", "type", "code", "param"}, body
    return body


def dot_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---- search ------------------------------------------------------------------------


def test_no_index_yet_is_503(world: World) -> None:
    for r in world.before_index.values():
        assert error(r, 503)["code"] == "index_unavailable"


def test_hybrid_finds_a_rare_exact_token(world: World) -> None:
    r = search(world, query="QZX-4471")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["object"], body["query"], body["mode"], body["collection"]) == ("list", "QZX-4471", "hybrid", None)
    hits = body["data"]
    assert all(set(h) == RESULT_KEYS and h["object"] == "search.result" for h in hits)
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    top_two = {h["document_id"] for h in hits[:2]}
    assert top_two == {world.ids["manual.md"], world.ids["spares.md"]}, hits[:2]
    assert all("QZX-4471" in h["text"] for h in hits[:2]), hits
    manual = next(h for h in hits if h["document_id"] == world.ids["manual.md"])
    assert manual["path"] == str(world.folders["docs"] / "manual.md") and manual["title"] == "Flux manual"
    assert (manual["heading"], manual["page"], manual["page_end"], manual["collection"]) == \
        ("Flux manual > Parts", 1, 1, "docs")
    assert isinstance(manual["chunk_id"], int)


def test_collection_filter_excludes_other_collections(world: World) -> None:
    r = search(world, query="QZX-4471 part", collection="docs", k=10)
    assert r.status_code == 200, r.text
    hits = r.json()["data"]
    assert hits and all(h["collection"] == "docs" for h in hits)
    assert hits[0]["document_id"] == world.ids["manual.md"] and "QZX-4471" in hits[0]["text"]
    assert world.ids["spares.md"] not in {h["document_id"] for h in hits}
    other = search(world, query="QZX-4471", collection="other").json()["data"]
    assert {h["document_id"] for h in other} == {world.ids["spares.md"]}


def test_vector_mode_finds_a_paraphrase(world: World) -> None:
    r = search(world, query="a kitten napping on the couch", mode="vector", k=1)
    assert r.status_code == 200, r.text
    (hit,) = r.json()["data"]
    assert "cat sleeps on the sofa" in hit["text"] and r.json()["mode"] == "vector"


def test_text_mode(world: World) -> None:
    r = search(world, query="how long to bake bread", mode="text", k=5)
    assert r.status_code == 200, r.text
    hits = r.json()["data"]
    assert hits[0]["document_id"] == world.ids["bread.txt"] and hits[0]["heading"] == "Bread"
    assert all(any(w in h["text"].lower() for w in ("bake", "bread", "how", "long", "to")) for h in hits)
    assert search(world, query="zzzunknownword", mode="text").json()["data"] == []


def test_unknown_collection_is_404(world: World) -> None:
    e = error(search(world, query="x", collection="nosuch"), 404)
    assert e["code"] == "collection_not_found" and e["param"] == "collection" and "docs" in e["message"]


@pytest.mark.parametrize("body, param", [
    ({"query": "x", "k": 0}, "k"),
    ({"query": "x", "k": 101}, "k"),  # [search] max_k = 100
    ({"query": "x", "k": "3"}, "k"),
    ({"query": "   \n"}, "query"),
    ({"query": ""}, "query"),
    ({"query": "x" * 10_001}, "query"),
    ({"query": "x", "mode": "fuzzy"}, "mode"),
    ({"query": "x", "top_k": 3}, "top_k"),
    ({}, "query"),
])
def test_bad_search_requests_are_400(world: World, body: dict[str, Any], param: str) -> None:
    e = error(search(world, **body), 400)
    assert e["param"] == param and e["type"] == "invalid_request_error", e


def test_bad_json_is_400(world: World) -> None:
    with world.suite.client() as c:
        assert error(c.post("/v1/search", content=b"{not json"), 400)["code"] == "invalid_request"
        assert error(c.post("/v1/search", json=["query"]), 400)["code"] == "invalid_request"


# ---- documents ---------------------------------------------------------------------


def test_list_with_counts(world: World) -> None:
    r = get(world, "/v1/documents")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["has_more"] is False
    assert body["counts"] == {"queued": 1, "processing": 0, "indexed": 3, "quarantined": 1}
    docs = body["data"]
    assert [d["id"] for d in docs] == sorted(world.ids.values())
    assert all(set(d) == DOC_KEYS and d["object"] == "document" for d in docs)
    manual = next(d for d in docs if d["id"] == world.ids["manual.md"])
    path = world.folders["docs"] / "manual.md"
    assert (manual["path"], manual["filename"], manual["collection"], manual["status"]) == \
        (str(path), "manual.md", "docs", "indexed")
    assert (manual["title"], manual["pages"], manual["chunks"], manual["bytes"]) == \
        ("Flux manual", 3, 3, path.stat().st_size)
    assert manual["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and manual["indexed_at"] > 0
    waiting = next(d for d in docs if d["filename"] == "waiting.pdf")
    assert waiting["status"] == "queued" and waiting["title"] is None and waiting["indexed_at"] is None


def test_list_filters_and_pages(world: World) -> None:
    other = get(world, "/v1/documents", collection="other").json()
    assert [d["id"] for d in other["data"]] == [world.ids["spares.md"]]
    assert other["counts"] == {"queued": 0, "processing": 0, "indexed": 1, "quarantined": 0}
    broken = get(world, "/v1/documents", status="quarantined").json()["data"]
    assert [(d["filename"], d["reason"]) for d in broken] == [("broken.pdf", "not a PDF")]
    seen: list[int] = []
    after: int | None = None
    while True:
        params: dict[str, Any] = {"limit": 2} if after is None else {"limit": 2, "after": after}
        page = get(world, "/v1/documents", **params).json()
        assert len(page["data"]) <= 2
        seen += [d["id"] for d in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == sorted(world.ids.values())
    assert get(world, "/v1/documents", after=max(seen)).json()["data"] == []


@pytest.mark.parametrize("params, status, param", [
    ({"status": "done"}, 400, "status"),
    ({"limit": 0}, 400, "query.limit"),
    ({"limit": 1001}, 400, "query.limit"),
    ({"after": "x"}, 400, "query.after"),
    ({"collection": "nosuch"}, 404, "collection"),
])
def test_bad_list_requests(world: World, params: dict[str, Any], status: int, param: str) -> None:
    assert error(get(world, "/v1/documents", **params), status)["param"] == param


def test_one_document(world: World) -> None:
    doc = get(world, f"/v1/documents/{world.ids['bread.txt']}").json()
    assert set(doc) == DOC_KEYS and doc["title"] == "Bread" and doc["chunks"] == 1 and doc["pages"] is None
    assert error(get(world, "/v1/documents/99999"), 404)["code"] == "document_not_found"
    error(get(world, "/v1/documents/abc"), 400)


def test_content_is_the_cached_markdown(world: World) -> None:
    r = get(world, f"/v1/documents/{world.ids['manual.md']}/content")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/markdown; charset=utf-8"
    assert r.text == world.markdown["manual.md"]
    e = error(get(world, f"/v1/documents/{world.ids['waiting.pdf']}/content"), 404)
    assert e["code"] == "document_not_indexed" and "queued" in e["message"]
    e = error(get(world, f"/v1/documents/{world.ids['broken.pdf']}/content"), 404)
    assert "quarantined" in e["message"] and "not a PDF" in e["message"]
    error(get(world, "/v1/documents/99999/content"), 404)


# ---- upload ------------------------------------------------------------------------


def upload_raw(w: World, data: Any, **params: str) -> httpx.Response:
    with w.suite.client() as c:
        return c.post("/v1/documents", params=params, content=data,
                      headers={"Content-Type": "application/octet-stream"})


def test_raw_upload_lands_in_the_inbox_and_never_overwrites(world: World) -> None:
    folder = world.folders["docs"]
    r = upload_raw(world, b"first version\n", filename="report.txt", collection="docs")
    assert r.status_code == 202, r.text
    assert r.json() == {"object": "document.upload", "path": str(folder / "report.txt"), "filename": "report.txt",
                        "collection": "docs", "bytes": 14, "status": "uploaded"}
    assert (folder / "report.txt").read_bytes() == b"first version\n"
    # The same bytes again: that file, nothing new.
    again = upload_raw(world, b"first version\n", filename="report.txt", collection="docs")
    assert again.status_code == 202 and again.json()["path"] == str(folder / "report.txt")
    # Different bytes under the same name: a new name, the first file untouched.
    second = upload_raw(world, b"second version\n", filename="report.txt", collection="docs")
    assert second.status_code == 202 and second.json()["filename"] == "report (2).txt"
    third = upload_raw(world, b"third\n", filename="report.txt", collection="docs")
    assert third.json()["filename"] == "report (3).txt"
    assert (folder / "report.txt").read_bytes() == b"first version\n"
    assert (folder / "report (2).txt").read_bytes() == b"second version\n"
    assert dot_files(folder) == []


def test_multipart_upload(world: World) -> None:
    with world.suite.client() as c:
        r = c.post("/v1/documents", files={"file": ("memo.md", b"# Memo\n\nhello\n", "text/markdown")},
                   data={"collection": "other"})
        assert r.status_code == 202, r.text
        assert r.json()["collection"] == "other" and r.json()["path"] == str(world.folders["other"] / "memo.md")
        assert (world.folders["other"] / "memo.md").read_bytes() == b"# Memo\n\nhello\n"
        # No collection named: the first configured one.
        r = c.post("/v1/documents", files={"file": ("plain.txt", b"plain\n")})
        assert r.status_code == 202 and r.json()["collection"] == "docs"
        assert (world.folders["docs"] / "plain.txt").read_bytes() == b"plain\n"
        e = error(c.post("/v1/documents", files={"document": ("x.txt", b"x")}), 400)
        assert e["param"] == "file"
        e = error(c.post("/v1/documents", files={"file": ("x.txt", b"x")}, data={"colour": "red"}), 400)
        assert e["param"] == "colour"
        error(c.post("/v1/documents", files={"file": ("x.txt", b"x")}, data={"collection": "nosuch"}), 404)
        error(c.post("/v1/documents", content=b"--nope\r\n", headers={"Content-Type": "multipart/form-data"}), 400)
    assert dot_files(world.folders["other"]) == [] and dot_files(world.folders["docs"]) == []


@pytest.mark.parametrize("name", ["../escape.txt", "a/b.txt", ".hidden", "..", "x\nb.txt", "x" * 256])
def test_bad_filenames_are_400(world: World, name: str) -> None:
    e = error(upload_raw(world, b"x", filename=name), 400)
    assert e["param"] == "filename", e
    if "\n" in name:
        return  # httpx sends a multipart filename's newline as "%0A", a plain name
    with world.suite.client() as c:
        e = error(c.post("/v1/documents", files={"file": (name, b"x")}), 400)
        assert e["param"] == "filename", e


def test_other_bad_uploads(world: World) -> None:
    assert error(upload_raw(world, b"x"), 400)["param"] == "filename"  # raw needs ?filename=
    assert error(upload_raw(world, b"x", filename="a.txt", collection="nosuch"), 404)["param"] == "collection"
    assert error(upload_raw(world, b"x", filename="a.txt", mode="fast"), 400)["param"] == "mode"
    assert not (world.folders["docs"] / "a.txt").exists()


def test_over_the_limit_is_413_and_leaves_nothing(world: World) -> None:
    folder = world.folders["docs"]
    # Under the body limit (file limit + 64 KiB of multipart framing) but over the file's.
    e = error(upload_raw(world, b"x" * (MAX_FILE + 1), filename="big.bin"), 413)
    assert e["code"] == "file_too_large"
    with world.suite.client() as c:
        r = c.post("/v1/documents", files={"file": ("big.bin", b"y" * (MAX_FILE + 1))})
    assert error(r, 413)["code"] == "file_too_large"
    # A declared length over the body limit: refused before the handler reads a byte.
    assert error(upload_raw(world, b"z" * (MAX_FILE + 70 * 1024), filename="big.bin"), 413)["code"] == \
        "body_too_large"

    # Chunked, without a length: the stream is cut at the limit.
    def chunks() -> Iterator[bytes]:
        for _ in range(8):
            yield b"w" * 1024

    assert error(upload_raw(world, chunks(), filename="big.bin"), 413)["code"] == "file_too_large"
    assert upload_raw(world, b"x" * MAX_FILE, filename="exact.bin").status_code == 202  # at the limit is fine
    assert not (folder / "big.bin").exists() and dot_files(folder) == []


def test_no_collections_configured_is_503(fresh_dir: Path) -> None:
    suite = Suite(fresh_dir, write_config(fresh_dir))
    try:
        suite.start_router()
        with suite.client() as c:
            r = c.post("/v1/documents", params={"filename": "a.txt"}, content=b"x")
        e = error(r, 503)
        assert e["code"] == "no_collections" and "no [collections] configured" in e["message"]
    finally:
        suite.stop()


# ---- delete, and the embedding daemon gone (last: it stops the daemon) -----------------


def test_delete_without_an_ingest_worker_is_503(world: World) -> None:
    with world.suite.client() as c:
        r = c.delete(f"/v1/documents/{world.ids['bread.txt']}")
        e = error(r, 503)
        assert e["code"] == "no_worker" and "ingestion daemon" in e["message"] and "Retry-After" in r.headers
        error(c.delete("/v1/documents/abc"), 400)


def test_without_the_embedding_daemon_only_text_mode_works(world: World) -> None:
    world.suite.children["embed@minilm"].stop(10)
    world.suite.wait_for(lambda c: not c.get("/ready").json()["services"].get("embed/minilm"), 10,
                         "the embed worker to leave")
    for mode in ("hybrid", "vector"):
        assert error(search(world, query="QZX-4471", mode=mode), 503)["code"] == "no_worker"
    r = search(world, query="QZX-4471", mode="text")
    assert r.status_code == 200 and len(r.json()["data"]) == 2
