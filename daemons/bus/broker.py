"""The broker: a ROUTER socket in the router's asyncio loop that workers register with.

It tracks live workers per service (heartbeats both ways; a worker silent for
`liveness` intervals is dead and its in-flight calls fail with WorkerLost), sends each
request to the least-loaded live worker with room, and routes PARTIAL/FINAL/ERROR
replies back to the waiting `Call`. The router's own handlers call `Broker.call()`;
other daemons and `onebox` commands call through the same socket with the client
protocol (daemons/bus/client.py), each of their calls served by a task here. Services
named "mmi.*" are the broker's own. Malformed messages are logged and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from daemons.bus import protocol as p
from daemons.bus.droplog import DropLog
from daemons.bus.errors import BusError, DeadlineExceeded, NoWorker, RemoteError, WorkerLost, kind_of
from daemons.config import BusConfig

log = logging.getLogger(__name__)

# Calls one client may have open at once; more are refused with 429.
MAX_CLIENT_CALLS = 1024
MMI_STATUS = "mmi.status"


@dataclass
class WorkerInfo:
    identity: bytes
    service: str
    capacity: int
    pid: int
    heartbeat_s: float
    expiry: float
    meta: dict[str, Any] = field(default_factory=dict)
    inflight: set[str] = field(default_factory=set)
    # The latest engine state the worker sent with a heartbeat (may be empty).
    status: dict[str, Any] = field(default_factory=dict)
    # Said DISCONNECT with requests still in flight: gets no new ones, finishes those.
    draining: bool = False

    def describe(self) -> str:
        return f"{self.service} worker pid {self.pid}"


@dataclass
class ClientInfo:
    """A daemon or command calling services through the client protocol."""

    identity: bytes
    expiry: float
    calls: dict[str, asyncio.Task[None]] = field(default_factory=dict)


class Call:
    """One request in flight. Iterate it for ("partial" | "final", data) pairs."""

    def __init__(self, broker: Broker, service: str, deadline: float, call_id: str | None = None) -> None:
        self.id = call_id or uuid.uuid4().hex
        self.service = service
        self.deadline = deadline  # unix time, as sent on the wire
        self.worker: WorkerInfo | None = None
        self.done = False
        self._broker = broker
        self._queue: asyncio.Queue[p.Message | BusError] = asyncio.Queue()

    def deliver(self, item: p.Message | BusError) -> None:
        self._queue.put_nowait(item)

    async def __aiter__(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        try:
            while True:
                remaining = self.deadline - time.time()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    raise DeadlineExceeded(f"request {self.id} to {self.service} passed its deadline") from None
                if isinstance(item, BusError):
                    self.done = True
                    raise item
                if item.command == p.ERROR:
                    self.done = True
                    raise RemoteError(item.header["message"], item.header["code"])
                if item.command == p.FINAL:
                    self.done = True
                    yield "final", item.header["data"]
                    return
                else:
                    yield "partial", item.header["data"]
        finally:
            await self.close()

    async def close(self) -> None:
        """Forget the call; if it did not finish, tell the worker to CANCEL it."""
        await self._broker.release(self, cancel=not self.done)
        self.done = True


class Broker:
    def __init__(self, endpoint: str, bus: BusConfig, ctx: zmq.asyncio.Context) -> None:
        self.endpoint = endpoint
        self.bus = bus
        self._ctx = ctx
        self._sock: zmq.asyncio.Socket | None = None
        self.workers: dict[bytes, WorkerInfo] = {}
        self._calls: dict[str, Call] = {}
        self._room = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self.clients: dict[bytes, ClientInfo] = {}
        self.drops = DropLog(log, "bus message")

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, self.bus.max_message_bytes)
        # Unroutable replies (a worker that just vanished) are dropped, not an error.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.bind(self.endpoint)
        if self.endpoint.startswith("ipc://"):
            os.chmod(self.endpoint[len("ipc://"):], 0o600)
        self._sock = sock
        self._tasks = [
            asyncio.create_task(self._recv_loop(), name="broker-recv"),
            asyncio.create_task(self._heartbeat_loop(), name="broker-heartbeat"),
        ]
        log.info("broker listening on %s", self.endpoint)

    async def stop(self) -> None:
        for identity in list(self.workers):
            await self._send(identity, p.DISCONNECT, {"reason": "broker stopping"})
        tasks = list(self._tasks)
        for client in list(self.clients.values()):
            for call_id, task in list(client.calls.items()):
                tasks.append(task)
                await self._send_client(client.identity, p.ERROR, {
                    "id": call_id, "code": 503, "message": "the router is shutting down"})
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for call in list(self._calls.values()):
            call.deliver(WorkerLost("the router is shutting down"))
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    # -- queries ---------------------------------------------------------------------

    def live(self, service: str) -> list[WorkerInfo]:
        now = time.monotonic()
        return [w for w in self.workers.values()
                if w.service == service and w.expiry > now and not w.draining]

    def snapshot(self) -> dict[str, Any]:
        """Every service with live workers and what each last said of itself."""
        services: dict[str, Any] = {}
        now = time.monotonic()
        for w in self.workers.values():
            if w.expiry <= now:
                continue
            entry = {"pid": w.pid, "capacity": w.capacity, "in_flight": len(w.inflight),
                     "draining": w.draining, **w.meta, **w.status}
            services.setdefault(w.service, {"workers": []})["workers"].append(entry)
        return {"services": services, "clients": len(self.clients)}

    # -- requests --------------------------------------------------------------------

    async def call(self, service: str, body: dict[str, Any], deadline: float, wait_for_worker: float = 0.0,
                   call_id: str | None = None) -> Call:
        """Send a request to a live worker; wait (until the deadline) for one with room.
        With no live worker at all, wait up to `wait_for_worker` seconds for one to
        register, then fail with NoWorker. `call_id` (unique) is the id the worker logs;
        the router passes its request id."""
        if call_id is not None and call_id in self._calls:
            raise ValueError(f"call id {call_id} is already in flight")
        call = Call(self, service, deadline, call_id)
        give_up = min(deadline, time.time() + wait_for_worker)
        async with self._room:
            while True:
                workers = self.live(service)
                if not workers:
                    remaining = give_up - time.time()
                    if remaining <= 0:
                        waited = f" after waiting {wait_for_worker:g} s for one" if wait_for_worker else ""
                        raise NoWorker(f"no live worker for {service}{waited}")
                    try:
                        await asyncio.wait_for(self._room.wait(), min(remaining, self.bus.heartbeat_interval_s))
                    except TimeoutError:
                        pass
                    continue
                free = [w for w in workers if len(w.inflight) < w.capacity]
                if free:
                    worker = min(free, key=lambda w: len(w.inflight) / w.capacity)
                    break
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise DeadlineExceeded(f"every {service} worker stayed at capacity until the deadline")
                try:
                    await asyncio.wait_for(self._room.wait(), min(remaining, self.bus.heartbeat_interval_s))
                except TimeoutError:
                    pass
            worker.inflight.add(call.id)
        call.worker = worker
        self._calls[call.id] = call
        try:
            await self._send(worker.identity, p.REQUEST, {"id": call.id, "deadline": deadline, "body": body})
        except p.ProtocolError as exc:  # a body the bus cannot carry is the caller's error
            await call.close()
            raise BusError(f"the request cannot be sent to {service}: {exc}", 400) from None
        except BaseException:
            await call.close()  # the HTTP request was cancelled mid-send: give the slot back
            raise
        return call

    async def release(self, call: Call, cancel: bool) -> None:
        if self._calls.pop(call.id, None) is None:
            return
        worker = call.worker
        if worker is not None and call.id in worker.inflight:
            worker.inflight.discard(call.id)
            if cancel and worker.identity in self.workers:
                log.info("cancelling request %s on %s", call.id, worker.describe())
                await self._send(worker.identity, p.CANCEL, {"id": call.id})
            await self._notify_room()

    # -- internals -------------------------------------------------------------------

    async def _notify_room(self) -> None:
        async with self._room:
            self._room.notify_all()

    async def _send(self, identity: bytes, command: bytes, header: dict[str, Any]) -> None:
        if self._sock is None:
            return
        try:
            await self._sock.send_multipart([identity, *p.encode(command, header)])
        except zmq.ZMQError as exc:
            log.warning("could not send %s to a worker: %s", p.NAMES[command], exc)

    async def _send_client(self, identity: bytes, command: bytes, header: dict[str, Any]) -> None:
        if self._sock is None:
            return
        try:
            await self._sock.send_multipart([identity, *p.encode(command, header, client=True)])
        except zmq.ZMQError as exc:
            log.warning("could not send %s to a client: %s", p.NAMES[command], exc)

    async def _recv_loop(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart(copy=True)
            if len(frames) < 2:
                self.drops.drop("unknown peer", "no routing identity")
                continue
            identity, rest = frames[0], frames[1:]
            try:
                msg = p.decode(rest, self.bus.max_message_bytes)
                if msg.client:
                    if msg.command not in p.FROM_CLIENT:
                        raise p.ProtocolError(f"{msg.name} is not sent by clients")
                    await self._handle_client(identity, msg)
                    continue
                if msg.command not in p.FROM_WORKER:
                    raise p.ProtocolError(f"{msg.name} is not sent by workers")
                await self._handle(identity, msg)
            except p.ProtocolError as exc:
                self.drops.drop(f"peer {identity.hex()[:16]}", str(exc))
            except Exception:
                # A bug in handling one message must not take the broker down.
                log.exception("error handling a bus message; dropped")

    async def _handle(self, identity: bytes, msg: p.Message) -> None:
        now = time.monotonic()
        worker = self.workers.get(identity)
        if msg.command == p.READY:
            h = msg.header
            if h["version"] != p.VERSION:
                await self._send(identity, p.DISCONNECT, {"reason": f"protocol version {h['version']} unsupported"})
                return
            if worker is not None:
                self._lose(worker, "re-registered")
            hb = h["heartbeat_ms"] / 1000
            self.workers[identity] = WorkerInfo(
                identity=identity, service=h["service"], capacity=h["capacity"], pid=h["pid"],
                heartbeat_s=hb, expiry=now + hb * self.bus.heartbeat_liveness,
                meta={k: v for k, v in h.items() if k not in p.SCHEMA[p.READY]},
            )
            log.info("worker registered: %s, capacity %d", self.workers[identity].describe(), h["capacity"])
            await self._send(identity, p.HEARTBEAT, {})  # the acknowledgement its READY=1 waits for
            self._reap_exited()
            await self._notify_room()
            return
        if worker is None:
            # Most likely the broker restarted and this worker does not know yet.
            if msg.command != p.DISCONNECT:
                await self._send(identity, p.DISCONNECT, {"reason": "unknown worker; send READY"})
            return
        worker.expiry = now + worker.heartbeat_s * self.bus.heartbeat_liveness
        if msg.command == p.HEARTBEAT:
            if isinstance(msg.header.get("status"), dict):
                worker.status = msg.header["status"]
            return
        if msg.command == p.DISCONNECT:
            if worker.inflight:
                log.info("%s draining %d request(s): %s", worker.describe(), len(worker.inflight),
                         msg.header["reason"])
                worker.draining = True
            else:
                log.info("%s disconnected: %s", worker.describe(), msg.header["reason"])
                self._lose(worker, f"disconnected ({msg.header['reason']})")
            return
        call_id = msg.header["id"]
        call = self._calls.get(call_id)
        if call is None or call.worker is not worker:
            return  # a late reply to a call already cancelled or timed out
        call.deliver(msg)
        if msg.command in (p.FINAL, p.ERROR):
            worker.inflight.discard(call_id)
            self._calls.pop(call_id, None)
            if worker.draining and not worker.inflight:
                log.info("%s finished draining", worker.describe())
                self._lose(worker, "finished draining")
            await self._notify_room()

    # -- clients -------------------------------------------------------------------------

    async def _handle_client(self, identity: bytes, msg: p.Message) -> None:
        now = time.monotonic()
        client = self.clients.get(identity)
        if client is None:
            client = self.clients[identity] = ClientInfo(identity, now)
        client.expiry = now + p.client_silence_s(self.bus.heartbeat_interval_s, self.bus.heartbeat_liveness)
        if msg.command == p.HEARTBEAT:
            return
        call_id = msg.header["id"]
        if msg.command == p.CANCEL:
            task = client.calls.pop(call_id, None)
            if task is not None:
                task.cancel()
            return
        h = msg.header
        if call_id in client.calls:
            await self._send_client(identity, p.ERROR, {"id": call_id, "code": 400,
                                                        "message": f"call id {call_id} is already in flight"})
        elif len(client.calls) >= MAX_CLIENT_CALLS:
            await self._send_client(identity, p.ERROR, {"id": call_id, "code": 429,
                                                        "message": f"more than {MAX_CLIENT_CALLS} calls open"})
        elif h["service"].startswith("mmi."):
            await self._mmi(identity, call_id, h["service"])
        else:
            wait = float(h.get("wait_s") or 0.0)
            client.calls[call_id] = asyncio.create_task(
                self._client_call(client, call_id, h["service"], h["body"], float(h["deadline"]), wait),
                name=f"client-call-{call_id[:16]}")

    async def _mmi(self, identity: bytes, call_id: str, service: str) -> None:
        if service == MMI_STATUS:
            await self._send_client(identity, p.FINAL, {"id": call_id, "data": self.snapshot()})
        else:
            await self._send_client(identity, p.ERROR, {"id": call_id, "code": 404,
                                                        "message": f"no broker service {service}"})

    async def _client_call(self, client: ClientInfo, call_id: str, service: str, body: dict[str, Any],
                           deadline: float, wait: float) -> None:
        """One client call, relayed: the broker is the client's proxy to the worker."""
        try:
            call = await self.call(service, body, deadline, wait_for_worker=wait)
            async for kind, data in call:
                await self._send_client(client.identity, p.PARTIAL if kind == "partial" else p.FINAL,
                                        {"id": call_id, "data": data})
        except BusError as exc:
            await self._send_client(client.identity, p.ERROR, {"id": call_id, "code": exc.code,
                                                               "message": exc.message, "kind": kind_of(exc)})
        except asyncio.CancelledError:
            pass  # the client cancelled or went silent; leaving `async for` sent CANCEL on
        finally:
            if client.calls.get(call_id) is asyncio.current_task():
                del client.calls[call_id]

    def _expire_clients(self, now: float) -> list[ClientInfo]:
        """Clients gone silent: their calls are cancelled. The rest, with calls open, are returned."""
        alive: list[ClientInfo] = []
        for client in list(self.clients.values()):
            if client.expiry > now:
                if client.calls:
                    alive.append(client)
                continue
            if client.calls:
                log.warning("a bus client went silent with %d call(s) open (exited or hung?); cancelling them",
                            len(client.calls))
                for task in client.calls.values():
                    task.cancel()
            del self.clients[client.identity]
        return alive

    def _reap_exited(self) -> None:
        """Workers whose process is gone. Over ipc:// every worker is on this box and says
        its pid, so a kill -9 is known at once rather than after `liveness` heartbeats
        (a pid that was reused looks alive: the heartbeats still catch that one)."""
        if not self.endpoint.startswith("ipc://"):
            return
        for worker in list(self.workers.values()):
            try:
                os.kill(worker.pid, 0)
            except ProcessLookupError:
                log.error("%s exited (its process is gone: killed, crashed or out of memory?); failing %d "
                          "request(s)", worker.describe(), len(worker.inflight))
                self._lose(worker, "exited")
            except PermissionError:
                pass  # alive, someone else's to signal

    def _lose(self, worker: WorkerInfo, why: str) -> None:
        self.workers.pop(worker.identity, None)
        for call_id in list(worker.inflight):
            call = self._calls.pop(call_id, None)
            if call is not None:
                call.deliver(WorkerLost(f"{worker.describe()} {why} while handling request {call_id}"))
        worker.inflight.clear()

    async def _heartbeat_loop(self) -> None:
        interval = self.bus.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for client in self._expire_clients(now):
                await self._send_client(client.identity, p.HEARTBEAT, {})
            self._reap_exited()
            for worker in list(self.workers.values()):
                if worker.expiry <= now:
                    log.error(
                        "%s missed %d heartbeats; dropping it and failing %d request(s) (crashed, hung, or killed?)",
                        worker.describe(), self.bus.heartbeat_liveness, len(worker.inflight),
                    )
                    self._lose(worker, "stopped answering heartbeats")
                else:
                    await self._send(worker.identity, p.HEARTBEAT, {})
