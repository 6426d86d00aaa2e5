"""What every route shares: the config, the broker, and the per-request context
(deadline, caller) that identity and admission will hook into."""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import Request

from daemons import registry
from daemons.bus.broker import Broker
from daemons.config import Config
from daemons.router.errors import APIError
from daemons.router.index import Index


@dataclass
class RouterState:
    config: Config
    broker: Broker
    index: Index

    @property
    def retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.config.router.retry_after_s)}

    def expected_services(self) -> list[str]:
        return registry.expected_services(self.config)


def get_state(request: Request) -> RouterState:
    state: RouterState = request.app.state.onebox
    return state


@dataclass(frozen=True)
class Caller:
    """Who is calling and until when. Today every caller who can reach the socket is
    trusted the same; identity (API keys, SO_PEERCRED) and admission join here."""

    deadline: float  # unix time


def deadline_for(request: Request, state: RouterState) -> float:
    rc = state.config.router
    timeout = rc.request_timeout_s
    header = request.headers.get("x-request-timeout")
    if header is not None:
        try:
            timeout = float(header)
        except ValueError:
            raise APIError(400, "X-Request-Timeout must be a number of seconds", "invalid_header") from None
        if not 0 < timeout <= rc.max_request_timeout_s:
            raise APIError(400, f"X-Request-Timeout must be in (0, {rc.max_request_timeout_s:g}]", "invalid_header")
    return time.time() + timeout


def caller(request: Request) -> Caller:
    """The dependency every API route that does work takes."""
    state = get_state(request)
    return Caller(deadline=deadline_for(request, state))
