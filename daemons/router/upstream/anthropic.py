"""The adapter to Anthropic's Messages API: a chat bus body to POST /v1/messages, and
its answer (whole, or streamed as SSE events) back to bus replies.

base_url is the API's root, without /v1 (https://api.anthropic.com). Tools, tool calls
and tool results map to the API's own; what it cannot do (logprobs, logit_bias,
response_format, seed, penalties, strict tools) is refused with a 400 naming the
parameter, before anything is sent (docs/api.md, "Upstream providers").
"""

from __future__ import annotations

import json
from typing import Any

from daemons.router.upstream import errors

Pair = tuple[str, dict[str, Any]]

VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024  # the API requires max_tokens; the bus body may leave it to the server

FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# OpenAI's tool_choice strings, as the Messages API says them ({"name": X} is {"type": "tool"}).
TOOL_CHOICE = {"auto": "auto", "required": "any", "none": "none"}

# The status each documented error type comes with, for error events inside a stream.
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


def refuse(provider: str, param: str, why: str) -> errors.UpstreamError:
    """A request parameter the Messages API cannot honour: a 400 naming it, refused before
    anything is sent. Another model of a fallback chain may honour it, so it is tried."""
    return errors.UpstreamError(f"provider {provider} (anthropic) cannot honour '{param}': {why}", 400, "http_4xx",
                                retryable_elsewhere=True)


def refusals(provider: str, body: dict[str, Any]) -> None:
    """What the bus body asks for that this API has no way to do."""
    if body.get("logprobs") is not None:
        raise refuse(provider, "logprobs", "the Messages API returns no token log-probabilities")
    if body.get("logit_bias"):
        raise refuse(provider, "logit_bias", "the Messages API takes no token biases")
    fmt = body.get("response_format")
    if fmt is not None:
        raise refuse(provider, "response_format", f"the Messages API cannot constrain the reply to "
                                                   f"{fmt.get('type', 'json')!r}")
    if body.get("seed") is not None:
        raise refuse(provider, "seed", "the Messages API has no seeded sampling")
    for name in ("frequency_penalty", "presence_penalty"):
        if float(body.get(name) or 0.0) != 0.0:
            raise refuse(provider, name, "the Messages API has no repetition penalties")
    for i, tool in enumerate(body.get("tools") or []):
        if tool.get("strict"):
            raise refuse(provider, f"tools[{i}].function.strict",
                         "the Messages API does not guarantee that tool arguments match their schema")


def tool_input(provider: str, arguments: str, where: str) -> dict[str, Any]:
    """A call's arguments (a JSON object as text) as a tool_use block's input."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise errors.bad_request(f"provider {provider} (anthropic): {where} must be a JSON object, as the "
                                 "Messages API takes a tool call's input")
    return value


def blocks(provider: str, i: int, m: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """(role, content blocks) of one bus message that is not a system one: a tool's output
    is a tool_result block of the user's turn, an assistant's calls are tool_use blocks."""
    role, content = str(m["role"]), str(m.get("content") or "")
    if role == "tool":
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": str(m["tool_call_id"])}
        if content:
            result["content"] = content
        return "user", [result]
    out: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []  # no empty text blocks
    if role != "assistant":
        return "user", out
    for j, call in enumerate(m.get("tool_calls") or []):
        function = call["function"]
        out.append({"type": "tool_use", "id": str(call["id"]), "name": str(function["name"]),
                    "input": tool_input(provider, str(function.get("arguments") or ""),
                                        f"messages[{i}].tool_calls[{j}].function.arguments")})
    return "assistant", out


def tool_fields(body: dict[str, Any]) -> dict[str, Any]:
    """tools and tool_choice as the Messages API has them."""
    tools = body.get("tools")
    if not tools:
        return {}
    defs = []
    for t in tools:
        tool: dict[str, Any] = {"name": str(t["name"])}
        if t.get("description"):
            tool["description"] = str(t["description"])
        tool["input_schema"] = t.get("parameters") or {"type": "object", "properties": {}}
        defs.append(tool)
    choice = body.get("tool_choice") or "auto"
    how: dict[str, Any]
    if isinstance(choice, dict):
        how = {"type": "tool", "name": str(choice["name"])}
    elif choice in TOOL_CHOICE:
        how = {"type": TOOL_CHOICE[choice]}
    else:
        raise ValueError(f"tool_choice {choice!r}")
    if body.get("parallel_tool_calls") is False and how["type"] != "none":
        how["disable_parallel_tool_use"] = True
    return {"tools": defs, "tool_choice": how}


def request(provider: str, body: dict[str, Any], model: str, stream: bool) -> tuple[str, dict[str, Any]]:
    """(path under base_url, JSON body) for one bus body."""
    if body.get("kind") != "chat":
        raise errors.bad_request(f"provider {provider} (anthropic) serves chat only")
    refusals(provider, body)
    system: list[str] = []
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    for i, m in enumerate(body["messages"]):
        if m["role"] in ("system", "developer"):
            if m.get("content"):
                system.append(str(m["content"]))
            continue
        role, content = blocks(provider, i, m)
        if not content:
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(content)  # the API takes turns that alternate
        else:
            turns.append((role, content))
    out: dict[str, Any] = {"model": model, "max_tokens": body.get("max_tokens") or DEFAULT_MAX_TOKENS,
                           "messages": [{"role": role, "content": joined(content)} for role, content in turns]}
    if system:
        out["system"] = "\n\n".join(system)
    # 1.0 is the API's default for both. Sent only when they differ from it, since
    # newer models refuse a request that sets both temperature and top_p.
    temperature = body.get("temperature")
    if temperature is not None and min(1.0, max(0.0, float(temperature))) != 1.0:
        out["temperature"] = min(1.0, max(0.0, float(temperature)))
    top_p = body.get("top_p")
    if top_p is not None and float(top_p) < 1.0:
        out["top_p"] = float(top_p)
    top_k = body.get("top_k")
    if top_k:
        out["top_k"] = int(top_k)
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("user") is not None:
        out["metadata"] = {"user_id": str(body["user"])}
    out.update(tool_fields(body))
    if stream:
        out["stream"] = True
    return "/v1/messages", out


def joined(content: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A turn's blocks, consecutive text blocks joined (as one message's text, the way
    the bus's messages of one role run together); a turn of text alone as a string."""
    out: list[dict[str, Any]] = []
    for block in content:
        if block["type"] == "text" and out and out[-1]["type"] == "text":
            out[-1] = {"type": "text", "text": out[-1]["text"] + "\n\n" + block["text"]}
        else:
            out.append(block)
    if len(out) == 1 and out[0]["type"] == "text":
        return str(out[0]["text"])
    return out


def headers(api_key: str | None) -> dict[str, str]:
    out = {"anthropic-version": VERSION}
    if api_key:
        out["x-api-key"] = api_key
    return out


def finish_reason(stop_reason: Any) -> str:
    return FINISH.get(str(stop_reason), "stop")


class Usage:
    """What the API says it used. input_tokens there leaves out the tokens read from (and
    written to) its prompt cache; the bus's prompt_tokens, like OpenAI's, counts them."""

    def __init__(self) -> None:
        self.input = 0
        self.cache_read = 0
        self.cache_write = 0
        self.output = 0

    def update(self, data: Any) -> None:
        if not isinstance(data, dict):
            return
        # Each is given when known; a later event's value replaces an earlier one.
        if data.get("input_tokens") is not None:
            self.input = int(data["input_tokens"])
        if data.get("cache_read_input_tokens") is not None:
            self.cache_read = int(data["cache_read_input_tokens"])
        if data.get("cache_creation_input_tokens") is not None:
            self.cache_write = int(data["cache_creation_input_tokens"])
        if data.get("output_tokens") is not None:
            self.output = int(data["output_tokens"])

    def bus(self) -> dict[str, int]:
        return {"prompt_tokens": self.input + self.cache_read + self.cache_write,
                "completion_tokens": self.output, "cached_tokens": self.cache_read}


def whole(data: Any) -> tuple[dict[str, Any], Pair]:
    """(the partial, final reply) of a response that was not streamed: its text, and its
    tool_use blocks as the bus's tool_calls."""
    try:
        if data.get("type") == "error":
            raise event_error(data)
        text = "".join(str(b.get("text", "")) for b in data["content"] if b.get("type") == "text")
        uses = [b for b in data["content"] if b.get("type") == "tool_use"]
        calls = [{"index": i, "id": str(u["id"]), "name": str(u["name"]),
                  "arguments": json.dumps(u.get("input") or {}, separators=(",", ":"))} for i, u in enumerate(uses)]
        used = Usage()
        used.update(data.get("usage"))
        finish = finish_reason(data.get("stop_reason"))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise errors.protocol(f"answer is not a message ({type(exc).__name__}: {exc})") from None
    partial: dict[str, Any] = {"text": text}
    if calls:
        partial["tool_calls"] = calls
    return partial, ("final", {"finish_reason": finish, "usage": used.bus()})


def event_error(event: dict[str, Any]) -> errors.UpstreamError:
    err = event.get("error")
    kind = str(err.get("type")) if isinstance(err, dict) else "api_error"
    message = str(err.get("message") if isinstance(err, dict) else err)[:300]
    return errors.from_status(ERROR_STATUS.get(kind, 500), f"{kind}: {message}")


class Decoder:
    """Streamed events to bus replies: text deltas as they come, a tool_use block as the
    pieces of a tool call (its id and name at content_block_start, then its input JSON as
    it comes), the FINAL at message_stop."""

    def __init__(self) -> None:
        self.usage = Usage()
        self.stop_reason: Any = None
        self.calls: dict[int, int] = {}  # a tool_use block's index -> its call's index
        self.sent: set[int] = set()  # calls that have had some input

    def feed(self, event: dict[str, Any]) -> Pair | None:
        kind = event.get("type")
        try:
            if kind == "content_block_delta":
                delta = event["delta"]
                if delta.get("type") == "text_delta" and delta.get("text"):
                    return "partial", {"text": str(delta["text"])}
                call = self.calls.get(int(event.get("index", 0)))
                if delta.get("type") == "input_json_delta" and call is not None and delta.get("partial_json"):
                    self.sent.add(call)
                    return "partial", {"text": "", "tool_calls": [
                        {"index": call, "arguments": str(delta["partial_json"])}]}
                # Other deltas (thinking, signatures, citations) are not output for the caller.
            elif kind == "content_block_start":
                block = event["content_block"]
                if block.get("type") == "tool_use":
                    call = self.calls[int(event.get("index", 0))] = len(self.calls)
                    given = block.get("input") or {}
                    arguments = json.dumps(given, separators=(",", ":")) if given else ""
                    if arguments:
                        self.sent.add(call)
                    return "partial", {"text": "", "tool_calls": [
                        {"index": call, "id": str(block["id"]), "name": str(block["name"]), "arguments": arguments}]}
            elif kind == "content_block_stop":
                call = self.calls.get(int(event.get("index", 0)))
                if call is not None and call not in self.sent:
                    self.sent.add(call)  # a call without arguments: its input is still an object
                    return "partial", {"text": "", "tool_calls": [{"index": call, "arguments": "{}"}]}
            elif kind == "message_start":
                self.usage.update(event["message"].get("usage"))
            elif kind == "message_delta":
                self.stop_reason = event.get("delta", {}).get("stop_reason", self.stop_reason)
                self.usage.update(event.get("usage"))
            elif kind == "message_stop":
                return "final", {"finish_reason": finish_reason(self.stop_reason), "usage": self.usage.bus()}
            elif kind == "error":
                raise event_error(event)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise errors.protocol(f"stream event {kind!r} is not as documented ({type(exc).__name__}: {exc})") \
                from None
        return None  # ping, other blocks' start and stop, and event types added after this was written

    def end(self, done: bool) -> Pair:
        raise errors.protocol("stream ended before message_stop")


def decoder() -> Decoder:
    return Decoder()
