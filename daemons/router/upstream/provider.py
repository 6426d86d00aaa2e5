"""One upstream provider: its HTTP client, its circuit breaker, and calls to it that read
like local bus calls.

`Provider.open()` sends one request, retrying 429, 5xx, connection errors and timeouts
(tenacity: exponential backoff with full jitter, a 429's Retry-After honoured, never
sleeping past the deadline) until a response is in hand — for a stream, its status
line and headers; nothing has been passed on yet, so a retry promises nothing twice.
The retried whole runs inside the circuit breaker (pybreaker), so one call counts at
most one failure. What it returns, an `UpstreamCall`, yields the ("partial", ...) and
("final", ...) pairs a local `Call` does, so the router serves both the same way.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import aiohttp
import httpx
import httpx_aiohttp
import orjson
import pybreaker
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential
from tenacity.stop import stop_base

from daemons.router.upstream import anthropic, errors, openai
from daemons.router.upstream.errors import UpstreamError

log = logging.getLogger(__name__)

Pair = tuple[str, dict[str, Any]]

BACKOFF_S = 0.25  # the first retry waits up to this long, the next up to twice that, ...
BACKOFF_MAX_S = 4.0
DRAIN_S = 0.25  # how long closing a finished stream waits for its end, so its connection is reused
REASON_CHARS = 200
# What one attempt may fail with and still be tried again: the provider is busy or
# broken for now, not refusing this request.
RETRIED = {"http_5xx", "http_429", "connect", "timeout", "protocol"}


class Decoder(Protocol):
    def feed(self, event: dict[str, Any]) -> Pair | None: ...

    def end(self, done: bool) -> Pair: ...


class Adapter(Protocol):
    """What openai.py and anthropic.py each are: one API's shapes."""

    def request(self, provider: str, body: dict[str, Any], model: str,
                stream: bool) -> tuple[str, dict[str, Any]]: ...

    def headers(self, api_key: str | None) -> dict[str, str]: ...

    def whole(self, data: Any) -> tuple[dict[str, Any], Pair]: ...

    def decoder(self) -> Decoder: ...


ADAPTERS: dict[str, Adapter] = {"openai": openai, "anthropic": anthropic}


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    kind: Literal["openai", "anthropic"]
    base_url: str
    api_key: str | None = field(repr=False)  # never in a repr, so never in a log line
    timeout_s: float = 60.0  # the longest one call may take, streaming included
    connect_timeout_s: float = 5.0
    retries: int = 2
    breaker_failures: int = 5
    breaker_reset_s: float = 30.0
    max_connections: int = 100


class _StateLog(pybreaker.CircuitBreakerListener):
    def __init__(self, provider: str, on_state: Callable[[str, str], None] | None) -> None:
        self.provider = provider
        self.on_state = on_state

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: pybreaker.CircuitBreakerState | None,
                     new_state: pybreaker.CircuitBreakerState) -> None:
        log.warning("provider %s: circuit %s -> %s", self.provider, old_state.name if old_state else "none",
                    new_state.name)
        if self.on_state is not None:
            try:
                self.on_state(self.provider, new_state.name)
            except Exception:  # a metrics hook must not break the breaker's bookkeeping
                log.exception("provider %s: on_state callback failed", self.provider)


def _not_a_failure(exc: BaseException) -> bool:
    # pybreaker takes an excluded exception as a success. A 4xx is one: the provider is
    # up and answering. So is a cancelled call (the client left): not the provider's fault.
    if isinstance(exc, UpstreamError):
        return not exc.trips_breaker
    return isinstance(exc, asyncio.CancelledError)


class _PastEnd(stop_base):
    """Stop retrying when the next sleep would end at or after the call's end."""

    def __init__(self, end: float) -> None:
        self.end = end

    def __call__(self, retry_state: RetryCallState) -> bool:
        return time.monotonic() + retry_state.upcoming_sleep >= self.end


def _retried(exc: BaseException) -> bool:
    return isinstance(exc, UpstreamError) and exc.kind in RETRIED


def retry_after(value: str | None) -> float | None:
    """A Retry-After header's seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_reason(content: bytes) -> str:
    """The message in an error body, as both APIs (and most compatible servers) put it."""
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        return content[:REASON_CHARS].decode("utf-8", "replace").strip() or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:REASON_CHARS]
        for value in (err, data.get("message"), data.get("detail")):
            if value:
                return str(value)[:REASON_CHARS]
    return str(data)[:REASON_CHARS]


class Provider:
    """One configured provider: one HTTP client (its connection pool) and one breaker."""

    def __init__(self, spec: ProviderSpec, on_state: Callable[[str, str], None] | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self._adapter = ADAPTERS[spec.kind]
        limits = httpx.Limits(max_connections=spec.max_connections, max_keepalive_connections=spec.max_connections)
        self._client = httpx.AsyncClient(
            # httpx's API on aiohttp's connection pool: httpcore's pool checks every pooled
            # connection (a socket readability test each) on each request and each release,
            # 22% of the router's CPU at 64 concurrent upstream calls; with aiohttp's the
            # router's CPU per call fell from 5.4 to 2.2 ms and p99 from 860 to 280 ms
            # (scripts/bench/router.py, 64 clients).
            transport=httpx_aiohttp.AiohttpTransport(limits=limits),
            base_url=spec.base_url,
            headers={"Content-Type": "application/json", **self._adapter.headers(spec.api_key)},
            limits=httpx.Limits(max_connections=spec.max_connections,
                                max_keepalive_connections=spec.max_connections),
            timeout=httpx.Timeout(spec.timeout_s, connect=spec.connect_timeout_s),
        )
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=spec.breaker_failures, reset_timeout=spec.breaker_reset_s, exclude=[_not_a_failure],
            listeners=[_StateLog(spec.name, on_state)], name=spec.name, throw_new_error_on_trip=False)
        self._backoff = wait_random_exponential(multiplier=BACKOFF_S, max=BACKOFF_MAX_S)

    @property
    def state(self) -> str:
        """The breaker's: "closed", "open" or "half-open" (open turns half-open at the
        first call after breaker_reset_s)."""
        return str(self._breaker.current_state)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def open(self, body: dict[str, Any], model: str, deadline: float, stream: bool) -> UpstreamCall:
        """Send `body` (a bus body) to the provider's `model`; `deadline` is unix time.

        Returns once a response is in hand (a stream's first bytes not yet read). Raises
        UpstreamError: 400 for a body this provider cannot take, the upstream's 4xx,
        429/502 after retries, 503 when the circuit is open or the provider unreachable,
        504 when the deadline or timeout_s passes first."""
        opened_at = time.monotonic()
        budget = min(self.spec.timeout_s, deadline - time.time())
        try:
            path, payload = self._adapter.request(self.name, body, model, stream)
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.bad_request(f"not a chat or completion body ({type(exc).__name__}: {exc})") from None
        if budget <= 0:
            raise errors.timeout("the request's deadline passed before the call was made")
        end = opened_at + budget
        content = orjson.dumps(payload)
        try:
            with self._breaker.calling():
                try:
                    got = await self._send(path, content, stream, end, budget)
                except UpstreamError as exc:
                    if exc.kind == "timeout" and budget < self.spec.timeout_s and time.monotonic() >= end - 0.05:
                        raise errors.deadline(f"no answer before the request's deadline ({budget:.1f} s)") from None
                    raise
        except pybreaker.CircuitBreakerError:
            # info, not warning: the trip itself was logged, and this is every call until it closes.
            log.info("provider %s: circuit open, not calling it", self.name)
            raise errors.circuit_open(self.spec.breaker_reset_s) from None
        except UpstreamError as exc:
            log.warning("provider %s: call failed with %d (%s): %s", self.name, exc.code, exc.kind, exc.message)
            raise
        if isinstance(got, httpx.Response):
            return UpstreamCall(self.name, model, opened_at, end, response=got, decoder=self._adapter.decoder())
        return UpstreamCall(self.name, model, opened_at, end, whole=got)

    # -- one call, retried ------------------------------------------------------------

    async def _send(self, path: str, content: bytes, stream: bool, end: float,
                    budget: float) -> httpx.Response | tuple[dict[str, Any], Pair]:
        retrying = AsyncRetrying(
            retry=retry_if_exception(_retried),
            wait=self._wait,
            stop=stop_after_attempt(self.spec.retries + 1) | _PastEnd(end),
            before_sleep=self._before_sleep,
            reraise=True,  # the last attempt's UpstreamError, not tenacity's RetryError
        )
        try:
            # httpx's timeouts bound each read; this bounds the whole, retries and sleeps included.
            async with asyncio.timeout(end - time.monotonic()):
                return await retrying(self._attempt, path, content, stream, end)
        except TimeoutError:
            raise errors.timeout(f"no answer within {budget:.1f} s") from None

    def _wait(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, UpstreamError) and exc.retry_after is not None:
            return exc.retry_after  # the upstream said when; a stop past the deadline still applies
        return float(self._backoff(retry_state))

    def _before_sleep(self, retry_state: RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        log.warning("provider %s: attempt %d failed (%s); retrying in %.2f s", self.name,
                    retry_state.attempt_number, exc.message if isinstance(exc, UpstreamError) else exc,
                    retry_state.upcoming_sleep)

    async def _attempt(self, path: str, content: bytes, stream: bool,
                       end: float) -> httpx.Response | tuple[dict[str, Any], Pair]:
        remaining = max(0.001, end - time.monotonic())
        timeout = httpx.Timeout(remaining, connect=min(self.spec.connect_timeout_s, remaining))
        request = self._client.build_request("POST", path, content=content, timeout=timeout)
        try:
            response = await self._client.send(request, stream=True)
        except (httpx.HTTPError, aiohttp.ClientError) as exc:
            raise self._transport_error(exc) from None
        keep = False
        try:
            if not 200 <= response.status_code < 300:
                await response.aread()
                reason = self._redact(error_reason(response.content))
                raise errors.from_status(response.status_code, reason, retry_after(response.headers.get("retry-after")))
            if stream and response.headers.get("content-type", "").startswith("text/event-stream"):
                keep = True
                return response
            # Not streamed (or a server that answered JSON to a stream request): whole.
            await response.aread()
            try:
                data = orjson.loads(response.content)
            except orjson.JSONDecodeError:
                raise errors.protocol(f"answered {response.status_code} with a body that is not JSON: "
                                      f"{self._redact(error_reason(response.content))}") from None
            return self._adapter.whole(data)
        except (httpx.HTTPError, aiohttp.ClientError) as exc:
            raise self._transport_error(exc) from None
        finally:
            if not keep:
                await response.aclose()

    def _transport_error(self, exc: httpx.HTTPError | aiohttp.ClientError) -> UpstreamError:
        what = type(exc).__name__
        if isinstance(exc, aiohttp.ClientError):
            # What httpx-aiohttp passes through untranslated: a malformed reply, mostly.
            if isinstance(exc, aiohttp.ClientConnectionError) and not isinstance(exc, aiohttp.ServerDisconnectedError):
                return errors.connect(f"connection failed ({what})")
            return errors.protocol(f"broke the HTTP protocol ({what})")
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return errors.connect(f"cannot connect ({what})")
        if isinstance(exc, httpx.PoolTimeout):
            return errors.connect(f"no free connection of {self.spec.max_connections} in time ({what})")
        if isinstance(exc, httpx.TimeoutException):
            return errors.timeout(f"timed out waiting for it ({what})")
        if isinstance(exc, httpx.RemoteProtocolError):
            return errors.protocol(f"broke the HTTP protocol ({what})")
        return errors.connect(f"connection failed ({what})")

    def _redact(self, text: str) -> str:
        # Some servers echo the key they were given in a 401's message.
        key = self.spec.api_key
        return text.replace(key, "[redacted]") if key else text


class UpstreamCall:
    """One upstream call in flight: iterate it for ("partial" | "final", data) pairs.

    `close()` ends it (idempotent; safe before the end). `opened_at` and
    `first_token_at` are time.monotonic() values, the latter at the first text."""

    def __init__(self, provider: str, model: str, opened_at: float, end: float,
                 response: httpx.Response | None = None, decoder: Decoder | None = None,
                 whole: tuple[dict[str, Any], Pair] | None = None) -> None:
        self.id = uuid.uuid4().hex
        self.provider = provider
        self.model = model
        self.opened_at = opened_at
        self.first_token_at: float | None = None
        self.done = False
        self._end = end
        self._pending: deque[Pair] = deque()
        self._response = response
        self._lines: AsyncGenerator[str, None] | None = None
        self._decoder = decoder
        self._reader: asyncio.Task[Any] | None = None
        self._closed = False
        self._drain = False
        if response is not None:
            self._lines = cast(AsyncGenerator[str, None], response.aiter_lines())
        if whole is not None:
            partial, final = whole  # the whole answer as one PARTIAL (text, logprobs, tool_calls)
            if partial.get("text") or partial.get("tool_calls") or partial.get("logprobs"):
                self.first_token_at = time.monotonic()
                self._pending.append(("partial", partial))
            self._pending.append(final)

    def __aiter__(self) -> UpstreamCall:
        return self

    async def __anext__(self) -> Pair:
        if self._pending:
            pair = self._pending.popleft()
            self.done = self.done or pair[0] == "final"
            return pair
        if self._lines is None or self._closed or self.done:
            raise StopAsyncIteration
        self._reader = asyncio.current_task()
        try:
            pair = await self._read()
        except UpstreamError as exc:
            log.warning("provider %s: stream %s failed with %d (%s): %s", self.provider, self.id, exc.code,
                        exc.kind, exc.message)
            self.done = True
            await self._release()
            raise
        except BaseException:  # cancelled (the client left): the stream cannot be picked up again
            self.done = True
            await self._release()
            raise
        finally:
            self._reader = None
        if pair[0] == "final":
            self.done = True
            self._drain = True
        elif self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if self._closed:  # close() came from another task while this read was in flight
            await self._release()
        return pair

    async def _read(self) -> Pair:
        assert self._lines is not None and self._decoder is not None
        try:
            while True:
                try:
                    # Per line, so a stream that trickles still ends at the call's end.
                    async with asyncio.timeout(self._end - time.monotonic()):
                        line = await anext(self._lines)
                except StopAsyncIteration:
                    return self._decoder.end(done=False)
                if not line.startswith("data:"):
                    continue  # event:, id:, comments and the blank lines between events
                data = line[5:].strip()
                if data == "[DONE]":
                    return self._decoder.end(done=True)
                try:
                    event = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise errors.protocol(f"stream data is not JSON: {data[:80]!r}") from None
                if not isinstance(event, dict):
                    raise errors.protocol("stream data is not a JSON object")
                pair = self._decoder.feed(event)
                if pair is not None:
                    return pair
        except TimeoutError:
            raise errors.timeout("the stream did not end before the call's deadline") from None
        except httpx.TimeoutException as exc:
            raise errors.timeout(f"the stream stalled ({type(exc).__name__})") from None
        except (httpx.HTTPError, aiohttp.ClientError) as exc:
            raise errors.protocol(f"the stream broke off ({type(exc).__name__})") from None

    async def close(self) -> None:
        """End the call: the HTTP response is closed (its connection reused when the
        stream had ended). Idempotent, and safe at any point."""
        self._closed = True
        self._pending.clear()
        if self._reader is not None and self._reader is not asyncio.current_task():
            # A read is in flight in another task (one its owner cancels, as
            # unless_gone does): closing the socket under it is not safe, so that
            # read releases the response itself as it unwinds.
            return
        await self._release()

    async def _release(self) -> None:
        response, lines = self._response, self._lines
        self._response = self._lines = None
        if response is None or lines is None:
            return
        try:
            if self._drain:
                # After the FINAL only the end of the body is left; reading it lets
                # httpx keep the connection for the next call instead of closing it.
                try:
                    async with asyncio.timeout(DRAIN_S):
                        async for _ in lines:
                            pass
                except (TimeoutError, httpx.HTTPError):
                    pass
            await lines.aclose()
        finally:
            await response.aclose()
