"""One request's output, the same in both engines: token pieces in, PARTIALs with text
out (UTF-8 split across tokens and stop strings split across pieces held back only as
long as they must be), then one FINAL with usage and timings."""

from __future__ import annotations

import time
from dataclasses import dataclass

from daemons.bus.worker import Emitter
from daemons.infer.textstream import StopMatcher, Utf8Stream


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None


class Reply:
    def __init__(self, emit: Emitter, request_id: str, stops: list[str], extra: dict[str, int] | None = None) -> None:
        self.emit = emit
        self.extra = extra or {}
        self.id = request_id
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self._utf8 = Utf8Stream()
        self._stops = StopMatcher(stops)
        self._stopped = False

    def piece(self, data: bytes) -> bool:
        """One generated token's bytes; True when a stop string ended the text."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        text, hit = self._stops.feed(self._utf8.feed(data))
        if text:
            self.emit.partial(self.id, {"text": text})
        self._stopped = hit
        return hit

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
            if tail:
                self.emit.partial(self.id, {"text": tail})
        elapsed = time.monotonic() - self.started
        ttft = (self.first_token_at or time.monotonic()) - self.started
        counts = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
        if usage.cached_tokens is not None:
            counts["cached_tokens"] = usage.cached_tokens
        self.emit.final(self.id, {"finish_reason": reason, "usage": counts, **self.extra,
                                  "timings": {"seconds": round(elapsed, 4), "first_token_s": round(ttft, 4)}})
        return elapsed
