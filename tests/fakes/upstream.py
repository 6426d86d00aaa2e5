"""A fake upstream provider on loopback: OpenAI's chat/completions and Anthropic's
Messages API, streamed and not, with knobs to make it fail or stall.

    python -m tests.fakes.upstream --port 0 [--key SECRET] [--words N]

prints `listening PORT` once its socket is bound. Every reply is N words "w0 w1 ...",
fewer when max_tokens (or a stop sequence that is one of those words) cuts it short;
prompt_tokens is the number of words in the prompt's text. It checks the key (Bearer
or x-api-key) when --key is given. Control, for tests and benchmarks:

    POST /_control  {"fail": [500, 429, "garbage"], "delay_s": 0.5, "token_delay_s": 0.01,
                     "words": 8, "cached": 2}
        the next requests get these statuses in order (429 with Retry-After: 0;
        "garbage" is a 200 whose body is not what the API says), delay_s before
        answering, token_delay_s between streamed tokens, cached prompt tokens reported
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
    requests: list[dict[str, Any]] = field(default_factory=list)

    def reset(self) -> None:
        self.fail.clear()
        self.delay_s = self.token_delay_s = 0.0
        self.words = None
        self.cached = 0
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


def openai_usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": min(cached, prompt)}}


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
    finish = "length" if why == "length" else "stop"
    usage = openai_usage(prompt_tokens, len(words), knobs.cached)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    base = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": body["model"]}
    if not body.get("stream"):
        text = " ".join(words)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return json_response({**base, "object": "chat.completion" if chat else "text_completion",
                              "choices": [choice], "usage": usage})
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    extra = {"usage": None} if include_usage else {}

    def chunk(content: str | None, finish_reason: str | None, role: bool = False) -> bytes:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else \
                ({"content": content} if content is not None else {})
            c: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            c = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish_reason}
        return b"data: " + orjson.dumps({**base, "choices": [c], **extra}) + b"\n\n"

    async def chunks() -> AsyncIterator[bytes]:
        if chat:
            yield chunk(None, None, role=True)
        for i, tok in enumerate(tokens(words)):
            if i and knobs.token_delay_s:
                await asyncio.sleep(knobs.token_delay_s)
            yield chunk(tok, None)
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
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise Refused(400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if not text_of(m.get("content")):
            raise Refused(400, f"messages.{i}: text content blocks must be non-empty")
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
    if not body.get("stream"):
        return json_response({**message, "content": [{"type": "text", "text": " ".join(words)}],
                              "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage})

    async def events() -> AsyncIterator[bytes]:
        yield event("message_start", {"type": "message_start", "message": {
            **message, "content": [], "usage": {**usage, "output_tokens": 1}}})
        yield event("content_block_start", {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "text", "text": ""}})
        yield event("ping", {"type": "ping"})
        for i, tok in enumerate(tokens(words)):
            if i and knobs.token_delay_s:
                await asyncio.sleep(knobs.token_delay_s)
            yield event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": tok}})
        yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
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
