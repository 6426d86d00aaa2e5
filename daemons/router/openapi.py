"""GET /openapi.json as the API really is, for client generators and API fuzzers.

FastAPI alone would document it wrong: the routes read their bodies themselves
(`body.parse_body`: JSON whatever the Content-Type, uploads as streams), so it would show
no request bodies, and it would promise 422 {"detail": [...]} for bad input where the
router answers 400 with an OpenAI error object (daemons/router/errors.py). Here the
generated document gets each route's request body from the pydantic model the route
parses, every error as an OpenAI error object, and the media types really served
(Server-Sent Events, Prometheus text, markdown)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from daemons.router.routes.admin import NewKey
from daemons.router.routes.embeddings import EmbeddingRequest
from daemons.router.routes.ocr import OcrOptions, OcrPathRequest
from daemons.router.routes.search import SearchRequest
from daemons.router.schemas import ChatRequest, CompletionRequest

REF = "#/components/schemas/{model}"

# The JSON body each route parses (all of them also take it without a JSON Content-Type).
JSON_BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("post", "/v1/chat/completions"): ChatRequest,
    ("post", "/v1/completions"): CompletionRequest,
    ("post", "/v1/embeddings"): EmbeddingRequest,
    ("post", "/v1/search"): SearchRequest,
    ("post", "/v1/keys"): NewKey,
}

ERROR = {
    "type": "object",
    "description": "An OpenAI error object: every 4xx and 5xx answer has this body.",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string", "minLength": 1},
            "type": {"type": "string", "minLength": 1},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]},
        },
    }},
}

READY = {
    "type": "object",
    "required": ["ready", "services", "missing"],
    "properties": {
        "ready": {"type": "boolean"},
        "services": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
        "missing": {"type": "array", "items": {"type": "string"}},
    },
}

USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "total_tokens"],
    "properties": {"prompt_tokens": {"type": "integer", "minimum": 0},
                   "completion_tokens": {"type": "integer", "minimum": 0},
                   "total_tokens": {"type": "integer", "minimum": 0}},
}


def _completion(obj: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"}, "object": {"const": obj}, "created": {"type": "integer"},
            "model": {"type": "string"}, "usage": {"$ref": REF.format(model="Usage")},
            "choices": {"type": "array", "minItems": 1, "items": choice},
        },
    }


CHAT_COMPLETION = _completion("chat.completion", {
    "type": "object",
    "required": ["index", "message", "finish_reason"],
    "properties": {
        "index": {"type": "integer", "minimum": 0},
        "finish_reason": {"type": "string"},
        "message": {"type": "object", "required": ["role", "content"],
                    "properties": {"role": {"const": "assistant"}, "content": {"type": ["string", "null"]}}},
    },
})

TEXT_COMPLETION = _completion("text_completion", {
    "type": "object",
    "required": ["index", "text", "finish_reason"],
    "properties": {"index": {"type": "integer", "minimum": 0}, "text": {"type": "string"},
                   "finish_reason": {"type": "string"}},
})

EMBEDDINGS = {
    "type": "object",
    "required": ["object", "data", "model", "usage"],
    "properties": {
        "object": {"const": "list"}, "model": {"type": "string"}, "usage": {"$ref": REF.format(model="Usage")},
        "data": {"type": "array", "items": {
            "type": "object", "required": ["object", "index", "embedding"],
            "properties": {"object": {"const": "embedding"}, "index": {"type": "integer", "minimum": 0},
                           "embedding": {"anyOf": [{"type": "array", "items": {"type": "number"}},
                                                   {"type": "string"}]}}}},
    },
}

MODELS = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
        "type": "object", "required": ["id", "object", "owned_by", "kind", "ready"],
        "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "owned_by": {"type": "string"},
                       "kind": {"enum": ["chat", "embedding"]}, "ready": {"type": "boolean"}}}}},
}

# One Server-Sent Event of a streamed answer (OpenAPI 3.1: `schema` is each event's).
EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "minLength": 1,
                            "description": "A chunk as JSON (an OpenAI error object if the answer failed midway); "
                                           "[DONE] last"}},
}

# What a 2xx answer is, where it is more than FastAPI's "any object".
ANSWERS: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/chat/completions"): {"200": {
        "description": "The completion, or with \"stream\": true its chunks as Server-Sent Events",
        "content": {"application/json": {"schema": {"$ref": REF.format(model="ChatCompletion")}},
                    "text/event-stream": {"schema": {"$ref": REF.format(model="Event")}}}}},
    ("post", "/v1/completions"): {"200": {
        "description": "The completion, or with \"stream\": true its chunks as Server-Sent Events",
        "content": {"application/json": {"schema": {"$ref": REF.format(model="TextCompletion")}},
                    "text/event-stream": {"schema": {"$ref": REF.format(model="Event")}}}}},
    ("post", "/v1/embeddings"): {"200": {
        "description": "One vector per input, in input order",
        "content": {"application/json": {"schema": {"$ref": REF.format(model="EmbeddingList")}}}}},
    ("get", "/v1/models"): {"200": {
        "description": "The chat and embedding models",
        "content": {"application/json": {"schema": {"$ref": REF.format(model="ModelList")}}}}},
    ("post", "/v1/ocr"): {"200": {
        "description": "The document's markdown, or with \"stream\": true its pages as Server-Sent Events",
        "content": {"application/json": {"schema": {"type": "object"}},
                    "text/event-stream": {"schema": {"$ref": REF.format(model="Event")}}}}},
    ("get", "/ready"): {
        "200": {"description": "Every enabled service has a live worker",
                "content": {"application/json": {"schema": {"$ref": REF.format(model="Readiness")}}}},
        "503": {"description": "Some service has no live worker (named in `missing`)",
                "content": {"application/json": {"schema": {"$ref": REF.format(model="Readiness")}}}}},
    ("get", "/metrics"): {"200": {"description": "Prometheus' text format",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}},
    ("get", "/v1/documents/{file_id}/content"): {"200": {
        "description": "The markdown the document was indexed from",
        "content": {"text/markdown": {"schema": {"type": "string"}}}}},
    ("post", "/v1/documents"): {"202": {
        "description": "Written into the collection's inbox folder; indexing happens later",
        "content": {"application/json": {"schema": {"type": "object"}}}}},
}

UPLOAD_QUERY = [
    {"name": "filename", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 255}},
    {"name": "collection", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 256}},
]


def _ocr_body() -> dict[str, Any]:
    options = OcrOptions.model_json_schema(ref_template=REF)
    form = {"type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary"}, **options["properties"]}}
    raw = {"schema": {"type": "string", "format": "binary"}}
    return {"required": True, "content": {
        "multipart/form-data": {"schema": form},
        "application/json": {"schema": {"$ref": REF.format(model="OcrPathRequest")}},
        "application/pdf": raw, "image/png": raw, "application/octet-stream": raw}}


def _upload_body() -> dict[str, Any]:
    form = {"type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary"},
                           "collection": {"type": "string", "maxLength": 256},
                           "filename": {"type": "string", "maxLength": 255}}}
    return {"required": True, "content": {
        "multipart/form-data": {"schema": form},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}


def document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document of `app`, corrected as the module docstring says."""
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    models: list[type[BaseModel]] = [*JSON_BODIES.values(), OcrPathRequest]
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    schemas: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(defs.get("$defs", {}))
    schemas.update({"Error": ERROR, "Event": EVENT, "Readiness": READY, "Usage": USAGE, "ChatCompletion": CHAT_COMPLETION,
                    "TextCompletion": TEXT_COMPLETION, "EmbeddingList": EMBEDDINGS, "ModelList": MODELS})
    error = {"description": "An OpenAI error object",
             "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}}}
    for path, operations in doc.get("paths", {}).items():
        for method, op in operations.items():
            key = (method, path)
            responses = op.setdefault("responses", {})
            responses.pop("422", None)  # never sent: bad input is a 400 with an error object
            if key in ANSWERS:
                if "200" not in ANSWERS[key]:
                    responses.pop("200", None)
                responses.update(ANSWERS[key])
            responses["default"] = error
            if key in JSON_BODIES:
                ref = {"$ref": REF.format(model=JSON_BODIES[key].__name__)}
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
            elif key == ("post", "/v1/ocr"):
                op["requestBody"] = _ocr_body()
            elif key == ("post", "/v1/documents"):
                op["requestBody"] = _upload_body()
                op["parameters"] = UPLOAD_QUERY
    return doc


def install(app: FastAPI) -> None:
    """Serve `document(app)` at app.openapi_url (built once, on the first request)."""
    built: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not built:
            built.update(document(app))
        return built

    app.openapi = openapi  # type: ignore[method-assign]
