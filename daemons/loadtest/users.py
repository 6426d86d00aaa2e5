"""One simulated user: its own keep-alive HTTP client and a closed loop (the next
request when the last one ends, after an optional random think time), every request a
streamed chat completion timed from its Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from daemons.loadtest.workload import Workload

ClientFactory = Callable[[], httpx.AsyncClient]
PATH = "/v1/chat/completions"
# After a failure, wait at least this long (or the Retry-After the router sent) before
# the next request: a closed loop that retries a 401 or a 503 at once measures nothing
# but how fast the router can refuse, and takes the CPU the model needs.
ERROR_PAUSE_S = 0.5
MAX_MESSAGE = 300

# Error kinds that are not an HTTP status.
TIMEOUT = "timeout"
CONNECTION = "connection error"
DROPPED = "stream dropped"
MALFORMED = "stream malformed"
CUT_SHORT = "stream ended early"


@dataclass
class Outcome:
    """One request: when it started and ended, when each content chunk came, and either
    success or the kind of error. Times are time.perf_counter() seconds."""

    kind: str  # the workload's kind: chat, rag, long
    started: float
    ended: float | None = None
    ok: bool = False
    error: str | None = None  # e.g. "429 overloaded", "timeout", "stream dropped"
    message: str = ""
    retry_after: float | None = None
    token_times: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cancelled: bool = False  # in flight when the step was stopped

    @property
    def finished(self) -> bool:
        return self.ended is not None and not self.cancelled

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.started if self.token_times else None

    @property
    def e2e(self) -> float | None:
        return None if self.ended is None else self.ended - self.started

    @property
    def gaps(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tokens(self) -> int:
        """Tokens generated: the usage chunk's count, else the content chunks (the router
        sends one a token, less what a stop string or a split UTF-8 character holds back)."""
        return self.completion_tokens if self.completion_tokens is not None else len(self.token_times)

    def fail(self, kind: str, message: str = "", retry_after: float | None = None) -> None:
        self.error = kind
        self.message = " ".join(message.split())[:MAX_MESSAGE]
        self.retry_after = retry_after


def error_of(body: Any) -> tuple[str | None, str]:
    """(code, message) of an OpenAI-style error body: ("overloaded", "the queue ...")."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, ""
    code = error.get("code") or error.get("type")
    return (str(code) if code else None), str(error.get("message") or "")


def retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


class User:
    def __init__(self, index: int, http: httpx.AsyncClient, workload: Workload, seed: int, think_s: float,
                 timeout_s: float) -> None:
        self.index = index
        self.http = http
        self.workload = workload
        self.rng = random.Random(seed * 1_000_003 + index)
        self.think_s = think_s
        self.timeout_s = timeout_s
        self.current: Outcome | None = None

    async def aclose(self) -> None:
        await self.http.aclose()

    async def loop(self, until: float, sink: list[Outcome]) -> None:
        """Requests one after another until `until` (perf_counter); the last one runs to
        its end. Every outcome goes into `sink` when it starts, so a step stopped early
        still counts the tokens its requests in flight had streamed."""
        while time.perf_counter() < until:
            out = await self.request(self.workload.pick(self.rng), sink)
            pause = self.think_s * self.rng.random()
            if out.error is not None:
                pause = max(pause, out.retry_after or 0.0, ERROR_PAUSE_S)
            if time.perf_counter() + pause >= until:
                return
            await asyncio.sleep(pause)

    async def request(self, kind: str, sink: list[Outcome]) -> Outcome:
        body = self.workload.body(kind, self.rng)
        out = Outcome(kind, time.perf_counter())
        sink.append(out)
        self.current = out
        try:
            # The router's own deadline (a 504 from it is an answer worth reporting); ours,
            # a little later, only catches a router that stops answering at all.
            async with asyncio.timeout(self.timeout_s + 10):
                await self._stream(body, out)
        except TimeoutError:
            out.fail(TIMEOUT, f"no answer within {self.timeout_s + 10:g} s")
        except httpx.TimeoutException as exc:
            out.fail(TIMEOUT, f"{type(exc).__name__}: {exc}")
        except httpx.ConnectError as exc:
            out.fail(CONNECTION, f"{type(exc).__name__}: {exc}")
        except httpx.HTTPError as exc:  # read errors, the peer closing mid-answer
            out.fail(DROPPED if out.token_times else CONNECTION, f"{type(exc).__name__}: {exc}")
        except asyncio.CancelledError:
            out.cancelled = True
            raise
        finally:
            out.ended = time.perf_counter()
            self.current = None
        return out

    async def _stream(self, body: dict[str, Any], out: Outcome) -> None:
        headers = {"X-Request-Timeout": f"{self.timeout_s:g}"}
        async with self.http.stream("POST", PATH, json=body, headers=headers) as response:
            if response.status_code >= 400:
                await response.aread()
                try:
                    parsed: Any = response.json()
                except ValueError:
                    parsed = None
                code, message = error_of(parsed)
                kind = f"{response.status_code} {code}" if code else str(response.status_code)
                out.fail(kind, message or response.text, retry_after(response))
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event: lines
                data = line[5:].strip()
                if data == "[DONE]":
                    out.ok = out.error is None
                    return
                if not self._chunk(data, out):
                    return
            out.fail(CUT_SHORT, "the stream ended without data: [DONE]")

    @staticmethod
    def _chunk(data: str, out: Outcome) -> bool:
        """Take one SSE data line; False when it ends the request (an error)."""
        now = time.perf_counter()
        try:
            chunk = json.loads(data)
        except ValueError:
            out.fail(MALFORMED, f"not JSON: {data[:100]!r}")
            return False
        if not isinstance(chunk, dict):
            out.fail(MALFORMED, f"not an object: {data[:100]!r}")
            return False
        if "error" in chunk:  # the router's way to fail a stream after the 200
            code, message = error_of(chunk)
            out.fail(f"stream error {code}" if code else "stream error", message)
            return False
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            out.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            out.completion_tokens = int(usage.get("completion_tokens") or 0)
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and delta.get("content"):
                out.token_times.append(now)
        return True
