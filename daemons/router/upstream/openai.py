"""The OpenAI-compatible adapter: bus bodies to /chat/completions and /completions, and
their answers (whole or streamed as SSE chunks) back to bus replies.

Any server that speaks OpenAI's API takes this: OpenAI itself, vLLM, llama-server,
LiteLLM, Ollama. base_url includes the /v1 part.
"""

from __future__ import annotations

from typing import Any

from daemons.router.upstream import errors

Pair = tuple[str, dict[str, Any]]

# Bus body fields OpenAI takes as they are. top_k, min_p and repeat_penalty are
# llama.cpp's: OpenAI refuses a request that names them ("Unrecognized request argument").
FIELDS = ("max_tokens", "temperature", "top_p", "frequency_penalty", "presence_penalty", "seed", "stop")


def request(provider: str, body: dict[str, Any], model: str, stream: bool) -> tuple[str, dict[str, Any]]:
    """(path under base_url, JSON body) for one bus body."""
    kind = body.get("kind")
    out: dict[str, Any]
    if kind == "chat":
        path = "/chat/completions"
        out = {"model": model, "messages": body["messages"]}
    elif kind == "completion":
        path = "/completions"
        out = {"model": model, "prompt": body["prompt"]}
    else:
        raise errors.bad_request(f"provider {provider} (openai) cannot serve a {kind!r} request")
    for name in FIELDS:
        value = body.get(name)
        # None is "the server's default"; an empty stop list is too, and some servers
        # refuse [] where they take a missing field.
        if value is not None and value != []:
            out[name] = value
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return path, out


def headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def usage(data: Any) -> dict[str, int]:
    """OpenAI's usage as the bus says it (prompt_tokens includes the cached ones there too)."""
    if not isinstance(data, dict):
        return {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
    details = data.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return {
        "prompt_tokens": int(data.get("prompt_tokens") or 0),
        "completion_tokens": int(data.get("completion_tokens") or 0),
        "cached_tokens": int(cached or 0),
    }


def whole(data: Any) -> tuple[str, Pair]:
    """(text, final reply) of a response that was not streamed."""
    try:
        choice = data["choices"][0]
        if "message" in choice:
            text = choice["message"].get("content") or ""  # None when it called a tool
        else:
            text = choice.get("text") or ""
        finish = str(choice.get("finish_reason") or "stop")
        used = usage(data.get("usage"))
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        raise errors.protocol(f"answer is not a completion ({type(exc).__name__}: {exc})") from None
    if not isinstance(text, str):
        raise errors.protocol("answer's content is not text")
    return text, ("final", {"finish_reason": finish, "usage": used})


def stream_error(event: dict[str, Any]) -> errors.UpstreamError:
    """An error chunk in the middle of a stream (vLLM, LiteLLM and others send them)."""
    err = event.get("error")
    message = str(err.get("message") if isinstance(err, dict) else err)[:300]
    code = err.get("code") if isinstance(err, dict) else None
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    return errors.from_status(status, f"error in stream: {message}")


class Decoder:
    """Streamed chunks to bus replies: text as it comes, the FINAL at [DONE]."""

    def __init__(self) -> None:
        self.finish: str | None = None
        self.usage: Any = None

    def feed(self, event: dict[str, Any]) -> Pair | None:
        if "error" in event:
            raise stream_error(event)
        if event.get("usage"):
            self.usage = event["usage"]  # the last chunk with include_usage (or every one, on some servers)
        choices = event.get("choices")
        if not choices:
            return None
        try:
            choice = choices[0]
            if choice.get("finish_reason"):
                self.finish = str(choice["finish_reason"])
            delta = choice.get("delta")
            text = delta.get("content") if delta is not None else choice.get("text")
        except (AttributeError, TypeError, IndexError) as exc:
            raise errors.protocol(f"stream chunk is not a completion chunk ({exc})") from None
        if text:
            return "partial", {"text": str(text)}
        return None

    def end(self, done: bool) -> Pair:
        """The FINAL, at [DONE] (`done`) or where the stream ended without it."""
        if not done and self.finish is None:
            raise errors.protocol("stream ended before its last chunk")
        try:
            used = usage(self.usage)
        except (TypeError, ValueError):
            raise errors.protocol("stream's usage is not numbers") from None
        return "final", {"finish_reason": self.finish or "stop", "usage": used}


def decoder() -> Decoder:
    return Decoder()
