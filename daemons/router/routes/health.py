"""Liveness, readiness and status: what a sysadmin or a supervisor asks the router."""

from __future__ import annotations

from typing import Any

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
    """200 once every enabled service has a live worker, else 503 naming the missing ones."""
    services = {name: len(entry["workers"]) for name, entry in state.broker.snapshot()["services"].items()}
    expected = state.expected_services()
    for name in expected:
        services.setdefault(name, 0)
    missing = [name for name in expected if not services[name]]
    body = {"ready": not missing, "services": dict(sorted(services.items())), "missing": missing}
    return JSONResponse(body, 503 if missing else 200, headers=state.retry_after if missing else {})


@router.get("/v1/status")
async def status(state: RouterState = Depends(get_state)) -> dict[str, Any]:
    """Every service's live workers and what each last said of itself (with heartbeats,
    so up to one heartbeat interval old); `models` is the same for the chat models."""
    snap = state.broker.snapshot()
    services: dict[str, Any] = snap["services"]
    for name in state.expected_services():
        services.setdefault(name, {"workers": []})
    models = {name: services.get(f"infer/{name}", {"workers": []}) for name in state.config.models}
    return {"object": "status", "models": models, "services": dict(sorted(services.items())),
            "bus_clients": snap["clients"]}
