"""One call's accounting, from admission to its end: timings, tokens, cost; then the
ledger row, the metrics and the settled budget, exactly once, however the call ended."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from daemons.bus.errors import BusError
from daemons.ledger import CallRecord
from daemons.router import pricing
from daemons.router.calls import ClientGone
from daemons.router.errors import APIError
from daemons.router.identity import Principal
from daemons.router.limits import Grant, LimitExceeded

if TYPE_CHECKING:
    from daemons.router.state import RouterState

log = logging.getLogger(__name__)


class Meter:
    def __init__(self, state: RouterState, who: Principal, request_id: str, model: str, kind: str,
                 user: str | None = None, client_request_id: str | None = None) -> None:
        self.state = state
        self.who = who
        self.request_id = request_id
        self.user = user  # the request's `user`, as the client sent it
        self.client_request_id = client_request_id  # the client's X-Request-Id, if it sent one
        self.model = model
        self.kind = kind
        self.at = time.time()
        self.started = time.monotonic()
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.grant: Grant | None = None
        # For a call that ends without usage (client gone, stream broken, a provider that
        # reports none): the prompt's bound and the pieces streamed are what it is billed.
        self.prompt_bound = 0
        self.pieces = 0
        self.opened = False
        state.meters.add(self)  # finished by RouterState.close() if the router stops first
        self.served_by = model
        self.provider = "local"
        self.done = False
        self.ticket = 0  # the ledger's, once finished

    @property
    def label(self) -> str:
        """The request in log lines: our id, and the client's when it sent one."""
        if self.client_request_id is None:
            return self.request_id
        return f"{self.request_id} (x-request-id {self.client_request_id})"

    def serving(self, model: str, provider: str) -> None:
        self.served_by = model
        self.provider = provider
        self.opened = True

    def token(self) -> None:
        """A piece of output reached the client (or is ready for it)."""
        now = time.monotonic()
        self.pieces += 1
        if self.first_at is None:
            self.first_at = now
        elif self.last_at is not None:
            self.state.metrics.inter_token.labels(self.served_by).observe(now - self.last_at)
        self.last_at = now

    def finish(self, status: int, usage: dict[str, Any] | None = None, error: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        self.state.meters.discard(self)
        usage = usage or {}
        prompt = int(usage.get("prompt_tokens", 0) or 0)
        completion = int(usage.get("completion_tokens", 0) or 0)
        cached = int(usage.get("cached_tokens", 0) or 0)
        if self.opened and not prompt and not completion and self.kind != "embedding":
            # Work was done and nobody said how much: never free. The prompt at its bound,
            # a token per piece streamed (a local engine streams one piece per token).
            prompt, completion = self.prompt_bound, self.pieces
            note = "no usage reported: billed the prompt's bound and a token per piece streamed"
            error = f"{error}; {note}" if error else note
        cost = pricing.price(self.state.config, self.served_by).cost(prompt, completion)
        duration = time.monotonic() - self.started
        ttft = None if self.first_at is None else self.first_at - self.started
        if self.grant is not None:
            self.state.limits.settle(self.grant, cost, prompt + completion)
        m = self.state.metrics
        cls = self.who.priority
        m.requests.labels(self.model, cls, str(status)).inc()
        m.duration.labels(self.served_by).observe(duration)
        if ttft is not None:
            m.ttft.labels(self.served_by).observe(ttft)
        if prompt:
            m.tokens.labels(self.served_by, "prompt").inc(prompt)
        if completion:
            m.tokens.labels(self.served_by, "completion").inc(completion)
        if cost:
            m.spend.labels(self.served_by, cls, self.provider).inc(cost)
        self.ticket = self.state.ledger.record(CallRecord(
            request_id=self.request_id, at=self.at, principal=self.who.name, principal_class=cls, model=self.model,
            provider=self.provider, served_by=self.served_by, kind=self.kind, prompt_tokens=prompt,
            completion_tokens=completion, cached_tokens=cached, cost=cost, ttft_s=ttft, duration_s=duration,
            status=status, error=error, user=self.user))
        if status >= 500:
            log.warning("request %s of %s (%s) on %s failed with %d after %.2f s: %s", self.label, self.who.name,
                        self.who.via, self.served_by, status, duration, error)


    async def recorded(self) -> None:
        """Until the ledger row is committed (bounded: see Ledger.committed), so a client
        that saw the end of its answer is in the ledger even if the router dies next."""
        if self.done and not await self.state.ledger.committed(self.ticket):
            log.debug("request %s: answered before its ledger row was committed (the row stays queued)",
                      self.label)


def admit(state: RouterState, meter: Meter, cost: float, tokens: int) -> Grant:
    """The principal's reservation for this call, or LimitExceeded (429), counted and
    written to the ledger like any other answer."""
    try:
        return state.limits.admit(meter.who.name, meter.who.limits, cost, tokens)
    except LimitExceeded as exc:
        state.metrics.limited.labels(exc.code or "limit").inc()
        meter.finish(exc.status, error=exc.message)
        raise


def failure(exc: BaseException) -> tuple[int, None, str]:
    """(status, usage, error) for the ledger row of a call that ended with `exc`."""
    if isinstance(exc, APIError):
        return exc.status, None, exc.message
    if isinstance(exc, BusError):
        return exc.code, None, exc.message
    if isinstance(exc, ClientGone):
        return 499, None, "the client went away"
    if isinstance(exc, asyncio.CancelledError):
        return 499, None, "cancelled (the client went away or the router is stopping)"
    return 500, None, f"{type(exc).__name__}: {exc}"
