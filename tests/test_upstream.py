"""daemons/router/upstream: real HTTP to the fake upstream on loopback, no mocks."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import httpx
import openai
import pytest

from daemons.router.shape import Reply
from daemons.router.upstream import Provider, ProviderSpec, UpstreamCall, UpstreamError
from daemons.router.upstream import anthropic, openai as upstream_openai, provider as provider_module
from tests.fakes.upstream import FakeUpstream
from tests.router_stubs import Router

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


# -- the request surface: structured outputs, tools, logprobs, logit_bias, user -------

WEATHER = {"name": "weather", "description": "the weather in a city", "strict": False,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CLOCK = {"name": "clock", "description": "", "strict": False, "parameters": {"type": "object", "properties": {}}}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
# A history with a tool call and its result, as ChatRequest.body() makes it.
HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "weather in Oslo and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "content": "rain", "tool_call_id": "call_a"},
    {"role": "tool", "content": "sun", "tool_call_id": "call_b"},
    {"role": "user", "content": "so?"},
]


def tool_body(**over: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"messages": HISTORY, "tools": [WEATHER, CLOCK], "tool_choice": "auto",
                              "parallel_tool_calls": True, "logit_bias": [], "logprobs": None, **over}
    return chat_body(**fields)


def assembled(pairs: list[tuple[str, dict[str, Any]]]) -> Reply:
    reply = Reply()
    for kind, data in pairs:
        if kind == "partial":
            reply.add(data)
        else:
            reply.final = data
    return reply


@pytest.mark.parametrize("stream", [True, False])
def test_openai_chat_fields_reach_upstream_in_openais_shape(fake: FakeUpstream, stream: bool) -> None:
    body = tool_body(tool_choice={"name": "weather"}, parallel_tool_calls=False, logprobs=2,
                     logit_bias=[[7, 2.5], [15, -100.0]], user="alice@example",
                     response_format={"type": "json_schema", "schema": SCHEMA, "strict": True},
                     tools=[{**WEATHER, "strict": True}, CLOCK])
    run(lambda: one(spec(fake), body, stream))
    [req] = fake.requests()
    sent = req["body"]
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "response", "schema": SCHEMA, "strict": True}}
    assert sent["tools"] == [
        {"type": "function", "function": {"name": "weather", "description": "the weather in a city",
                                          "parameters": WEATHER["parameters"], "strict": True}},
        {"type": "function", "function": {"name": "clock", "parameters": {"type": "object", "properties": {}}}}]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert sent["parallel_tool_calls"] is False
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 2)
    assert sent["logit_bias"] == {"7": 2.5, "15": -100.0}
    assert sent["user"] == "alice@example"
    assert "n" not in sent  # the router fans n out: each upstream call is one choice
    assistant, first, second = sent["messages"][2:5]
    assert assistant == {"role": "assistant", "content": None, "tool_calls": HISTORY[2]["tool_calls"]}
    assert first == {"role": "tool", "content": "rain", "tool_call_id": "call_a"}
    assert second == {"role": "tool", "content": "sun", "tool_call_id": "call_b"}


@pytest.mark.parametrize(("choice", "sent"), [
    ("auto", "auto"), ("none", "none"), ("required", "required"),
    ({"name": "clock"}, {"type": "function", "function": {"name": "clock"}})])
def test_openai_tool_choice(fake: FakeUpstream, choice: Any, sent: Any) -> None:
    run(lambda: one(spec(fake), tool_body(tool_choice=choice, response_format={"type": "json_object"}), False))
    [req] = fake.requests()
    assert req["body"]["tool_choice"] == sent and req["body"]["response_format"] == {"type": "json_object"}
    # true is OpenAI's default; an empty logit_bias and logprobs off are not sent.
    assert not {"parallel_tool_calls", "logit_bias", "logprobs", "top_logprobs", "user"} & set(req["body"])


@pytest.mark.parametrize("stream", [True, False])
def test_openai_tool_calls_come_back_as_the_workers_do(fake: FakeUpstream, stream: bool) -> None:
    calls = [{"name": "weather", "arguments": '{"city": "Oslo"}'}, {"name": "clock", "arguments": "{}"}]
    fake.control(tool_calls=calls, words=0)
    text, final, pairs = run(lambda: one(spec(fake), tool_body(), stream))
    assert text == "" and final["finish_reason"] == "tool_calls"
    reply = assembled(pairs)
    assert reply.calls == {0: {"id": "call_0", "name": "weather", "arguments": '{"city": "Oslo"}'},
                           1: {"id": "call_1", "name": "clock", "arguments": "{}"}}
    if stream:  # the arguments came in two pieces each, the first with the call's id and name
        pieces = [p for _, d in pairs[:-1] for p in d.get("tool_calls", [])]
        assert pieces[0] == {"index": 0, "id": "call_0", "name": "weather", "arguments": '{"city":'}
        assert pieces[1] == {"index": 0, "arguments": ' "Oslo"}'}
        assert len(pieces) == 4


@pytest.mark.parametrize("stream", [True, False])
def test_openai_chat_logprobs_come_back(fake: FakeUpstream, stream: bool) -> None:
    _, _, pairs = run(lambda: one(spec(fake), chat_body(logprobs=2, logit_bias=[]), stream))
    entries = assembled(pairs).logprobs
    assert [e["token"] for e in entries] == ["w0"] + [f" w{i}" for i in range(1, WORDS)]
    assert entries[1] == {"token": " w1", "logprob": -0.1, "bytes": list(b" w1"), "top_logprobs": [
        {"token": "alt0", "logprob": -1.0, "bytes": list(b"alt0")},
        {"token": "alt1", "logprob": -2.0, "bytes": list(b"alt1")}]}


@pytest.mark.parametrize("stream", [True, False])
def test_openai_completion_logprobs_legacy_shape_to_entries(fake: FakeUpstream, stream: bool) -> None:
    text, _, pairs = run(lambda: one(spec(fake), completion_body(logprobs=1, max_tokens=3), stream))
    [req] = fake.requests()
    assert req["body"]["logprobs"] == 1 and "top_logprobs" not in req["body"]
    assert text == "w0 w1 w2"
    assert assembled(pairs).logprobs == [
        {"token": t, "logprob": -i / 10, "bytes": list(t.encode()),
         "top_logprobs": [{"token": "alt0", "logprob": -1.0, "bytes": list(b"alt0")}]}
        for i, t in enumerate(["w0", " w1", " w2"])]


def test_openai_legacy_logprobs_with_nulls() -> None:
    assert upstream_openai.legacy_logprobs({"tokens": ["a", "b"], "token_logprobs": [None, -0.5],
                                            "top_logprobs": [None, {"c": -1.5}], "text_offset": [0, 1]}) == [
        {"token": "a", "logprob": 0.0, "bytes": [97], "top_logprobs": []},
        {"token": "b", "logprob": -0.5, "bytes": [98], "top_logprobs": [{"token": "c", "logprob": -1.5,
                                                                           "bytes": [99]}]}]


@pytest.mark.parametrize("stream", [True, False])
def test_anthropic_tools_and_history_reach_upstream(fake: FakeUpstream, stream: bool) -> None:
    body = tool_body(parallel_tool_calls=False, tool_choice="required", user="alice@example")
    run(lambda: one(spec(fake, "anthropic"), body, stream))
    [req] = fake.requests()
    sent = req["body"]
    assert sent["tools"] == [
        {"name": "weather", "description": "the weather in a city", "input_schema": WEATHER["parameters"]},
        {"name": "clock", "input_schema": {"type": "object", "properties": {}}}]
    assert sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert sent["metadata"] == {"user_id": "alice@example"}
    assert sent["system"] == "be brief"
    assert sent["messages"] == [
        {"role": "user", "content": "weather in Oslo and Rome?"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "call_a", "name": "weather", "input": {"city": "Oslo"}},
            {"type": "tool_use", "id": "call_b", "name": "weather", "input": {"city": "Rome"}}]},
        {"role": "user", "content": [  # the results first, then the user's next words, in one turn
            {"type": "tool_result", "tool_use_id": "call_a", "content": "rain"},
            {"type": "tool_result", "tool_use_id": "call_b", "content": "sun"},
            {"type": "text", "text": "so?"}]}]


@pytest.mark.parametrize(("choice", "parallel", "sent"), [
    ("auto", True, {"type": "auto"}), ("none", False, {"type": "none"}),
    ("required", True, {"type": "any"}), ({"name": "clock"}, False,
                                          {"type": "tool", "name": "clock", "disable_parallel_tool_use": True})])
def test_anthropic_tool_choice(fake: FakeUpstream, choice: Any, parallel: bool, sent: dict[str, Any]) -> None:
    run(lambda: one(spec(fake, "anthropic"), tool_body(tool_choice=choice, parallel_tool_calls=parallel), False))
    [req] = fake.requests()
    # "none" still sends the tools: the history's tool_use blocks need them defined.
    assert req["body"]["tool_choice"] == sent and len(req["body"]["tools"]) == 2


@pytest.mark.parametrize("stream", [True, False])
def test_anthropic_tool_use_comes_back_as_tool_calls(fake: FakeUpstream, stream: bool) -> None:
    fake.control(tool_calls=[{"name": "weather", "arguments": '{"city": "Oslo"}'},
                             {"name": "clock", "arguments": "{}"}], words=2)
    text, final, pairs = run(lambda: one(spec(fake, "anthropic"), tool_body(), stream))
    assert text == "w0 w1" and final["finish_reason"] == "tool_calls"
    reply = assembled(pairs)
    assert {i: {**c, "arguments": json.loads(c["arguments"])} for i, c in reply.calls.items()} == {
        0: {"id": "toolu_0", "name": "weather", "arguments": {"city": "Oslo"}},
        1: {"id": "toolu_1", "name": "clock", "arguments": {}}}
    if stream:
        pieces = [p for _, d in pairs[:-1] for p in d.get("tool_calls", [])]
        assert pieces[0] == {"index": 0, "id": "toolu_0", "name": "weather", "arguments": ""}
        assert "".join(p["arguments"] for p in pieces if p["index"] == 0) == '{"city":"Oslo"}'
        assert pieces[-1] == {"index": 1, "arguments": "{}"}  # no input deltas: still an object


def test_anthropic_stream_tool_use_events() -> None:
    d = anthropic.Decoder()
    assert d.feed({"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_x", "name": "f", "input": {}}}) == \
        ("partial", {"text": "", "tool_calls": [{"index": 0, "id": "toolu_x", "name": "f", "arguments": ""}]})
    assert d.feed({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta",
                                                                         "partial_json": '{"a": 1'}}) == \
        ("partial", {"text": "", "tool_calls": [{"index": 0, "arguments": '{"a": 1'}]})
    assert d.feed({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta",
                                                                         "partial_json": ""}}) is None
    assert d.feed({"type": "content_block_stop", "index": 1}) is None


@pytest.mark.parametrize(("over", "param"), [
    ({"logprobs": 0}, "logprobs"),
    ({"logit_bias": [[5, 1.0]]}, "logit_bias"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "schema": SCHEMA, "strict": True}}, "response_format"),
    ({"seed": 7}, "seed"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": -0.5}, "presence_penalty"),
    ({"tools": [{**WEATHER, "strict": True}], "tool_choice": "auto", "parallel_tool_calls": True},
     "tools[0].function.strict"),
])
def test_anthropic_refuses_what_it_cannot_do(fake: FakeUpstream, over: dict[str, Any], param: str) -> None:
    err = run(lambda: failure(spec(fake, "anthropic"), chat_body(**over)))
    assert err.code == 400 and err.kind == "http_4xx" and not err.trips_breaker
    assert f"'{param}'" in err.message and "anthropic" in err.message
    assert err.retryable_elsewhere  # another model of a chain may honour it
    assert fake.requests() == []


def test_anthropic_refuses_tool_arguments_that_are_not_an_object(fake: FakeUpstream) -> None:
    history = [dict(m) for m in HISTORY]
    history[2] = {**history[2], "tool_calls": [{"id": "call_a", "type": "function",
                                                "function": {"name": "weather", "arguments": "[1, 2]"}}]}
    err = run(lambda: failure(spec(fake, "anthropic"), tool_body(messages=history[:4])))
    assert err.code == 400 and "messages[2].tool_calls[0].function.arguments" in err.message
    assert fake.requests() == []


# -- through the router, with the openai SDK ------------------------------------------


def router_raw(fake: FakeUpstream) -> dict[str, Any]:
    return {
        "providers": {"p": {"kind": "openai", "base_url": fake.url + "/v1"},
                      "c": {"kind": "anthropic", "base_url": fake.url}},
        "remote_models": {"gpt": {"provider": "p", "model": "up-gpt"}, "claude": {"provider": "c"},
                          "claude-then-gpt": {"provider": "c", "fallback": ["gpt"]}},
    }


def via_router(fake: FakeUpstream, use: Callable[[openai.AsyncOpenAI], Awaitable[T]]) -> T:
    async def go() -> T:
        with Router(router_raw(fake)) as rt:
            rt.state.providers["p"] = Provider(ProviderSpec(name="p", kind="openai", base_url=fake.url + "/v1",
                                                            api_key=None, retries=0))
            rt.state.providers["c"] = Provider(ProviderSpec(name="c", kind="anthropic", base_url=fake.url,
                                                            api_key=None, retries=0))
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=rt.app), base_url="http://onebox")
            client = openai.AsyncOpenAI(base_url="http://onebox/v1", api_key="unused", http_client=http,
                                        max_retries=0)
            try:
                return await use(client)
            finally:
                await client.close()
                for p in rt.state.providers.values():
                    await p.aclose()
    return asyncio.run(go())


SDK_TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "weather", "description": "the weather in a city", "parameters": WEATHER["parameters"]}}]


@pytest.mark.parametrize("model", ["gpt", "claude"])
@pytest.mark.parametrize("stream", [True, False])
def test_tool_calls_through_the_router(fake: FakeUpstream, model: str, stream: bool) -> None:
    fake.control(tool_calls=[{"name": "weather", "arguments": '{"city": "Oslo"}'}], words=0)

    async def use(client: openai.AsyncOpenAI) -> tuple[Any, str | None, str | None]:
        messages: list[Any] = [{"role": "user", "content": "weather in Oslo?"}]
        if not stream:
            r = await client.chat.completions.create(model=model, messages=messages, tools=SDK_TOOLS,
                                                     tool_choice="required", max_tokens=50)
            return r.choices[0].message.tool_calls, r.choices[0].message.content, r.choices[0].finish_reason
        async with client.chat.completions.stream(model=model, messages=messages, tools=SDK_TOOLS,
                                                  tool_choice="required", max_tokens=50) as s:
            async for _ in s:
                pass
            done = await s.get_final_completion()
        return done.choices[0].message.tool_calls, done.choices[0].message.content, done.choices[0].finish_reason

    calls, content, finish = via_router(fake, use)
    assert finish == "tool_calls" and not content
    assert calls is not None and len(calls) == 1
    assert calls[0].function.name == "weather" and json.loads(calls[0].function.arguments) == {"city": "Oslo"}
    assert calls[0].id == ("call_0" if model == "gpt" else "toolu_0")
    [req] = fake.requests()
    assert req["body"]["tool_choice"] == ("required" if model == "gpt" else {"type": "any"})


@pytest.mark.parametrize("stream", [True, False])
def test_chat_logprobs_through_the_router(fake: FakeUpstream, stream: bool) -> None:
    async def use(client: openai.AsyncOpenAI) -> list[Any]:
        messages: list[Any] = [{"role": "user", "content": "hi"}]
        if not stream:
            r = await client.chat.completions.create(model="gpt", messages=messages, logprobs=True, top_logprobs=1)
            assert r.choices[0].logprobs is not None and r.choices[0].logprobs.content is not None
            return list(r.choices[0].logprobs.content)
        out: list[Any] = []
        async for chunk in await client.chat.completions.create(model="gpt", messages=messages, logprobs=True,
                                                                top_logprobs=1, stream=True):
            if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
                out.extend(chunk.choices[0].logprobs.content)
        return out

    entries = via_router(fake, use)
    assert [e.token for e in entries] == ["w0"] + [f" w{i}" for i in range(1, WORDS)]
    assert entries[2].logprob == pytest.approx(-0.2) and entries[2].bytes == list(b" w2")
    assert [(t.token, t.logprob) for t in entries[2].top_logprobs] == [("alt0", -1.0)]


@pytest.mark.parametrize("stream", [True, False])
def test_completion_logprobs_through_the_router(fake: FakeUpstream, stream: bool) -> None:
    async def use(client: openai.AsyncOpenAI) -> tuple[str, list[str], list[float], list[Any], list[int]]:
        if not stream:
            r = await client.completions.create(model="gpt", prompt="a b", max_tokens=3, logprobs=1)
            lp = r.choices[0].logprobs
            assert lp is not None
            return (r.choices[0].text, list(lp.tokens or []), list(lp.token_logprobs or []),
                    list(lp.top_logprobs or []), list(lp.text_offset or []))
        text, toks, lps, tops, offsets = "", [], [], [], []
        async for chunk in await client.completions.create(model="gpt", prompt="a b", max_tokens=3, logprobs=1,
                                                           stream=True):
            if chunk.choices:
                text += chunk.choices[0].text
                lp = chunk.choices[0].logprobs
                if lp is not None:
                    toks += lp.tokens or []
                    lps += lp.token_logprobs or []
                    tops += lp.top_logprobs or []
                    offsets += lp.text_offset or []
        return text, toks, lps, tops, offsets

    text, toks, lps, tops, offsets = via_router(fake, use)
    assert text == "w0 w1 w2" and toks == ["w0", " w1", " w2"]
    assert lps == pytest.approx([0.0, -0.1, -0.2]) and tops == [{"alt0": -1.0}] * 3 and offsets == [0, 2, 5]


@pytest.mark.parametrize("stream", [True, False])
def test_anthropic_refusal_is_a_400_through_the_router(fake: FakeUpstream, stream: bool) -> None:
    async def use(client: openai.AsyncOpenAI) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}],
                                                 logprobs=True, stream=stream)
        return info.value

    err = via_router(fake, use)
    assert err.status_code == 400 and "'logprobs'" in err.message and "anthropic" in err.message
    assert fake.requests() == []


def test_a_refusal_falls_back_to_a_model_that_can(fake: FakeUpstream) -> None:
    async def use(client: openai.AsyncOpenAI) -> Any:
        return await client.chat.completions.create(
            model="claude-then-gpt", messages=[{"role": "user", "content": "hi"}], seed=3,
            response_format={"type": "json_object"})

    r = via_router(fake, use)
    assert r.model == "gpt" and r.choices[0].message.content == REPLY
    [req] = fake.requests()  # claude's adapter refused it before sending anything
    assert req["path"] == "/v1/chat/completions" and req["body"]["seed"] == 3
    assert req["body"]["response_format"] == {"type": "json_object"}
