"""Which model to load and how long its context is, from GET /v1/models (and, when the
command can read it, the config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Fields OpenAI-compatible servers use for the context length (onebox lists none yet;
# vLLM says max_model_len, others context_length): the first one present wins.
CONTEXT_FIELDS = ("n_ctx", "context_length", "max_model_len", "context_window")


@dataclass(frozen=True)
class Listed:
    id: str
    ready: bool | None
    context: int | None


def chat_models(body: Any) -> list[Listed]:
    """The chat models of a /v1/models answer, in its order; an entry without `kind`
    (another server's) counts as chat."""
    data = body.get("data") if isinstance(body, dict) else None
    out = []
    for entry in data if isinstance(data, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        if entry.get("kind", "chat") != "chat":
            continue
        context = next((int(entry[f]) for f in CONTEXT_FIELDS if isinstance(entry.get(f), int) and entry[f] > 0),
                       None)
        ready = entry.get("ready")
        out.append(Listed(entry["id"], ready if isinstance(ready, bool) else None, context))
    return out
