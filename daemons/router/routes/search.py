"""POST /v1/search: the chunks of the indexed documents that best answer a query.

Hybrid (vectors and BM25 fused), vector or text alone; filtered by collection. Hybrid and
vector need the embedding daemon for the query's vector; text works without it. A result
names its document by the file's id, the one GET /v1/documents lists and DELETE takes
(the content id that duplicates share stays inside the index).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from daemons.router import retrieve
from daemons.router.body import parse_body
from daemons.router.calls import unless_gone, watch
from daemons.router.errors import APIError
from daemons.router.state import Caller, RouterState, caller, get_state

router = APIRouter()

DEFAULT_K = 10


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1, max_length=10_000)
    collection: str | None = Field(default=None, min_length=1, max_length=256)
    k: int | None = Field(default=None, ge=1, strict=True)
    mode: Literal["hybrid", "vector", "text"] | None = None


def result_object(rank: int, hit: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "search.result", "rank": rank, "score": hit["score"], "text": hit["text"],
        "heading": hit["heading"], "page": hit["page"], "page_end": hit["page_end"],
        "document_id": hit["file_id"], "path": hit["path"], "title": hit["title"],
        "collection": hit["collection"], "chunk_id": hit["id"],
    }


@router.post("/v1/search")
async def search(request: Request, who: Annotated[Caller, Depends(caller)],
                 state: Annotated[RouterState, Depends(get_state)]) -> dict[str, Any]:
    req = parse_body(SearchRequest, await request.body())
    if not req.query.strip():
        raise APIError(400, "query must not be blank", "invalid_request", "query")
    max_k = state.config.search.max_k
    k = req.k if req.k is not None else min(DEFAULT_K, max_k)
    if k > max_k:
        raise APIError(400, f"k: must be at most {max_k} ([search] max_k)", "invalid_request", "k")
    mode = req.mode or state.config.search.mode
    gone = watch(request)
    try:
        hits = await unless_gone(
            retrieve.search(state, req.query, collection=req.collection, k=k, mode=mode, deadline=who.deadline), gone)
    except TimeoutError:
        raise APIError(504, "the search ran past the request's deadline", "deadline_exceeded") from None
    finally:
        gone.cancel()
    return {"object": "list", "query": req.query, "mode": mode, "collection": req.collection,
            "data": [result_object(rank, hit) for rank, hit in enumerate(hits, 1)]}
