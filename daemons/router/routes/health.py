"""Liveness and readiness: what a supervisor or load balancer asks the router, with no
key needed (they say nothing about who calls or what it costs)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from daemons.router.state import RouterState, get_state

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    """The router's loop is running (says nothing about the daemons behind it)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: RouterState = Depends(get_state)) -> JSONResponse:
    """200 once every enabled service has a live worker, else 503 naming the missing ones.
    A worker that is draining (it said DISCONNECT with requests still in flight, as a
    stalled engine does) takes no new requests, so it does not count."""
    services = {name: sum(not w["draining"] for w in entry["workers"])
                for name, entry in state.broker.snapshot()["services"].items()}
    expected = state.expected_services()
    for name in expected:
        services.setdefault(name, 0)
    missing = [name for name in expected if not services[name]]
    body = {"ready": not missing, "services": dict(sorted(services.items())), "missing": missing}
    return JSONResponse(body, 503 if missing else 200, headers=state.retry_after if missing else {})
