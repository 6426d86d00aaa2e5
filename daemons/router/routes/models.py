"""GET /v1/models: the configured chat models, as OpenAI lists them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from daemons.router.state import RouterState, get_state

router = APIRouter()


def infer_service(model: str) -> str:
    return f"infer/{model}"


@router.get("/v1/models")
async def models(state: RouterState = Depends(get_state)) -> dict[str, Any]:
    """Chat models and embedding models (`kind`), each with whether a worker serves it now."""
    listed = [(name, "chat", infer_service(name)) for name in state.config.models]
    listed += [(name, "embedding", f"embed/{name}") for name in state.config.embeddings]
    data: list[dict[str, Any]] = [
        {"id": name, "object": "model", "created": 0, "owned_by": "onebox", "kind": kind,
         "ready": bool(state.broker.live(service))}
        for name, kind, service in listed
    ]
    # Models served by a provider: "ready" unless its circuit is open.
    for name, remote in state.config.remote_models.items():
        provider = state.providers.get(remote.provider)
        data.append({"id": name, "object": "model", "created": 0, "owned_by": remote.provider, "kind": "chat",
                     "ready": provider is not None and provider.state != "open"})
    return {"object": "list", "data": data}
