"""Ingestion and retrieval: [ingest] (the ingestion daemon), [collections.NAME] (one per
inbox folder) and [search] (how the router ranks chunks and builds RAG prompts)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from daemons.config.schema import setting

MIB = 1024 * 1024


@dataclass(frozen=True)
class CollectionConfig:
    folder: str = setting(
        "", "The inbox folder whose files make up this collection (subfolders included); empty means\n"
            "STATE_DIR/inbox/NAME. Files are indexed where they lie and never modified.")
    local_only: bool = setting(False, "Its text must never leave the box (upstream providers are refused for it).")

    def path(self, state: Path, name: str) -> Path:
        return Path(self.folder) if self.folder else state / "inbox" / name


@dataclass(frozen=True)
class IngestConfig:
    enabled: bool = setting(True, "Run the ingestion daemon (onebox-ingest.service) when any [collections.NAME] exists.")
    embedding: str = setting("", "The [embeddings.NAME] model that embeds chunks and queries; empty: the first one.")
    watch: Literal["auto", "inotify", "poll"] = setting(
        "auto", "How inbox changes are seen: inotify, or polling (for network filesystems, where inotify\n"
                "sees nothing); auto polls folders on NFS/CIFS/FUSE and uses inotify elsewhere.")
    poll_interval_s: float = setting(5.0, "Polling watcher: how often each folder is listed.", gt=0)
    settle_s: float = setting(
        2.0, "A file is read once it is complete: closed after writing (inotify), or with size and\n"
             "modification time unchanged for this long (polling, and files found at start).", ge=0)
    max_file_bytes: int = setting(200 * MIB, "Larger files are quarantined.", ge=1024)
    max_docx_xml_bytes: int = setting(
        32 * MIB, "A .docx whose XML (its text, styles and so on) unzips to more is quarantined: the parser\n"
                  "holds a tree 20-40 times the XML's size in memory (the unit's MemoryMax is 2G).", ge=MIB)
    max_zip_ratio: int = setting(
        100, "A .docx part (over 1 MiB) that unzips to more than this many times its zipped size is a\n"
             "zip bomb and is quarantined; Word's XML compresses 5-20 times.", ge=10)
    min_free_mb: int = setting(
        256, "Ingestion pauses while the state disk has less free space than this (index.db and the\n"
             "markdown cache live there), says so in its status, and resumes by itself; files wait queued.",
        ge=0)
    max_attempts: int = setting(5, "Failures (OCR or embedding unavailable, a crash mid-file) before a file is\n"
                                   "quarantined; a file that can never work (corrupt, unsupported) is quarantined at once.",
                                ge=1, le=100)
    backoff_s: float = setting(5.0, "Wait before the first retry, doubling each time up to backoff_max_s.", gt=0)
    backoff_max_s: float = setting(600.0, "", gt=0)
    chunk_tokens: int = setting(256, "Tokens per chunk (the embedding model's tokens; cut to what it can embed).",
                                ge=16, le=8192)
    chunk_overlap: int = setting(32, "Tokens repeated from the end of one chunk at the start of the next.", ge=0)
    text_workers: int = setting(2, "Files parsed at once (text, markdown, HTML, docx).", ge=1, le=64)
    ocr_workers: int = setting(1, "PDFs and images read at once through the OCR daemon (in their own lane, so a\n"
                                  "300-page scan never holds up small text files).", ge=1, le=64)
    embed_batch: int = setting(16, "Chunks per call to the embedding daemon (a chat arriving meanwhile waits for\n"
                                   "at most one call: see yield_to_inference).", ge=1, le=2048)
    queue: int = setting(8, "Documents waiting between two stages (parse -> embed -> store); a full queue\n"
                            "makes the stage before it wait, so memory stays bounded.", ge=1, le=1024)
    yield_to_inference: bool = setting(
        True, "Wait before each embedding batch and OCR document while any inference daemon has\n"
              "requests in flight (on a small box they share cores, and a decode step stalls when one\n"
              "of its threads is kept off its core).")
    max_yield_s: float = setting(30.0, "Longest such a wait: under constant chat load ingestion still moves.", gt=0)
    call_timeout_s: float = setting(3600.0, "Deadline of one OCR document or embedding call.", gt=0)
    nice: int = setting(10, "Niceness of the daemon: ingestion yields the CPU to the request path.", ge=0, le=19)
    shutdown_timeout_s: float = setting(10.0, "On SIGTERM: finish the current step for this long, then stop; unfinished\n"
                                              "files are picked up again at the next start.", gt=0)

    def problems(self) -> Iterator[str]:
        if self.chunk_overlap >= self.chunk_tokens:
            yield "chunk_overlap: must be less than chunk_tokens"
        if self.backoff_s > self.backoff_max_s:
            yield "backoff_s: must not exceed backoff_max_s"


@dataclass(frozen=True)
class SearchConfig:
    mode: Literal["hybrid", "vector", "text"] = setting(
        "hybrid", "POST /v1/search when a request names no mode: vector neighbours and BM25 full text\n"
                  "fused by reciprocal rank (hybrid), or either alone.")
    vector_weight: float = setting(1.0, "Hybrid: weight / (rrf_k + rank) from each ranking, summed.", ge=0)
    text_weight: float = setting(1.0, "", ge=0)
    rrf_k: int = setting(60, "", ge=1)
    candidates: int = setting(50, "Hybrid: chunks taken from each ranking before fusing.", ge=1, le=10_000)
    vectors: Literal["binary", "exact"] = setting(
        "binary", "Nearest-neighbour scan: binary (sign bits, 32x less to scan, candidates rescored\n"
                  "exactly) or exact (every float vector). Changing it rebuilds the scan table at the\n"
                  "ingestion daemon's next start.")
    rescore: int = setting(8, "Binary: candidates scanned per result, then ranked by exact distance.", ge=1, le=1000)
    max_k: int = setting(100, "Largest k a search may ask for.", ge=1, le=10_000)
    rag_k: int = setting(5, 'Chat completions with "rag": chunks retrieved when the request names no k.', ge=1)
    rag_answer_tokens: int = setting(
        256, "Chat completions with \"rag\": room kept for the answer when sources are fitted into the\n"
             "model's context (fewer sources are sent rather than a prompt that does not fit).", ge=1)
