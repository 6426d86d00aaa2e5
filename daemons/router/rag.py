"""RAG for chat completions: `"rag": {"collection": NAME, "k": N}` in the request.

The router retrieves chunks for the last user message (daemons/router/retrieve.py) and
sends them, best first, with the chat to the inference daemon, which puts as many as fit
its context (keeping search.rag_answer_tokens for the answer) into the system prompt,
numbered for citing as [1], [2] (daemons/infer/rag.py). The reply carries the sources
the prompt held in a `sources` field (in the last chunk when streamed), in that order.
A retrieval that would overflow the context therefore never makes a request fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemons.router import retrieve
from daemons.router.errors import APIError
from daemons.router.schemas import ChatRequest
from daemons.router.state import Caller, RouterState


def label(hit: dict[str, Any]) -> str:
    where = Path(str(hit.get("path") or "")).name
    page = hit.get("page")
    pages = "" if page is None else (f", page {page}" if hit.get("page_end") in (None, page)
                                     else f", pages {page}-{hit['page_end']}")
    title = str(hit.get("title") or where)
    return f"{title} ({where}{pages})" if where and where != title else f"{title}{pages}"


def source(n: int, hit: dict[str, Any]) -> dict[str, Any]:
    return {"index": n, "document_id": hit.get("file_id"), "chunk_id": hit["id"], "title": hit.get("title"),
            "path": hit.get("path"), "collection": hit.get("collection"), "page": hit.get("page"),
            "page_end": hit.get("page_end"), "heading": hit.get("heading"), "score": hit.get("score"),
            "text": hit.get("text")}


async def retrieve_sources(state: RouterState, req: ChatRequest, who: Caller) -> tuple[list[dict[str, Any]],
                                                                                       dict[str, Any]]:
    """(the sources for the reply, the "rag" part of the bus body)."""
    assert req.rag is not None
    question = req.question()
    if not question:
        raise APIError(400, "rag needs a user message to retrieve for", "invalid_request", "messages")
    s = state.config.search
    hits = await retrieve.search(state, question, collection=req.rag.collection, k=req.rag.k or s.rag_k,
                                 mode=req.rag.mode or s.mode, deadline=who.deadline)
    sources = [source(n, h) for n, h in enumerate(hits, 1)]
    body = {"sources": [{"label": label(h), "text": h["text"]} for h in hits],
            "answer_tokens": s.rag_answer_tokens}
    return sources, body


def local_only(state: RouterState, req: ChatRequest, sources: list[dict[str, Any]]) -> str | None:
    """Why a RAG request must stay on this machine: it searches, or drew a source from, a
    local_only collection."""
    collections = state.config.collections
    asked = req.rag.collection if req.rag is not None else None
    if asked and asked in collections and collections[asked].local_only:
        return f"collection {asked!r} is local_only"
    for s in sources:
        name = s.get("collection")
        if isinstance(name, str) and name in collections and collections[name].local_only:
            return f"a source comes from collection {name!r}, which is local_only"
    return None
