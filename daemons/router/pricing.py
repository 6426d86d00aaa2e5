"""What a call costs, and the most it could cost before it runs (for budgets).

The bound needs no tokenizer: a token covers at least one byte of the text it came
from (special tokens aside, which the chat template adds: TEMPLATE_TOKENS per message
covers them), so a prompt of B bytes is at most B tokens; a local model also never
holds more than its context. The completion is at most max_tokens, which the router
always sends on (a remote model gets its default_max_tokens when the request has none).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from daemons.config import Config

TEMPLATE_TOKENS = 16  # per message, for role markers and separators
PROMPT_BASE_TOKENS = 64


@dataclass(frozen=True)
class Price:
    prompt_per_1k: float
    completion_per_1k: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt_per_1k + completion_tokens * self.completion_per_1k) / 1000


def price(config: Config, model: str) -> Price:
    if model in config.remote_models:
        r = config.remote_models[model]
        return Price(r.prompt_price_per_1k, r.completion_price_per_1k)
    if model in config.models:
        m = config.models[model]
        derived = config.costs.local_prices()
        return Price(m.prompt_price_per_1k or derived[0], m.completion_price_per_1k or derived[1])
    if model in config.embeddings:
        return Price(config.costs.local_prices()[0], 0.0)
    return Price(0.0, 0.0)


def prompt_bytes(body: dict[str, Any]) -> tuple[int, int]:
    """(bytes of text, messages) in a bus body, RAG sources included."""
    texts: list[str] = []
    if "messages" in body:
        texts += [str(m.get("content") or "") for m in body["messages"]]
        # Earlier tool calls and the declared tools are rendered into the prompt too.
        texts += [json.dumps(m["tool_calls"]) for m in body["messages"] if m.get("tool_calls")]
    if body.get("tools"):
        texts.append(json.dumps(body["tools"]))
    if (body.get("response_format") or {}).get("schema") is not None:
        texts.append(json.dumps(body["response_format"]["schema"]))
    if "prompt" in body:
        texts.append(str(body["prompt"]))
    if "input" in body:
        value = body["input"]
        texts += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    for s in (body.get("rag") or {}).get("sources", []):
        texts += [str(s.get("label", "")), str(s.get("text", ""))]
    return sum(len(t.encode()) for t in texts), len(texts)


def bounds(config: Config, model: str, body: dict[str, Any],
           size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(most prompt tokens, most completion tokens) the call can use on `model`
    (`size`: the body's prompt_bytes, when the caller has them)."""
    size_bytes, parts = size or prompt_bytes(body)
    prompt = size_bytes + parts * TEMPLATE_TOKENS + PROMPT_BASE_TOKENS
    if model in config.models:
        m = config.models[model]
        context = min(m.n_ctx, m.kv_tokens) if m.engine == "batch" else m.n_ctx
        completion = min(int(body.get("max_tokens") or m.default_max_tokens), context)
        return min(prompt, context), completion
    if model in config.remote_models:
        r = config.remote_models[model]
        completion = min(int(body.get("max_tokens") or r.default_max_tokens), r.context_tokens)
        return min(prompt, r.context_tokens), completion
    return prompt, 0


@dataclass(frozen=True)
class Bound:
    """The most a call can cost, use in tokens, and send as prompt."""
    cost: float
    tokens: int
    prompt: int


def chain_bound(config: Config, chain: list[str], body: dict[str, Any]) -> Bound:
    """The worst case over every model the call may end on, in each figure on its own:
    a cheap fallback may use more tokens than a dear model."""
    size = prompt_bytes(body)
    each = []
    for model in chain:
        prompt, completion = bounds(config, model, body, size)
        each.append(Bound(price(config, model).cost(prompt, completion), prompt + completion, prompt))
    return Bound(max(b.cost for b in each), max(b.tokens for b in each), max(b.prompt for b in each))
