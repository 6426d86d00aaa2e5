"""One request's output, the same in both engines: token pieces in, PARTIALs with text
out (UTF-8 split across tokens and stop strings split across pieces held back only as
long as they must be), then one FINAL with usage and timings.

A PARTIAL is {"text": str} and, where asked for, "logprobs": [one entry per token since
the last PARTIAL] and "tool_calls": [{"index", "id", "name", "arguments"}] for each call
the output completed (daemons/infer/tools.py); a reply that made calls finishes with
"tool_calls"."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from daemons.bus.worker import Emitter
from daemons.infer.textstream import StopMatcher, Utf8Stream
from daemons.infer.tools import ToolCalls


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None


class Reply:
    def __init__(self, emit: Emitter, request_id: str, stops: list[str], extra: dict[str, int] | None = None,
                 tool_calls: ToolCalls | None = None) -> None:
        self.emit = emit
        self._tools = tool_calls
        self._logprobs: list[dict[str, Any]] = []
        self.called = 0  # tool calls made
        self.extra = extra or {}
        self.id = request_id
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self._utf8 = Utf8Stream()
        self._stops = StopMatcher(stops)
        self._stopped = False

    def piece(self, data: bytes, logprob: dict[str, Any] | None = None) -> bool:
        """One generated token's bytes (and its logprobs entry); True when a stop string
        ended the text."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        text, hit = self._stops.feed(self._utf8.feed(data))
        if logprob is not None:
            self._logprobs.append(logprob)
        self._send(text, hit)
        self._stopped = hit
        return hit

    def _send(self, text: str, last: bool) -> None:
        calls: list[dict[str, Any]] = []
        if self._tools is not None:
            shown, calls = self._tools.feed(text)
            if last:
                rest, more = self._tools.finish()
                shown, calls = shown + rest, calls + more
            text = shown
        out: dict[str, Any] = {}
        if text:
            out["text"] = text
        if calls:
            out["tool_calls"] = calls
            self.called += len(calls)
        if self._logprobs and (out or last):
            out["logprobs"], self._logprobs = self._logprobs, []
        if out:
            out.setdefault("text", "")
            self.emit.partial(self.id, out)

    def first_token(self) -> None:
        """The first token came (an end-of-generation one has no piece)."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()

    def finish(self, reason: str, usage: Usage) -> float:
        """Flush what was held back and send the FINAL; returns the seconds it took."""
        if not self._stopped:
            tail, hit = self._stops.feed(self._utf8.flush())
            tail = tail if hit else tail + self._stops.flush()
            if hit:
                reason = "stop"
            self._send(tail, True)
        if self.called:
            reason = "tool_calls"
        elapsed = time.monotonic() - self.started
        ttft = (self.first_token_at or time.monotonic()) - self.started
        counts = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
        if usage.cached_tokens is not None:
            counts["cached_tokens"] = usage.cached_tokens
        self.emit.final(self.id, {"finish_reason": reason, "usage": counts, **self.extra,
                                  "timings": {"seconds": round(elapsed, 4), "first_token_s": round(ttft, 4)}})
        return elapsed
