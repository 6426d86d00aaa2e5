"""Shared, in-process scaffolding for tests/test_router_edges.py: the real
router app (create_app) with a stub bus broker and stub upstream providers, driven by
raw ASGI calls so a test decides exactly when the client disconnects.

No subprocesses, no sockets, no sleeps longer than a few loop turns: each test runs in
well under a second. This module holds no tests of its own.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from daemons import config as config_mod
from daemons.bus.errors import BusError
from daemons.router.app import create_app
from daemons.router.identity import Principal

Pair = tuple[str, dict[str, Any]]


async def spin(turns: int = 30) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


# -- the bus ---------------------------------------------------------------------------

@dataclass
class StubWorker:
    capacity: int = 1
    status: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class StubCall:
    """A local bus call: yields `pairs`, each after `delay_s`; close() is counted."""

    def __init__(self, pairs: list[Pair], delay_s: float = 0.0) -> None:
        self.pairs = list(pairs)
        self.delay_s = delay_s
        self.closed = 0

    async def __aiter__(self) -> AsyncIterator[Pair]:
        for pair in self.pairs:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            yield pair

    async def close(self) -> None:
        self.closed += 1


class StubBroker:
    """What the router asks a Broker: live(), snapshot(), call()."""

    def __init__(self) -> None:
        self.workers: dict[str, list[StubWorker]] = {}
        # service -> a factory called with the body; returns a StubCall or raises.
        self.handlers: dict[str, Callable[[dict[str, Any]], StubCall]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def live(self, service: str) -> list[StubWorker]:
        return list(self.workers.get(service, []))

    def snapshot(self) -> dict[str, Any]:
        return {"services": {}, "clients": 0}

    async def call(self, service: str, body: dict[str, Any], deadline: float, wait_for_worker: float = 0.0,
                   call_id: str | None = None) -> StubCall:
        self.calls.append((service, body))
        await asyncio.sleep(0)
        return self.handlers[service](body)


# -- upstreams -------------------------------------------------------------------------

class StubUpstreamCall:
    def __init__(self, pairs: list[Pair], delay_s: float = 0.0) -> None:
        self._pairs = list(pairs)
        self.delay_s = delay_s
        self.closed = 0

    def __aiter__(self) -> StubUpstreamCall:
        return self

    async def __anext__(self) -> Pair:
        if not self._pairs or self.closed:
            raise StopAsyncIteration
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return self._pairs.pop(0)

    async def close(self) -> None:
        self.closed += 1


class StubProvider:
    """A provider whose open() answers with `make(body)` (a StubUpstreamCall or an exception)."""

    def __init__(self, name: str, make: Callable[[dict[str, Any]], StubUpstreamCall]) -> None:
        self.name = name
        self.make = make
        self.opened: list[dict[str, Any]] = []
        self.state = "closed"

    async def open(self, body: dict[str, Any], model: str, deadline: float, stream: bool) -> StubUpstreamCall:
        self.opened.append(body)
        await asyncio.sleep(0)
        return self.make(body)

    async def aclose(self) -> None:
        pass


def words(n: int, prompt_tokens: int = 10) -> list[Pair]:
    """n partial replies of one word each, then the FINAL with usage."""
    return [("partial", {"text": f"w{i} "}) for i in range(n)] + [
        ("final", {"finish_reason": "stop", "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n}})]


# -- identity --------------------------------------------------------------------------

class FixedIdentity:
    """Every caller is `name` (identity itself is reviewed with the real Identity)."""

    def __init__(self, config: config_mod.Config, name: str) -> None:
        self.config = config
        self.name = name

    def identify(self, peer: Any, authorization: str | None) -> Principal:
        limits = self.config.principal(self.name)
        return Principal(self.name, limits, limits.admin, "test")


# -- the app ---------------------------------------------------------------------------

def make_config(directory: Path, raw: dict[str, Any]) -> config_mod.Config:
    base: dict[str, Any] = {"paths": {"runtime_dir": str(directory / "run"), "state_dir": str(directory / "state")},
                            "ocr": {"enabled": False}}
    base.update(raw)
    return config_mod.parse(base)


class Router:
    """The real FastAPI app over stubs. `state` is its RouterState."""

    def __init__(self, raw: dict[str, Any], principal: str = "alice") -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="onebox-review-")
        self.dir = Path(self._tmp.name)
        (self.dir / "state").mkdir()
        self.config = make_config(self.dir, raw)
        self.broker = StubBroker()
        self.app = create_app(self.config, self.broker, CollectorRegistry())  # type: ignore[arg-type]
        self.state = self.app.state.onebox
        self.state._identity = FixedIdentity(self.config, principal)
        self.state.ledger.open()  # creates ledger.db; its writer thread is a daemon thread
        self.principal = principal

    def close(self) -> None:
        self.state.ledger.close(2.0)
        self._tmp.cleanup()

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # What the tests look at.
    def in_flight(self, model: str) -> int:
        return int(self.state.dispatch.queues[model].in_flight)

    def limits(self) -> dict[str, Any]:
        return dict(self.state.limits.snapshot(self.principal))

    def ledger_rows(self) -> int:
        """Rows recorded so far (written or still queued)."""
        return int(self.state.ledger._recorded)


@dataclass
class Exchange:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    error: BaseException | None = None  # what the app raised after answering (Starlette re-raises a 500's cause)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return json.loads(self.body)


async def asgi_call(app: Any, method: str, path: str, body: Any = None,
                    receive_after_body: Callable[[int], Awaitable[dict[str, Any]]] | None = None,
                    on_send: Callable[[dict[str, Any], Exchange], Awaitable[None]] | None = None,
                    headers: dict[str, str] | None = None) -> Exchange:
    """One HTTP request straight into the ASGI app.

    `receive_after_body(n)` answers the n-th receive() after the body (n = 1, 2, ...);
    by default every such call waits forever, as for a client that stays connected.
    `on_send(message, exchange)` runs before each message is recorded (it may block)."""
    raw = b"" if body is None else json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": hdrs, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent_body = False
    n = 0
    forever = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent_body, n
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": raw, "more_body": False}
        n += 1
        if receive_after_body is not None:
            return await receive_after_body(n)
        await forever.wait()
        return {"type": "http.disconnect"}

    ex = Exchange()

    async def send(message: dict[str, Any]) -> None:
        if on_send is not None:
            await on_send(message, ex)
        if message["type"] == "http.response.start":
            ex.status = message["status"]
            ex.headers = {k.decode(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            ex.chunks.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    except Exception as exc:
        ex.error = exc
    return ex


def chat(model: str, text: str = "hello", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **kw}


def remote_config(**extra: Any) -> dict[str, Any]:
    """One provider `p` serving remote model `r` (priced), alice with a budget."""
    raw: dict[str, Any] = {
        "providers": {"p": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "remote_models": {"r": {"provider": "p", "prompt_price_per_1k": 1.0, "completion_price_per_1k": 1.0,
                                "default_max_tokens": 100}},
        "principals": {"alice": {"budget": 100.0, "budget_period": "day", "max_concurrent": 5}},
    }
    for k, v in extra.items():
        raw[k] = v
    return raw


def now() -> float:
    return time.time()


__all__ = ["BusError", "Router", "StubCall", "StubProvider", "StubUpstreamCall", "StubWorker", "asgi_call", "chat",
           "remote_config", "spin", "words"]
