"""The worker side of the bus: one DEALER to the broker, driven from the main thread.

The daemon's engine (a `Handler`) runs its own threads and answers through an `Emitter`,
which is thread-safe and owns no ZeroMQ socket: it queues encoded replies and wakes the
main thread through a pipe, and the main thread alone sends them. So every socket is
created, used and closed by one thread.

Replies the broker cannot take at once wait in a bounded backlog, in order. A reply
that does not fit fails its request cleanly (the engine cancels it, the broker gets an
ERROR after the pieces it already has) instead of leaving a hole in a stream.

The worker heartbeats only while its engine is alive: an engine that stops making
progress makes the worker say DISCONNECT and go silent, so the broker stops routing to
it at once; once the engine moves again the worker registers afresh. It also
re-registers when the broker goes silent for `liveness` heartbeats or says DISCONNECT
(a restarted broker does not know it); libzmq's own reconnect interval, doubling up to
RECONNECT_IVL_MAX, is the backoff for the transport underneath.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import zmq

from daemons import __version__
from daemons.bus import protocol as p
from daemons.bus.droplog import DropLog
from daemons.bus.handoff import Handoff
from daemons.bus.errors import RequestError
from daemons.config import BusConfig

STARTED_AT = time.time()  # this process, about when it started (the module loads at start)
log = logging.getLogger(__name__)

RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 5000
# Replies waiting for the broker to take them; beyond this a request fails (about 1 MB of
# token pieces; a broker this far behind is stuck or gone).
BACKLOG_LIMIT = 10_000
# Request ids failed for an unsendable reply, remembered so their later replies are dropped.
FAILED_MEMORY = 1024


@dataclass(frozen=True)
class Request:
    id: str
    deadline: float  # unix time
    body: dict[str, Any]


class Emitter:
    """Thread-safe way for an engine to send PARTIAL/FINAL/ERROR for its requests: each
    reply is encoded in the caller's thread and handed to the worker's main thread."""

    def __init__(self) -> None:
        self._out: Handoff[tuple[bytes, str, list[bytes]]] = Handoff()

    @property
    def fd(self) -> int:
        """Readable when replies are waiting (for the main thread's poller)."""
        return self._out.fd

    def _put(self, command: bytes, request_id: str, header: dict[str, Any]) -> None:
        self._out.put((command, request_id, p.encode(command, header)))

    def partial(self, request_id: str, data: dict[str, Any]) -> None:
        self._put(p.PARTIAL, request_id, {"id": request_id, "data": data})

    def final(self, request_id: str, data: dict[str, Any]) -> None:
        self._put(p.FINAL, request_id, {"id": request_id, "data": data})

    def error(self, request_id: str, code: int, message: str) -> None:
        self._put(p.ERROR, request_id, {"id": request_id, "code": code, "message": message})

    def take(self) -> list[tuple[bytes, str, list[bytes]]]:
        """Everything queued so far (main thread)."""
        return self._out.take()

    def close(self) -> None:
        self._out.close()


class Handler(Protocol):
    """The seam an engine plugs into; the bus knows nothing else about it."""

    def submit(self, request: Request) -> None:
        """Take a request without blocking; raise RequestError to refuse it."""

    def cancel(self, request_id: str) -> None:
        """Stop work on a request and free what it holds; no reply is needed."""

    def alive(self) -> bool:
        """False when the engine's own loop has stopped making progress."""

    def status_map(self) -> dict[str, Any]:
        """The engine's state, sent with each heartbeat (GET /v1/status)."""


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
        self.emitter = Emitter()
        self._sock: zmq.Socket[bytes] | None = None
        self._poller = zmq.Poller()
        self._backlog: deque[list[bytes]] = deque()
        self._failed: OrderedDict[str, None] = OrderedDict()
        self._broker_expiry = 0.0
        self._next_heartbeat = 0.0
        self._draining = False
        # False while the engine is stalled: DISCONNECT said, no heartbeats.
        self.registered = False
        self._last_check = time.monotonic()
        self._on_registered: Callable[[], None] | None = None
        self._registered_by = 0.0
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
        # Replies queued for the old connection cannot reach its broker's calls.
        self._backlog.clear()
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self.emitter.fd, zmq.POLLIN)
        self._send_control(p.READY, {
            "version": p.VERSION, "service": self.service, "capacity": self.capacity,
            "heartbeat_ms": int(self.bus.heartbeat_interval_s * 1000), "pid": os.getpid(),
            # For `onebox status` (meta keys reach /v1/status): what runs and since when.
            "onebox_version": __version__, "started_at": STARTED_AT, **self.meta,
        })
        now = time.monotonic()
        self._broker_expiry = now + self._silence_limit()
        self._next_heartbeat = now + self.bus.heartbeat_interval_s
        self.registered = True

    def _silence_limit(self) -> float:
        return self.bus.heartbeat_interval_s * self.bus.heartbeat_liveness

    # -- sending -----------------------------------------------------------------------

    def _send_control(self, command: bytes, header: dict[str, Any]) -> None:
        self._backlog.append(p.encode(command, header))
        self._flush()

    def _flush(self) -> None:
        """Send what the backlog holds, in order, until the socket would block."""
        if self._sock is None:
            return
        while self._backlog:
            try:
                self._sock.send_multipart(self._backlog[0], flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            self._backlog.popleft()
        self._poller.modify(self._sock, zmq.POLLIN | (zmq.POLLOUT if self._backlog else 0))

    def _forward(self, handler: Handler) -> None:
        for command, request_id, frames in self.emitter.take():
            if request_id in self._failed:
                continue  # failed already for a reply that could not be sent
            if command in (p.FINAL, p.ERROR):
                self.active.discard(request_id)
            if command != p.ERROR and len(self._backlog) >= BACKLOG_LIMIT:
                self._fail_unsendable(handler, request_id)
                continue
            self._backlog.append(frames)
        self._flush()

    def _fail_unsendable(self, handler: Handler, request_id: str) -> None:
        log.warning("request %s: the broker has not taken %d replies (stuck or gone?); failing the request "
                    "rather than dropping part of its reply", request_id, len(self._backlog))
        handler.cancel(request_id)
        self.active.discard(request_id)
        self._failed[request_id] = None
        while len(self._failed) > FAILED_MEMORY:
            self._failed.popitem(last=False)
        # After the pieces already queued, so the caller sees a clean end, not a gap.
        self._backlog.append(p.encode(p.ERROR, {
            "id": request_id, "code": 503, "message": f"{self.service} worker could not deliver its reply"}))

    def _error(self, request_id: str, code: int, message: str) -> None:
        self._backlog.append(p.encode(p.ERROR, {"id": request_id, "code": code, "message": message}))

    # -- main loop -------------------------------------------------------------------

    def run(self, handler: Handler, should_stop: Callable[[], int], on_tick: Callable[[], None],
            drain_timeout: float, on_registered: Callable[[], None] | None = None) -> None:
        """Serve until `should_stop()` turns non-zero; a value of 2 or more skips the drain.
        `on_registered` is called once: when the broker first answers (it acknowledges
        READY at once), or after one heartbeat interval without a broker (the router is
        down or not started yet; the worker registers whenever it comes)."""
        self._on_registered = on_registered
        self._registered_by = time.monotonic() + self.bus.heartbeat_interval_s
        self._connect()
        log.info("registering %s with the broker at %s", self.service, self.endpoint)
        stop_at: float | None = None
        while True:
            stop = should_stop()
            if stop and not self._draining:
                self._draining = True
                stop_at = time.monotonic() + drain_timeout
                self._send_control(p.DISCONNECT, {"reason": "worker shutting down"})
                log.info("draining %d request(s), up to %.0f s", len(self.active), drain_timeout)
            if self._draining:
                assert stop_at is not None
                if not self.active or stop >= 2 or time.monotonic() >= stop_at:
                    self._finish(handler)
                    return
            self._step(handler)
            if self._on_registered is not None and time.monotonic() >= self._registered_by:
                self._announce()
            on_tick()

    def _finish(self, handler: Handler) -> None:
        if self.active:
            log.warning("shutdown deadline: cancelling %d request(s)", len(self.active))
        for request_id in list(self.active):
            handler.cancel(request_id)
            self._error(request_id, 503, f"{self.service} worker shut down before finishing")
        self.active.clear()
        self._forward(handler)
        self._send_control(p.DISCONNECT, {"reason": "worker stopped"})
        # A moment for the last replies to leave; the socket is closed with linger 0.
        deadline = time.monotonic() + 0.5
        while self._backlog and time.monotonic() < deadline:
            time.sleep(0.01)
            self._flush()

    def _step(self, handler: Handler) -> None:
        assert self._sock is not None
        now = time.monotonic()
        timeout_ms = max(1, int(min(self._next_heartbeat - now, 0.25) * 1000))
        events = dict(self._poller.poll(timeout_ms))
        if self.emitter.fd in events:
            self._forward(handler)
        if events.get(self._sock, 0) & zmq.POLLOUT:
            self._flush()
        if events.get(self._sock, 0) & zmq.POLLIN:
            self._receive(handler)
        self._check_engine(handler)
        now = time.monotonic()
        if now >= self._next_heartbeat:
            if self.registered and not self._backlog:
                self._send_control(p.HEARTBEAT, {"status": handler.status_map()})
            self._next_heartbeat = now + self.bus.heartbeat_interval_s
        if now >= self._broker_expiry and self.registered and not self._draining:
            log.warning("broker silent for %.1f s; re-registering", self._silence_limit())
            self._reset(handler, "the broker went silent")
            self._connect()

    def _announce(self) -> None:
        if self._on_registered is not None:
            callback, self._on_registered = self._on_registered, None
            callback()

    def _check_engine(self, handler: Handler) -> None:
        """Liveness is progress: a stalled engine leaves the bus until it moves again."""
        now = time.monotonic()
        starved, self._last_check = now - self._last_check > 1.0, now
        if starved:
            return  # this thread was off the CPU too: the whole process waited, nothing hung
        alive = handler.alive()
        if self.registered and not alive and not self._draining:
            log.error("%s engine is not making progress (hung?); leaving the bus so no new requests come "
                      "here, %d in flight", self.service, len(self.active))
            self._send_control(p.DISCONNECT, {"reason": "engine stalled"})
            self.registered = False
        elif not self.registered and alive and not self._draining:
            log.warning("%s engine is making progress again; registering afresh", self.service)
            self._reset(handler, "the broker failed them when this worker left the bus")
            self._connect()

    def _receive(self, handler: Handler) -> None:
        assert self._sock is not None
        for _ in range(1000):
            try:
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self._broker_expiry = time.monotonic() + self._silence_limit()
            self._announce()
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
                    self.active.discard(msg.id)
                    self._error(msg.id, 500, "internal error in the worker; see its log")
            self._flush()

    def _handle(self, handler: Handler, msg: p.Message) -> None:
        if msg.command == p.REQUEST:
            req = Request(msg.header["id"], float(msg.header["deadline"]), msg.header["body"])
            if self._draining:
                self._error(req.id, 503, f"{self.service} worker is shutting down")
            elif not self.registered:
                self._error(req.id, 503, f"{self.service} worker is stalled")
            elif req.id in self.active:
                self._error(req.id, 400, f"duplicate request id {req.id}")
            elif len(self.active) >= self.capacity:
                self._error(req.id, 429, f"{self.service} worker is at capacity ({self.capacity})")
            elif req.deadline <= time.time():
                self._error(req.id, 504, "request arrived after its deadline")
            else:
                self.active.add(req.id)
                try:
                    handler.submit(req)
                except RequestError as exc:
                    self.active.discard(req.id)
                    self._error(req.id, exc.code, exc.message)
        elif msg.command == p.CANCEL:
            if msg.header["id"] in self.active:
                log.info("request %s cancelled by the router (client gone or deadline)", msg.header["id"])
                handler.cancel(msg.header["id"])
                self.active.discard(msg.header["id"])
        elif msg.command == p.DISCONNECT:
            if not self._draining and self.registered:
                log.info("broker says %r; re-registering", msg.header["reason"])
                self._reset(handler, "the broker forgot this worker")
                self._connect()
        elif msg.command == p.ERROR:
            log.warning("broker error for %s: %s", msg.header["id"], msg.header["message"])

    def _reset(self, handler: Handler, why: str) -> None:
        """A new registration cannot route old replies: cancel what was in flight."""
        if self.active:
            log.warning("cancelling %d request(s): %s", len(self.active), why)
        for request_id in list(self.active):
            handler.cancel(request_id)
        self.active.clear()

    def close(self) -> None:
        """Main thread only, after the engine's threads have stopped using the emitter."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self.emitter.close()
