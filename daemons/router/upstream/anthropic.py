"""The adapter to Anthropic's Messages API: a chat bus body to POST /v1/messages, and
its answer (whole, or streamed as SSE events) back to bus replies.

base_url is the API's root, without /v1 (https://api.anthropic.com).
"""

from __future__ import annotations

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


def request(provider: str, body: dict[str, Any], model: str, stream: bool) -> tuple[str, dict[str, Any]]:
    """(path under base_url, JSON body) for one bus body."""
    if body.get("kind") != "chat":
        raise errors.bad_request(f"provider {provider} (anthropic) serves chat only")
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for m in body["messages"]:
        role, content = str(m["role"]), str(m.get("content") or "")
        if role in ("system", "developer"):
            if content:
                system.append(content)
            continue
        # A tool's output is the user's side of the turn here (the bus body has no
        # tool_use ids to tie it to a tool_result block).
        role = "assistant" if role == "assistant" else "user"
        if not content:
            continue  # the API refuses empty text blocks
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    out: dict[str, Any] = {"model": model, "max_tokens": body.get("max_tokens") or DEFAULT_MAX_TOKENS,
                           "messages": messages}
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
    if stream:
        out["stream"] = True
    return "/v1/messages", out


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


def whole(data: Any) -> tuple[str, Pair]:
    """(text, final reply) of a response that was not streamed."""
    try:
        if data.get("type") == "error":
            raise event_error(data)
        text = "".join(str(b.get("text", "")) for b in data["content"] if b.get("type") == "text")
        used = Usage()
        used.update(data.get("usage"))
        finish = finish_reason(data.get("stop_reason"))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise errors.protocol(f"answer is not a message ({type(exc).__name__}: {exc})") from None
    return text, ("final", {"finish_reason": finish, "usage": used.bus()})


def event_error(event: dict[str, Any]) -> errors.UpstreamError:
    err = event.get("error")
    kind = str(err.get("type")) if isinstance(err, dict) else "api_error"
    message = str(err.get("message") if isinstance(err, dict) else err)[:300]
    return errors.from_status(ERROR_STATUS.get(kind, 500), f"{kind}: {message}")


class Decoder:
    """Streamed events to bus replies: text deltas as they come, the FINAL at message_stop."""

    def __init__(self) -> None:
        self.usage = Usage()
        self.stop_reason: Any = None

    def feed(self, event: dict[str, Any]) -> Pair | None:
        kind = event.get("type")
        try:
            if kind == "content_block_delta":
                delta = event["delta"]
                # Other deltas (tool input JSON, thinking, signatures) are not text for the caller.
                if delta.get("type") == "text_delta" and delta.get("text"):
                    return "partial", {"text": str(delta["text"])}
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
        return None  # ping, content_block_start/stop, and event types added after this was written

    def end(self, done: bool) -> Pair:
        raise errors.protocol("stream ended before message_stop")


def decoder() -> Decoder:
    return Decoder()
