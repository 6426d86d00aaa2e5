"""POST /v1/chat/completions and /v1/completions, streamed (SSE) and not.

Each request: the principal's limits reserve its most possible cost and tokens
(daemons/router/limits.py), the dispatcher finds a model in the chain that gives a first
reply (daemons/router/dispatch.py: fair queue, fallback, overflow, local_only), the reply
is shaped as OpenAI's, and the meter settles the reservation and writes the ledger row
(daemons/router/meter.py) however the request ended. A request for several choices (n,
a list of prompts) is one bus call per choice (daemons/router/choices.py). Every
response, errors included, carries X-Request-Id: the client's when it sent a usable
one (then also in the bus body and the log lines), else ours (docs/api.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from daemons.bus.errors import BusError
from daemons.router import choices, errors, rag
from daemons.router.body import parse_body
from daemons.router.calls import unless_gone, watch
from daemons.router.dispatch import Opened
from daemons.router.errors import APIError
from daemons.router.meter import Meter, failure
from daemons.router.schemas import ChatRequest, CompletionRequest, Sampling
from daemons.router.shape import Reply, Shape, counts, sse
from daemons.router.state import Caller, RouterState, caller, get_state
from daemons.router.calls import Ids

log = logging.getLogger(__name__)

router = APIRouter()


@contextlib.contextmanager
def tagged(ids: Ids, state: RouterState) -> Iterator[None]:
    """Error responses carry the X-Request-Id header too."""
    try:
        yield
    except APIError as exc:
        exc.headers = {**exc.headers, "X-Request-Id": ids.header}  # a copy: it may be a shared dict
        raise
    except BusError as exc:
        err = errors.from_bus(exc, state.config.router.retry_after_s)
        err.headers["X-Request-Id"] = ids.header
        raise err from None


@router.post("/v1/chat/completions", response_model=None)
async def chat(request: Request, who: Caller = Depends(caller), state: RouterState = Depends(get_state)) -> Response:
    ids = Ids.of(request)
    with tagged(ids, state):
        req = parse_body(ChatRequest, await request.body())
        req.check()
        check_model(state, req.model)
        body = req.body()
        sources: list[dict[str, Any]] | None = None
        residency = local_only(state, req, who)
        if req.rag is not None:
            sources, body["rag"] = await rag.retrieve_sources(state, req, who)
            residency = residency or rag.local_only(state, req, sources)
        return await generate(state, req, body, request, who, ids, chat=True, sources=sources, residency=residency)


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, who: Caller = Depends(caller),
                      state: RouterState = Depends(get_state)) -> Response:
    ids = Ids.of(request)
    with tagged(ids, state):
        req = parse_body(CompletionRequest, await request.body())
        req.check()
        check_model(state, req.model)
        return await generate(state, req, req.body(), request, who, ids, chat=False,
                              residency=local_only(state, req, who), prompts=req.prompt_list())


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


async def generate(state: RouterState, req: Sampling, body: dict[str, Any], request: Request, who: Caller, ids: Ids,
                   chat: bool, residency: str | None, sources: list[dict[str, Any]] | None = None,
                   prompts: list[str] | None = None) -> Response:
    principal = who.principal
    if req.priority == "batch":  # a request may lower its class, never raise it
        principal = dataclasses.replace(principal, limits=dataclasses.replace(principal.limits, priority="batch"))
    meter = Meter(state, principal, ids.ours, req.model, "chat" if chat else "completion", user=req.user,
                  client_request_id=ids.theirs)
    if ids.theirs is not None:
        body["client_request_id"] = ids.theirs
        log.info("request %s: the client's x-request-id is %s", ids.ours, ids.theirs)
    try:
        chain, _ = state.dispatch.candidates(req.model, residency)
    except APIError as exc:
        meter.finish(exc.status, error=exc.message)
        raise
    calls = choices.bodies(body, prompts if prompts is not None and len(prompts) > 1 else None, req.n)
    meter.grant = choices.reserve(state, meter, chain, calls, req.n)
    gone = watch(request)
    opened: list[Opened] = []
    streaming = False
    headers = {"X-Request-Id": ids.header}
    try:
        opened = await choices.open_all(state, principal, ids.ours, req.model, calls, who.deadline, gone, residency,
                                        stream=req.stream)
        meter.serving(opened[0].model, opened[0].provider)
        shape = Shape(opened[0].model, ids.ours, chat, sources, logprobs=body.get("logprobs") is not None)
        if req.stream:
            # The response closes the calls, finishes the meter and listens for the client.
            streaming = True
            return ClosingStream(
                stream(state, opened, shape, req.include_usage, meter, req.n),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
            )
        replies = await unless_gone(whole(opened, meter), gone)
        usage = choices.usage([r.final for r in replies], req.n)
        meter.finish(200, usage)
        await meter.recorded()
        return JSONResponse(shape.whole(replies, usage), headers=headers)
    except BaseException as exc:
        meter.finish(*failure(exc))
        raise
    finally:
        gone.cancel()
        if not streaming:
            await choices.close_all(opened)  # sends CANCEL unless a call finished; frees its queue place


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


async def stream(state: RouterState, opened: list[Opened], shape: Shape, include_usage: bool,
                 meter: Meter, n: int) -> AsyncIterator[bytes]:
    status: int = 499
    usage: dict[str, Any] | None = None
    error: str | None = "the client went away"
    replies = choices.merged(opened)
    try:
        for index in range(len(opened)):
            yield sse(shape.role_chunk(index))
        finals: list[dict[str, Any]] = [{} for _ in opened]
        async for index, kind, data in replies:
            if kind == "partial":
                chunk = shape.partial_chunk(index, data)
                if chunk is not None:
                    if counts(data):
                        meter.token()
                    yield sse(chunk)
                continue
            finals[index] = data
            yield sse(shape.finish_chunk(index, data))
        status, usage, error = 200, choices.usage(finals, n), None
        if include_usage:
            yield sse(shape.usage_chunk(usage))
        meter.finish(status, usage, error)
        await meter.recorded()
        yield sse("[DONE]")
    except BusError as exc:
        err = errors.from_bus(exc, state.config.router.retry_after_s)
        status, error = err.status, err.message
        log.warning("stream %s ended with %d: %s", meter.label, err.status, err.message)
        yield sse(errors.error_body(err.status, err.message, err.code))
    finally:
        # Reached on normal end, on error, and when the client disconnects (the
        # response task is cancelled): an unfinished call sends CANCEL to the worker.
        try:
            await replies.aclose()
        finally:
            meter.finish(status, usage, error)
            await choices.close_all(opened)


async def whole(opened: list[Opened], meter: Meter) -> list[Reply]:
    """Each choice's reply, not streamed, with its FINAL."""
    replies = [Reply() for _ in opened]
    async for index, kind, data in choices.merged(opened):
        if kind == "partial":
            if counts(data):
                meter.token()
            replies[index].add(data)
        else:
            replies[index].final = data
    return replies
