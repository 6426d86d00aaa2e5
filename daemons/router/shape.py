"""OpenAI response objects and Server-Sent Events, built from the workers' replies."""

from __future__ import annotations

import json
import time
from typing import Any


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class Shape:
    """Builds OpenAI response objects for one completion call."""

    def __init__(self, model: str, call_id: str, chat: bool, sources: list[dict[str, Any]] | None = None) -> None:
        self.model = model
        # RAG: the retrieved sources, best first; the reply names those the prompt held.
        self.sources = sources
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + call_id
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.created = int(time.time())

    def delta(self, text: str) -> dict[str, Any]:
        return {"content": text} if self.chat else {"text": text}

    def chunk(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            choice["delta"] = delta if finish is None else {}
        else:
            choice["text"] = delta.get("text", "")
        return {
            "id": self.id, "object": self.chunk_object,
            "created": self.created, "model": self.model, "choices": [choice],
        }

    def used_sources(self, final: dict[str, Any]) -> dict[str, Any]:
        """{"sources": [...]} for a RAG reply (the ones that fit the prompt, cited [1]..),
        else nothing."""
        if self.sources is None:
            return {}
        return {"sources": self.sources[:int(final.get("sources_used", 0))]}

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id, "object": self.chunk_object,
            "created": self.created, "model": self.model, "choices": [], "usage": self.usage(usage),
        }

    @staticmethod
    def usage(usage: dict[str, Any]) -> dict[str, Any]:
        prompt = int(usage.get("prompt_tokens", 0))
        completion = int(usage.get("completion_tokens", 0))
        out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                               "total_tokens": prompt + completion}
        if "cached_tokens" in usage:  # prompt tokens served from the prefix cache, as OpenAI reports them
            out["prompt_tokens_details"] = {"cached_tokens": int(usage["cached_tokens"])}
        return out

    def whole(self, text: str, final: dict[str, Any]) -> dict[str, Any]:
        finish = final.get("finish_reason", "stop")
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": finish, "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {
            "id": self.id, "object": self.object, "created": self.created, "model": self.model,
            "choices": [choice], "usage": self.usage(final.get("usage", {})), **self.used_sources(final),
        }
