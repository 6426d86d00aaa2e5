"""Making a bus call on behalf of an HTTP request, and noticing when its client leaves.

`Ids` are a call's ids: ours and the client's X-Request-Id.

Nothing cancels a handler when its client goes away (only a streaming response
listens for that, once it runs), so every stage — waiting for a worker, queued in the
engine, generating a reply that is not streamed — watches the connection and gives
its place up at once. A handler lets BusError and ClientGone propagate: the app turns
them into the OpenAI error (daemons/router/app.py) or a 499 nobody reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from daemons.router.errors import APIError
from daemons.router.state import RouterState

log = logging.getLogger(__name__)

T = TypeVar("T")


class ClientGone(Exception):
    """The HTTP client closed the connection before its reply was ready."""


def require_worker(state: RouterState, service: str, what: str) -> None:
    """503 with Retry-After at once when nothing serves `service`."""
    if not state.broker.live(service):
        raise APIError(503, f"{what} has no live worker (starting, restarting or stopped)", "no_worker",
                       headers=state.retry_after)


async def unless_gone(aw: Awaitable[T], gone: asyncio.Future[None]) -> T:
    """`aw`'s result, or ClientGone if the client leaves first (`aw` is then cancelled)."""
    task = asyncio.ensure_future(aw)
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
    if not task.done():
        raise ClientGone  # the client went; `task` unwinds on its own (open_call gives its slot back)
    return task.result()


async def disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the request body is read)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception as exc:  # the connection broke: the client is as good as gone
        log.debug("receive() failed while watching for a disconnect: %r", exc)


def watch(request: Request) -> asyncio.Future[None]:
    """A future that completes when the client goes away; cancel it when done."""
    return asyncio.ensure_future(disconnected(request))


CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclasses.dataclass(frozen=True)
class Ids:
    """A call's ids: ours (the bus call's, in the response's id) and the client's
    X-Request-Id when it sent a usable one, which the response header then echoes."""

    ours: str
    theirs: str | None

    @classmethod
    def of(cls, request: Request) -> Ids:
        theirs = request.headers.get("x-request-id")
        ours = os.urandom(16).hex()  # as unique as uuid4, a fraction of its cost
        return cls(ours, theirs if theirs is not None and CLIENT_ID.match(theirs) else None)

    @property
    def header(self) -> str:
        return self.theirs or self.ours
