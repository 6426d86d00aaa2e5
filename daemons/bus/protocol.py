"""The onebox bus protocol: constants and a pure encode()/decode() pair.

Majordomo-style (ZeroMQ RFC 7/MDP, 18/MDP), simplified to one header frame. Workers
and clients connect DEALERs to the broker's ROUTER; every message is three frames:

    [PROTOCOL, COMMAND, HEADER]     HEADER is a msgpack map, never pickle

PROTOCOL is b"OBX1" between the broker and workers and b"OBC1" between the broker and
clients (as MDP keeps MDPW01 and MDPC01 apart), so one socket can never be mistaken
for the other. Worker commands and their required header fields:

    READY      worker -> broker   version, service, capacity, heartbeat_ms, pid
    HEARTBEAT  both ways          (none); optional status (map): a worker's engine
                                  state (slots, KV cells, queue...) for GET /v1/status
    REQUEST    broker -> worker   id, deadline (unix time, float), body (map)
    PARTIAL    worker -> broker   id, data (map)        one piece of a streamed reply
    FINAL      worker -> broker   id, data (map)        the last piece; closes the request
    ERROR      both ways          id, code (HTTP-like int), message
    CANCEL     broker -> worker   id                    the client went away
    DISCONNECT both ways          reason                "forget me / re-register"

Client commands (a daemon or `onebox` command calling a service through the broker):

    CALL       client -> broker   id, service, deadline, body; optional wait_s: how long
                                  to wait for a worker of that service to register
                                  (within the deadline) before failing with 503
    CANCEL     client -> broker   id                    stop that call
    HEARTBEAT  both ways          (none)                sent while calls are open: a
                                  client silent for `liveness` intervals (at least 3 s)
                                  has its calls cancelled; a broker silent as long fails them
    PARTIAL    broker -> client   id, data (map)
    FINAL      broker -> client   id, data (map)
    ERROR      broker -> client   id, code, message; optional kind: "no_worker",
                                  "worker_lost", "deadline" or "remote" (the worker said it)

A client's ids are its own (the broker keeps them per client). Services whose names
start with "mmi." are answered by the broker itself (Majordomo's management interface,
MDP's MMI): "mmi.status" returns every service and its workers' status maps.

Anything else — wrong frame count, unknown command, bad msgpack, missing or mistyped
fields, oversized frames — raises ProtocolError; callers log it and drop the message
(or answer ERROR when they know the request id). Nothing here does I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

PROTOCOL = b"OBX1"
CLIENT = b"OBC1"
VERSION = 1

READY = b"\x01"
HEARTBEAT = b"\x02"
REQUEST = b"\x03"
PARTIAL = b"\x04"
FINAL = b"\x05"
ERROR = b"\x06"
CANCEL = b"\x07"
DISCONNECT = b"\x08"
CALL = b"\x09"

NAMES = {
    READY: "READY",
    HEARTBEAT: "HEARTBEAT",
    REQUEST: "REQUEST",
    PARTIAL: "PARTIAL",
    FINAL: "FINAL",
    ERROR: "ERROR",
    CANCEL: "CANCEL",
    DISCONNECT: "DISCONNECT",
    CALL: "CALL",
}

# Required header fields per command, with the types they must have.
_NUM = (int, float)
SCHEMA: dict[bytes, dict[str, type | tuple[type, ...]]] = {
    READY: {"version": int, "service": str, "capacity": int, "heartbeat_ms": int, "pid": int},
    HEARTBEAT: {},
    REQUEST: {"id": str, "deadline": _NUM, "body": dict},
    PARTIAL: {"id": str, "data": dict},
    FINAL: {"id": str, "data": dict},
    ERROR: {"id": str, "code": int, "message": str},
    CANCEL: {"id": str},
    DISCONNECT: {"reason": str},
    CALL: {"id": str, "service": str, "deadline": _NUM, "body": dict},
}

# Optional header fields: checked when present.
OPTIONAL: dict[bytes, dict[str, type | tuple[type, ...]]] = {
    HEARTBEAT: {"status": dict},
    CALL: {"wait_s": _NUM},
    ERROR: {"kind": str},
}

# Commands each side may receive.
FROM_WORKER = frozenset({READY, HEARTBEAT, PARTIAL, FINAL, ERROR, DISCONNECT})
FROM_BROKER = frozenset({HEARTBEAT, REQUEST, ERROR, CANCEL, DISCONNECT})
FROM_CLIENT = frozenset({CALL, CANCEL, HEARTBEAT})
TO_CLIENT = frozenset({PARTIAL, FINAL, ERROR, HEARTBEAT})

MAX_ID_LEN = 128
# Between clients and the broker, silence means death only after liveness x interval
# and at least this long: a dead client only wastes work until then, while a false
# alarm fails calls that were fine (a busy 2-core box can stall a process that long).
CLIENT_SILENCE_MIN_S = 3.0


def client_silence_s(interval: float, liveness: int) -> float:
    return max(CLIENT_SILENCE_MIN_S, interval * liveness)
MAX_SERVICE_LEN = 128


class ProtocolError(ValueError):
    """A message that does not follow this protocol."""


@dataclass(frozen=True)
class Message:
    command: bytes
    header: dict[str, Any]
    # Sent under the client protocol (CLIENT), not the worker one.
    client: bool = False

    @property
    def name(self) -> str:
        return NAMES.get(self.command, repr(self.command))

    @property
    def id(self) -> str | None:
        value = self.header.get("id")
        return value if isinstance(value, str) else None


def encode(command: bytes, header: dict[str, Any] | None = None, client: bool = False) -> list[bytes]:
    """Frames for one message. Raises ProtocolError for a header that fails the schema
    or a command the protocol does not have."""
    header = {} if header is None else header
    if client and command not in FROM_CLIENT | TO_CLIENT:
        raise ProtocolError(f"{NAMES.get(command, command)!r} is not a client command")
    _validate(command, header)
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (OverflowError, TypeError, ValueError) as exc:
        # An integer past 64 bits (JSON sets no bound), a value msgpack has no type for.
        raise ProtocolError(f"{NAMES.get(command, command)!r} header cannot be encoded: {exc}") from None
    return [CLIENT if client else PROTOCOL, command, packed]


def decode(frames: list[bytes], max_bytes: int = 4 * 1024 * 1024) -> Message:
    """Parse and check one message (frames after any routing identity)."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames, got {len(frames)}")
    proto, command, raw = frames
    if proto not in (PROTOCOL, CLIENT):
        raise ProtocolError(f"unknown protocol {bytes(proto[:16])!r}")
    client = proto == CLIENT
    if command not in SCHEMA or (client and command not in FROM_CLIENT | TO_CLIENT):
        raise ProtocolError(f"unknown command {bytes(command[:8])!r}")
    if len(raw) > max_bytes:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {max_bytes}")
    try:
        header = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, use_list=True
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"bad msgpack header: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    _validate(command, header)
    return Message(command, header, client)


def _validate(command: bytes, header: dict[str, Any]) -> None:
    schema = SCHEMA.get(command)
    if schema is None:
        raise ProtocolError(f"unknown command {command!r}")
    for key, kind in schema.items():
        if key not in header:
            raise ProtocolError(f"{NAMES[command]}: missing field {key!r}")
        value = header[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ProtocolError(f"{NAMES[command]}: field {key!r} has type {type(value).__name__}")
    for key, kind in OPTIONAL.get(command, {}).items():
        value = header.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise ProtocolError(f"{NAMES[command]}: field {key!r} has type {type(value).__name__}")
    ident = header.get("id")
    if isinstance(ident, str) and not 0 < len(ident) <= MAX_ID_LEN:
        raise ProtocolError(f"{NAMES[command]}: id must be 1..{MAX_ID_LEN} characters")
    if command in (READY, CALL):
        if not 0 < len(header["service"]) <= MAX_SERVICE_LEN:
            raise ProtocolError(f"{NAMES[command]}: service must be 1..{MAX_SERVICE_LEN} characters")
    wait = header.get("wait_s")
    if command == CALL and isinstance(wait, (int, float)) and not 0 <= wait <= 86_400:
        raise ProtocolError("CALL: wait_s must be 0..86400")
    if command == READY:
        if not 1 <= header["capacity"] <= 65536:
            raise ProtocolError("READY: capacity must be 1..65536")
        if not 10 <= header["heartbeat_ms"] <= 600_000:
            raise ProtocolError("READY: heartbeat_ms must be 10..600000")
    if command in (REQUEST, CALL) and not math.isfinite(header["deadline"]):
        # NaN compares false with every time: such a request would never expire.
        raise ProtocolError(f"{NAMES[command]}: deadline must be a finite unix time")
    if command == ERROR and not 100 <= header["code"] <= 599:
        raise ProtocolError("ERROR: code must be 100..599")
