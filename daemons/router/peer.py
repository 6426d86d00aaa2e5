"""Who is on the other end of a Unix-socket connection: SO_PEERCRED, put into each
request's ASGI scope by the HTTP protocol that accepted the connection.

The kernel fills SO_PEERCRED when the client connects, from the connecting process's
credentials: nothing the client sends afterwards (headers included) can change it.
uvicorn has no hook for per-connection data, so the protocol class wraps the app it
calls for this one connection; a request reaching the app any other way (a TCP
connection, a test client) has no peer and must authenticate with a key.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass
from typing import Any, cast

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

SCOPE_KEY = "onebox.peer"
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(sock: Any) -> Peer | None:
    """The credentials of a connected Unix socket's peer; None for any other socket."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return Peer(pid, uid, gid)


def scope_peer(scope: Scope) -> Peer | None:
    peer = scope.get(SCOPE_KEY)
    return peer if isinstance(peer, Peer) else None


class _WithPeer:
    def __init__(self, app: ASGIApp, peer: Peer) -> None:
        self.app = app
        self.peer = peer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[SCOPE_KEY] = self.peer
        await self.app(scope, receive, send)


class PeerHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol, with the peer's credentials in every request's scope."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = peer_of(transport.get_extra_info("socket"))
        if peer is not None:
            app: Any = self.app  # type: ignore[has-type]  # uvicorn's protocols are untyped there
            self.app = cast(Any, _WithPeer(app, peer))
