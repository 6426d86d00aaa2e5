"""Retrieval for the router: the query's vector from the embedding daemon, then a search
of index.db, read-only, on a worker thread (never on the event loop: a search is a few
milliseconds of SQLite that must not stall other requests).

The index belongs to the ingestion daemon; the router opens it read-only (one
connection per thread) and, in WAL mode, reads the last commit without ever waiting
for the writer. Used by POST /v1/search and by chat completions with "rag".
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from daemons.index.search import MODES, Fusion, Searcher
from daemons.router.calls import require_worker
from daemons.router.errors import APIError
from daemons.router.state import RouterState


def fusion_of(state: RouterState) -> Fusion:
    s = state.config.search
    return Fusion(vector_weight=s.vector_weight, text_weight=s.text_weight, rrf_k=s.rrf_k,
                  candidates=s.candidates, rescore=s.rescore)


def check_collection(state: RouterState, collection: str | None) -> None:
    if collection is not None and collection not in state.config.collections:
        known = ", ".join(sorted(state.config.collections)) or "none configured"
        raise APIError(404, f"no collection '{collection}' (known: {known})", "collection_not_found", "collection")


async def embed_query(state: RouterState, text: str, deadline: float) -> np.ndarray:
    key = state.config.ingest_embedding()
    if key is None:
        raise APIError(503, "no embedding model is configured ([embeddings.NAME]); use mode \"text\"",
                       "no_embedding_model")
    service = f"embed/{key}"
    require_worker(state, service, f"embedding model '{key}'")
    call = await state.broker.call(service, {"input": [text], "truncate": True}, deadline)
    try:
        parts: list[dict[str, Any]] = []
        final: dict[str, Any] = {}
        async for kind, data in call:
            if kind == "final":
                final = data
                break
            parts.append(data)
    finally:
        await call.close()
    if not parts or "dim" not in final:
        raise APIError(502, "the embedding daemon ended without a vector", "bad_gateway")
    vector: np.ndarray = np.frombuffer(parts[0]["vectors"], dtype="<f4").reshape(-1, int(final["dim"]))[0]
    return vector


async def search(state: RouterState, query: str, *, collection: str | None, k: int, mode: str,
                 deadline: float) -> list[dict[str, Any]]:
    """Ranked chunks (best first) with document id, path, title, page, heading and score."""
    if mode not in MODES:
        raise APIError(400, f"mode must be one of {', '.join(MODES)}", "invalid_request", "mode")
    check_collection(state, collection)
    index = state.index
    index.db()  # 503 now if there is no index, before asking for a vector
    vector = await embed_query(state, query, deadline) if mode in ("hybrid", "vector") else None
    fusion = fusion_of(state)

    def run() -> list[dict[str, Any]]:
        return Searcher(index.db()).search(text=query, vector=vector, collection=collection, k=k, mode=mode,
                                           fusion=fusion)

    return await asyncio.wait_for(run_in_threadpool(run), timeout=max(0.1, deadline - time.time()))
