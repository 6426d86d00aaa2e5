"""Calling a service through the broker from any daemon or command: ingest -> "ocr",
"embed/<model>"; `onebox status` -> "mmi.status".

Two flavours over one protocol (the client commands in protocol.py):
- `BusClient`, for threads: an I/O thread owns the socket; any thread may call.
- `AsyncBusClient`, for asyncio code: a reader task on the loop.

Each call has an id and a deadline. Iterating a call yields ("partial", data) pieces
and ends with ("final", data); errors raise the typed BusError subclasses the router
also uses (NoWorker 503, WorkerLost 503, DeadlineExceeded 504, RemoteError with the
worker's code). Leaving a call before its FINAL, or `cancel()`, sends CANCEL. A call
to a service with no live worker waits up to `wait_s` (default: bus.client_wait_s) for
one to register. While calls are open the client heartbeats, and a broker silent for
`liveness` intervals fails them with WorkerLost (it restarted or died).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import zmq
import zmq.asyncio

from daemons.bus import protocol as p
from daemons.bus.droplog import DropLog
from daemons.bus.handoff import Handoff
from daemons.bus.errors import BusError, DeadlineExceeded, WorkerLost, from_wire
from daemons.config import BusConfig

log = logging.getLogger(__name__)

Item = tuple[str, dict[str, Any]] | BusError


def _item(msg: p.Message) -> Item:
    if msg.command == p.ERROR:
        return from_wire(msg.header.get("kind"), msg.header["message"], msg.header["code"])
    return ("final" if msg.command == p.FINAL else "partial", msg.header["data"])


def _socket(ctx: zmq.Context[Any], endpoint: str, bus: BusConfig) -> Any:
    """A DEALER to the broker (a zmq.asyncio.Socket when `ctx` is an asyncio context)."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, bus.max_message_bytes)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
    sock.connect(endpoint)
    return sock


def _call_frames(call_id: str, service: str, body: dict[str, Any], deadline: float, wait_s: float) -> list[bytes]:
    return p.encode(p.CALL, {"id": call_id, "service": service, "deadline": deadline, "body": body,
                             "wait_s": wait_s}, client=True)


def _deadline(timeout: float | None, deadline: float | None) -> float:
    if deadline is not None:
        return deadline
    if timeout is None or timeout <= 0:
        raise ValueError("a call needs a positive timeout or a deadline")
    return time.time() + timeout


class _Call:
    """What both flavours of call keep, and how they read one reply."""

    def __init__(self, call_id: str, service: str, deadline: float) -> None:
        self.id = call_id
        self.service = service
        self.deadline = deadline
        self.done = False

    def _remaining(self) -> float:
        return self.deadline - time.time()

    def _late(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"call {self.id} to {self.service} passed its deadline")

    def _accept(self, item: Item) -> tuple[str, dict[str, Any]]:
        """A reply as ("partial" | "final", data); an error is raised. Either may end the call."""
        if isinstance(item, BusError):
            self.done = True
            raise item
        if item[0] == "final":
            self.done = True
        return item


# -- threads -------------------------------------------------------------------------------

class ClientCall(_Call):
    """One call from a `BusClient`; iterate it from one thread."""

    def __init__(self, client: BusClient, call_id: str, service: str, deadline: float) -> None:
        super().__init__(call_id, service, deadline)
        self._client = client
        self.queue: queue.SimpleQueue[Item] = queue.SimpleQueue()

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        try:
            while not self.done:
                remaining = self._remaining()
                try:
                    if remaining <= 0:
                        raise queue.Empty
                    item = self.queue.get(timeout=remaining)
                except queue.Empty:
                    raise self._late() from None
                yield self._accept(item)
        finally:
            self.cancel()

    def result(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Wait for the whole reply: the partial pieces and the final data."""
        parts: list[dict[str, Any]] = []
        for kind, data in self:
            if kind == "final":
                return parts, data
            parts.append(data)
        raise BusError(f"call {self.id} ended without a reply")  # iteration ends on FINAL or raises

    def cancel(self) -> None:
        """Stop the call if it has not finished (no effect after the FINAL)."""
        if not self.done:
            self.done = True
            self._client._cancel(self)
        self._client._forget(self.id)


class BusClient:
    def __init__(self, endpoint: str, bus: BusConfig, ctx: zmq.Context[Any] | None = None) -> None:
        self.endpoint = endpoint
        self.bus = bus
        self._ctx = ctx or zmq.Context.instance()
        self._calls: dict[str, ClientCall] = {}
        self._lock = threading.Lock()
        self._outbox: Handoff[list[bytes]] = Handoff()
        self._stop = threading.Event()
        self._drops = DropLog(log, "bus message")
        self._thread = threading.Thread(target=self._io, name="bus-client", daemon=True)
        self._thread.start()

    def call(self, service: str, body: dict[str, Any], *, timeout: float | None = None,
             deadline: float | None = None, wait_s: float | None = None) -> ClientCall:
        """Start a call; iterate the result for its replies."""
        call = ClientCall(self, uuid.uuid4().hex, service, _deadline(timeout, deadline))
        with self._lock:
            self._calls[call.id] = call
        wait = self.bus.client_wait_s if wait_s is None else wait_s
        self._send(_call_frames(call.id, service, body, call.deadline, wait))
        return call

    def request(self, service: str, body: dict[str, Any], *, timeout: float, wait_s: float | None = None
                ) -> dict[str, Any]:
        """A call whose reply is one FINAL (partials, if any, are dropped)."""
        return self.call(service, body, timeout=timeout, wait_s=wait_s).result()[1]

    def close(self) -> None:
        with self._lock:
            calls = list(self._calls.values())
        for call in calls:
            call.cancel()
        self._stop.set()
        self._outbox.wake()
        self._thread.join(5)
        self._outbox.close()

    def __enter__(self) -> BusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------

    def _cancel(self, call: ClientCall) -> None:
        if not self._stop.is_set():
            self._send(p.encode(p.CANCEL, {"id": call.id}, client=True))

    def _forget(self, call_id: str) -> None:
        with self._lock:
            self._calls.pop(call_id, None)

    def _send(self, frames: list[bytes]) -> None:
        self._outbox.put(frames)

    def _fail_all(self, error: BusError) -> None:
        with self._lock:
            calls = list(self._calls.values())
        for call in calls:
            call.queue.put(error)

    def _io(self) -> None:
        sock = _socket(self._ctx, self.endpoint, self.bus)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._outbox.fd, zmq.POLLIN)
        interval = self.bus.heartbeat_interval_s
        silence = p.client_silence_s(interval, self.bus.heartbeat_liveness)
        heard = time.monotonic()
        next_beat = heard + interval
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(int(interval * 1000 / 2)))
                if self._outbox.fd in events:
                    for frames in self._outbox.take():
                        sock.send_multipart(frames)
                if sock in events:
                    heard = self._receive(sock)
                now = time.monotonic()
                with self._lock:
                    busy = bool(self._calls)
                if not busy:
                    heard = now
                elif now - heard > silence:
                    log.warning("the broker has been silent for %.1f s; failing %d open call(s)", silence,
                                len(self._calls))
                    self._fail_all(WorkerLost("the broker stopped answering (the router restarted or died?)"))
                    heard = now
                if busy and now >= next_beat:
                    sock.send_multipart(p.encode(p.HEARTBEAT, {}, client=True))
                    next_beat = now + interval
        finally:
            sock.close(linger=0)

    def _receive(self, sock: zmq.Socket[Any]) -> float:
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = p.decode(frames, self.bus.max_message_bytes)
                if not msg.client or msg.command not in p.TO_CLIENT:
                    raise p.ProtocolError(f"{msg.name} is not sent to clients")
            except p.ProtocolError as exc:
                self._drops.drop("the broker", str(exc))
                continue
            if msg.command == p.HEARTBEAT:
                continue
            with self._lock:
                call = self._calls.get(msg.header["id"])
            if call is not None:
                call.queue.put(_item(msg))
        return time.monotonic()


# -- asyncio -------------------------------------------------------------------------------

class AsyncClientCall(_Call):
    """One call from an `AsyncBusClient`; `async for` it."""

    def __init__(self, client: AsyncBusClient, call_id: str, service: str, deadline: float) -> None:
        super().__init__(call_id, service, deadline)
        self._client = client
        self.queue: asyncio.Queue[Item] = asyncio.Queue()

    async def __aiter__(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        try:
            while not self.done:
                remaining = self._remaining()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    raise self._late() from None
                yield self._accept(item)
        finally:
            await self.cancel()

    async def result(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        parts: list[dict[str, Any]] = []
        async for kind, data in self:
            if kind == "final":
                return parts, data
            parts.append(data)
        raise BusError(f"call {self.id} ended without a reply")  # iteration ends on FINAL or raises

    async def cancel(self) -> None:
        if not self.done:
            self.done = True
            await self._client._send(p.encode(p.CANCEL, {"id": self.id}, client=True))
        self._client._calls.pop(self.id, None)


class AsyncBusClient:
    def __init__(self, endpoint: str, bus: BusConfig, ctx: zmq.asyncio.Context | None = None) -> None:
        self.endpoint = endpoint
        self.bus = bus
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._calls: dict[str, AsyncClientCall] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._heard = time.monotonic()
        self._drops = DropLog(log, "bus message")

    async def __aenter__(self) -> AsyncBusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _start(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            sock: zmq.asyncio.Socket = _socket(self._ctx, self.endpoint, self.bus)
            self._sock = sock
            self._tasks = [asyncio.create_task(self._reader(), name="bus-client-reader"),
                           asyncio.create_task(self._heartbeat(), name="bus-client-heartbeat")]
            return sock
        return self._sock

    async def call(self, service: str, body: dict[str, Any], *, timeout: float | None = None,
                   deadline: float | None = None, wait_s: float | None = None) -> AsyncClientCall:
        call = AsyncClientCall(self, uuid.uuid4().hex, service, _deadline(timeout, deadline))
        if not self._calls:
            self._heard = time.monotonic()
        self._calls[call.id] = call
        wait = self.bus.client_wait_s if wait_s is None else wait_s
        await self._send(_call_frames(call.id, service, body, call.deadline, wait))
        return call

    async def request(self, service: str, body: dict[str, Any], *, timeout: float,
                      wait_s: float | None = None) -> dict[str, Any]:
        call = await self.call(service, body, timeout=timeout, wait_s=wait_s)
        return (await call.result())[1]

    async def close(self) -> None:
        for call in list(self._calls.values()):
            await call.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    async def _send(self, frames: list[bytes]) -> None:
        await self._start().send_multipart(frames)

    async def _reader(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            self._heard = time.monotonic()
            try:
                msg = p.decode(frames, self.bus.max_message_bytes)
                if not msg.client or msg.command not in p.TO_CLIENT:
                    raise p.ProtocolError(f"{msg.name} is not sent to clients")
            except p.ProtocolError as exc:
                self._drops.drop("the broker", str(exc))
                continue
            if msg.command == p.HEARTBEAT:
                continue
            call = self._calls.get(msg.header["id"])
            if call is not None:
                call.queue.put_nowait(_item(msg))

    async def _heartbeat(self) -> None:
        interval = self.bus.heartbeat_interval_s
        silence = p.client_silence_s(interval, self.bus.heartbeat_liveness)
        while True:
            await asyncio.sleep(interval)
            if not self._calls:
                self._heard = time.monotonic()
                continue
            if time.monotonic() - self._heard > silence:
                log.warning("the broker has been silent for %.1f s; failing %d open call(s)", silence,
                            len(self._calls))
                for call in list(self._calls.values()):
                    call.queue.put_nowait(WorkerLost("the broker stopped answering (the router restarted or died?)"))
                self._heard = time.monotonic()
            await self._send(p.encode(p.HEARTBEAT, {}, client=True))
