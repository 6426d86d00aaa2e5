"""The OpenAI-compatible HTTP API: models, chat completions, completions, health."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from daemons.bus.broker import Broker, Call
from daemons.bus.errors import BusError
from daemons.config import Config
from daemons.router import errors
from daemons.router.errors import APIError
from daemons.router.schemas import ChatRequest, CompletionRequest, Sampling

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def infer_service(model: str) -> str:
    return f"infer/{model}"


class BodyLimit:
    """Refuse bodies larger than the configured limit before anything reads them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if not length.isdigit() or int(length) > self.limit:
                err = APIError(413, f"request body larger than {self.limit} bytes", "body_too_large")
                await errors.error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def parse_body(model: type[M], raw: bytes) -> M:
    """Parse a JSON body whatever its Content-Type (curl -d sends a form type)."""
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        message, param = errors.describe(list(exc.errors()))
        raise APIError(400, message, "invalid_request", param)


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def create_app(config: Config, broker: Broker) -> FastAPI:
    app = FastAPI(title="onebox", version="0.1.0", docs_url=None, redoc_url=None)
    errors.install(app)
    app.add_middleware(BodyLimit, limit=config.router.max_body_bytes)
    rc = config.router

    def deadline_for(request: Request) -> float:
        timeout = rc.request_timeout_s
        header = request.headers.get("x-request-timeout")
        if header is not None:
            try:
                timeout = float(header)
            except ValueError:
                raise APIError(400, "X-Request-Timeout must be a number of seconds", "invalid_header")
            if not 0 < timeout <= rc.max_request_timeout_s:
                raise APIError(400, f"X-Request-Timeout must be in (0, {rc.max_request_timeout_s:g}]",
                               "invalid_header")
        return time.time() + timeout

    def check_model(model: str) -> str:
        if model not in config.models:
            raise APIError(404, f"The model '{model}' does not exist", "model_not_found", "model")
        service = infer_service(model)
        if not broker.live(service):
            raise APIError(503, f"model '{model}' has no live worker (starting, restarting or stopped)",
                           "no_worker", headers={"Retry-After": str(rc.retry_after_s)})
        return service

    async def open_call(service: str, body: dict[str, Any], deadline: float) -> Call:
        try:
            return await broker.call(service, body, deadline)
        except BusError as exc:
            raise errors.from_bus(exc, rc.retry_after_s)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        models = {name: len(broker.live(infer_service(name))) for name in config.models}
        ok = all(models.values())
        body = {"ready": ok, "workers": models}
        headers = {} if ok else {"Retry-After": str(rc.retry_after_s)}
        return JSONResponse(body, 200 if ok else 503, headers=headers)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "onebox",
                 "ready": bool(broker.live(infer_service(name)))}
                for name in config.models
            ],
        }

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        """Each model's live workers and their engine state (sent with heartbeats)."""
        return {
            "object": "status",
            "models": {
                name: {"workers": [{"pid": w.pid, "capacity": w.capacity, "in_flight": len(w.inflight),
                                    "engine": w.meta.get("engine"), **w.status}
                                   for w in broker.live(infer_service(name))]}
                for name in config.models
            },
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Response:
        req = parse_body(ChatRequest, await request.body())
        return await generate(req, req.body(), request, chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        req = parse_body(CompletionRequest, await request.body())
        return await generate(req, req.body(), request, chat=False)

    async def generate(req: Sampling, body: dict[str, Any], request: Request, chat: bool) -> Response:
        deadline = deadline_for(request)
        service = check_model(req.model)
        # Nothing cancels a handler when its client goes away (only a streaming
        # response listens for that, once it runs): watch, so an abandoned call,
        # waiting for a worker, queued or generating, gives its place up at once.
        gone = asyncio.ensure_future(disconnected(request))
        call: Call | None = None
        streaming = False
        try:
            call = await unless_gone(open_call(service, body, deadline), gone)
            shape = Shape(req.model, call.id, chat)
            replies = aiter(call)
            # The first reply comes before any response, so that a refusal (prompt too
            # long, overload) is a real HTTP status, not an error event inside a 200 stream.
            first = await unless_gone(anext(replies), gone)
            if req.stream:
                streaming = True  # the response closes the call, and listens for the client
                return StreamingResponse(
                    stream(call, replies, first, shape, req.include_usage),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            text, final = await unless_gone(whole(first, replies), gone)
            return JSONResponse(shape.whole(text, final))
        except BusError as exc:
            raise errors.from_bus(exc, rc.retry_after_s)
        except ClientGone:
            log.info("call %s: the client went away before the reply; cancelling it",
                     call.id if call else "(not yet sent)")
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        finally:
            gone.cancel()
            if call is not None and not streaming:
                await call.close()  # sends CANCEL unless the call finished

    async def stream(call: Call, replies: AsyncIterator[tuple[str, dict[str, Any]]],
                     first: tuple[str, dict[str, Any]], shape: Shape, include_usage: bool) -> AsyncIterator[bytes]:
        try:
            yield sse(shape.chunk({"role": "assistant", "content": ""} if shape.chat else {"text": ""}, None))
            kind, data = first
            while True:
                if kind == "partial":
                    if data.get("text"):
                        yield sse(shape.chunk(shape.delta(str(data["text"])), None))
                    kind, data = await anext(replies)
                    continue
                yield sse(shape.chunk(shape.delta(""), data.get("finish_reason", "stop")))
                if include_usage:
                    yield sse(shape.usage_chunk(data.get("usage", {})))
                break
            yield sse("[DONE]")
        except BusError as exc:
            err = errors.from_bus(exc, rc.retry_after_s)
            log.warning("stream %s ended with %d: %s", call.id, err.status, err.message)
            yield sse(errors.error_body(err.status, err.message, err.code))
        finally:
            # Reached on normal end, on error, and when the client disconnects (the
            # response task is cancelled): an unfinished call sends CANCEL to the worker.
            await call.close()

    return app


class ClientGone(Exception):
    """The HTTP client closed the connection before its reply was ready."""


async def unless_gone(aw: Awaitable[T], gone: asyncio.Future[None]) -> T:
    """`aw`'s result, or ClientGone if the client leaves first (`aw` is then cancelled)."""
    task = asyncio.ensure_future(aw)
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
    if not task.done():
        raise ClientGone  # the client went; `task` unwinds on its own (open_call gives its slot back)
    return task.result()


async def whole(first: tuple[str, dict[str, Any]], replies: AsyncIterator[tuple[str, dict[str, Any]]]
                ) -> tuple[str, dict[str, Any]]:
    """The text of a non-streamed reply and its FINAL."""
    text: list[str] = []
    kind, data = first
    while kind == "partial":
        text.append(str(data.get("text", "")))
        kind, data = await anext(replies)
    return "".join(text), data


async def disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the request body is read)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception as exc:  # the connection broke: the client is as good as gone
        log.debug("receive() failed while watching for a disconnect: %r", exc)


class Shape:
    """Builds OpenAI response objects for one call."""

    def __init__(self, model: str, call_id: str, chat: bool) -> None:
        self.model = model
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + call_id
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.created = int(time.time())

    def delta(self, text: str) -> dict[str, Any]:
        return {"content": text} if self.chat else {"text": text}

    def chunk(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            choice["delta"] = delta if finish is None else {}
        else:
            choice["text"] = delta.get("text", "")
        return {
            "id": self.id, "object": self.chunk_object,
            "created": self.created, "model": self.model, "choices": [choice],
        }

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id, "object": self.chunk_object,
            "created": self.created, "model": self.model, "choices": [], "usage": self.usage(usage),
        }

    @staticmethod
    def usage(usage: dict[str, Any]) -> dict[str, Any]:
        prompt = int(usage.get("prompt_tokens", 0))
        completion = int(usage.get("completion_tokens", 0))
        out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                               "total_tokens": prompt + completion}
        if "cached_tokens" in usage:  # prompt tokens served from the prefix cache, as OpenAI reports them
            out["prompt_tokens_details"] = {"cached_tokens": int(usage["cached_tokens"])}
        return out

    def whole(self, text: str, final: dict[str, Any]) -> dict[str, Any]:
        finish = final.get("finish_reason", "stop")
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": finish, "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {
            "id": self.id, "object": self.object, "created": self.created, "model": self.model,
            "choices": [choice], "usage": self.usage(final.get("usage", {})),
        }
