"""POST /v1/chat/completions and /v1/completions, streamed (SSE) and not."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from daemons.bus.broker import Call
from daemons.bus.errors import BusError
from daemons.router import errors
from daemons.router.body import parse_body
from daemons.router.calls import require_worker, unless_gone, watch
from daemons.router.errors import APIError
from daemons.router import rag
from daemons.router.routes.models import infer_service
from daemons.router.schemas import ChatRequest, CompletionRequest, Sampling
from daemons.router.shape import Shape, sse
from daemons.router.state import Caller, RouterState, caller, get_state

log = logging.getLogger(__name__)

router = APIRouter()

Replies = AsyncIterator[tuple[str, dict[str, Any]]]


@router.post("/v1/chat/completions", response_model=None)
async def chat(request: Request, who: Caller = Depends(caller), state: RouterState = Depends(get_state)) -> Response:
    req = parse_body(ChatRequest, await request.body())
    body = req.body()
    sources: list[dict[str, Any]] | None = None
    if req.rag is not None:
        check_model(state, req.model)
        sources, body["rag"] = await rag.retrieve_sources(state, req, who)
    return await generate(state, req, body, request, who, chat=True, sources=sources)


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, who: Caller = Depends(caller),
                      state: RouterState = Depends(get_state)) -> Response:
    req = parse_body(CompletionRequest, await request.body())
    return await generate(state, req, req.body(), request, who, chat=False)


def check_model(state: RouterState, model: str) -> str:
    if model not in state.config.models:
        raise APIError(404, f"The model '{model}' does not exist", "model_not_found", "model")
    service = infer_service(model)
    require_worker(state, service, f"model '{model}'")
    return service


async def generate(state: RouterState, req: Sampling, body: dict[str, Any], request: Request, who: Caller,
                   chat: bool, sources: list[dict[str, Any]] | None = None) -> Response:
    service = check_model(state, req.model)
    gone = watch(request)
    call: Call | None = None
    streaming = False
    try:
        call = await unless_gone(state.broker.call(service, body, who.deadline), gone)
        shape = Shape(req.model, call.id, chat, sources)
        replies = aiter(call)
        # The first reply comes before any response, so that a refusal (prompt too
        # long, overload) is a real HTTP status, not an error event inside a 200 stream.
        first = await unless_gone(anext(replies), gone)
        if req.stream:
            streaming = True  # the response closes the call, and listens for the client
            return StreamingResponse(
                stream(state, call, replies, first, shape, req.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        text, final = await unless_gone(whole(first, replies), gone)
        return JSONResponse(shape.whole(text, final))
    finally:
        gone.cancel()
        if call is not None and not streaming:
            await call.close()  # sends CANCEL unless the call finished


async def stream(state: RouterState, call: Call, replies: Replies, first: tuple[str, dict[str, Any]], shape: Shape,
                 include_usage: bool) -> AsyncIterator[bytes]:
    try:
        yield sse(shape.chunk({"role": "assistant", "content": ""} if shape.chat else {"text": ""}, None))
        kind, data = first
        while True:
            if kind == "partial":
                if data.get("text"):
                    yield sse(shape.chunk(shape.delta(str(data["text"])), None))
                kind, data = await anext(replies)
                continue
            yield sse({**shape.chunk(shape.delta(""), data.get("finish_reason", "stop")), **shape.used_sources(data)})
            if include_usage:
                yield sse(shape.usage_chunk(data.get("usage", {})))
            break
        yield sse("[DONE]")
    except BusError as exc:
        err = errors.from_bus(exc, state.config.router.retry_after_s)
        log.warning("stream %s ended with %d: %s", call.id, err.status, err.message)
        yield sse(errors.error_body(err.status, err.message, err.code))
    finally:
        # Reached on normal end, on error, and when the client disconnects (the
        # response task is cancelled): an unfinished call sends CANCEL to the worker.
        await call.close()


async def whole(first: tuple[str, dict[str, Any]], replies: Replies) -> tuple[str, dict[str, Any]]:
    """The text of a non-streamed reply and its FINAL."""
    text: list[str] = []
    kind, data = first
    while kind == "partial":
        text.append(str(data.get("text", "")))
        kind, data = await anext(replies)
    return "".join(text), data
