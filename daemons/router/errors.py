"""OpenAI-style error bodies and the handlers that make every failure one."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from daemons.bus.errors import BusError

log = logging.getLogger(__name__)

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}


def error_type(status: int) -> str:
    """OpenAI's error type for a status; any other 4xx (a worker's 409, 415 or 422) is
    the client's request too, never a server error."""
    return TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error")


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.code, err.param), err.status, headers=err.headers)


def from_bus(exc: BusError, retry_after: int) -> APIError:
    headers = {"Retry-After": str(retry_after)} if exc.code in (429, 503) else {}
    code = {503: "no_worker", 504: "deadline_exceeded", 429: "overloaded"}.get(exc.code)
    return APIError(exc.code, exc.message, code, headers=headers)


def _is_tag(part: object) -> bool:
    """A step of a pydantic error location that names a member of a union (`str`,
    `list[str]`, `NamedToolChoice`, `literal['auto']`), not a field."""
    return isinstance(part, str) and (part in _TYPE_TAGS or any(c in part for c in "[(") or part[:1].isupper())


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "bytes"})


def param_path(loc: list[Any]) -> str | None:
    """OpenAI's way of naming a parameter: messages[0].content[1].type."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def describe(errors: list[Any]) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    raw = [x for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}", None
    if not raw and first.get("type") in ("model_type", "model_attributes_type"):
        return "request body must be a JSON object", None
    if first.get("type") == "extra_forbidden" and raw:
        # OpenAI's answer to an argument it does not know; the name itself is kept as sent.
        param = param_path([x for x in raw[:-1] if not _is_tag(x)] + [str(raw[-1])])
        return f"Unrecognized request argument supplied: {param}", param
    param = param_path([x for x in raw if not _is_tag(x)])
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe(list(exc.errors()))
        return error_response(APIError(400, message, "invalid_request", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error serving %s %s", request.method, request.url.path)
        return error_response(APIError(500, "internal error in the router; see its log", "internal_error"))
