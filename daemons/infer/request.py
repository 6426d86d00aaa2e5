"""The bus body an inference worker takes, checked field by field.

The router already validated the HTTP request; this checks again because any peer on
the bus can send a REQUEST, and a bad one must get a 400, not crash the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from daemons.bus.errors import RequestError

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_SOURCES = 100


@dataclass(frozen=True)
class Source:
    """A retrieved passage the router sends with a RAG chat, cited as [n]."""

    label: str  # "Title, page 3"
    text: str


@dataclass(frozen=True)
class GenRequest:
    kind: str  # "chat" | "completion"
    messages: list[dict[str, str]]
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
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise RequestError("each message needs a known role and string content", 400)
            messages.append({"role": m["role"], "content": m["content"]})
    elif kind == "completion":
        prompt = body.get("prompt")  # type: ignore[assignment]
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string", 400)
    else:
        raise RequestError(f"unknown request kind {kind!r}", 400)
    stop = body.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise RequestError("stop must be a list of up to 16 non-empty strings", 400)
    sources, answer_tokens = _rag(body.get("rag"), kind)
    return GenRequest(
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
