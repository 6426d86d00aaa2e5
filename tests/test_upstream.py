"""daemons/router/upstream: real HTTP to the fake upstream on loopback, no mocks."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from daemons.router.upstream import Provider, ProviderSpec, UpstreamCall, UpstreamError
from daemons.router.upstream import anthropic, provider as provider_module
from tests.fakes.upstream import FakeUpstream

T = TypeVar("T")
KEY = "sk-test-0123456789abcdef"
WORDS = 6
REPLY = " ".join(f"w{i}" for i in range(WORDS))


def chat_body(**over: Any) -> dict[str, Any]:
    """A bus body as ChatRequest.body() makes it."""
    body = {"kind": "chat", "messages": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": "one two three"}],
            "max_tokens": None, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
            "frequency_penalty": 0.0, "presence_penalty": 0.0, "repeat_penalty": 1.0, "seed": None, "stop": []}
    body.update(over)
    return body


def completion_body(**over: Any) -> dict[str, Any]:
    body = chat_body(**over)
    del body["messages"]
    body.update(kind="completion", prompt=over.get("prompt", "a b c d"))
    return body


def soon(seconds: float = 30.0) -> float:
    return time.time() + seconds


def run(make: Callable[[], Awaitable[T]]) -> T:
    async def go() -> T:
        return await make()
    return asyncio.run(go())


async def collect(call: UpstreamCall) -> tuple[str, dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    pairs = []
    try:
        async for pair in call:
            pairs.append(pair)
    finally:
        await call.close()
    assert pairs and pairs[-1][0] == "final", pairs
    assert all(kind == "partial" for kind, _ in pairs[:-1])
    return "".join(d["text"] for _, d in pairs[:-1]), pairs[-1][1], pairs


@pytest.fixture(scope="module")
def server() -> Iterator[FakeUpstream]:
    with FakeUpstream(words=WORDS) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeUpstream) -> FakeUpstream:
    server.reset()
    return server


def spec(fake: FakeUpstream, kind: str = "openai", **over: Any) -> ProviderSpec:
    base = fake.url + ("/v1" if kind == "openai" else "")
    fields: dict[str, Any] = {"name": "fake", "kind": kind, "base_url": base, "api_key": None, **over}
    return ProviderSpec(**fields)


async def one(s: ProviderSpec, body: dict[str, Any], stream: bool, model: str = "up-model",
              deadline: float | None = None) -> tuple[str, dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    p = Provider(s)
    try:
        return await collect(await p.open(body, model, deadline or soon(), stream=stream))
    finally:
        await p.aclose()


async def failure(s: ProviderSpec, body: dict[str, Any], stream: bool = True,
                  deadline: float | None = None) -> UpstreamError:
    p = Provider(s)
    try:
        with pytest.raises(UpstreamError) as info:
            await collect(await p.open(body, "up-model", deadline or soon(), stream=stream))
        return info.value
    finally:
        await p.aclose()


# -- OpenAI-compatible ---------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
def test_openai_chat(fake: FakeUpstream, stream: bool) -> None:
    text, final, pairs = run(lambda: one(spec(fake), chat_body(top_k=40, seed=7), stream))
    assert text == REPLY
    assert final == {"finish_reason": "stop", "usage": {"prompt_tokens": 5, "completion_tokens": WORDS,
                                                        "cached_tokens": 0}}
    if stream:
        assert len(pairs) == WORDS + 1  # one partial per streamed token
    [req] = fake.requests()
    assert req["path"] == "/v1/chat/completions"
    sent = req["body"]
    assert sent["model"] == "up-model" and sent["messages"][1] == {"role": "user", "content": "one two three"}
    assert sent["seed"] == 7
    # llama.cpp's knobs and None values are not OpenAI's: the fake, like OpenAI, refuses them.
    assert not {"top_k", "min_p", "repeat_penalty", "max_tokens", "stop", "kind"} & set(sent)
    assert (sent.get("stream"), sent.get("stream_options")) == ((True, {"include_usage": True}) if stream
                                                                else (None, None))
    assert "authorization" not in req["headers"]


@pytest.mark.parametrize("stream", [True, False])
def test_openai_cached_tokens_and_length(fake: FakeUpstream, stream: bool) -> None:
    fake.control(cached=2)
    text, final, _ = run(lambda: one(spec(fake), chat_body(max_tokens=3), stream))
    assert text == "w0 w1 w2"
    assert final == {"finish_reason": "length", "usage": {"prompt_tokens": 5, "completion_tokens": 3,
                                                          "cached_tokens": 2}}


@pytest.mark.parametrize("stream", [True, False])
def test_openai_completion(fake: FakeUpstream, stream: bool) -> None:
    text, final, _ = run(lambda: one(spec(fake), completion_body(max_tokens=4, stop=["w9"]), stream))
    assert text == "w0 w1 w2 w3"
    assert final == {"finish_reason": "length", "usage": {"prompt_tokens": 4, "completion_tokens": 4,
                                                          "cached_tokens": 0}}
    [req] = fake.requests()
    assert req["path"] == "/v1/completions"
    assert req["body"]["prompt"] == "a b c d" and req["body"]["stop"] == ["w9"]


# -- Anthropic -----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
def test_anthropic_messages(fake: FakeUpstream, stream: bool) -> None:
    body = chat_body(messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one two"},
        {"role": "user", "content": "three"},
        {"role": "developer", "content": "no lists"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "five"},
    ], temperature=0.3, top_k=40, stop="w9")
    text, final, pairs = run(lambda: one(spec(fake, "anthropic", api_key=KEY), body, stream))
    assert text == REPLY
    # 9 words of prompt, system included (input_tokens plus the cache's, which is none here).
    assert final == {"finish_reason": "stop", "usage": {"prompt_tokens": 9, "completion_tokens": WORDS,
                                                        "cached_tokens": 0}}
    if stream:
        assert len(pairs) == WORDS + 1
    [req] = fake.requests()
    assert req["path"] == "/v1/messages"
    assert req["headers"]["anthropic-version"] == "2023-06-01" and req["headers"]["x-api-key"] == KEY
    sent = req["body"]
    assert sent["system"] == "be brief\n\nno lists"
    assert sent["messages"] == [{"role": "user", "content": "one two\n\nthree"},
                                {"role": "assistant", "content": "four"}, {"role": "user", "content": "five"}]
    assert sent["max_tokens"] == 1024 and sent["temperature"] == 0.3 and sent["top_k"] == 40
    assert sent["stop_sequences"] == ["w9"] and "top_p" not in sent
    assert sent.get("stream") is (True if stream else None)


@pytest.mark.parametrize("stream", [True, False])
def test_anthropic_finish_reasons_and_cache(fake: FakeUpstream, stream: bool) -> None:
    s = spec(fake, "anthropic")
    fake.control(cached=2)
    _, final, _ = run(lambda: one(s, chat_body(max_tokens=2, temperature=1.7), stream))
    assert final == {"finish_reason": "length", "usage": {"prompt_tokens": 5, "completion_tokens": 2,
                                                          "cached_tokens": 2}}
    text, final, _ = run(lambda: one(s, chat_body(stop=["w2"]), stream))
    assert text == "w0 w1" and final["finish_reason"] == "stop"
    first, second = fake.requests()
    assert "temperature" not in first["body"]  # 1.7 clamps to 1.0, the API's default
    assert first["body"]["max_tokens"] == 2


def test_anthropic_serves_chat_only(fake: FakeUpstream) -> None:
    err = run(lambda: failure(spec(fake, "anthropic"), completion_body()))
    assert err.code == 400 and not err.retryable_elsewhere and err.kind == "http_4xx"
    assert "serves chat only" in err.message
    assert fake.requests() == []


def test_anthropic_stream_events_map() -> None:
    d = anthropic.Decoder()
    assert d.feed({"type": "message_start", "message": {"usage": {
        "input_tokens": 3, "cache_read_input_tokens": 10, "cache_creation_input_tokens": 2, "output_tokens": 1}}}) \
        is None
    assert d.feed({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta",
                                                                         "partial_json": "{"}}) is None
    assert d.feed({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}) == \
        ("partial", {"text": "hi"})
    d.feed({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 4}})
    assert d.feed({"type": "message_stop"}) == ("final", {"finish_reason": "tool_calls", "usage": {
        "prompt_tokens": 15, "completion_tokens": 4, "cached_tokens": 10}})
    with pytest.raises(UpstreamError) as info:
        anthropic.Decoder().feed({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    assert info.value.code == 502 and info.value.kind == "http_5xx" and info.value.retryable_elsewhere
    with pytest.raises(UpstreamError) as info:
        anthropic.Decoder().end(done=False)
    assert info.value.kind == "protocol"


# -- retries -------------------------------------------------------------------------


def test_retries_429_honouring_retry_after(fake: FakeUpstream) -> None:
    fake.control(fail=[429])
    t0 = time.monotonic()
    text, _, _ = run(lambda: one(spec(fake), chat_body(), stream=True))
    assert text == REPLY
    assert len(fake.requests()) == 2
    assert time.monotonic() - t0 < 1.0  # Retry-After: 0, not the backoff's wait


@pytest.mark.parametrize("stream", [True, False])
def test_retries_500_then_succeeds(fake: FakeUpstream, stream: bool) -> None:
    fake.control(fail=[500, 503])
    text, _, _ = run(lambda: one(spec(fake, retries=2), chat_body(), stream))
    assert text == REPLY
    assert len(fake.requests()) == 3


def test_500s_past_retries_are_502(fake: FakeUpstream) -> None:
    fake.control(fail=[500, 500, 500])
    err = run(lambda: failure(spec(fake, retries=1), chat_body()))
    assert (err.code, err.kind, err.retryable_elsewhere) == (502, "http_5xx", True)
    assert "500" in err.message
    assert len(fake.requests()) == 2


def test_429s_past_retries_are_429(fake: FakeUpstream) -> None:
    fake.control(fail=[429, 429])
    err = run(lambda: failure(spec(fake, retries=1), chat_body()))
    assert (err.code, err.kind, err.retryable_elsewhere, err.retry_after) == (429, "http_429", True, 0.0)


def test_garbage_is_retried_then_502(fake: FakeUpstream) -> None:
    fake.control(fail=["garbage", "garbage"])
    err = run(lambda: failure(spec(fake, retries=1), chat_body(), stream=False))
    assert (err.code, err.kind, err.retryable_elsewhere) == (502, "protocol", True)
    fake.control(fail=["garbage"])
    text, _, _ = run(lambda: one(spec(fake, retries=1), chat_body(), stream=False))
    assert text == REPLY


def test_client_error_passes_through_and_does_not_trip(fake: FakeUpstream) -> None:
    async def go() -> Provider:
        p = Provider(spec(fake, breaker_failures=2, retries=2))
        try:
            for _ in range(3):
                with pytest.raises(UpstreamError) as info:
                    await p.open(chat_body(), "up-model", soon(), stream=True)
                err = info.value
                assert (err.code, err.kind, err.retryable_elsewhere) == (400, "http_4xx", False)
                assert err.message == "injected failure 400"  # the upstream's own words
            assert p.state == "closed"
            return p
        finally:
            await p.aclose()

    fake.control(fail=[400, 400, 400])
    run(go)
    assert len(fake.requests()) == 3  # not retried


def test_unreachable_is_503(fake: FakeUpstream) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens on it
    dead = ProviderSpec(name="dead", kind="openai", base_url=f"http://127.0.0.1:{port}/v1", api_key=None,
                        retries=1)
    err = run(lambda: failure(dead, chat_body()))
    assert (err.code, err.kind, err.retryable_elsewhere) == (503, "connect", True)


# -- the circuit breaker -------------------------------------------------------------


def test_circuit_opens_then_closes(fake: FakeUpstream) -> None:
    states: list[tuple[str, str]] = []

    async def go() -> None:
        p = Provider(spec(fake, retries=1, breaker_failures=2, breaker_reset_s=0.5),
                     on_state=lambda name, state: states.append((name, state)))
        try:
            for _ in range(2):  # each fails after its retry: one failure each
                with pytest.raises(UpstreamError) as info:
                    await p.open(chat_body(), "up-model", soon(), stream=True)
                assert info.value.code == 502
            assert p.state == "open"
            assert len(fake.requests()) == 4
            t0 = time.monotonic()
            with pytest.raises(UpstreamError) as info:
                await p.open(chat_body(), "up-model", soon(), stream=True)
            assert (info.value.code, info.value.kind, info.value.retryable_elsewhere) == (503, "circuit_open", True)
            assert time.monotonic() - t0 < 0.1 and len(fake.requests()) == 4  # nothing sent
            await asyncio.sleep(0.6)
            text, _, _ = await collect(await p.open(chat_body(), "up-model", soon(), stream=True))
            assert text == REPLY
            assert p.state == "closed"
        finally:
            await p.aclose()

    fake.control(fail=[500] * 4)
    run(go)
    assert states == [("fake", "open"), ("fake", "half-open"), ("fake", "closed")]


def test_failed_trial_reopens(fake: FakeUpstream) -> None:
    async def go() -> None:
        p = Provider(spec(fake, retries=0, breaker_failures=1, breaker_reset_s=0.3))
        try:
            for expected in ("open", "open"):
                with pytest.raises(UpstreamError):
                    await p.open(chat_body(), "up-model", soon(), stream=False)
                assert p.state == expected
                await asyncio.sleep(0.35)
            text, _, _ = await collect(await p.open(chat_body(), "up-model", soon(), stream=False))
            assert text == REPLY and p.state == "closed"
        finally:
            await p.aclose()

    fake.control(fail=[500, 500])
    run(go)


# -- deadlines -----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
def test_deadline_before_answer_is_504(fake: FakeUpstream, stream: bool) -> None:
    fake.control(delay_s=2.0)
    t0 = time.monotonic()
    err = run(lambda: failure(spec(fake), chat_body(), stream=stream, deadline=soon(0.3)))
    # The request's own deadline, not the provider's timeout_s: no breaker failure.
    assert (err.code, err.kind, err.trips_breaker) == (504, "deadline", False)
    assert time.monotonic() - t0 < 1.0


def test_timeout_s_bounds_a_call(fake: FakeUpstream) -> None:
    fake.control(delay_s=2.0)
    t0 = time.monotonic()
    err = run(lambda: failure(spec(fake, timeout_s=0.3), chat_body(), deadline=soon(30)))
    assert err.code == 504 and err.kind == "timeout" and err.trips_breaker and time.monotonic() - t0 < 1.0


def test_stream_that_stalls_past_deadline_is_504(fake: FakeUpstream) -> None:
    async def go() -> tuple[list[Any], UpstreamError]:
        p = Provider(spec(fake))
        try:
            call = await p.open(chat_body(), "up-model", soon(0.5), stream=True)
            got = [await anext(call)]  # the first token comes at once
            with pytest.raises(UpstreamError) as info:
                async for pair in call:
                    got.append(pair)
            await call.close()
            return got, info.value
        finally:
            await p.aclose()

    fake.control(token_delay_s=2.0)
    t0 = time.monotonic()
    got, err = run(go)
    assert got == [("partial", {"text": "w0"})]
    assert (err.code, err.kind) == (504, "timeout") and time.monotonic() - t0 < 1.5


def test_passed_deadline_sends_nothing(fake: FakeUpstream) -> None:
    err = run(lambda: failure(spec(fake), chat_body(), deadline=time.time() - 1))
    assert err.code == 504
    assert fake.requests() == []


# -- keys ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_key_is_sent_and_never_shown(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "sk-wrong-fedcba9876543210"
    with FakeUpstream(key=KEY, words=WORDS) as keyed:
        good = spec(keyed, kind, api_key=KEY)
        text, _, _ = run(lambda: one(good, chat_body(), stream=True))
        assert text == REPLY
        header = keyed.requests()[0]["headers"]
        assert header.get("authorization" if kind == "openai" else "x-api-key") == \
            (f"Bearer {KEY}" if kind == "openai" else KEY)
        # The fake echoes the key it was given in its 401, as some servers do.
        err = run(lambda: failure(spec(keyed, kind, api_key=wrong), chat_body()))
        assert (err.code, err.kind, err.retryable_elsewhere) == (502, "http_4xx", False)
        assert "401" in err.message
    assert wrong not in err.message and KEY not in err.message
    assert wrong not in repr(spec(keyed, kind, api_key=wrong))
    assert caplog.records, "expected DEBUG records from httpx/httpcore and the provider"
    assert any(r.name == provider_module.__name__ for r in caplog.records)
    for r in caplog.records:
        shown = r.getMessage() + repr(r.args) + str(r.exc_info or "")
        assert KEY not in shown and wrong not in shown, r


# -- closing -------------------------------------------------------------------------


def test_closing_early_does_not_leak(fake: FakeUpstream) -> None:
    async def go() -> None:
        # One connection: a call closed early that kept it would leave none for the next.
        p = Provider(spec(fake, max_connections=1))
        try:
            for _ in range(3):
                call = await p.open(chat_body(), "up-model", soon(5), stream=True)
                assert await anext(call) == ("partial", {"text": "w0"})
                await call.close()
                await call.close()  # idempotent
                with pytest.raises(StopAsyncIteration):
                    await anext(call)
            unread = await p.open(chat_body(), "up-model", soon(5), stream=True)
            await unread.close()  # before reading anything
            text, _, _ = await asyncio.wait_for(collect(await p.open(chat_body(), "up-model", soon(5), stream=True)),
                                                3)
            assert text.split() == [f"w{i}" for i in range(50)]
        finally:
            await p.aclose()

    fake.control(words=50, token_delay_s=0.02)
    run(go)


def test_close_while_a_read_is_in_flight_elsewhere(fake: FakeUpstream) -> None:
    """As the router does when its client leaves: the read's task is cancelled, then close()."""
    async def go() -> None:
        p = Provider(spec(fake, max_connections=1))
        try:
            call = await p.open(chat_body(), "up-model", soon(5), stream=True)
            await anext(call)
            reading = asyncio.ensure_future(anext(call))
            await asyncio.sleep(0.05)
            reading.cancel()
            await call.close()
            with pytest.raises(asyncio.CancelledError):
                await reading
            assert p.state == "closed"
            fake.control(token_delay_s=0)
            text, _, _ = await asyncio.wait_for(collect(await p.open(chat_body(), "up-model", soon(5), stream=True)),
                                                3)
            assert text == REPLY
        finally:
            await p.aclose()

    fake.control(token_delay_s=1.0)
    run(go)


def test_finished_stream_reuses_its_connection(fake: FakeUpstream) -> None:
    async def go() -> None:
        p = Provider(spec(fake, max_connections=1))
        try:
            for _ in range(5):
                text, _, _ = await collect(await p.open(chat_body(), "up-model", soon(5), stream=True))
                assert text == REPLY
        finally:
            await p.aclose()

    run(go)
    assert len({r["peer"] for r in fake.requests()}) == 1


def test_retry_after_header() -> None:
    assert provider_module.retry_after("2.5") == 2.5
    assert provider_module.retry_after(None) is None
    assert provider_module.retry_after("soon") is None
    later = provider_module.retry_after(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60)))
    assert later is not None and 55 < later <= 61


def test_closed_whole_call_yields_nothing_more(fake: FakeUpstream) -> None:
    async def go() -> None:
        p = Provider(spec(fake))
        try:
            call = await p.open(chat_body(), "up-model", soon(), stream=False)
            assert call.first_token_at is not None and call.first_token_at >= call.opened_at
            await call.close()
            with pytest.raises(StopAsyncIteration):
                await anext(call)
        finally:
            await p.aclose()

    run(go)


def test_body_that_is_neither_chat_nor_completion_is_400(fake: FakeUpstream) -> None:
    err = run(lambda: failure(spec(fake), {"kind": "chat"}))
    assert (err.code, err.retryable_elsewhere) == (400, False)
    err = run(lambda: failure(spec(fake), {"kind": "embed", "input": ["x"]}))
    assert err.code == 400 and "embed" in err.message
    assert fake.requests() == []
