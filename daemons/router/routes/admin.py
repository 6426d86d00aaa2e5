"""Admin endpoints: /v1/status, /v1/keys, /v1/usage (admin principals only; the app
adds the check to every route here)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from daemons import __version__
from daemons.ledger import parse_since, report
from daemons.router.body import parse_body
from daemons.router.errors import APIError
from daemons.router.state import RouterState, get_state

router = APIRouter()


@router.get("/v1/status")
async def status(state: RouterState = Depends(get_state)) -> dict[str, Any]:
    """Every service's live workers and what each last said of itself (with heartbeats,
    so up to one heartbeat interval old); `models` is the same for the chat models, with
    the router's own queue for each; `providers` their circuits."""
    snap = state.broker.snapshot()
    services: dict[str, Any] = snap["services"]
    for name in state.expected_services():
        services.setdefault(name, {"workers": []})
    queues = {name: {"waiting": q.queued, "in_flight": q.in_flight, "limit": q.limit(),
                     "expected_wait_s": round(q.expected_wait(), 3)} for name, q in state.dispatch.queues.items()}
    models = {name: {**services.get(f"infer/{name}", {"workers": []}), "router_queue": queues[name]}
              for name in state.config.models}
    remote = {name: {"provider": r.provider, "router_queue": queues[name],
                     "circuit": state.providers[r.provider].state if r.provider in state.providers else "unknown"}
              for name, r in state.config.remote_models.items()}
    router = {"pid": os.getpid(), "onebox_version": __version__, "started_at": state.started_at}
    return {"object": "status", "router": router, "models": models, "remote_models": remote, "services": dict(sorted(services.items())),
            "bus_clients": snap["clients"], "ledger": {"written": state.ledger.written,
                                                       "pending": state.ledger.pending()}}


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    principal: str = Field(min_length=1, max_length=64)
    name: str = Field(default="", max_length=200)


@router.get("/v1/keys")
async def list_keys(state: RouterState = Depends(get_state), revoked: bool = False) -> dict[str, Any]:
    keys = await asyncio.to_thread(state.keys.list, revoked)
    return {"object": "list", "data": [k.public() for k in keys]}


@router.post("/v1/keys")
async def create_key(request: Request, state: RouterState = Depends(get_state)) -> dict[str, Any]:
    """A new key for a principal; the secret is in this reply only (it is stored hashed)."""
    req = parse_body(NewKey, await request.body())
    try:
        info, secret = await asyncio.to_thread(state.keys.create, req.principal, req.name)
    except ValueError as exc:
        raise APIError(400, str(exc), "invalid_request", "principal") from None
    return {**info.public(), "key": secret}


@router.delete("/v1/keys/{key_id}")
async def revoke_key(key_id: str, state: RouterState = Depends(get_state)) -> dict[str, Any]:
    """Revoked at once: the very next request with it gets 401."""
    info = await asyncio.to_thread(state.keys.revoke, key_id)
    if info is None:
        raise APIError(404, f"no API key with id {key_id!r}", "not_found", "key_id")
    return info.public()


@router.get("/v1/usage")
async def get_usage(state: RouterState = Depends(get_state),
                    since: str = Query("today", description='"today", "7d", "24h", "2026-11-01", an ISO time'),
                    until: str | None = None,
                    by: Literal["principal", "model", "day", "provider"] = "principal") -> dict[str, Any]:
    """The ledger, grouped; rows still waiting to be written are flushed first."""
    now = time.time()
    try:
        start = parse_since(since, now)
        end = parse_since(until, now) if until else None
    except ValueError as exc:
        raise APIError(400, str(exc), "invalid_request", "since") from None

    def query() -> dict[str, Any]:
        state.ledger.flush(5.0)
        return report(state.ledger.path, start, end, by, state.config.costs.currency)

    return await asyncio.to_thread(query)
