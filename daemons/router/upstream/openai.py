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
FIELDS = ("max_tokens", "temperature", "top_p", "frequency_penalty", "presence_penalty", "seed", "stop", "user")


def request(provider: str, body: dict[str, Any], model: str, stream: bool) -> tuple[str, dict[str, Any]]:
    """(path under base_url, JSON body) for one bus body: the bus's fields back in
    OpenAI's shapes (docs/api.md, "Upstream providers")."""
    kind = body.get("kind")
    out: dict[str, Any]
    if kind == "chat":
        path = "/chat/completions"
        out = {"model": model, "messages": [message(m) for m in body["messages"]]}
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
    if body.get("logit_bias"):
        # The token ids are the upstream model's own: the caller's ids mean that model's tokens.
        out["logit_bias"] = {str(int(token)): float(bias) for token, bias in body["logit_bias"]}
    top = body.get("logprobs")
    if top is not None:
        if kind == "chat":
            out["logprobs"] = True
            out["top_logprobs"] = int(top)
        else:
            out["logprobs"] = int(top)
    if kind == "chat":
        out.update(chat_fields(body))
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return path, out


def message(m: dict[str, Any]) -> dict[str, Any]:
    """A bus message as OpenAI takes it: null content for an assistant turn that only
    calls tools."""
    out: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"id": str(c["id"]), "type": "function",
                              "function": {"name": str(c["function"]["name"]),
                                           "arguments": str(c["function"]["arguments"])}}
                             for c in m["tool_calls"]]
        if not out["content"]:
            out["content"] = None
    for name in ("tool_call_id", "name"):
        if m.get(name) is not None:
            out[name] = str(m[name])
    return out


def chat_fields(body: dict[str, Any]) -> dict[str, Any]:
    """response_format, tools, tool_choice and parallel_tool_calls, as OpenAI names them."""
    out: dict[str, Any] = {}
    fmt = body.get("response_format")
    if fmt is not None:
        if fmt["type"] == "json_schema":
            out["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "response", "schema": fmt["schema"], "strict": bool(fmt.get("strict"))}}
        elif fmt["type"] == "json_object":
            out["response_format"] = {"type": "json_object"}
        else:
            raise ValueError(f"response_format type {fmt['type']!r}")
    tools = body.get("tools")
    if tools:
        defs = []
        for t in tools:
            function: dict[str, Any] = {"name": str(t["name"])}
            if t.get("description"):
                function["description"] = str(t["description"])
            function["parameters"] = t.get("parameters") or {"type": "object", "properties": {}}
            if t.get("strict"):
                function["strict"] = True
            defs.append({"type": "function", "function": function})
        out["tools"] = defs
        choice = body.get("tool_choice") or "auto"
        out["tool_choice"] = {"type": "function", "function": {"name": str(choice["name"])}} \
            if isinstance(choice, dict) else str(choice)
        # true is OpenAI's default; sent only when false, since some models (and servers)
        # refuse the field itself.
        if body.get("parallel_tool_calls") is False:
            out["parallel_tool_calls"] = False
    return out


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


def whole(data: Any) -> tuple[dict[str, Any], Pair]:
    """(the partial, final reply) of a response that was not streamed: the partial as a
    worker's ({"text"}, with "logprobs" and "tool_calls" when there are any)."""
    try:
        choice = data["choices"][0]
        if "message" in choice:
            msg = choice["message"]
            text = msg.get("content") or ""  # None when it called a tool
            calls = [{"index": i, "id": str(c.get("id") or ""), "name": str(c["function"].get("name") or ""),
                      "arguments": str(c["function"].get("arguments") or "")}
                     for i, c in enumerate(msg.get("tool_calls") or [])]
            entries = chat_logprobs(choice.get("logprobs"))
        else:
            text = choice.get("text") or ""
            calls = []
            entries = legacy_logprobs(choice.get("logprobs"))
        finish = str(choice.get("finish_reason") or "stop")
        used = usage(data.get("usage"))
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        raise errors.protocol(f"answer is not a completion ({type(exc).__name__}: {exc})") from None
    if not isinstance(text, str):
        raise errors.protocol("answer's content is not text")
    partial: dict[str, Any] = {"text": text}
    if entries:
        partial["logprobs"] = entries
    if calls:
        partial["tool_calls"] = calls
    return partial, ("final", {"finish_reason": finish, "usage": used})


def _alternative(entry: dict[str, Any]) -> dict[str, Any]:
    token = str(entry.get("token", ""))
    raw = entry.get("bytes")
    return {"token": token, "logprob": float(entry.get("logprob") or 0.0),
            "bytes": [int(b) for b in raw] if isinstance(raw, list) else list(token.encode())}


def chat_logprobs(data: Any) -> list[dict[str, Any]]:
    """A chat choice's logprobs ({"content": [...]}) as the bus's entries."""
    if not isinstance(data, dict):
        return []
    return [{**_alternative(e), "top_logprobs": [_alternative(t) for t in e.get("top_logprobs") or []]}
            for e in data.get("content") or []]


def legacy_logprobs(data: Any) -> list[dict[str, Any]]:
    """/v1/completions' logprobs ({"tokens", "token_logprobs", "top_logprobs",
    "text_offset"}) as the bus's entries."""
    if not isinstance(data, dict):
        return []
    tokens = data.get("tokens") or []
    logprobs = data.get("token_logprobs") or []
    tops = data.get("top_logprobs") or []
    out = []
    for i, token in enumerate(tokens):
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        logprob = logprobs[i] if i < len(logprobs) else None
        out.append({**_alternative({"token": token, "logprob": logprob}),
                    "top_logprobs": [_alternative({"token": t, "logprob": lp}) for t, lp in top.items()]})
    return out


def call_pieces(deltas: Any) -> list[dict[str, Any]]:
    """A chunk's delta.tool_calls as the bus's pieces: id and name where given (the
    call's first delta), arguments as they come."""
    out = []
    for d in deltas or []:
        function = d.get("function") or {}
        piece: dict[str, Any] = {"index": int(d.get("index") or 0), "arguments": str(function.get("arguments") or "")}
        if d.get("id"):
            piece["id"] = str(d["id"])
        if function.get("name"):
            piece["name"] = str(function["name"])
        out.append(piece)
    return out


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
            if delta is not None:
                text = delta.get("content")
                pieces = call_pieces(delta.get("tool_calls"))
                entries = chat_logprobs(choice.get("logprobs"))
            else:
                text = choice.get("text")
                pieces = []
                entries = legacy_logprobs(choice.get("logprobs"))
        except (AttributeError, TypeError, IndexError, ValueError) as exc:
            raise errors.protocol(f"stream chunk is not a completion chunk ({exc})") from None
        if not text and not pieces and not entries:
            return None
        partial: dict[str, Any] = {"text": str(text or "")}
        if entries:
            partial["logprobs"] = entries
        if pieces:
            partial["tool_calls"] = pieces
        return "partial", partial

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
