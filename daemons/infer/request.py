"""The bus body an inference worker takes, checked field by field.

The router already validated the HTTP request; this checks again because any peer on
the bus can send a REQUEST, and a bad one must get a 400, not crash the engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from daemons.bus.errors import RequestError
from daemons.infer import constrain

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_SOURCES = 100
MAX_STOP = 16
MAX_TOOLS = 128
MAX_LOGIT_BIAS = 1024
MAX_TOP_LOGPROBS = 20
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOOL_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class Source:
    """A retrieved passage the router sends with a RAG chat, cited as [n]."""

    label: str  # "Title, page 3"
    text: str


@dataclass(frozen=True)
class GenRequest:
    kind: str  # "chat" | "completion"
    messages: list[dict[str, Any]]  # role, content; tool_calls, tool_call_id, name where given
    prompt: str
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    frequency_penalty: float
    presence_penalty: float
    repeat_penalty: float
    seed: int | None
    stop: list[str]
    # RAG: passages to fit into the prompt, best first, and room to keep for the answer.
    sources: list[Source] | None = None
    answer_tokens: int = 256
    # What preparing the prompt decided, reported in the FINAL (e.g. {"sources_used": 3}).
    fitted: dict[str, int] = field(default_factory=dict)
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: off; else how many alternatives per token (0-20)
    # Declared tools ({"name", "description", "parameters"}), and whether and which to call.
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | dict[str, str] = "auto"
    parallel_tool_calls: bool = True
    # GBNF the output must follow (from response_format, or a required tool call).
    grammar: str | None = None
    client_request_id: str = ""  # the client's x-request-id, for log lines

    @property
    def calls_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


def _num(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise RequestError(f"{key} must be a number in [{lo}, {hi}]", 400)
    return float(value)


def _opt_int(body: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(f"{key} must be an integer in [{lo}, {hi}]", 400)
    return value


def parse(body: dict[str, Any]) -> GenRequest:
    kind = body.get("kind")
    messages: list[dict[str, str]] = []
    prompt = ""
    if kind == "chat":
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise RequestError("messages must be a non-empty list", 400)
        for m in raw:
            messages.append(_message(m))
    elif kind == "completion":
        prompt = body.get("prompt")  # type: ignore[assignment]
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string", 400)
    else:
        raise RequestError(f"unknown request kind {kind!r}", 400)
    stop = body.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise RequestError(f"stop must be a list of up to {MAX_STOP} non-empty strings", 400)
    sources, answer_tokens = _rag(body.get("rag"), kind)
    tools, tool_choice, parallel = _tools(body, kind)
    grammar = None
    if tools and (tool_choice == "required" or isinstance(tool_choice, dict)):
        grammar = constrain.tool_grammar(tools, tool_choice["name"] if isinstance(tool_choice, dict) else None,
                                         parallel)
    elif body.get("response_format") is not None:
        grammar = _response_format(body["response_format"])
    client_id = body.get("client_request_id") or ""
    if not isinstance(client_id, str) or len(client_id) > 128:
        raise RequestError("client_request_id must be a string of up to 128 characters", 400)
    return GenRequest(
        logit_bias=_logit_bias(body.get("logit_bias")),
        logprobs=_opt_int(body, "logprobs", 0, MAX_TOP_LOGPROBS),
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        grammar=grammar,
        client_request_id=client_id,
        sources=sources,
        answer_tokens=answer_tokens,
        kind=kind,
        messages=messages,
        prompt=prompt,
        max_tokens=_opt_int(body, "max_tokens", 1, 1_000_000),
        temperature=_num(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_num(body, "top_p", 1.0, 0.0, 1.0),
        top_k=int(_num(body, "top_k", 0, 0, 100_000)),
        min_p=_num(body, "min_p", 0.0, 0.0, 1.0),
        frequency_penalty=_num(body, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=_num(body, "presence_penalty", 0.0, -2.0, 2.0),
        # llama.cpp divides by it: 0 (some clients' "off") means no penalty, i.e. 1.0.
        repeat_penalty=_num(body, "repeat_penalty", 1.0, 0.0, 10.0) or 1.0,
        seed=_opt_int(body, "seed", 0, 2**63 - 1),
        stop=list(stop),
    )


def _message(m: Any) -> dict[str, Any]:
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise RequestError("each message needs a known role", 400)
    content = m.get("content")
    calls = m.get("tool_calls")
    if content is None and m["role"] == "assistant" and calls:
        content = ""
    if not isinstance(content, str):
        raise RequestError("each message needs string content (an assistant message with tool_calls may have none)",
                           400)
    out: dict[str, Any] = {"role": m["role"], "content": content}
    if calls is not None:
        if m["role"] != "assistant" or not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict)
                and isinstance(c["function"].get("name"), str)
                and isinstance(c["function"].get("arguments", ""), str) for c in calls):
            raise RequestError("tool_calls belong to assistant messages: a list of {id, type, function: "
                               "{name, arguments}}", 400)
        out["tool_calls"] = [{"id": str(c.get("id", "")), "type": "function",
                              "function": {"name": c["function"]["name"],
                                           "arguments": c["function"].get("arguments", "")}} for c in calls]
    for key in ("tool_call_id", "name"):
        if m.get(key) is not None:
            if not isinstance(m[key], str):
                raise RequestError(f"a message's {key} must be a string", 400)
            out[key] = m[key]
    return out


def _logit_bias(raw: Any) -> dict[int, float]:
    """[[token, bias], ...] (msgpack keeps no integer keys) -> {token: bias}."""
    if raw is None:
        return {}
    if not isinstance(raw, list) or len(raw) > MAX_LOGIT_BIAS:
        raise RequestError(f"logit_bias must be a list of at most {MAX_LOGIT_BIAS} [token, bias] pairs", 400)
    out: dict[int, float] = {}
    for pair in raw:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or isinstance(pair[0], bool) \
                or not isinstance(pair[0], int) or pair[0] < 0 or isinstance(pair[1], bool) \
                or not isinstance(pair[1], (int, float)) or not -100 <= pair[1] <= 100:
            raise RequestError("each logit_bias entry is [token id >= 0, bias in [-100, 100]]", 400)
        out[int(pair[0])] = float(pair[1])
    return out


def _tools(body: dict[str, Any], kind: str) -> tuple[list[dict[str, Any]], str | dict[str, str], bool]:
    raw = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise RequestError("parallel_tool_calls must be true or false", 400)
    if raw is None:
        if choice not in (None, "none", "auto"):
            raise RequestError("tool_choice needs tools", 400)
        return [], "auto", parallel
    if kind != "chat" or not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise RequestError(f"tools must be a list of at most {MAX_TOOLS}, on chat requests", 400)
    tools: list[dict[str, Any]] = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not TOOL_NAME.fullmatch(t["name"]):
            raise RequestError(f"tools[{i}] needs a name of 1-64 letters, digits, _ or -", 400)
        if any(t["name"] == other["name"] for other in tools):
            raise RequestError(f"tools[{i}]: the name {t['name']!r} is declared twice", 400)
        params = t.get("parameters")
        if params is not None:
            constrain.check_schema(params, f"tools[{i}].function.parameters")
        description = t.get("description") or ""
        if not isinstance(description, str):
            raise RequestError(f"tools[{i}]: description must be a string", 400)
        tools.append({"name": t["name"], "description": description, "parameters": params})
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        name = choice.get("name")
        if not any(t["name"] == name for t in tools):
            raise RequestError(f"tool_choice names {name!r}, which is not among the tools", 400)
        return tools, {"name": str(name)}, parallel
    if choice not in TOOL_CHOICES:
        raise RequestError("tool_choice must be none, auto, required or {name}", 400)
    return tools, str(choice), parallel


def _response_format(raw: Any) -> str | None:
    if not isinstance(raw, dict) or raw.get("type") not in ("text", "json_object", "json_schema"):
        raise RequestError("response_format must be {type: text | json_object | json_schema}", 400)
    if raw["type"] == "text":
        return None
    return constrain.json_grammar(raw)


def _rag(raw: Any, kind: str) -> tuple[list[Source] | None, int]:
    if raw is None:
        return None, 256
    if kind != "chat" or not isinstance(raw, dict):
        raise RequestError("rag must be an object, on chat requests only", 400)
    items = raw.get("sources")
    if not isinstance(items, list) or len(items) > MAX_SOURCES:
        raise RequestError(f"rag.sources must be a list of at most {MAX_SOURCES}", 400)
    sources = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or \
                not isinstance(item.get("label", ""), str):
            raise RequestError("each rag source needs string text and label", 400)
        sources.append(Source(label=item.get("label", ""), text=item["text"]))
    answer = raw.get("answer_tokens", 256)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 1 <= answer <= 1_000_000:
        raise RequestError("rag.answer_tokens must be a positive integer", 400)
    return sources, answer
