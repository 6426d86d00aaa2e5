"""OpenAI response objects and Server-Sent Events, built from the workers' replies.

A worker's PARTIAL carries any of: "text"; "logprobs", one entry per token it covers
({"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]});
"tool_calls", pieces of the calls the model makes ({"index", "id", "name",
"arguments"}: a call's arguments may come in several pieces, the first with its id and
name). Its FINAL carries "finish_reason" ("stop", "length", "tool_calls") and "usage".
Each choice of a call (n > 1, a list of prompts) has its own `index`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


@dataclass
class Reply:
    """One choice's reply gathered from its partials (an answer that is not streamed)."""

    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    calls: dict[int, dict[str, str]] = field(default_factory=dict)  # by the call's index
    final: dict[str, Any] = field(default_factory=dict)

    def add(self, partial: dict[str, Any]) -> None:
        if partial.get("text"):
            self.text.append(str(partial["text"]))
        self.logprobs.extend(partial.get("logprobs") or [])
        for piece in partial.get("tool_calls") or []:
            call = self.calls.setdefault(int(piece.get("index", 0)), {"id": "", "name": "", "arguments": ""})
            for key in ("id", "name"):
                if piece.get(key) and not call[key]:
                    call[key] = str(piece[key])
            call["arguments"] += str(piece.get("arguments") or "")


def counts(partial: dict[str, Any]) -> bool:
    """Whether a partial is a piece of output (text or a tool call's), for the meter."""
    return bool(partial.get("text") or partial.get("tool_calls"))


def _call_id() -> str:
    return "call_" + os.urandom(12).hex()


def _alternative(entry: dict[str, Any]) -> dict[str, Any]:
    token = str(entry.get("token", ""))
    raw = entry.get("bytes")
    return {"token": token, "logprob": float(entry.get("logprob", 0.0)),
            "bytes": list(raw) if isinstance(raw, list) else list(token.encode())}


def _entry(entry: dict[str, Any]) -> dict[str, Any]:
    return {**_alternative(entry), "top_logprobs": [_alternative(t) for t in entry.get("top_logprobs") or []]}


def _legacy(entries: list[dict[str, Any]], offset: int) -> tuple[dict[str, Any], int]:
    """/v1/completions' logprobs shape; text_offset counts from the completion's start."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        token = str(e.get("token", ""))
        out["tokens"].append(token)
        out["token_logprobs"].append(float(e.get("logprob", 0.0)))
        out["top_logprobs"].append({str(t.get("token", "")): float(t.get("logprob", 0.0))
                                    for t in e.get("top_logprobs") or []})
        out["text_offset"].append(offset)
        offset += len(token)
    return out, offset


class Shape:
    """Builds OpenAI response objects for one completion call."""

    def __init__(self, model: str, call_id: str, chat: bool, sources: list[dict[str, Any]] | None = None,
                 logprobs: bool = False) -> None:
        self.model = model
        # RAG: the retrieved sources, best first; the reply names those the prompt held.
        self.sources = sources
        self.chat = chat
        self.logprobs = logprobs  # asked for: a choice's logprobs is an object, never null
        self.id = ("chatcmpl-" if chat else "cmpl-") + call_id
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.created = int(time.time())
        self._named: set[tuple[int, int]] = set()  # (choice, call) whose id and name were streamed
        self._offset: dict[int, int] = {}  # completions: each choice's text_offset so far

    # -- streamed ----------------------------------------------------------------------

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": [choice]}

    def role_chunk(self, index: int) -> dict[str, Any]:
        """The first chunk of a choice."""
        if self.chat:
            return self._chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None})
        return self._chunk({"index": index, "text": "", "logprobs": None, "finish_reason": None})

    def partial_chunk(self, index: int, partial: dict[str, Any]) -> dict[str, Any] | None:
        """The chunk for one PARTIAL of choice `index`, or None when it carries nothing."""
        text = str(partial.get("text") or "")
        pieces = partial.get("tool_calls") or []
        entries = partial.get("logprobs") or []
        if not text and not pieces and not entries:
            return None
        logprobs: dict[str, Any] | None = None
        if entries and self.chat:
            logprobs = {"content": [_entry(e) for e in entries], "refusal": None}
        elif entries:
            logprobs, self._offset[index] = _legacy(entries, self._offset.get(index, 0))
        if not self.chat:
            return self._chunk({"index": index, "text": text, "logprobs": logprobs, "finish_reason": None})
        delta: dict[str, Any] = {}
        if text:
            delta["content"] = text
        if pieces:
            delta["tool_calls"] = [self._call_delta(index, p) for p in pieces]
        return self._chunk({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None})

    def _call_delta(self, index: int, piece: dict[str, Any]) -> dict[str, Any]:
        """A piece of a tool call as OpenAI streams it: id, type and name in its first delta only."""
        i = int(piece.get("index", 0))
        arguments = str(piece.get("arguments") or "")
        if (index, i) in self._named:
            return {"index": i, "function": {"arguments": arguments}}
        self._named.add((index, i))
        return {"index": i, "id": str(piece.get("id") or _call_id()), "type": "function",
                "function": {"name": str(piece.get("name") or ""), "arguments": arguments}}

    def finish_chunk(self, index: int, final: dict[str, Any]) -> dict[str, Any]:
        finish = final.get("finish_reason", "stop")
        if self.chat:
            choice: dict[str, Any] = {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": "", "logprobs": None, "finish_reason": finish}
        return {**self._chunk(choice), **self.used_sources(final)}

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

    # -- whole -------------------------------------------------------------------------

    def choice(self, index: int, reply: Reply) -> dict[str, Any]:
        finish = reply.final.get("finish_reason", "stop")
        text = "".join(reply.text)
        logprobs: dict[str, Any] | None = None
        if self.logprobs and self.chat:
            logprobs = {"content": [_entry(e) for e in reply.logprobs], "refusal": None}
        elif self.logprobs:
            logprobs = _legacy(reply.logprobs, 0)[0]
        if not self.chat:
            return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}
        # Only whitespace around tool calls is no content (OpenAI's null).
        content = text if text.strip() or not reply.calls else None
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if reply.calls:
            message["tool_calls"] = [{"id": c["id"] or _call_id(), "type": "function",
                                      "function": {"name": c["name"], "arguments": c["arguments"]}}
                                     for _, c in sorted(reply.calls.items())]
        return {"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs}

    def whole(self, replies: list[Reply], usage: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id, "object": self.object, "created": self.created, "model": self.model,
            "choices": [self.choice(i, r) for i, r in enumerate(replies)], "usage": self.usage(usage),
            **self.used_sources(replies[0].final),
        }
