"""A fake upstream provider on loopback: OpenAI's chat/completions and Anthropic's
Messages API, streamed and not, with knobs to make it fail or stall.

    python -m tests.fakes.upstream --port 0 [--key SECRET] [--words N]

prints `listening PORT` once its socket is bound. Every reply is N words "w0 w1 ...",
fewer when max_tokens (or a stop sequence that is one of those words) cuts it short;
prompt_tokens is the number of words in the prompt's text. It checks the key (Bearer
or x-api-key) when --key is given. Control, for tests and benchmarks:

    POST /_control  {"fail": [500, 429, "garbage"], "delay_s": 0.5, "token_delay_s": 0.01,
                     "words": 8, "cached": 2, "tool_calls": [{"name": "f", "arguments": "{}"}]}
        the next requests get these statuses in order (429 with Retry-After: 0;
        "garbage" is a 200 whose body is not what the API says), delay_s before
        answering, token_delay_s between streamed tokens, cached prompt tokens reported;
        tool_calls: every reply calls these tools (after its words, which "words": 0
        leaves out), streamed with each call's arguments in two pieces

A request that asks for logprobs (chat: logprobs/top_logprobs; completions: logprobs N)
gets them, in the endpoint's shape: token i has logprob -i/10 and N alternatives
"alt0".. (logprob -1 - j).
    GET  /_requests -> [{"path", "body", "headers", "peer"}] of every API request received
        (peer: the client's port, which tells one connection from another)
    POST /_reset    forget the knobs and the requests

It is also the upstream in latency benchmarks, so nothing in it waits unless told to.
`FakeUpstream` runs it in a subprocess for a test.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

ROOT = Path(__file__).resolve().parents[2]
RECORDED_HEADERS = ("authorization", "x-api-key", "anthropic-version", "content-type")

OPENAI_CHAT_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "frequency_penalty",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "n", "user", "logprobs", "top_logprobs",
    "response_format", "tools", "tool_choice", "logit_bias", "parallel_tool_calls", "store", "metadata",
    "service_tier", "reasoning_effort",
}
OPENAI_COMPLETION_FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "frequency_penalty", "presence_penalty", "seed",
    "stop", "stream", "stream_options", "n", "user", "logprobs", "echo", "best_of", "logit_bias", "suffix",
}
ANTHROPIC_FIELDS = {
    "model", "messages", "max_tokens", "system", "temperature", "top_p", "top_k", "stop_sequences", "stream",
    "metadata", "tools", "tool_choice", "thinking", "service_tier",
}
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 529: "overloaded_error",
}


@dataclass
class Knobs:
    key: str | None
    default_words: int
    fail: deque[int | str] = field(default_factory=deque)
    delay_s: float = 0.0
    token_delay_s: float = 0.0
    words: int | None = None
    cached: int = 0
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)

    def reset(self) -> None:
        self.fail.clear()
        self.delay_s = self.token_delay_s = 0.0
        self.words = None
        self.cached = 0
        self.tool_calls = []
        self.requests.clear()


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def text_of(content: Any) -> str:
    """A message's text: a string, or a list of text parts/blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def count_words(*texts: str) -> int:
    return sum(len(t.split()) for t in texts)


def reply_words(knobs: Knobs, max_tokens: Any, stops: list[str]) -> tuple[list[str], str]:
    """(the words of the reply, why it ended: "stop", "length" or "stop_sequence")."""
    n = knobs.words if knobs.words is not None else knobs.default_words
    words = [f"w{i}" for i in range(n)]
    for i, w in enumerate(words):
        if w in stops:
            return words[:i], "stop_sequence"
    if isinstance(max_tokens, int) and max_tokens < n:
        return words[:max_tokens], "length"
    return words, "stop"


def tokens(words: list[str]) -> list[str]:
    return [w if i == 0 else f" {w}" for i, w in enumerate(words)]


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers=headers, media_type="application/json")


def sse_response(chunks: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# -- OpenAI --------------------------------------------------------------------------


def openai_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    kind = {401: "invalid_request_error", 429: "rate_limit_error"}.get(status,
                                                                     "server_error" if status >= 500 else
                                                                     "invalid_request_error")
    code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
    return json_response({"error": {"message": message, "type": kind, "param": None, "code": code}}, status, headers)


def openai_check(body: dict[str, Any], chat: bool) -> None:
    allowed = OPENAI_CHAT_FIELDS if chat else OPENAI_COMPLETION_FIELDS
    for name in body:
        if name not in allowed:
            raise Refused(400, f"Unrecognized request argument supplied: {name}")
    if not isinstance(body.get("model"), str):
        raise Refused(400, "you must provide a model parameter")
    if chat and not (isinstance(body.get("messages"), list) and body["messages"]):
        raise Refused(400, "'messages' must be a non-empty array")
    if not chat and not isinstance(body.get("prompt"), (str, list)):
        raise Refused(400, "'prompt' is required")
    # The shapes OpenAI checks, of the fields the router maps back to them.
    for i, m in enumerate(body.get("messages") or []):
        if m.get("content") is None and not (m.get("role") == "assistant" and m.get("tool_calls")):
            raise Refused(400, f"messages[{i}].content: expected a string, got null")
        for c in m.get("tool_calls") or []:
            if c.get("type") != "function" or not isinstance((c.get("function") or {}).get("arguments"), str):
                raise Refused(400, f"messages[{i}].tool_calls: expected function calls")
        if m.get("role") == "tool" and not m.get("tool_call_id"):
            raise Refused(400, f"messages[{i}]: tool messages need tool_call_id")
    fmt = body.get("response_format")
    if fmt is not None and not (fmt == {"type": "json_object"} or fmt.get("type") == "json_schema" and isinstance(
            (fmt.get("json_schema") or {}).get("name"), str)):
        raise Refused(400, "Invalid value for 'response_format'")
    for i, t in enumerate(body.get("tools") or []):
        if t.get("type") != "function" or not isinstance((t.get("function") or {}).get("name"), str):
            raise Refused(400, f"Invalid value for 'tools[{i}]'")
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("none", "auto", "required") and not (
            isinstance(choice, dict) and choice.get("type") == "function"):
        raise Refused(400, "Invalid value for 'tool_choice'")
    if (choice is not None or "parallel_tool_calls" in body) and not body.get("tools"):
        raise Refused(400, "tool_choice and parallel_tool_calls are only allowed when tools are specified")
    if chat and body.get("top_logprobs") is not None and body.get("logprobs") is not True:
        raise Refused(400, "logprobs must be set to true when top_logprobs is used")
    if not chat and body.get("logprobs") is not None and not isinstance(body["logprobs"], int):
        raise Refused(400, "logprobs: expected an integer")
    if not all(isinstance(k, str) and k.isdigit() for k in body.get("logit_bias") or {}):
        raise Refused(400, "Invalid key in 'logit_bias'")


def openai_usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": min(cached, prompt)}}


def logprob_entry(i: int, token: str, top: int) -> dict[str, Any]:
    return {"token": token, "logprob": -i / 10, "bytes": list(token.encode()),
            "top_logprobs": [{"token": f"alt{j}", "logprob": -1.0 - j, "bytes": list(f"alt{j}".encode())}
                             for j in range(top)]}


def chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    return None if entries is None else {"content": entries, "refusal": None}


def legacy_logprobs(entries: list[dict[str, Any]] | None, offset: int = 0) -> dict[str, Any] | None:
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def openai_answer(knobs: Knobs, body: dict[str, Any], chat: bool) -> Response:
    openai_check(body, chat)
    if chat:
        prompt_tokens = count_words(*(text_of(m.get("content")) for m in body["messages"]))
    else:
        prompt = body["prompt"]
        prompt_tokens = count_words(prompt if isinstance(prompt, str) else " ".join(map(str, prompt)))
    stop = body.get("stop")
    words, why = reply_words(knobs, body.get("max_tokens") or body.get("max_completion_tokens"),
                             [stop] if isinstance(stop, str) else list(stop or []))
    calls: list[dict[str, Any]] = [{"id": f"call_{i}", "type": "function", "function": dict(c)}
             for i, c in enumerate(knobs.tool_calls)] if chat else []
    finish = "tool_calls" if calls else "length" if why == "length" else "stop"
    usage = openai_usage(prompt_tokens, len(words), knobs.cached)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    base = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": body["model"]}
    top: int | None = (body.get("top_logprobs") or 0 if body.get("logprobs") else None) if chat else \
        body.get("logprobs")
    toks = tokens(words)
    entries = None if top is None else [logprob_entry(i, t, top) for i, t in enumerate(toks)]
    if not body.get("stream"):
        text = " ".join(words)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat:
            choice["message"] = {"role": "assistant", "content": text or None, "refusal": None,
                                 **({"tool_calls": calls} if calls else {})}
            choice["logprobs"] = chat_logprobs(entries)
        else:
            choice["text"] = text
            choice["logprobs"] = legacy_logprobs(entries)
        return json_response({**base, "object": "chat.completion" if chat else "text_completion",
                              "choices": [choice], "usage": usage})
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    extra = {"usage": None} if include_usage else {}
    offset = [0]

    def chunk(content: str | None, finish_reason: str | None, role: bool = False,
              entry: dict[str, Any] | None = None, call: list[dict[str, Any]] | None = None) -> bytes:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else \
                ({"content": content} if content is not None else {})
            if call:
                delta["tool_calls"] = call
            c: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason,
                                 "logprobs": chat_logprobs([entry]) if entry else None}
        else:
            c = {"index": 0, "text": content or "", "finish_reason": finish_reason,
                 "logprobs": legacy_logprobs([entry], offset[0]) if entry else None}
            offset[0] += len(content or "")
        return b"data: " + orjson.dumps({**base, "choices": [c], **extra}) + b"\n\n"

    async def chunks() -> AsyncIterator[bytes]:
        if chat:
            yield chunk(None, None, role=True)
        for i, tok in enumerate(toks):
            if i and knobs.token_delay_s:
                await asyncio.sleep(knobs.token_delay_s)
            yield chunk(tok, None, entry=entries[i] if entries else None)
        for i, c in enumerate(calls):
            args = c["function"]["arguments"]
            half = len(args) // 2
            yield chunk(None, None, call=[{"index": i, "id": c["id"], "type": "function",
                                           "function": {"name": c["function"]["name"], "arguments": args[:half]}}])
            yield chunk(None, None, call=[{"index": i, "function": {"arguments": args[half:]}}])
        yield chunk(None, finish)
        if include_usage:
            yield b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return sse_response(chunks())


# -- Anthropic -----------------------------------------------------------------------


def anthropic_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return json_response({"type": "error", "error": {"type": kind, "message": message}}, status, headers)


def anthropic_check(body: dict[str, Any], version: str | None) -> None:
    if not version:
        raise Refused(400, "anthropic-version: header is required")
    for name in body:
        if name not in ANTHROPIC_FIELDS:
            raise Refused(400, f"{name}: Extra inputs are not permitted")
    if not isinstance(body.get("model"), str):
        raise Refused(400, "model: Field required")
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        raise Refused(400, "max_tokens: Field required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Refused(400, "messages: at least one message is required")
    uses: set[str] = set()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise Refused(400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if i and m["role"] == messages[i - 1]["role"]:
            raise Refused(400, f"messages.{i}: roles must alternate between 'user' and 'assistant'")
        content = m.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list) or not content:
            raise Refused(400, f"messages.{i}: content must be non-empty")
        kinds = [b.get("type") for b in content]
        for j, block in enumerate(content):
            where = f"messages.{i}.content.{j}"
            if block.get("type") == "text" and not block.get("text"):
                raise Refused(400, f"{where}: text content blocks must be non-empty")
            elif block.get("type") == "tool_use":
                if m["role"] != "assistant" or not isinstance(block.get("input"), dict) or not block.get("id"):
                    raise Refused(400, f"{where}: a tool_use block needs an id and an object input, from the assistant")
                uses.add(block["id"])
            elif block.get("type") == "tool_result":
                if m["role"] != "user" or block.get("tool_use_id") not in uses:
                    raise Refused(400, f"{where}: unexpected `tool_use_id` found in `tool_result` blocks")
                if any(k != "tool_result" for k in kinds[:j]):
                    raise Refused(400, f"{where}: tool_result blocks must come first")
            elif block.get("type") not in ("text", "tool_use", "tool_result"):
                raise Refused(400, f"{where}.type: unknown block type")
        if (uses or "tool_result" in kinds) and not body.get("tools"):
            raise Refused(400, "Requests which include `tool_use` or `tool_result` blocks must define tools.")
    for i, t in enumerate(body.get("tools") or []):
        if not isinstance(t.get("name"), str) or (t.get("input_schema") or {}).get("type") != "object" or \
                set(t) - {"name", "description", "input_schema"}:
            raise Refused(400, f"tools.{i}: Input should be a custom tool (name, description, input_schema)")
    choice = body.get("tool_choice")
    if choice is not None:
        if choice.get("type") not in ("auto", "any", "tool", "none") or (choice["type"] == "tool") != ("name" in choice) \
                or set(choice) - {"type", "name", "disable_parallel_tool_use"} \
                or (choice["type"] == "none" and "disable_parallel_tool_use" in choice):
            raise Refused(400, "tool_choice: Input tag does not match any of the expected tags")
        if not body.get("tools"):
            raise Refused(400, "tool_choice may only be specified while providing tools")
    if set(body.get("metadata") or {}) - {"user_id"}:
        raise Refused(400, "metadata: Extra inputs are not permitted")
    temperature = body.get("temperature")
    if temperature is not None and not 0.0 <= float(temperature) <= 1.0:
        raise Refused(400, "temperature: range: 0..1")
    if temperature is not None and body.get("top_p") is not None:
        raise Refused(400, "`temperature` and `top_p` cannot both be specified for this model.")


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def anthropic_answer(knobs: Knobs, body: dict[str, Any], version: str | None) -> Response:
    anthropic_check(body, version)
    system = body.get("system")
    prompt_tokens = count_words(text_of(system) if system is not None else "",
                                *(text_of(m.get("content")) for m in body["messages"]))
    cached = min(knobs.cached, prompt_tokens)
    words, why = reply_words(knobs, body["max_tokens"], list(body.get("stop_sequences") or []))
    stop_reason = {"length": "max_tokens", "stop_sequence": "stop_sequence"}.get(why, "end_turn")
    stop_sequence = f"w{len(words)}" if why == "stop_sequence" else None
    usage = {"input_tokens": prompt_tokens - cached, "cache_creation_input_tokens": 0,
             "cache_read_input_tokens": cached, "output_tokens": len(words)}
    message = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
               "model": body["model"], "stop_reason": None, "stop_sequence": None}
    calls = [{"type": "tool_use", "id": f"toolu_{i}", "name": c["name"], "input": orjson.loads(c["arguments"])}
             for i, c in enumerate(knobs.tool_calls)]
    if calls:
        stop_reason, stop_sequence = "tool_use", None
    text = " ".join(words)
    if not body.get("stream"):
        content = ([{"type": "text", "text": text}] if text else []) + calls
        return json_response({**message, "content": content,
                              "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage})

    async def events() -> AsyncIterator[bytes]:
        yield event("message_start", {"type": "message_start", "message": {
            **message, "content": [], "usage": {**usage, "output_tokens": 1}}})
        index = 0
        if words:
            yield event("content_block_start", {"type": "content_block_start", "index": 0,
                                                "content_block": {"type": "text", "text": ""}})
            yield event("ping", {"type": "ping"})
            for i, tok in enumerate(tokens(words)):
                if i and knobs.token_delay_s:
                    await asyncio.sleep(knobs.token_delay_s)
                yield event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "text_delta", "text": tok}})
            yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
            index = 1
        for c in calls:
            yield event("content_block_start", {"type": "content_block_start", "index": index, "content_block": {
                "type": "tool_use", "id": c["id"], "name": c["name"], "input": {}}})
            args = orjson.dumps(c["input"]).decode() if c["input"] else ""
            half = len(args) // 2
            for piece in (args[:half], args[half:]) if args else ():
                yield event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                    "delta": {"type": "input_json_delta", "partial_json": piece}})
            yield event("content_block_stop", {"type": "content_block_stop", "index": index})
            index += 1
        yield event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                      "usage": {"output_tokens": len(words)}})
        yield event("message_stop", {"type": "message_stop"})

    return sse_response(events())


# -- the app -------------------------------------------------------------------------


def create_app(key: str | None = None, words: int = 16) -> FastAPI:
    knobs = Knobs(key=key, default_words=words)
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    async def serve(request: Request, api: str) -> Response:
        error = anthropic_error if api == "anthropic" else openai_error
        raw = await request.body()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            knobs.requests.append({"path": request.url.path, "body": None, "headers": {}})
            return error(400, "the request body is not valid JSON")
        knobs.requests.append({"path": request.url.path, "body": body,
                               "headers": {h: request.headers[h] for h in RECORDED_HEADERS if h in request.headers},
                               "peer": request.client.port if request.client else None})
        if knobs.delay_s:
            await asyncio.sleep(knobs.delay_s)
        if knobs.fail:
            failure = knobs.fail.popleft()
            if failure == "garbage":
                return Response(b"<html>502 oops</html>", 200, media_type="application/json")
            status = int(failure)
            headers = {"Retry-After": "0"} if status == 429 else None
            return error(status, f"injected failure {status}", headers)
        if knobs.key is not None:
            auth = request.headers.get("authorization", "")
            given = auth[len("Bearer "):] if api != "anthropic" and auth.startswith("Bearer ") else \
                request.headers.get("x-api-key", "")
            if given != knobs.key:
                # Echoes what it was given, as some real servers do: the client must not repeat it.
                return error(401, f"Incorrect API key provided: {given or '(none)'}")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object")
        try:
            if api == "anthropic":
                return anthropic_answer(knobs, body, request.headers.get("anthropic-version"))
            return openai_answer(knobs, body, chat=api == "chat")
        except Refused as exc:
            return error(exc.status, exc.message)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await serve(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, "completion")

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        return await serve(request, "anthropic")

    @app.post("/_control")
    async def control(request: Request) -> Response:
        data = orjson.loads(await request.body() or b"{}")
        if "fail" in data:
            knobs.fail.extend(data["fail"])
        for name in ("delay_s", "token_delay_s"):
            if name in data:
                setattr(knobs, name, float(data[name]))
        if "words" in data:
            knobs.words = None if data["words"] is None else int(data["words"])
        if "cached" in data:
            knobs.cached = int(data["cached"])
        if "tool_calls" in data:
            knobs.tool_calls = list(data["tool_calls"])
        return json_response({"ok": True})

    @app.get("/_requests")
    async def requests() -> Response:
        return json_response(knobs.requests)

    @app.post("/_reset")
    async def reset() -> Response:
        knobs.reset()
        return json_response({"ok": True})

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", default=None)
    parser.add_argument("--words", type=int, default=16)
    args = parser.parse_args(argv)
    # Bound and listening before the port is printed, so a client that reads it can
    # connect at once (the backlog holds it until uvicorn accepts). IPPROTO_TCP named
    # outright: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # Nagle holds each streamed chunk for the client's delayed ACK (~40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(1024)
    config = uvicorn.Config(
        create_app(args.key, args.words), log_level="warning", access_log=False, lifespan="off",
        http="httptools" if importlib.util.find_spec("httptools") else "auto", timeout_graceful_shutdown=1,
        backlog=1024,
    )
    print(f"listening {sock.getsockname()[1]}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


class FakeUpstream:
    """The fake in a subprocess, for the length of a `with` block."""

    def __init__(self, key: str | None = None, words: int = 16, start_timeout_s: float = 30.0) -> None:
        self.key = key
        self.words = words
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._http: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeUpstream:
        cmd = [sys.executable, "-m", "tests.fakes.upstream", "--port", "0", "--words", str(self.words)]
        if self.key is not None:
            cmd += ["--key", self.key]
        self._proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            self.port = self._read_port()
            self._http = httpx.Client(base_url=self.url, timeout=10, trust_env=False)
        except BaseException:
            self._stop()
            raise
        return self

    def _read_port(self) -> int:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._proc.stdout], [], [], 0.1)
            if ready:
                line = self._proc.stdout.readline().decode()
                if line.startswith("listening "):
                    return int(line.split()[1])
                if not line:
                    break  # stdout closed: it exited
            elif self._proc.poll() is not None:
                break
        raise RuntimeError(f"the fake upstream did not start (exit status {self._proc.poll()})")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def _client(self) -> httpx.Client:
        if self._http is None:
            raise RuntimeError("the fake upstream is not running")
        return self._http

    def control(self, **knobs: Any) -> None:
        self._client().post("/_control", json=knobs).raise_for_status()

    def requests(self) -> list[dict[str, Any]]:
        r = self._client().get("/_requests")
        r.raise_for_status()
        result: list[dict[str, Any]] = r.json()
        return result

    def reset(self) -> None:
        self._client().post("/_reset").raise_for_status()


if __name__ == "__main__":
    sys.exit(main())
