"""Malformed bus traffic never crashes the broker or a worker (bounded fuzz loops)."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from daemons.bus import protocol as p
from tests.harness import Suite, write_config

N_MESSAGES = 3000
TIME_LIMIT_S = 20.0


def junk_messages(rng: random.Random, n: int) -> list[list[bytes]]:
    """A mix of every kind of wrong: random bytes, wrong frame counts, bad msgpack,
    unknown commands, wrong field types, out-of-range values, oversized frames."""
    valid_cmds = list(p.NAMES)
    out: list[list[bytes]] = []
    for i in range(n):
        kind = i % 10
        if kind == 0:
            out.append([rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 6))])
        elif kind == 1:
            out.append([p.PROTOCOL])
        elif kind == 2:
            out.append([p.PROTOCOL, rng.choice(valid_cmds), b"\xc1\xff\x00garbage"])
        elif kind == 3:
            out.append([p.PROTOCOL, bytes([rng.randint(9, 255)]), msgpack.packb({})])
        elif kind == 4:
            out.append([p.PROTOCOL, p.PARTIAL, msgpack.packb({"id": 5, "data": "x"})])
        elif kind == 5:
            out.append([p.PROTOCOL, p.READY, msgpack.packb(
                {"version": 1, "service": "", "capacity": -1, "heartbeat_ms": 0, "pid": 1})])
        elif kind == 6:
            out.append([p.PROTOCOL, p.FINAL, msgpack.packb({"id": "nope", "data": {}}), b"extra"])
        elif kind == 7:
            out.append([b"MDPW01", p.READY, msgpack.packb([1, 2, 3])])
        elif kind == 8:
            out.append([p.PROTOCOL, rng.choice(valid_cmds), msgpack.packb(rng.randbytes(40))])
        else:
            out.append([p.PROTOCOL, p.ERROR, msgpack.packb({"id": "x" * 500, "code": 999, "message": 1})])
    return out


def test_decode_rejects_junk_without_crashing() -> None:
    rng = random.Random(1)
    for frames in junk_messages(rng, N_MESSAGES):
        with pytest.raises(p.ProtocolError):
            p.decode(frames)
    for _ in range(2000):
        frames = [rng.randbytes(rng.randint(0, 20)) for _ in range(3)]
        frames[0] = p.PROTOCOL
        frames[1] = rng.choice(list(p.NAMES))
        try:
            p.decode(frames)
        except p.ProtocolError:
            pass


def test_encode_decode_round_trip() -> None:
    header = {"id": "abc", "deadline": 12.5, "body": {"kind": "chat", "x": [1, 2]}}
    assert p.decode(p.encode(p.REQUEST, header)) == p.Message(p.REQUEST, header)
    with pytest.raises(p.ProtocolError):
        p.encode(p.REQUEST, {"id": "abc"})
    with pytest.raises(p.ProtocolError):
        p.decode(p.encode(p.HEARTBEAT) + [b""])
    with pytest.raises(p.ProtocolError):
        p.decode([p.PROTOCOL, p.HEARTBEAT, b"\x80" + b"x" * 100], max_bytes=50)


def test_broker_survives_fuzz(suite: Suite) -> None:
    rng = random.Random(2)
    ctx = zmq.Context()
    endpoint = f"ipc://{suite.run_dir / 'bus.sock'}"
    socks = []
    try:
        t0 = time.monotonic()
        for round_ in range(3):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.sndhwm = 100_000
            sock.connect(endpoint)
            socks.append(sock)
            for frames in junk_messages(rng, N_MESSAGES // 3):
                sock.send_multipart(frames)
                if time.monotonic() - t0 > TIME_LIMIT_S:
                    break
            # Oversized: above bus.max_message_bytes the broker's libzmq drops the peer.
            sock.send_multipart([p.PROTOCOL, p.HEARTBEAT, b"\x00" * (5 * 1024 * 1024)])
        # A fake worker that registers and then sends nonsense for its own requests.
        fake = ctx.socket(zmq.DEALER)
        fake.linger = 0
        fake.connect(endpoint)
        socks.append(fake)
        fake.send_multipart(p.encode(p.READY, {"version": 1, "service": "fuzz/echo", "capacity": 1,
                                               "heartbeat_ms": 1000, "pid": os.getpid()}))
        fake.send_multipart(p.encode(p.FINAL, {"id": "never-sent", "data": {}}))
        # Clients: junk under the client protocol, well-formed calls to nowhere, cancels of
        # calls that do not exist, worker commands sent as a client and the other way round.
        client = ctx.socket(zmq.DEALER)
        client.linger = 0
        client.connect(endpoint)
        socks.append(client)
        for frames in junk_messages(rng, N_MESSAGES // 3):
            client.send_multipart([p.CLIENT, *frames[1:]] if frames and frames[0] == p.PROTOCOL else frames)
        for i in range(200):
            client.send_multipart(p.encode(p.CANCEL, {"id": f"nope-{i}"}, client=True))
            client.send_multipart([p.CLIENT, p.READY, msgpack.packb({"version": 1})])
            client.send_multipart([p.CLIENT, p.CALL, msgpack.packb(
                {"id": f"c{i}", "service": "x" * rng.randint(0, 300), "deadline": "soon", "body": {}})])
        for i in range(50):
            client.send_multipart(p.encode(p.CALL, {"id": f"none-{i}", "service": "no/such", "deadline":
                                                    time.time() + 5, "body": {}, "wait_s": 0}, client=True))
        errors = 0
        while client.poll(2000):
            msg = p.decode(client.recv_multipart())
            assert msg.client and msg.command == p.ERROR and msg.header["kind"] == "no_worker"
            errors += 1
            if errors == 50:
                break
        assert errors == 50, "every call to a service with no worker gets an ERROR"
        time.sleep(1.0)
        assert suite.children["router"].exit_code() is None
        with suite.client() as c:
            assert c.get("/health").status_code == 200
            assert c.get("/ready").status_code == 200
            r = c.post("/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200, r.text
        assert "dropped malformed bus message" in suite.log_text("router")
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()


def test_worker_survives_fuzz(fresh_dir: Path) -> None:
    """A real inference daemon, registered with a broker played by this test."""
    config = write_config(fresh_dir, heartbeat=0.5)
    run = fresh_dir / "run"
    run.mkdir()
    ctx = zmq.Context()
    broker = ctx.socket(zmq.ROUTER)
    broker.linger = 0
    # A ROUTER silently drops what does not fit its per-peer queue: with the default
    # 1,000 the real requests sent after the junk could be lost on a loaded machine.
    broker.sndhwm = 0
    broker.bind(f"ipc://{run / 'bus.sock'}")
    suite = Suite(fresh_dir, config)
    rng = random.Random(3)
    try:
        infer = suite.start_infer()
        poller = zmq.Poller()
        poller.register(broker, zmq.POLLIN)
        identity = b""
        deadline = time.monotonic() + 15
        while not identity and time.monotonic() < deadline:
            if poller.poll(500):
                frames = broker.recv_multipart()
                if p.decode(frames[1:]).command == p.READY:
                    identity = frames[0]
        assert identity, "the worker never sent READY"
        t0 = time.monotonic()
        for frames in junk_messages(rng, N_MESSAGES):
            broker.send_multipart([identity, *frames])
            if time.monotonic() - t0 > TIME_LIMIT_S:
                break
        # Well-formed but wrong: bad request bodies get ERROR 400 replies.
        bad_body = {"id": "bad-1", "deadline": time.time() + 30, "body": {"kind": "chat", "messages": "x"}}
        broker.send_multipart([identity, *p.encode(p.REQUEST, bad_body)])
        good = {"id": "good-1", "deadline": time.time() + 30,
                "body": {"kind": "completion", "prompt": "Hi", "max_tokens": 3, "temperature": 0}}
        broker.send_multipart([identity, *p.encode(p.REQUEST, good)])
        replies: dict[str, list[p.Message]] = {}
        deadline = time.monotonic() + 30
        while "good-1" not in {k for k, v in replies.items() if v[-1].command == p.FINAL}:
            assert time.monotonic() < deadline, f"no FINAL for good-1; got {replies}"
            if not poller.poll(200):
                continue
            frames = broker.recv_multipart()
            msg = p.decode(frames[1:])
            if msg.command == p.HEARTBEAT:
                broker.send_multipart([identity, *p.encode(p.HEARTBEAT)])
            if msg.id:
                replies.setdefault(msg.id, []).append(msg)
        assert replies["bad-1"][-1].command == p.ERROR
        assert replies["bad-1"][-1].header["code"] == 400
        assert infer.exit_code() is None
        assert "dropped malformed message from the broker" in suite.log_text("infer@smollm2")
    finally:
        suite.stop()
        broker.close(linger=0)
        ctx.term()
