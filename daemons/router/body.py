"""Request bodies: a size limit that holds with or without Content-Length, and JSON
parsing into pydantic models whatever the Content-Type."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemons.router import errors
from daemons.router.errors import APIError

M = TypeVar("M", bound=BaseModel)


class BodyLimit:
    """Refuse bodies larger than the limit before a handler reads them. A declared
    Content-Length is checked at once; a body without one (chunked) is read here up to
    the limit and handed on only if it fits. Paths in `streamed` (uploads) have their own
    limit and are never buffered here: their handler reads them as a stream, and the
    stream fails with 413 once it passes the limit."""

    def __init__(self, app: ASGIApp, limit: int, streamed: dict[str, int] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.streamed = streamed or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.streamed.get(scope.get("path", ""), self.limit)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                await self._refuse(scope, receive, send, limit)
                return
            await self.app(scope, receive, send)
            return
        if scope.get("path", "") in self.streamed:
            await self.app(scope, _counting(receive, limit), send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client left while sending; let the app see that as it would.
                await self.app(scope, _replay([], message, receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send, self.limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(chunks, None, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        err = APIError(413, f"request body larger than {limit} bytes", "body_too_large")
        await errors.error_response(err)(scope, receive, send)


def _counting(receive: Receive, limit: int) -> Receive:
    """A receive() that fails with 413 once the body passes `limit` bytes."""
    size = 0

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise APIError(413, f"request body larger than {limit} bytes", "body_too_large")
        return message

    return counted


def _replay(chunks: list[bytes], last: Message | None, receive: Receive) -> Receive:
    """A receive() that gives the buffered body first, then the real channel (disconnects)."""
    pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}] if last is None \
        else [last]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay


def once_each(items: Iterable[tuple[str, Any]], where: str) -> dict[str, Any]:
    """Query parameters or form fields as a dict, each name given once: of a repeated
    one no value is more right than another (400 naming it)."""
    out: dict[str, Any] = {}
    for key, value in items:
        if key in out:
            raise APIError(400, f"{where} {key!r} given more than once", "invalid_request", key)
        out[key] = value
    return out


def parse_body(model: type[M], raw: bytes) -> M:
    """Parse a JSON body whatever its Content-Type (curl -d sends a form type)."""
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        message, param = errors.describe(list(exc.errors()))
        raise APIError(400, message, "invalid_request", param) from None
