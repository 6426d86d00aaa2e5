"""The worker side of the bus: one DEALER to the broker, driven from the main thread.

The daemon's engine (a `Handler`) runs its own threads and answers through an `Emitter`,
which is thread-safe: each thread gets its own inproc PUSH socket and the main thread
forwards what arrives to the broker. ZeroMQ sockets never cross threads.

The worker re-registers when the broker goes silent for `liveness` heartbeats or says
DISCONNECT (a restarted broker does not know it); libzmq's own reconnect interval,
doubling up to RECONNECT_IVL_MAX, is the backoff for the transport underneath.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import zmq

from daemons.bus import protocol as p
from daemons.bus.droplog import DropLog
from daemons.bus.errors import RequestError
from daemons.config import BusConfig

log = logging.getLogger(__name__)

RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 5000


@dataclass(frozen=True)
class Request:
    id: str
    deadline: float  # unix time
    body: dict[str, Any]


class Emitter:
    """Thread-safe way for an engine to send PARTIAL/FINAL/ERROR for its requests."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], address: str) -> None:
        self._ctx = ctx
        self._address = address
        self._local = threading.local()
        self._socks: list[zmq.Socket[bytes]] = []
        self._lock = threading.Lock()

    def _sock(self) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] | None = getattr(self._local, "sock", None)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.linger = 0
            sock.connect(self._address)
            self._local.sock = sock
            with self._lock:
                self._socks.append(sock)
        return sock

    def _send(self, command: bytes, header: dict[str, Any]) -> None:
        self._sock().send_multipart(p.encode(command, header))

    def partial(self, request_id: str, data: dict[str, Any]) -> None:
        self._send(p.PARTIAL, {"id": request_id, "data": data})

    def final(self, request_id: str, data: dict[str, Any]) -> None:
        self._send(p.FINAL, {"id": request_id, "data": data})

    def error(self, request_id: str, code: int, message: str) -> None:
        self._send(p.ERROR, {"id": request_id, "code": code, "message": message})

    def close(self) -> None:
        with self._lock:
            for sock in self._socks:
                sock.close(linger=0)
            self._socks.clear()


class Handler(Protocol):
    """The seam an engine plugs into; the bus knows nothing else about it."""

    def submit(self, request: Request) -> None:
        """Take a request without blocking; raise RequestError to refuse it."""

    def cancel(self, request_id: str) -> None:
        """Stop work on a request and free what it holds; no reply is needed."""

    def alive(self) -> bool:
        """False when the engine's own loop has stopped making progress."""


class Worker:
    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        service: str,
        capacity: int,
        bus: BusConfig,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.service = service
        self.capacity = capacity
        self.bus = bus
        self.meta = meta or {}
        self.active: set[str] = set()
        self.registered_count = 0
        self._outbox_address = f"inproc://onebox-outbox-{uuid.uuid4().hex}"
        self._outbox = ctx.socket(zmq.PULL)
        self._outbox.linger = 0
        self._outbox.bind(self._outbox_address)
        self.emitter = Emitter(ctx, self._outbox_address)
        self._sock: zmq.Socket[bytes] | None = None
        self._poller = zmq.Poller()
        self._broker_expiry = 0.0
        self._next_heartbeat = 0.0
        self._draining = False
        # Optional: the engine's state, sent with each heartbeat (GET /v1/status).
        self.status_provider: Callable[[], dict[str, Any]] | None = None
        self.drops = DropLog(log, "message")

    # -- connection ------------------------------------------------------------------

    def _connect(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        sock.setsockopt(zmq.MAXMSGSIZE, self.bus.max_message_bytes)
        sock.connect(self.endpoint)
        self._sock = sock
        # Built once per connection, not per loop turn (the loop turns once per reply).
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._outbox, zmq.POLLIN)
        self._send(p.READY, {
            "version": p.VERSION, "service": self.service, "capacity": self.capacity,
            "heartbeat_ms": int(self.bus.heartbeat_interval_s * 1000), "pid": os.getpid(), **self.meta,
        })
        now = time.monotonic()
        self._broker_expiry = now + self._silence_limit()
        self._next_heartbeat = now + self.bus.heartbeat_interval_s
        self.registered_count += 1

    def _silence_limit(self) -> float:
        return self.bus.heartbeat_interval_s * self.bus.heartbeat_liveness

    def _send(self, command: bytes, header: dict[str, Any]) -> None:
        assert self._sock is not None
        try:
            self._sock.send_multipart(p.encode(command, header), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("bus send queue full; dropped %s", p.NAMES[command])

    # -- main loop -------------------------------------------------------------------

    def run(self, handler: Handler, should_stop: Callable[[], int], on_tick: Callable[[], None],
            drain_timeout: float) -> None:
        """Serve until `should_stop()` turns non-zero; a value of 2 or more skips the drain."""
        self._connect()
        log.info("registering %s with the broker at %s", self.service, self.endpoint)
        stop_at: float | None = None
        while True:
            stop = should_stop()
            if stop and not self._draining:
                self._draining = True
                stop_at = time.monotonic() + drain_timeout
                self._send(p.DISCONNECT, {"reason": "worker shutting down"})
                log.info("draining %d request(s), up to %.0f s", len(self.active), drain_timeout)
            if self._draining:
                assert stop_at is not None
                if not self.active or stop >= 2 or time.monotonic() >= stop_at:
                    if self.active:
                        log.warning("shutdown deadline: cancelling %d request(s)", len(self.active))
                    for request_id in list(self.active):
                        handler.cancel(request_id)
                        self.emitter.error(request_id, 503, f"{self.service} worker shut down before finishing")
                    self._forward_outbox()
                    self._send(p.DISCONNECT, {"reason": "worker stopped"})
                    return
            self._step(handler)
            on_tick()

    def _step(self, handler: Handler) -> None:
        assert self._sock is not None
        now = time.monotonic()
        timeout_ms = max(1, int(min(self._next_heartbeat - now, 0.25) * 1000))
        events = dict(self._poller.poll(timeout_ms))
        if self._outbox in events:
            self._forward_outbox()
        if self._sock in events:
            self._receive(handler)
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._send(p.HEARTBEAT, {"status": self.status_provider()} if self.status_provider else {})
            self._next_heartbeat = now + self.bus.heartbeat_interval_s
        if now >= self._broker_expiry and not self._draining:
            log.warning("broker silent for %.1f s; re-registering", self._silence_limit())
            self._reset(handler, "the broker went silent")
            self._connect()

    def _forward_outbox(self) -> None:
        assert self._sock is not None
        for _ in range(10_000):
            try:
                frames = self._outbox.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            command = frames[1] if len(frames) == 3 else b""
            if command in (p.FINAL, p.ERROR):
                try:
                    self.active.discard(p.decode(frames).header["id"])
                except p.ProtocolError:
                    pass
            try:
                self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                log.warning("bus send queue full; dropped a reply")

    def _receive(self, handler: Handler) -> None:
        assert self._sock is not None
        for _ in range(1000):
            try:
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self._broker_expiry = time.monotonic() + self._silence_limit()
            try:
                msg = p.decode(frames, self.bus.max_message_bytes)
                if msg.command not in p.FROM_BROKER:
                    raise p.ProtocolError(f"{msg.name} is not sent by the broker")
            except p.ProtocolError as exc:
                self.drops.drop("the broker", str(exc))
                continue
            try:
                self._handle(handler, msg)
            except Exception:
                log.exception("error handling %s; dropped", msg.name)
                if msg.command == p.REQUEST and msg.id:
                    self.emitter.error(msg.id, 500, "internal error in the worker; see its log")

    def _handle(self, handler: Handler, msg: p.Message) -> None:
        if msg.command == p.REQUEST:
            req = Request(msg.header["id"], float(msg.header["deadline"]), msg.header["body"])
            if self._draining:
                self.emitter.error(req.id, 503, f"{self.service} worker is shutting down")
            elif req.id in self.active:
                self.emitter.error(req.id, 400, f"duplicate request id {req.id}")
            elif len(self.active) >= self.capacity:
                self.emitter.error(req.id, 429, f"{self.service} worker is at capacity ({self.capacity})")
            elif req.deadline <= time.time():
                self.emitter.error(req.id, 504, "request arrived after its deadline")
            else:
                self.active.add(req.id)
                try:
                    handler.submit(req)
                except RequestError as exc:
                    self.active.discard(req.id)
                    self.emitter.error(req.id, exc.code, exc.message)
        elif msg.command == p.CANCEL:
            if msg.header["id"] in self.active:
                log.info("request %s cancelled by the router (client gone or deadline)", msg.header["id"])
                handler.cancel(msg.header["id"])
                self.active.discard(msg.header["id"])
        elif msg.command == p.DISCONNECT:
            if not self._draining:
                log.info("broker says %r; re-registering", msg.header["reason"])
                self._reset(handler, "the broker forgot this worker")
                self._connect()
        elif msg.command == p.ERROR:
            log.warning("broker error for %s: %s", msg.header["id"], msg.header["message"])

    def _reset(self, handler: Handler, why: str) -> None:
        """A new broker cannot route old replies: cancel what was in flight."""
        if self.active:
            log.warning("cancelling %d request(s): %s", len(self.active), why)
        for request_id in list(self.active):
            handler.cancel(request_id)
        self.active.clear()

    def close(self) -> None:
        self.emitter.close()
        self._outbox.close(linger=0)
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
