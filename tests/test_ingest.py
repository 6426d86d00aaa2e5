"""The ingestion daemon in a running suite: inbox folders to a searchable, citable index.

One suite for the module (router, inference, embedding, OCR, ingestion), real files
dropped into real inbox folders, the real index read back. The file states are read
from index.db itself (read-only, as the router reads it)."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemons.index.schema import MIGRATIONS
from daemons.store import Database
from tests.harness import Suite, write_config
from tests.ocr_docs import PAGES, scan, scanned_pdf

GGUF = "all_minilm_l6_v2/all-MiniLM-L6-v2.f16.gguf"
COLLECTIONS = ("docs", "other", "bulk")


def config_text(root: Path) -> str:
    tables = "".join(f'[collections.{c}]\nfolder = "{root / "inbox" / c}"\n' for c in COLLECTIONS)
    return (f'[embeddings.minilm]\npath = "{GGUF}"\nthreads = 1\n'
            "[ocr]\nworkers = 1\n"
            "[ingest]\nsettle_s = 0.5\nbackoff_s = 0.2\nbackoff_max_s = 1.0\nmax_attempts = 3\n"
            "chunk_tokens = 128\nchunk_overlap = 16\n" + tables)


@pytest.fixture(scope="module")
def isuite() -> Iterator[Suite]:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        suite = Suite(root, write_config(root, extra=config_text(root)))
        try:
            suite.start_documents()
            yield suite
        finally:
            suite.stop()


def inbox(s: Suite, collection: str = "docs") -> Path:
    return s.dir / "inbox" / collection


def files(s: Suite) -> dict[str, dict[str, Any]]:
    """Every file the ingestion daemon knows, by path, from index.db."""
    db = Database(s.dir / "state" / "index.db", readonly=True, migrations=MIGRATIONS)
    try:
        return {r["path"]: r for r in db.rows("SELECT * FROM files")}
    finally:
        db.close()


def wait_done(s: Suite, paths: list[Path], timeout: float = 120.0, poll_s: float = 0.2,
              ) -> dict[str, dict[str, Any]]:
    """Until every path is indexed or quarantined; their rows."""
    want = [str(p) for p in paths]
    end = time.monotonic() + timeout
    while True:
        rows = files(s)
        if all(rows.get(p, {}).get("state") in ("indexed", "quarantined") for p in want):
            return {p: rows[p] for p in want}
        if time.monotonic() > end:
            raise AssertionError({p: rows.get(p, {}).get("state") for p in want
                                  if rows.get(p, {}).get("state") not in ("indexed", "quarantined")})
        time.sleep(poll_s)


def search(c: httpx.Client, query: str, **kw: Any) -> list[dict[str, Any]]:
    r = c.post("/v1/search", json={"query": query, **kw})
    assert r.status_code == 200, r.text
    hits: list[dict[str, Any]] = r.json()["data"]
    return hits


def names(hits: list[dict[str, Any]]) -> list[str]:
    return [Path(h["path"]).name for h in hits]


def test_a_mixed_folder_becomes_searchable_and_citable(isuite: Suite) -> None:
    folder = inbox(isuite)
    (folder / "notes.txt").write_text("Field notes. The quokkaberry shrub flowers in early spring on the "
                                      "western slopes, and its fruit ripens by midsummer.\n")
    (folder / "guide.md").write_text("# Pump manual\n\n## Maintenance\n\nReplace the impeller gasket every "
                                     "400 hours of operation.\n\n## Safety\n\nAlways isolate the mains before "
                                     "opening the housing.\n")
    (folder / "page.html").write_text("<html><head><title>Lighthouse history</title><style>p{}</style>"
                                      "<script>var hidden = 'scriptword';</script></head><body><h1>Lighthouse "
                                      "history</h1><p>The Skerryvore lighthouse was completed in 1844.</p>"
                                      "</body></html>")
    scanned_pdf(folder / "scan.pdf", PAGES[:2])
    scan(PAGES[2]).save(folder / "photo.png", dpi=(300, 300))
    dropped = [folder / n for n in ("notes.txt", "guide.md", "page.html", "scan.pdf", "photo.png")]
    (inbox(isuite, "other") / "elsewhere.txt").write_text("A different quokkaberry report, filed in the other "
                                                          "collection.\n")
    rows = wait_done(isuite, [*dropped, inbox(isuite, "other") / "elsewhere.txt"], timeout=180)
    assert {r["state"] for r in rows.values()} == {"indexed"}, rows
    with isuite.client(timeout=120) as c:
        assert "notes.txt" in names(search(c, "quokkaberry", collection="docs"))[:1]
        gasket = search(c, "how often should the impeller gasket be replaced", collection="docs")
        assert names(gasket)[0] == "guide.md" and "Maintenance" in gasket[0]["heading"]
        assert names(search(c, "Skerryvore", collection="docs", mode="text")) == ["page.html"]
        assert search(c, "scriptword", mode="text") == []  # scripts are not text
        sphinx = search(c, "sphinx of black quartz judge my vow", collection="docs")
        assert names(sphinx)[0] == "scan.pdf" and sphinx[0]["page"] <= 2 <= sphinx[0]["page_end"]
        assert names(search(c, "discotheques provide jukeboxes", collection="docs"))[0] == "photo.png"
        r = c.post("/v1/chat/completions", json={
            "model": "smollm2", "max_tokens": 24, "temperature": 0,
            "messages": [{"role": "user", "content": "When does the quokkaberry flower?"}],
            "rag": {"collection": "docs", "k": 3}})
        assert r.status_code == 200, r.text
        body = r.json()
        sources = body["sources"]
        assert sources and all(s["collection"] == "docs" for s in sources)
        assert Path(sources[0]["path"]).name == "notes.txt" and sources[0]["index"] == 1
        assert body["choices"][0]["message"]["content"]
        # Streamed: the sources come in the last chunk, the one with finish_reason.
        with c.stream("POST", "/v1/chat/completions", json={
                "model": "smollm2", "max_tokens": 8, "stream": True,
                "messages": [{"role": "user", "content": "quokkaberry"}], "rag": {"collection": "other"}}) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] and [Path(x["path"]).name for x in last["sources"]] == \
            ["elsewhere.txt"]


def test_rag_never_overflows_the_context(isuite: Suite) -> None:
    """Twenty long sources against a 2,048-token context: fewer are sent, never a 400."""
    folder = inbox(isuite, "other")
    paths = []
    for i in range(20):
        p = folder / f"long{i}.txt"
        p.write_text(f"Report {i} on the glacier survey. " + "The ice sheet moved steadily. " * 60)
        paths.append(p)
    wait_done(isuite, paths)
    with isuite.client(timeout=120) as c:
        r = c.post("/v1/chat/completions", json={
            "model": "smollm2", "max_tokens": 16,
            "messages": [{"role": "user", "content": "What did the glacier survey find about the ice sheet?"}],
            "rag": {"collection": "other", "k": 40}})
        assert r.status_code == 200, r.text
        used = r.json()["sources"]
        assert 0 < len(used) < 40
        assert r.json()["usage"]["prompt_tokens"] <= 2048 - 16


def test_a_half_written_file_is_not_read_early(isuite: Suite) -> None:
    path = inbox(isuite) / "slow.txt"
    with open(path, "w") as f:
        f.write("The first half of a slow upload. " * 20)
        f.flush()
        time.sleep(3)  # six times settle_s, with the file still open
        assert str(path) not in files(isuite), "read while still being written"
        f.write("And the tail arrives with the word zebracorn at last.\n")
    rows = wait_done(isuite, [path])
    assert rows[str(path)]["state"] == "indexed"
    with isuite.client() as c:
        hits = search(c, "zebracorn", mode="text")
        assert names(hits) == ["slow.txt"]


def test_duplicate_modified_and_deleted_files(isuite: Suite) -> None:
    folder = inbox(isuite)
    a, b = folder / "a.txt", folder / "b.txt"
    a.write_text("Original text about the marmalade festival.\n")
    b.write_text("Original text about the marmalade festival.\n")
    rows = wait_done(isuite, [a, b])
    assert rows[str(a)]["document_id"] == rows[str(b)]["document_id"] is not None  # one document
    with isuite.client() as c:
        assert len(search(c, "marmalade", mode="text")) == 1
        a.write_text("Rewritten: the festival moved to the harbour and now sells jam.\n")
        end = time.monotonic() + 60
        while files(isuite)[str(a)]["document_id"] == rows[str(b)]["document_id"] or \
                files(isuite)[str(a)]["state"] != "indexed":
            assert time.monotonic() < end, files(isuite)[str(a)]
            time.sleep(0.2)
        assert names(search(c, "harbour", mode="text")) == ["a.txt"]
        assert names(search(c, "marmalade", mode="text")) == ["b.txt"]  # b still has the old bytes
        b.unlink()
        end = time.monotonic() + 30
        while str(b) in files(isuite):
            assert time.monotonic() < end
            time.sleep(0.2)
        assert search(c, "marmalade", mode="text") == []
        a.unlink()
        end = time.monotonic() + 30
        while search(c, "harbour", mode="text"):
            assert time.monotonic() < end
            time.sleep(0.2)


def test_bad_files_are_quarantined_with_a_reason(isuite: Suite) -> None:
    folder = inbox(isuite)
    bad = {
        "junk.txt": os.urandom(4096) + b"\x00" * 64,
        "broken.pdf": b"%PDF-1.7\n" + os.urandom(2048),
        "empty.txt": b"",
        "blob.xyz": b"\x7fELF" + os.urandom(512),
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    rows = wait_done(isuite, [folder / n for n in bad])
    for name in bad:
        row = rows[str(folder / name)]
        assert row["state"] == "quarantined" and row["reason"], row
    assert "empty" in rows[str(folder / "empty.txt")]["reason"]
    good = folder / "after.txt"
    good.write_text("Still working after the bad files: heliotrope.\n")
    assert wait_done(isuite, [good])[str(good)]["state"] == "indexed"
    assert isuite.children["ingest"].exit_code() is None


def test_hybrid_search_finds_rare_terms_and_paraphrases(isuite: Suite) -> None:
    folder = inbox(isuite, "bulk")
    # The part number is one detail of a longer text; other files hold look-alike codes,
    # which is what the embedding of a bare code is near. BM25 matches the exact token.
    docs = {
        "pump.txt": "Service bulletin for the cooling circuit. During the annual inspection the technician drains "
                    "the loop, checks the hoses for cracks, replaces the seal kit QZ7781X on the coolant pump and "
                    "refills with fresh glycol before the pressure test.",
        "codes.txt": "Catalogue codes QZ7718X, QZ1877X, XQ7781Z and QZ8771Y.",
        "codes2.txt": "Order references: QX7781Z, ZQ7781X-B, QZ-7781.",
        "vet.txt": "Veterinarians recommend vaccinating young dogs and walking them twice daily.",
        "bread.txt": "Knead the dough for ten minutes, then let it rise until doubled in size.",
        "tax.txt": "File the quarterly return before the end of the month to avoid penalties.",
    }
    for name, text in docs.items():
        (folder / name).write_text(text + "\n")
    wait_done(isuite, [folder / n for n in docs])
    with isuite.client() as c:
        rare = "QZ7781X"
        assert names(search(c, rare, collection="bulk", mode="text"))[:1] == ["pump.txt"]
        assert names(search(c, rare, collection="bulk", mode="vector", k=1)) != ["pump.txt"]
        assert "pump.txt" in names(search(c, rare, collection="bulk", k=2))
        paraphrase = "how should I look after a puppy's health"
        assert search(c, paraphrase, collection="bulk", mode="text") == []
        assert names(search(c, paraphrase, collection="bulk", mode="vector"))[:1] == ["vet.txt"]
        assert names(search(c, paraphrase, collection="bulk"))[:1] == ["vet.txt"]
    for name in docs:
        (folder / name).unlink()


def test_search_never_waits_for_the_writer(isuite: Suite) -> None:
    """A write transaction held open on index.db (as ingestion holds one while storing a
    big document) does not delay the router's reads."""
    writer = Database(isuite.dir / "state" / "index.db", busy_timeout_ms=30_000)
    try:
        with writer.transaction(), isuite.client() as c:
            writer.execute("UPDATE meta SET value = value WHERE key = 'dims'")
            t0 = time.monotonic()
            for _ in range(5):
                r = c.post("/v1/search", json={"query": "quokkaberry", "mode": "text"})
                assert r.status_code == 200, r.text
            assert time.monotonic() - t0 < 2.0
    finally:
        writer.close()


def test_ingest_status_is_on_the_bus(isuite: Suite) -> None:
    with isuite.client() as c:
        services = c.get("/v1/status").json()["services"]
    (ingest,) = [s for name, s in services.items() if name == "ingest"]
    files_ = ingest["workers"][0]["files"]
    assert files_["indexed"] > 0 and set(files_) == {"queued", "processing", "indexed", "quarantined"}


def test_kill9_mid_batch_then_restart_indexes_every_file_exactly_once(isuite: Suite) -> None:
    folder = inbox(isuite, "bulk") / "batch"
    folder.mkdir()
    paths = []
    for i in range(40):
        p = folder / f"file{i:02d}.txt"
        p.write_text(f"Batch file {i}. " + " ".join(f"word{i}x{j}" for j in range(300)) + "\n")
        paths.append(p)
    end = time.monotonic() + 120
    while True:
        states = [files(isuite).get(str(p), {}).get("state") for p in paths]
        if states.count("indexed") >= 2:
            break
        assert time.monotonic() < end, states
        time.sleep(0.05)
    assert states.count("indexed") < len(paths), "finished before the kill: make the batch bigger"
    killed = isuite.children["ingest"]
    killed.signal(signal.SIGKILL)
    end = time.monotonic() + 10
    while killed.exit_code() is None:
        assert time.monotonic() < end
        time.sleep(0.05)
    isuite.start_daemon("ingest")
    rows = wait_done(isuite, paths, timeout=180)
    assert {r["state"] for r in rows.values()} == {"indexed"}
    db = Database(isuite.dir / "state" / "index.db", readonly=True, migrations=MIGRATIONS)
    try:
        ids = [r["document_id"] for r in rows.values()]
        assert len(set(ids)) == len(paths)
        marks = ",".join("?" * len(ids))
        per_doc = db.all(f"SELECT document_id, count(*), count(DISTINCT seq) FROM chunks WHERE document_id IN "
                         f"({marks}) GROUP BY document_id", ids)
        assert len(per_doc) == len(paths) and all(n == distinct for _, n, distinct in per_doc)
        chunks = db.value("SELECT count(*) FROM chunks")
        assert db.value("SELECT count(*) FROM chunk_vectors") == chunks
        assert db.value("SELECT count(*) FROM knn") == chunks
        assert db.value("SELECT count(*) FROM documents d WHERE NOT EXISTS "
                        "(SELECT 1 FROM chunks c WHERE c.document_id = d.id)") == 0
    finally:
        db.close()
    with isuite.client() as c:
        assert names(search(c, "word17x5", collection="bulk", mode="text")) == ["file17.txt"]
