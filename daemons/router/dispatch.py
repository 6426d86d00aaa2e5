"""Where a chat or completion goes: the model asked for, then its fallback chain.

Each model in the chain is tried in order until one gives its first reply: a local
model when it has a live worker and room in its fair queue (or its expected wait there
is within overflow_wait_s), a remote model through its provider (retries, timeouts and
the circuit breaker live in daemons/router/upstream/). A failure that another model
could fix — no worker, overload, a 5xx, an open circuit — moves on to the next; one that
is the request's own fault (400) or its deadline (504) does not. Once a first reply has
come, the request stays where it is: nothing has been promised twice.

Data residency: a request that is local_only — its principal, a collection it draws
sources from, or the request itself says so — never reaches a remote model, whatever
the chain says; asking for a remote model by name is 403, and a fallback not taken for
that reason is logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from daemons.bus.errors import BusError
from daemons.infer.rag import messages_with_sources
from daemons.infer.request import Source
from daemons.router.admission import FairQueue, Place
from daemons.router.calls import unless_gone
from daemons.router.errors import APIError
from daemons.router.identity import Principal
from daemons.router.routes.models import infer_service
from daemons.router.upstream import UpstreamError

if TYPE_CHECKING:
    from daemons.router.state import RouterState

log = logging.getLogger(__name__)

Pair = tuple[str, dict[str, Any]]
MAX_CHAIN = 8
# Failures another model may not share: the worker or provider is gone, full or broken.
ELSEWHERE = {429, 500, 502, 503}


@dataclass
class Opened:
    """A call that has given its first reply; `close()` ends it and frees its place."""

    model: str  # the model serving it (after any fallback)
    provider: str  # "local" or the provider's name
    first: Pair
    replies: AsyncIterator[Pair]
    _close: Callable[[], Awaitable[None]]
    place: Place

    async def close(self) -> None:
        try:
            await self._close()
        finally:
            self.place.release()


class Dispatcher:
    def __init__(self, state: RouterState) -> None:
        self.state = state
        config = state.config
        self.queues: dict[str, FairQueue] = {}
        for name, m in config.models.items():
            self.queues[name] = FairQueue(name, m.queue_depth, self._local_limit(name),
                                          config.router.retry_after_s)
        for name, r in config.remote_models.items():
            self.queues[name] = FairQueue(name, r.queue_depth, _constant(r.max_in_flight),
                                          config.router.retry_after_s)

    def _local_limit(self, model: str) -> Callable[[], int]:
        configured = self.state.config.models[model].max_in_flight
        default = self.state.config.models[model].in_flight

        def limit() -> int:
            if configured:
                return configured
            # What the live workers run at once (their slots, or their capacity when
            # they say nothing of slots), so the fair queue decides who goes next.
            total = 0
            for w in self.state.broker.live(infer_service(model)):
                slots = w.status.get("slots") if isinstance(w.status, dict) else None
                total += int(slots["total"]) if isinstance(slots, dict) and "total" in slots else w.capacity
            return total or default
        return limit

    def kick(self) -> None:
        for q in self.queues.values():
            q.kick()

    def chain(self, model: str) -> list[str]:
        """The model, then its fallbacks and theirs, each once."""
        out: list[str] = []
        todo = [model]
        while todo and len(out) < MAX_CHAIN:
            name = todo.pop(0)
            if name in out:
                continue
            out.append(name)
            todo.extend(self.state.config.fallback(name))
        return out

    def candidates(self, model: str, local_only: str | None) -> tuple[list[str], list[str]]:
        """(models to try in order, remote ones left out because the request is local_only)."""
        chain = self.chain(model)
        if not local_only:
            return chain, []
        remote = self.state.config.remote_models
        if model in remote:
            provider = remote[model].provider
            self.state.metrics.local_only_refusals.labels(model).inc()
            log.warning("refused to send a request to %s (provider %s): it is local_only (%s)", model, provider,
                        local_only)
            raise APIError(403, f"model {model!r} is served by provider {provider!r}, and this request is local_only "
                                f"({local_only}): it may not leave this machine", "local_only", "model")
        return [c for c in chain if c not in remote], [c for c in chain if c in remote]

    async def open(self, who: Principal, request_id: str, model: str, body: dict[str, Any], deadline: float,
                   gone: asyncio.Future[None], local_only: str | None, stream: bool = True) -> Opened:
        """The first model of the chain that gives a first reply. `stream`: whether the
        client reads the reply as it comes (a provider is asked for one whole answer
        otherwise: less work on both sides)."""
        tried, refused = self.candidates(model, local_only)
        failures: list[str] = []
        last_error: APIError | None = None
        for i, name in enumerate(tried):
            more = i + 1 < len(tried)
            try:
                opened = await self._try(who, request_id, name, body, deadline, gone, overflow_ok=more, stream=stream)
            except APIError as exc:
                if more or not refused or exc.status not in ELSEWHERE:
                    raise
                last_error = exc  # the last local model is full: say what was not tried instead
                failures.append(f"{name}: {exc.message}")
                break
            except _Skip as skip:
                failures.append(f"{name}: {skip.reason}")
                last_error = skip.error
                if more:
                    self.state.metrics.fallbacks.labels(model, tried[i + 1], skip.kind).inc()
                    log.info("request %s: %s %s; trying %s", request_id, name, skip.reason, tried[i + 1])
                continue
            return opened
        if refused:
            self.state.metrics.local_only_refusals.labels(model).inc()
            log.warning("request %s of %s is local_only (%s): not sending it to %s", request_id, who.name,
                        local_only, ", ".join(refused))
            failures.append(f"not sent to {', '.join(refused)}: the request is local_only ({local_only})")
        assert last_error is not None
        if len(failures) > 1:
            last_error = APIError(last_error.status, "; ".join(failures), last_error.code, last_error.param,
                                  last_error.headers)
        raise last_error

    async def _try(self, who: Principal, request_id: str, name: str, body: dict[str, Any], deadline: float,
                   gone: asyncio.Future[None], overflow_ok: bool, stream: bool) -> Opened:
        config = self.state.config
        queue = self.queues[name]
        local = name in config.models
        if local:
            if not self.state.broker.live(infer_service(name)):
                raise _Skip("has no live worker (starting, restarting or stopped)", "no_worker",
                            APIError(503, f"model {name!r} has no live worker (starting, restarting or stopped)",
                                     "no_worker", headers=self.state.retry_after))
        # A free place is taken at once; only a request that would wait asks whether it
        # should overflow (no await in between, so concurrent requests see what is left).
        place = queue.try_acquire()
        if place is None and local:
            overflow = config.models[name].overflow_wait_s
            wait = queue.expected_wait(who.priority)
            if overflow_ok and overflow > 0 and wait > overflow:
                raise _Skip(f"would wait about {wait:.1f} s in its queue (overflow_wait_s = {overflow:g})",
                            "overflow", APIError(429, f"model {name!r} is overloaded", "overloaded",
                                                 headers=self.state.retry_after))
        if place is None:
            try:
                place = await unless_gone(queue.acquire(who.name, who.priority, deadline), gone)
            except APIError as exc:
                if exc.status == 429 and overflow_ok:
                    raise _Skip("has a full queue", "queue_full", exc) from None
                raise
        try:
            if local:
                return await self._local(request_id, name, body, deadline, gone, place)
            return await self._remote(name, body, deadline, gone, place, stream)
        except BaseException:
            place.release()
            raise

    async def _local(self, request_id: str, name: str, body: dict[str, Any], deadline: float,
                     gone: asyncio.Future[None], place: Place) -> Opened:
        try:
            # The worker may have gone while the request waited its turn (NoWorker, 503).
            call = await unless_gone(self.state.broker.call(infer_service(name), body, deadline,
                                                            call_id=request_id), gone)
        except BusError as exc:
            raise self._local_failed(exc) from None
        replies = aiter(call)
        try:
            first = await unless_gone(anext(replies), gone)
        except BusError as exc:
            await call.close()
            raise self._local_failed(exc) from None
        except BaseException:
            await call.close()
            raise
        return Opened(name, "local", first, replies, call.close, place)

    def _local_failed(self, exc: BusError) -> Exception:
        if exc.code in ELSEWHERE:
            return _Skip(f"failed ({exc.code}: {exc.message})", "error",
                         APIError(exc.code, exc.message, _bus_code(exc.code),
                                  headers=self.state.retry_after if exc.code in (429, 503) else {}))
        return exc

    async def _remote(self, name: str, body: dict[str, Any], deadline: float, gone: asyncio.Future[None],
                      place: Place, stream: bool) -> Opened:
        remote = self.state.config.remote_models[name]
        provider = self.state.providers[remote.provider]
        upstream_body, sources = for_upstream(body, remote.default_max_tokens)
        try:
            call = await unless_gone(provider.open(upstream_body, remote.model or name, deadline, stream=stream), gone)
        except UpstreamError as exc:
            raise self._upstream_failed(remote.provider, exc) from None
        try:
            first = await unless_gone(anext(call), gone)
        except UpstreamError as exc:
            await call.close()
            raise self._upstream_failed(remote.provider, exc) from None
        except BaseException:
            await call.close()
            raise
        replies: AsyncIterator[Pair] = call
        if sources:
            first, replies = _with_sources_used(first, call, sources)
        return Opened(name, remote.provider, first, replies, call.close, place)

    def _upstream_failed(self, provider: str, exc: UpstreamError) -> Exception:
        self.state.metrics.upstream_errors.labels(provider, exc.kind).inc()
        headers = {"Retry-After": str(max(1, int(exc.retry_after or self.state.config.router.retry_after_s)))} \
            if exc.code in (429, 503) else {}
        error = APIError(exc.code, f"provider {provider!r}: {exc.message}", _bus_code(exc.code), headers=headers)
        if exc.retryable_elsewhere:
            return _Skip(f"failed upstream ({exc.code}: {exc.message})", exc.kind, error)
        return error


def _constant(n: int) -> Callable[[], int]:
    return lambda: n


class _Skip(Exception):
    """This model cannot take the request; the next in the chain may."""

    def __init__(self, reason: str, kind: str, error: APIError) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.error = error


def _bus_code(status: int) -> str | None:
    return {503: "no_worker", 504: "deadline_exceeded", 429: "overloaded", 502: "bad_gateway"}.get(status)


def for_upstream(body: dict[str, Any], default_max_tokens: int) -> tuple[dict[str, Any], int]:
    """The bus body for a provider: a RAG request's sources put into its messages (a
    local daemon fits them to its context itself; a provider's is large), and a
    max_tokens always (budgets reserve against it). Returns the sources' count too."""
    out = {k: v for k, v in body.items() if k != "rag"}
    out["max_tokens"] = body.get("max_tokens") or default_max_tokens
    rag = body.get("rag")
    if not rag or "messages" not in body:
        return out, 0
    sources = [Source(str(s.get("label", "")), str(s.get("text", ""))) for s in rag.get("sources", [])]
    out["messages"] = messages_with_sources(list(body["messages"]), sources)
    return out, len(sources)


def _with_sources_used(first: Pair, rest: AsyncIterator[Pair], used: int) -> tuple[Pair, AsyncIterator[Pair]]:
    def mark(pair: Pair) -> Pair:
        return (pair[0], {**pair[1], "sources_used": used}) if pair[0] == "final" else pair

    async def marked() -> AsyncIterator[Pair]:
        async for pair in rest:
            yield mark(pair)
    return mark(first), marked()
