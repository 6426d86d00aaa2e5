"""POST /v1/chat/completions and /v1/completions, streamed (SSE) and not.

Each request: the principal's limits reserve its most possible cost and tokens
(daemons/router/limits.py), the dispatcher finds a model in the chain that gives a first
reply (daemons/router/dispatch.py: fair queue, fallback, overflow, local_only), the reply
is shaped as OpenAI's, and the meter settles the reservation and writes the ledger row
(daemons/router/meter.py) however the request ended.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from daemons.bus.errors import BusError
from daemons.router import errors, pricing, rag
from daemons.router.body import parse_body
from daemons.router.calls import unless_gone, watch
from daemons.router.dispatch import Opened, Pair
from daemons.router.errors import APIError
from daemons.router.meter import Meter, admit, failure
from daemons.router.schemas import ChatRequest, CompletionRequest, Sampling
from daemons.router.shape import Shape, sse
from daemons.router.state import Caller, RouterState, caller, get_state

log = logging.getLogger(__name__)

router = APIRouter()

Replies = AsyncIterator[Pair]


@router.post("/v1/chat/completions", response_model=None)
async def chat(request: Request, who: Caller = Depends(caller), state: RouterState = Depends(get_state)) -> Response:
    req = parse_body(ChatRequest, await request.body())
    check_model(state, req.model)
    body = req.body()
    sources: list[dict[str, Any]] | None = None
    residency = local_only(state, req, who)
    if req.rag is not None:
        sources, body["rag"] = await rag.retrieve_sources(state, req, who)
        residency = residency or rag.local_only(state, req, sources)
    return await generate(state, req, body, request, who, chat=True, sources=sources, residency=residency)


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, who: Caller = Depends(caller),
                      state: RouterState = Depends(get_state)) -> Response:
    req = parse_body(CompletionRequest, await request.body())
    check_model(state, req.model)
    return await generate(state, req, req.body(), request, who, chat=False, residency=local_only(state, req, who))


def check_model(state: RouterState, model: str) -> None:
    if model not in state.config.models and model not in state.config.remote_models:
        hint = " (an embedding model: use /v1/embeddings)" if model in state.config.embeddings else ""
        raise APIError(404, f"The model '{model}' does not exist{hint}", "model_not_found", "model")


def local_only(state: RouterState, req: Sampling, who: Caller) -> str | None:
    """Why the request must stay on this machine, or None."""
    if who.principal.local_only:
        return f"principal {who.principal.name!r} is local_only"
    if req.local_only:
        return "the request says local_only"
    return None


async def generate(state: RouterState, req: Sampling, body: dict[str, Any], request: Request, who: Caller,
                   chat: bool, residency: str | None, sources: list[dict[str, Any]] | None = None) -> Response:
    principal = who.principal
    if req.priority == "batch":  # a request may lower its class, never raise it
        principal = dataclasses.replace(principal, limits=dataclasses.replace(principal.limits, priority="batch"))
    request_id = os.urandom(16).hex()  # as unique as uuid4, a fraction of its cost
    meter = Meter(state, principal, request_id, req.model, "chat" if chat else "completion")
    try:
        chain, _ = state.dispatch.candidates(req.model, residency)
    except APIError as exc:
        meter.finish(exc.status, error=exc.message)
        raise
    bound = pricing.chain_bound(state.config, chain, body)
    meter.grant = admit(state, meter, bound.cost, bound.tokens)
    meter.prompt_bound = bound.prompt
    gone = watch(request)
    opened: Opened | None = None
    streaming = False
    try:
        opened = await state.dispatch.open(principal, request_id, req.model, body, who.deadline, gone, residency,
                                           stream=req.stream)
        meter.serving(opened.model, opened.provider)
        shape = Shape(opened.model, request_id, chat, sources)
        if req.stream:
            # The response closes the call, finishes the meter and listens for the client.
            streaming = True
            return ClosingStream(
                stream(state, opened, shape, req.include_usage, meter),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": request_id},
            )
        text, final = await unless_gone(whole(opened.first, opened.replies, meter), gone)
        meter.finish(200, final.get("usage"))
        return JSONResponse(shape.whole(text, final), headers={"X-Request-Id": request_id})
    except BaseException as exc:
        meter.finish(*failure(exc))
        raise
    finally:
        gone.cancel()
        if opened is not None and not streaming:
            await opened.close()  # sends CANCEL unless the call finished; frees its queue place


class ClosingStream(StreamingResponse):
    """A StreamingResponse that closes its body generator however the response ends.
    Starlette cancels a response whose client leaves while a send is blocked (a stalled
    reader) and leaves the generator suspended at its `yield`: its `finally` — the
    ledger row, the budget settled, the queue place and the worker's CANCEL — would
    wait for the garbage collector."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            body = self.body_iterator
            if isinstance(body, AsyncGenerator):
                await body.aclose()


async def stream(state: RouterState, opened: Opened, shape: Shape, include_usage: bool,
                 meter: Meter) -> AsyncIterator[bytes]:
    status: int = 499
    usage: dict[str, Any] | None = None
    error: str | None = "the client went away"
    try:
        yield sse(shape.chunk({"role": "assistant", "content": ""} if shape.chat else {"text": ""}, None))
        kind, data = opened.first
        while True:
            if kind == "partial":
                if data.get("text"):
                    meter.token()
                    yield sse(shape.chunk(shape.delta(str(data["text"])), None))
                kind, data = await anext(opened.replies)
                continue
            status, usage, error = 200, data.get("usage"), None
            yield sse({**shape.chunk(shape.delta(""), data.get("finish_reason", "stop")), **shape.used_sources(data)})
            if include_usage:
                yield sse(shape.usage_chunk(data.get("usage", {})))
            break
        yield sse("[DONE]")
    except BusError as exc:
        err = errors.from_bus(exc, state.config.router.retry_after_s)
        status, error = err.status, err.message
        log.warning("stream %s ended with %d: %s", meter.request_id, err.status, err.message)
        yield sse(errors.error_body(err.status, err.message, err.code))
    finally:
        # Reached on normal end, on error, and when the client disconnects (the
        # response task is cancelled): an unfinished call sends CANCEL to the worker.
        meter.finish(status, usage, error)
        await opened.close()


async def whole(first: Pair, replies: Replies, meter: Meter) -> tuple[str, dict[str, Any]]:
    """The text of a non-streamed reply and its FINAL."""
    text: list[str] = []
    kind, data = first
    while kind == "partial":
        if data.get("text"):
            meter.token()
        text.append(str(data.get("text", "")))
        kind, data = await anext(replies)
    return "".join(text), data
