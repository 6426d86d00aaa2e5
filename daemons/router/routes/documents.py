"""/v1/documents: the files of the inbox folders, as the ingestion daemon sees them.

To a user a document is a file: its id is the `files` row's, the same one search
results give as "document_id". Listing and reading are read-only queries on index.db,
on a worker thread; an upload writes the file into its collection's inbox folder
(daemons/router/inbox.py) and leaves the rest to the ingestion daemon, which the
client follows by polling GET /v1/documents; a delete asks the ingestion daemon, the
index's only writer, to remove the file and its index entries.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as InPath
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from daemons.bus.broker import Call
from daemons.index.schema import STATES, file_counts
from daemons.router import inbox
from daemons.router.body import once_each
from daemons.router.calls import require_worker, unless_gone, watch
from daemons.router.errors import APIError
from daemons.router.retrieve import check_collection
from daemons.router.state import Caller, RouterState, caller, get_state
from daemons.store import Database

router = APIRouter()

SERVICE = "ingest"
CHUNK = 1 << 20
MAX_LIMIT = 1000
UPLOAD_PARAMS = ("filename", "collection")

State = Annotated[RouterState, Depends(get_state)]
Who = Annotated[Caller, Depends(caller)]
# A files row id: SQLite's integers are 64-bit, and a larger one cannot even be asked for.
MAX_ID = 2**63 - 1
FileId = Annotated[int, InPath(ge=1, le=MAX_ID)]

SELECT = (
    "SELECT f.id, f.path, f.collection, f.state, f.reason, f.attempts, f.size, f.sha256, f.queued_at, f.updated_at, "
    "d.title, d.pages, d.indexed_at, d.markdown, "
    "(SELECT count(*) FROM chunks c WHERE c.document_id = d.id) AS chunks "
    "FROM files f LEFT JOIN documents d ON d.id = f.document_id"
)


def document_object(row: dict[str, Any]) -> dict[str, Any]:
    """The title, pages, chunks and indexed_at are those of the content the file shows as
    now (null until it is first indexed; while a changed file waits to be indexed again,
    its previous version's)."""
    return {
        "object": "document", "id": row["id"], "path": row["path"], "filename": Path(row["path"]).name,
        "collection": row["collection"], "status": row["state"], "reason": row["reason"],
        "attempts": row["attempts"], "bytes": row["size"], "sha256": row["sha256"], "title": row["title"],
        "pages": row["pages"], "chunks": row["chunks"], "queued_at": row["queued_at"],
        "updated_at": row["updated_at"], "indexed_at": row["indexed_at"],
    }


def find(db: Database, file_id: int) -> dict[str, Any]:
    rows = db.rows(f"{SELECT} WHERE f.id = ?", (file_id,))
    if not rows:
        raise APIError(404, f"no document {file_id}", "document_not_found", "id")
    return rows[0]


def listing(db: Database, collection: str | None, status: str | None, limit: int,
            after: int | None) -> dict[str, Any]:
    """One page by id, and the counts by status of the whole collection (or of all)."""
    where: list[str] = []
    args: list[Any] = []
    if collection is not None:
        where.append("f.collection = ?")
        args.append(collection)
    if status is not None:
        where.append("f.state = ?")
        args.append(status)
    if after is not None:
        where.append("f.id > ?")
        args.append(after)
    sql = SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY f.id LIMIT ?"
    with db.snapshot():  # the page and the counts from the same commit
        rows = db.rows(sql, [*args, limit + 1])
        counts = file_counts(db, collection)
    return {"object": "list", "data": [document_object(r) for r in rows[:limit]], "has_more": len(rows) > limit,
            "counts": counts}


@router.get("/v1/documents")
async def list_documents(state: State, collection: str | None = None, status: str | None = None,
                         limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
                         after: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None) -> dict[str, Any]:
    """Ordered by id; the next page starts `after` the last id of this one."""
    check_collection(state, collection)
    if status is not None and status not in STATES:
        raise APIError(400, f"status must be one of {', '.join(STATES)}", "invalid_request", "status")
    index = state.index
    result: dict[str, Any] = await run_in_threadpool(lambda: listing(index.db(), collection, status, limit, after))
    return result


@router.get("/v1/documents/{file_id}")
async def get_document(file_id: FileId, state: State) -> dict[str, Any]:
    index = state.index
    row = await run_in_threadpool(lambda: find(index.db(), file_id))
    return document_object(row)


@router.get("/v1/documents/{file_id}/content", response_model=None)
async def document_content(file_id: FileId, state: State) -> Response:
    """The markdown the document was indexed from (the ingestion daemon's cache)."""
    index = state.index
    row = await run_in_threadpool(lambda: find(index.db(), file_id))
    if row["markdown"] is None:
        why = f": {row['reason']}" if row["reason"] else ""
        raise APIError(404, f"document {file_id} is not indexed (status {row['state']}{why})", "document_not_indexed",
                       "id")
    path = Path(row["markdown"])
    if not await run_in_threadpool(path.is_file):
        raise APIError(404, f"document {file_id}: its cached markdown is missing ({path}); it is indexed again when "
                            "the file changes or the ingestion daemon rebuilds the index", "content_missing", "id")
    return FileResponse(path, media_type="text/markdown; charset=utf-8")


@router.delete("/v1/documents/{file_id}")
async def delete_document(file_id: FileId, request: Request, who: Who, state: State) -> dict[str, Any]:
    """The ingestion daemon deletes the file from its inbox and its entries from the index
    (the router only reads index.db); its 404 or 409 comes back as this reply's status."""
    require_worker(state, SERVICE, "the ingestion daemon")
    gone = watch(request)
    call: Call | None = None
    try:
        call = await unless_gone(state.broker.call(SERVICE, {"op": "delete", "id": file_id}, who.deadline), gone)
        final = await unless_gone(final_of(call), gone)
    finally:
        gone.cancel()
        if call is not None:
            await call.close()
    return {"id": final.get("id", file_id), "object": "document", "deleted": bool(final.get("deleted", True))}


async def final_of(call: Call) -> dict[str, Any]:
    async for kind, data in call:
        if kind == "final":
            return data
    raise APIError(502, "the ingestion daemon ended without a reply", "bad_gateway")


# ---- upload ----------------------------------------------------------------------


def upload_collection(state: RouterState, name: str | None) -> tuple[str, Path]:
    """The named collection, else the first configured one, and its inbox folder."""
    collections = state.config.collections
    if not collections:
        raise APIError(503, "no [collections] configured: add a [collections.NAME] table to upload documents",
                       "no_collections")
    if name is None:
        name = next(iter(collections))
    check_collection(state, name)
    return name, state.config.collection_dirs()[name]


def upload_params(values: dict[str, str], where: str) -> dict[str, str]:
    unknown = sorted(set(values) - set(UPLOAD_PARAMS))
    if unknown:
        raise APIError(400, f"unknown {where} {unknown[0]!r} (known: {', '.join(UPLOAD_PARAMS)})", "invalid_request",
                       unknown[0])
    return values


@router.post("/v1/documents", response_model=None)
async def upload(request: Request, who: Who, state: State) -> Response:
    """Multipart (field "file", optional "collection" field) or the raw body with
    ?filename=NAME; ?collection=NAME either way. 202: indexing happens later."""
    query = upload_params(once_each(request.query_params.multi_items(), "query parameter"), "query parameter")
    limit = state.config.ingest.max_file_bytes
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        placed, collection = await save_multipart(request, state, query, limit)
    else:
        collection, folder = upload_collection(state, query.get("collection"))
        name = inbox.plain_name(query.get("filename"))
        placed = await inbox.save(request.stream(), folder, name, limit)
    return JSONResponse({"object": "document.upload", "path": str(placed.path), "filename": placed.path.name,
                         "collection": collection, "bytes": placed.bytes, "status": "uploaded"}, status_code=202)


async def save_multipart(request: Request, state: RouterState, query: dict[str, str],
                         limit: int) -> tuple[inbox.Placed, str]:
    try:
        form = await request.form(max_files=1, max_fields=10)
    except HTTPException as exc:  # Starlette's answer to a malformed multipart body
        raise APIError(400, f"bad multipart body: {exc.detail}", "invalid_request") from None
    try:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise APIError(400, 'multipart upload: the document goes in a file field named "file"', "invalid_request",
                           "file")
        fields = upload_params(once_each([(k, v) for k, v in form.multi_items() if isinstance(v, str)], "form field"),
                               "form field")
        collection, folder = upload_collection(state, fields.get("collection", query.get("collection")))
        name = inbox.plain_name(fields.get("filename", query.get("filename", file.filename)))

        async def chunks() -> AsyncIterator[bytes]:
            while block := await file.read(CHUNK):
                yield block

        return await inbox.save(chunks(), folder, name, limit), collection
    finally:
        await form.close()
