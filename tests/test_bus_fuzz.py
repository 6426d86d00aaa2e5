"""Malformed bus traffic never crashes the broker or a worker (bounded fuzz loops).

The broker is fuzzed in a running suite. Each real worker daemon (inference on the real
model, embedding, OCR, ingestion) is fuzzed with the test playing its broker: a ROUTER
on bus.sock that answers READY and heartbeats as the real one does. It gets random and
mutated frames, wrong frame counts, bad msgpack, wrong header types, unknown commands,
an oversized frame, commands out of order and replayed, and well-formed REQUESTs with
hostile bodies. Afterwards the daemon still runs, still heartbeats, has answered every
well-formed REQUEST once (a client error, never a 5xx), has logged what it dropped, and
still serves a correct request."""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
import zmq

from daemons.bus import protocol as p
from tests.harness import Suite, write_config
from tests.ocr_docs import PAGES, scan

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


# ---- every worker daemon, with this test as its broker --------------------------------

EMBED_GGUF = "all_minilm_l6_v2/all-MiniLM-L6-v2.f16.gguf"
REPLY_TIMEOUT_S = 60.0  # every well-formed REQUEST answered within this, on a loaded box


class FakeBroker:
    """The broker's side of the worker protocol: a ROUTER on bus.sock that acknowledges
    READY, answers heartbeats, tells an unknown peer to register (as the real broker
    does, e.g. after libzmq dropped a connection for an oversized frame), and keeps the
    replies by request id. Client traffic (the ingestion daemon's OCR and embedding
    calls) is ignored."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], run_dir: Path) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        # A ROUTER silently drops what does not fit its per-peer queue: with the default
        # 1,000 the real requests sent after the junk could be lost on a loaded machine.
        self.sock.sndhwm = 0
        self.sock.bind(f"ipc://{run_dir / 'bus.sock'}")
        self.identity = b""
        self.readies = 0
        self.heartbeats = 0
        self.replies: dict[str, list[p.Message]] = {}

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart([self.identity, *frames])

    def request(self, request_id: str, body: dict[str, object], deadline_s: float = 30.0) -> None:
        self.send(p.encode(p.REQUEST, {"id": request_id, "deadline": time.time() + deadline_s, "body": body}))

    def pump(self, timeout_ms: int = 100) -> None:
        """Everything that arrives within `timeout_ms`."""
        while self.sock.poll(timeout_ms):
            timeout_ms = 0
            frames = self.sock.recv_multipart()
            peer, rest = frames[0], frames[1:]
            if rest and rest[0] == p.CLIENT:
                continue
            msg = p.decode(rest)  # a worker never sends junk: this raises if it does
            if msg.command == p.READY:
                self.identity, self.readies = peer, self.readies + 1
                self.send(p.encode(p.HEARTBEAT))
            elif peer != self.identity:
                if msg.command != p.DISCONNECT:
                    self.sock.send_multipart([peer, *p.encode(p.DISCONNECT, {"reason": "unknown worker; send READY"})])
            elif msg.command == p.HEARTBEAT:
                self.heartbeats += 1
                self.send(p.encode(p.HEARTBEAT))
            elif msg.id:
                self.replies.setdefault(msg.id, []).append(msg)

    def wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.pump()

    def ended(self, request_id: str) -> list[p.Message]:
        """The FINAL and ERROR replies to `request_id`."""
        return [m for m in self.replies.get(request_id, []) if m.command in (p.FINAL, p.ERROR)]

    def close(self) -> None:
        self.sock.close(linger=0)


def nested(depth: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for _ in range(depth):
        out = {"a": out}
    return out


# Hostile bodies every worker gets: none may crash it or earn a 5xx.
COMMON_HOSTILE: list[dict[str, object]] = [
    {}, {"kind": None, "op": None, "path": None, "input": None}, nested(400), {"x": "y" * 1_000_000},
    {"kind": ["chat"], "op": {"delete": 1}, "path": [1, 2], "input": {"a": 1}}, {"\u0000": "\u0000"},
]


@dataclass
class Target:
    """A worker daemon: its argv, a correct request and what its answer must hold, and
    the hostile bodies of its own kind."""

    args: tuple[str, ...]
    good: Callable[[Path], dict[str, object]]
    check: Callable[[list[p.Message]], None]
    hostile: Callable[[Path], list[dict[str, object]]]


def check_completion(replies: list[p.Message]) -> None:
    final = replies[-1]
    assert final.command == p.FINAL, replies
    assert final.header["data"]["usage"]["completion_tokens"] >= 1, final
    assert "".join(str(m.header["data"].get("text", "")) for m in replies[:-1]).strip(), replies


def check_embedding(replies: list[p.Message]) -> None:
    final = replies[-1]
    assert final.command == p.FINAL and final.header["data"]["dim"] == 384, replies
    rows = sum(int(m.header["data"]["count"]) for m in replies[:-1])
    assert rows == 2, replies


def check_ocr(replies: list[p.Message]) -> None:
    assert replies[-1].command == p.FINAL, replies
    text = " ".join(str(m.header["data"].get("markdown", "")) for m in replies[:-1]).lower()
    assert "quick brown fox" in text, replies


def check_ingest(replies: list[p.Message]) -> None:
    assert replies[-1].command == p.FINAL and "counts" in replies[-1].header["data"], replies


def infer_hostile(_: Path) -> list[dict[str, object]]:
    chat = {"kind": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    done = {"kind": "completion", "prompt": "Hi", "max_tokens": 2}
    return [
        {"kind": "chat", "messages": "x"}, {"kind": "chat", "messages": []}, {"kind": "chat", "messages": [5]},
        {"kind": "chat", "messages": [{"role": "user", "content": "x " * 60_000}], "max_tokens": 2},
        {"kind": "chat", "messages": [{"role": "tool", "content": "x", "tool_call_id": 5}], "max_tokens": 2},
        {"kind": "chat", "messages": [{"role": "user", "content": None, "tool_calls": "x"}]},
        {**done, "prompt": 12}, {**done, "max_tokens": 0}, {**done, "max_tokens": -1}, {**done, "max_tokens": 2**64 - 1},
        {**done, "temperature": math.nan}, {**done, "top_p": math.inf}, {**done, "top_k": -5}, {**done, "seed": -1},
        {**done, "seed": 2**64 - 1}, {**done, "stop": [""]}, {**done, "stop": ["a"] * 100}, {**done, "stop": "x"},
        {**done, "logit_bias": [[2**40, 1.0]]}, {**done, "logit_bias": [[10**9, 5.0]]}, {**done, "logit_bias": [[1]]},
        {**done, "logit_bias": {"1": 2}}, {**done, "logprobs": 10**6}, {**done, "rag": {"sources": "x"}},
        {**done, "client_request_id": "x" * 1000}, {**done, "tools": [{"name": 5}]},
        {**chat, "response_format": {"type": "json_schema", "schema": {"type": "nonsense", "properties": 5}}},
        {**chat, "tools": [{"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/x"}}}}],
         "tool_choice": "required"},
        {**chat, "tools": [{"name": "f"}], "tool_choice": {"name": "g"}},
        {**done, "prompt": "\u0000" * 16}, {**done, "prompt": ""},
    ]


def embed_hostile(_: Path) -> list[dict[str, object]]:
    return [{"input": 5}, {"input": []}, {"input": [[]]}, {"input": [[-1]]}, {"input": [[2**63]]},
            {"input": [[2**64 - 1, 3]]}, {"input": ["x"] * 100_000}, {"input": "word " * 50_000},
            {"input": ["ok"], "truncate": "yes"}, {"input": [["a"]]}, {"input": [1.5]}, {"input": [""]},
            {"input": [True]}, {"input": ["ok", None]}]


def ocr_hostile(state: Path) -> list[dict[str, object]]:
    uploads = state / "uploads"
    (uploads / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(3000))
    (uploads / "empty.pdf").write_bytes(b"")
    (uploads / "fake.pdf").write_bytes(b"%PDF-1.7\n" + os.urandom(2000))
    link = uploads / "passwd.png"
    if not link.exists():
        link.symlink_to("/etc/passwd")
    page = str(uploads / "page.png")
    return [{"path": "/etc/passwd"}, {"path": "relative.png"}, {"path": 5}, {"path": "/dev/zero"}, {"path": str(uploads)},
            {"path": str(uploads / "missing.png")}, {"path": str(uploads / "junk.png")},
            {"path": str(uploads / "empty.pdf")}, {"path": str(uploads / "fake.pdf")}, {"path": str(link)},
            {"path": f"{uploads}/../../../etc/passwd"}, {"path": page, "dpi": 10**6}, {"path": page, "dpi": -1},
            {"path": page, "dpi": 2**64 - 1}, {"path": page, "languages": "; rm -rf /"},
            {"path": page, "languages": "xx"}, {"path": page, "first_page": 99}, {"path": page, "first_page": 2**63},
            {"path": page, "max_pages": 0}, {"path": page + "\u0000"}]


def ingest_hostile(_: Path) -> list[dict[str, object]]:
    return [{"op": 5}, {"op": "delete"}, {"op": "delete", "id": "1"}, {"op": "delete", "id": 2**64 - 1},
            {"op": "delete", "id": -(2**63)}, {"op": "delete", "id": 1.5}, {"op": "delete", "id": True},
            {"op": "explode"}, {"op": "rescan", "extra": [1] * 1000}]


TARGETS = {
    "infer": Target(("infer", "smollm2"),
                    lambda _: {"kind": "completion", "prompt": "The capital of France is", "max_tokens": 4,
                               "temperature": 0},
                    check_completion, infer_hostile),
    "embed": Target(("embed", "minilm"), lambda _: {"input": ["a quiet harbour", "a busy port"]}, check_embedding,
                    embed_hostile),
    "ocr": Target(("ocr",), lambda state: {"path": str(state / "uploads" / "page.png")}, check_ocr, ocr_hostile),
    "ingest": Target(("ingest",), lambda _: {"op": "status"}, check_ingest, ingest_hostile),
}


def worker_config(root: Path) -> str:
    return (f'[embeddings.minilm]\npath = "{EMBED_GGUF}"\nthreads = 1\n'
            "[ocr]\nworkers = 1\nmax_file_bytes = 1048576\nmax_pages = 2\n"
            f'[collections.docs]\nfolder = "{root / "inbox" / "docs"}"\n')


def mutated(rng: random.Random, templates: list[list[bytes]], n: int) -> list[list[bytes]]:
    """Valid messages broken the ways a bad peer or a bad link would: bytes flipped,
    the header cut short or padded, the command swapped, frames doubled or dropped."""
    out: list[list[bytes]] = []
    commands = list(p.NAMES)
    for i in range(n):
        frames = [bytearray(f) for f in rng.choice(templates)]
        how = i % 6
        header = frames[2]
        if how == 0 and header:
            for _ in range(rng.randint(1, 4)):
                header[rng.randrange(len(header))] = rng.randrange(256)
        elif how == 1:
            del header[rng.randrange(len(header) + 1):]
        elif how == 2:
            header += rng.randbytes(rng.randint(1, 16))
        elif how == 3:
            frames[1] = bytearray(rng.choice(commands))
        elif how == 4:
            frames.insert(rng.randrange(len(frames) + 1), frames[rng.randrange(len(frames))])
        else:
            del frames[rng.randrange(len(frames))]
        out.append([bytes(f) for f in frames])
    return out


@pytest.mark.parametrize("daemon", list(TARGETS))
def test_worker_survives_fuzz(fresh_dir: Path, daemon: str) -> None:
    target = TARGETS[daemon]
    config = write_config(fresh_dir, heartbeat=0.5, extra=worker_config(fresh_dir))
    run, state = fresh_dir / "run", fresh_dir / "state"
    run.mkdir()
    (state / "uploads").mkdir(parents=True)
    (fresh_dir / "inbox" / "docs").mkdir(parents=True)
    scan(PAGES[0]).save(state / "uploads" / "page.png", dpi=(300, 300))
    ctx = zmq.Context()
    broker = FakeBroker(ctx, run)
    suite = Suite(fresh_dir, config)
    rng = random.Random(f"bus-fuzz-{daemon}")
    try:
        child = suite.start_daemon(*target.args)
        broker.wait(lambda: bool(broker.identity), 30, "READY")
        good = target.good(state)

        # Junk, and valid messages mutated; then a frame past bus.max_message_bytes, which
        # makes libzmq drop the connection (the worker reconnects and registers afresh).
        templates = [p.encode(p.REQUEST, {"id": f"tpl-{i}", "deadline": time.time() + 5, "body": body})
                     for i, body in enumerate([{"kind": "completion", "prompt": "Hi", "max_tokens": 1}, {"op": "x"},
                                               {"input": 5}, {"path": "/etc/passwd"}])]
        templates += [p.encode(p.CANCEL, {"id": "tpl-0"}), p.encode(p.HEARTBEAT, {"status": {"a": 1}}),
                      p.encode(p.ERROR, {"id": "tpl-1", "code": 500, "message": "x"})]
        t0 = time.monotonic()
        for i, frames in enumerate(junk_messages(rng, N_MESSAGES // 2) + mutated(rng, templates, N_MESSAGES // 2)):
            broker.send(frames)
            if i % 200 == 0:
                broker.pump(0)  # answer its heartbeats meanwhile
            if time.monotonic() - t0 > TIME_LIMIT_S:
                break
        readies = broker.readies
        broker.send([p.PROTOCOL, p.HEARTBEAT, b"\x80" + b"\x00" * (5 * 1024 * 1024)])
        broker.wait(lambda: broker.readies > readies, 30, "READY again after the oversized frame")

        # Out of order: cancels of nothing, a broker ERROR, and a DISCONNECT, after which
        # a worker registers afresh.
        for i in range(20):
            broker.send(p.encode(p.CANCEL, {"id": f"never-{i}"}))
            broker.send(p.encode(p.ERROR, {"id": f"never-{i}", "code": 503, "message": "x" * 1000}))
        readies = broker.readies
        broker.send(p.encode(p.DISCONNECT, {"reason": "fuzz"}))
        broker.wait(lambda: broker.readies > readies, 30, "READY again after DISCONNECT")

        # Well-formed REQUESTs: hostile bodies, a deadline already past, a request
        # replayed under the same id, one cancelled before it was sent.
        hostile = COMMON_HOSTILE + target.hostile(state)
        sent: dict[str, int] = {}
        for i, body in enumerate(hostile):
            broker.request(f"bad-{i}", body)
            sent[f"bad-{i}"] = 1
        broker.request("late", good, deadline_s=-1)
        for name, when in (("nan", math.nan), ("inf", math.inf)):  # malformed: dropped, never served
            broker.send([p.PROTOCOL, p.REQUEST, msgpack.packb({"id": name, "deadline": when, "body": good})])
        broker.send(p.encode(p.CANCEL, {"id": "early"}))
        broker.request("early", good)
        broker.request("twice", good)
        broker.request("twice", good)
        sent.update({"late": 1, "early": 1, "twice": 2})
        broker.wait(lambda: all(len(broker.ended(k)) >= n for k, n in sent.items()), REPLY_TIMEOUT_S,
                    f"an answer to every request; missing: "
                    f"{[k for k, n in sent.items() if len(broker.ended(k)) < n]}")
        broker.pump(300)  # nothing more may come for them
        for request_id, n in sent.items():
            ended = broker.ended(request_id)
            assert len(ended) == n, f"{request_id}: {n} answer(s) expected, got {ended}"
            for msg in ended:
                if msg.command == p.ERROR:
                    code = msg.header["code"]
                    assert 400 <= code < 500 or (request_id == "late" and code == 504), \
                        f"{request_id} ({hostile[int(request_id[4:])] if request_id.startswith('bad-') else ''!r:.200}):" \
                        f" {msg.header}"
        assert broker.ended("late")[0].header["code"] == 504
        assert "nan" not in broker.replies and "inf" not in broker.replies
        assert broker.ended("bad-0")[0].command == p.ERROR  # an empty body asks for nothing
        target.check(broker.replies["early"])  # a CANCEL before its REQUEST cancels nothing

        # Afterwards: alive, heartbeating, and serving a correct request.
        beats = broker.heartbeats
        broker.wait(lambda: broker.heartbeats >= beats + 3, 10, "three more heartbeats")
        broker.request("good", good)
        broker.wait(lambda: bool(broker.ended("good")), REPLY_TIMEOUT_S, "the answer to a correct request")
        target.check(broker.replies["good"])
        assert child.exit_code() is None, child.describe_exit()
        log = suite.log_text(child.name)
        assert "dropped malformed message from the broker" in log
        assert "error handling" not in log and "Traceback" not in log, log[-3000:]
    finally:
        suite.stop()
        broker.close()
        ctx.term()
