"""A worker whose broker stops taking replies: a request's reply is never left with a
hole in it. Replies wait in order; one that cannot be kept fails its request with an
ERROR after the pieces already sent, and the engine is told to cancel it.

The broker here is this test: a ROUTER that registers the worker, sends one request,
then stops reading, while a small engine streams numbered pieces."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import zmq

from daemons.bus import protocol as p
from daemons.bus.worker import Emitter, Request, Worker
from daemons.config import BusConfig

# More than the socket's high-water mark (1000) and the worker's backlog (10,000) hold.
PIECES = 15_000
PIECE = "x" * 100


class Streamer:
    """Emits PIECES numbered pieces from its own thread, then a FINAL."""

    def __init__(self, emit: Emitter) -> None:
        self.emit = emit
        self.cancelled: set[str] = set()

    def submit(self, req: Request) -> None:
        def run() -> None:
            for i in range(PIECES):
                if req.id in self.cancelled:
                    return
                self.emit.partial(req.id, {"n": i, "pad": PIECE})
            self.emit.final(req.id, {"pieces": PIECES})
        threading.Thread(target=run, daemon=True).start()

    def cancel(self, request_id: str) -> None:
        self.cancelled.add(request_id)

    def alive(self) -> bool:
        return True

    def status_map(self) -> dict[str, Any]:
        return {}


def test_unsendable_replies_fail_the_request_without_a_gap(tmp_path: Any) -> None:
    endpoint = f"ipc://{tmp_path}/bus.sock"
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    broker = ctx.socket(zmq.ROUTER)
    broker.linger = 0
    broker.rcvhwm = 1
    broker.bind(endpoint)
    bus = BusConfig(heartbeat_interval_s=5.0)
    worker = Worker(ctx, endpoint, "stream", 4, bus)
    engine = Streamer(worker.emitter)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(engine, lambda: 2 if stop.is_set() else 0,
                                                      lambda: None, 1.0), daemon=True)
    thread.start()
    try:
        frames = broker.recv_multipart()
        identity = frames[0]
        assert p.decode(frames[1:]).command == p.READY
        broker.send_multipart([identity, *p.encode(p.REQUEST, {"id": "r1", "deadline": time.time() + 60,
                                                              "body": {}})])
        time.sleep(3.0)  # not reading: the socket's queues and then the worker's backlog fill
        seen: list[int] = []
        end: p.Message | None = None
        deadline = time.monotonic() + 20
        while end is None and time.monotonic() < deadline:
            if not broker.poll(1000):
                continue
            msg = p.decode(broker.recv_multipart()[1:])
            if msg.command == p.PARTIAL:
                seen.append(msg.header["data"]["n"])
            elif msg.command in (p.FINAL, p.ERROR):
                end = msg
        assert end is not None, f"no end after {len(seen)} pieces"
        assert seen == list(range(len(seen))), "a piece was dropped from the middle of the reply"
        assert end.command == p.ERROR and end.header["code"] == 503, end
        assert len(seen) < PIECES
        assert "r1" in engine.cancelled
    finally:
        stop.set()
        thread.join(5)
        worker.close()
        broker.close(linger=0)
        ctx.term()
    assert not thread.is_alive()
    assert os.path.exists(f"{tmp_path}/bus.sock")


def test_engine_threads_own_no_sockets(tmp_path: Any) -> None:
    """Engine threads emit through a queue, never a ZeroMQ socket of their own: the main
    thread closes the worker and ends the context while a thread is still emitting (a
    hung or slow engine at shutdown), without blocking in term() or touching a socket
    from two threads."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    worker = Worker(ctx, f"ipc://{tmp_path}/bus.sock", "stream", 4, BusConfig())
    emit = worker.emitter
    stop = threading.Event()
    sent = 0

    def busy() -> None:
        nonlocal sent
        while not stop.is_set():
            emit.partial("r1", {"n": sent})
            sent += 1

    threads = [threading.Thread(target=busy, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    worker.close()
    t0 = time.monotonic()
    ctx.term()
    assert time.monotonic() - t0 < 1.0
    time.sleep(0.1)
    assert all(t.is_alive() for t in threads), "an emitting thread died when the worker closed"
    stop.set()
    for t in threads:
        t.join(2)
    assert sent > 0
