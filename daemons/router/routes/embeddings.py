"""POST /v1/embeddings, as OpenAI's: a string, a list of strings, or token ids in; float
or base64 vectors out, in input order, with usage.prompt_tokens."""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
import orjson

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from daemons.bus.broker import Call
from daemons.router.body import parse_body
from daemons.router.calls import Ids, require_worker, unless_gone, watch
from daemons.router.errors import APIError
from daemons.router import pricing
from daemons.router.meter import Meter, admit, failure
from daemons.router.state import Caller, RouterState, caller, get_state

router = APIRouter()

Input = str | list[str] | list[int] | list[list[int]]


class OneboxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    truncate: bool | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=256)
    input: Input
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    # onebox's own options, where the openai client puts extra_body={"onebox": {...}}.
    onebox: OneboxOptions | None = None


def embed_service(model: str) -> str:
    return f"embed/{model}"


def check_model(state: RouterState, model: str) -> str:
    if model not in state.config.embeddings:
        hint = " (a chat model: use /v1/chat/completions)" if model in state.config.models else ""
        raise APIError(404, f"The embedding model '{model}' does not exist{hint}", "model_not_found", "model")
    service = embed_service(model)
    require_worker(state, service, f"embedding model '{model}'")
    return service


@router.post("/v1/embeddings", response_model=None)
async def embeddings(request: Request, who: Caller = Depends(caller),
                     state: RouterState = Depends(get_state)) -> Response:
    req = parse_body(EmbeddingRequest, await request.body())
    if isinstance(req.input, list) and not req.input:
        raise APIError(400, "input must not be empty", "invalid_request", "input")
    service = check_model(state, req.model)
    dims = [w.meta.get("dimensions") for w in state.broker.live(service)]
    if req.dimensions is not None and req.dimensions not in dims:
        raise APIError(400, f"dimensions={req.dimensions}: model '{req.model}' gives {dims[0]}-dimensional vectors "
                            "and cannot shorten them", "invalid_request", "dimensions")
    body: dict[str, Any] = {"input": req.input}
    if req.onebox and req.onebox.truncate is not None:
        body["truncate"] = req.onebox.truncate
    ids = Ids.of(request)
    request_id = ids.ours
    meter = Meter(state, who.principal, request_id, req.model, "embedding", client_request_id=ids.theirs)
    most = input_tokens(req.input)
    meter.grant = admit(state, meter, pricing.price(state.config, req.model).cost(most, 0), most)
    gone = watch(request)
    call: Call | None = None
    try:
        call = await unless_gone(state.broker.call(service, body, who.deadline, call_id=request_id), gone)
        parts, final = await unless_gone(collect(call), gone)
        meter.token()
        try:
            data = [{"object": "embedding", "index": i, "embedding": vec} for i, vec in
                    enumerate(vectors(parts, int(final["dim"]), req.encoding_format))]
            tokens = int(final.get("usage", {}).get("prompt_tokens", 0))
        except (KeyError, ValueError, TypeError) as exc:
            raise APIError(502, f"the embedding daemon's reply is malformed ({type(exc).__name__}: {exc})",
                           "bad_gateway") from None
        meter.finish(200, {"prompt_tokens": tokens})
        await meter.recorded()
    except BaseException as exc:
        meter.finish(*failure(exc))
        raise
    finally:
        gone.cancel()
        if call is not None:
            await call.close()
    # orjson writes numpy float32 rows with float32's shortest digits: half the bytes of
    # json.dumps on Python floats, and about fifteen times faster (measured on 64 x 384).
    payload = orjson.dumps({"object": "list", "data": data, "model": req.model,
                            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                           option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(payload, media_type="application/json", headers={"X-Request-Id": ids.header})


def input_tokens(value: Input) -> int:
    """The most tokens an input can be: one per byte of text (or the ids themselves)."""
    items = value if isinstance(value, list) else [value]
    total = 0
    for item in items:
        if isinstance(item, str):
            total += len(item.encode()) + 2  # with the model's [CLS]/[SEP]-like specials
        elif isinstance(item, list):
            total += len(item)
        else:
            total += 1
    return total


async def collect(call: Call) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    async for kind, data in call:
        if kind == "final":
            return parts, data
        parts.append(data)
    raise APIError(502, "the embedding daemon ended without a reply", "bad_gateway")


def vectors(parts: list[dict[str, Any]], dim: int, encoding: str) -> list[Any]:
    """The rows of the workers' float32 pieces, in input order: numpy rows, or base64
    (OpenAI's base64 is the little-endian float32 array itself, as the workers send it)."""
    out: list[Any] = []
    for part in sorted(parts, key=lambda p: int(p["index"])):
        rows = np.frombuffer(part["vectors"], dtype="<f4").reshape(int(part["count"]), dim)
        if encoding == "base64":
            out.extend(base64.b64encode(row.tobytes()).decode() for row in rows)
        else:
            out.extend(rows)
    return out
