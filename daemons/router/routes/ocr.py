"""POST /v1/ocr: a scanned PDF or an image to markdown, for apps that only want OCR.

The document comes as an upload (multipart/form-data, field "file"), as the raw body
(Content-Type application/pdf, image/*, application/octet-stream), or as a path the OCR
daemon may read (JSON {"path": ...}: inside its allowed directories, the inbox). Uploads
are written to STATE/uploads/ (the OCR daemon reads files, never bytes over the bus) and
removed when the call ends. The reply is JSON, or Server-Sent Events page by page with
"stream": true (a 300-page scan shows its progress).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from daemons.bus.broker import Call
from daemons.bus.errors import BusError
from daemons.router import errors
from daemons.router.body import once_each, parse_body
from daemons.router.calls import require_worker, unless_gone, watch
from daemons.router.errors import APIError
from daemons.router.shape import sse
from daemons.router.state import Caller, RouterState, caller, get_state

log = logging.getLogger(__name__)

router = APIRouter()

SERVICE = "ocr"
CHUNK = 1 << 20
DOCUMENT_TYPES = ("application/pdf", "application/octet-stream", "image/")


class OcrOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    languages: str | None = Field(default=None, max_length=200)
    dpi: int | None = None
    first_page: int | None = None
    max_pages: int | None = None
    stream: bool = False


class OcrPathRequest(OcrOptions):
    path: str = Field(min_length=1, max_length=4096)


def uploads_dir(state: RouterState) -> Path:
    return state.config.paths.state / "uploads"


def inbox_path(state: RouterState, given: str) -> str:
    """A path a client names must be a file in the inbox (symlinks and .. resolved)."""
    inbox = (state.config.paths.state / "inbox").resolve()
    try:
        real = Path(os.path.realpath(given))
    except ValueError:  # a NUL byte, or a lone surrogate no file name can hold
        raise APIError(400, f"path {given!r} is not a file name this system can hold", "invalid_request",
                       "path") from None
    if not Path(given).is_absolute() or (real != inbox and inbox not in real.parents):
        raise APIError(400, f"path must be an absolute path inside the inbox ({inbox}); upload other files instead",
                       "invalid_request", "path")
    return str(real)


def options_from(values: dict[str, str]) -> OcrOptions:
    """Query parameters or form fields, which are all strings."""
    raw: dict[str, Any] = {}
    for key, value in values.items():
        if key in ("dpi", "first_page", "max_pages"):
            if not value.lstrip("-").isdigit():
                raise APIError(400, f"{key}: must be an integer", "invalid_request", key)
            raw[key] = int(value)
        elif key == "stream":
            raw[key] = value.lower() in ("1", "true", "yes")
        else:
            raw[key] = value
    try:
        return OcrOptions.model_validate(raw)
    except Exception as exc:  # pydantic's ValidationError: an unknown field or a bad value
        raise APIError(400, f"bad OCR option: {exc}".splitlines()[0], "invalid_request") from None


@router.post("/v1/ocr", response_model=None)
async def ocr(request: Request, who: Caller = Depends(caller), state: RouterState = Depends(get_state)) -> Response:
    if not state.config.ocr.enabled:
        raise APIError(404, "OCR is turned off on this box ([ocr] enabled = false)", "not_found")
    require_worker(state, SERVICE, "OCR")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    upload: Path | None = None
    opts: OcrOptions
    try:
        if kind == "application/json":
            by_path = parse_body(OcrPathRequest, await request.body())
            opts, path = by_path, inbox_path(state, by_path.path)
        elif kind == "multipart/form-data":
            upload, opts = await save_multipart(request, state)
            path = str(upload)
        elif kind.startswith(DOCUMENT_TYPES) or not kind:
            opts = options_from(once_each(request.query_params.multi_items(), "query parameter"))
            upload = await save_stream(request.stream(), state)
            path = str(upload)
        else:
            raise APIError(415, f"Content-Type {kind!r}: send the document as multipart/form-data (field \"file\"), "
                                "as the raw body (application/pdf, image/...), or JSON {\"path\": ...}",
                           "unsupported_media_type")
        body = {"path": path, **opts.model_dump(exclude={"stream", "path"}, exclude_none=True)}
        return await run(state, request, who, body, opts.stream, upload)
    except BaseException:
        if upload is not None:
            upload.unlink(missing_ok=True)
        raise


async def save_stream(chunks: AsyncIterator[bytes], state: RouterState) -> Path:
    directory = uploads_dir(state)
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    path = directory / f"{uuid.uuid4().hex}.upload"
    try:
        with open(path, "xb") as f:
            os.chmod(path, 0o640)
            async for chunk in chunks:
                f.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


async def save_multipart(request: Request, state: RouterState) -> tuple[Path, OcrOptions]:
    try:
        form = await request.form(max_files=1, max_fields=10)
    except APIError:
        raise
    except Exception as exc:  # a malformed multipart body
        raise APIError(400, f"bad multipart body: {exc}", "invalid_request") from None
    try:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise APIError(400, 'multipart upload: the document goes in a file field named "file"', "invalid_request",
                           "file")
        opts = options_from(once_each([(k, v) for k, v in form.multi_items() if isinstance(v, str)], "form field"))

        async def chunks() -> AsyncIterator[bytes]:
            while block := await file.read(CHUNK):
                yield block

        return await save_stream(chunks(), state), opts
    finally:
        await form.close()


async def run(state: RouterState, request: Request, who: Caller, body: dict[str, Any], stream: bool,
              upload: Path | None) -> Response:
    gone = watch(request)
    call: Call | None = None
    streaming = False
    try:
        call = await unless_gone(state.broker.call(SERVICE, body, who.deadline), gone)
        replies = aiter(call)
        # The first reply before any response: a refused document is a real HTTP status.
        first = await unless_gone(anext(replies), gone)
        if stream:
            streaming = True
            return StreamingResponse(events(state, call, replies, first, upload), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pages: list[dict[str, Any]] = []
        kind, data = first
        while kind == "partial":
            pages.append(data)
            kind, data = await unless_gone(anext(replies), gone)
        return JSONResponse(document(pages, data))
    finally:
        gone.cancel()
        if not streaming:
            if call is not None:
                await call.close()
            if upload is not None:
                upload.unlink(missing_ok=True)


def page_object(data: dict[str, Any]) -> dict[str, Any]:
    return {"object": "ocr.page", **{k: data.get(k) for k in ("page", "pages", "method", "confidence", "chars",
                                                                "markdown")}}


def document(pages: list[dict[str, Any]], final: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "ocr.document",
        "markdown": "\n\n".join(str(p.get("markdown", "")) for p in pages),
        "pages": [{k: v for k, v in page_object(p).items() if k not in ("object", "markdown")} for p in pages],
        "usage": {k: final.get(k) for k in ("pages", "ocr_pages", "text_pages")},
        "mean_confidence": final.get("mean_confidence"),
        "seconds": final.get("seconds"),
    }


async def events(state: RouterState, call: Call, replies: AsyncIterator[tuple[str, dict[str, Any]]],
                 first: tuple[str, dict[str, Any]], upload: Path | None) -> AsyncIterator[bytes]:
    try:
        kind, data = first
        pages: list[dict[str, Any]] = []
        while kind == "partial":
            pages.append(data)
            yield sse(page_object(data))
            kind, data = await anext(replies)
        done = document(pages, data)
        done.pop("markdown")
        yield sse(json.dumps(done, separators=(",", ":")))
        yield sse("[DONE]")
    except BusError as exc:
        err = errors.from_bus(exc, state.config.router.retry_after_s)
        log.warning("OCR stream %s ended with %d: %s", call.id, err.status, err.message)
        yield sse(errors.error_body(err.status, err.message, err.code))
    finally:
        await call.close()
        if upload is not None:
            upload.unlink(missing_ok=True)
