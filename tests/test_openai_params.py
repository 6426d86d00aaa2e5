"""The OpenAI request surface as apps use it (issue 15), the router's side.

Two kinds of test: against the real suite (router + smollm2 worker, one per module),
with the official openai SDK where it fits; and in-process, the real router app over a
stub bus (tests/router_stubs.py), for the worker's new reply fields (logprobs, tool
calls) and for fan-out bookkeeping that the real model cannot show deterministically.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest

from daemons.ledger import open_ledger
from daemons.router import choices
from daemons.router.shape import Reply, Shape
from tests.harness import MODEL_PATH, Suite
from tests.router_stubs import Router, StubCall, StubWorker, asgi_call, chat, spin

CHAT: dict[str, Any] = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}
COUNT = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]


@pytest.fixture
def client(suite: Suite) -> Iterator[openai.OpenAI]:
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(suite.api_socket)), timeout=60)
    with openai.OpenAI(base_url="http://onebox/v1", api_key="unused", http_client=http, max_retries=0) as c:
        yield c


def post(suite: Suite, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    with suite.client() as c:
        return c.post(path, json=body, headers=headers)


def events(text: str) -> list[Any]:
    """The data of each SSE event ([DONE] as a string)."""
    out: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# -- refused: every parameter is honoured or named in a 400 ------------------------------

REFUSED = [
    ("/v1/chat/completions", {**CHAT, "foo": 1}, "foo", "Unrecognized request argument supplied: foo"),
    ("/v1/chat/completions", {**CHAT, "reasoning_effort": "low"}, "reasoning_effort", "Unrecognized request argument"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "colour": "red"}]},
     "messages[0].colour", "Unrecognized request argument supplied: messages[0].colour"),
    ("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0].content[1]", "the model 'smollm2' cannot read images"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "auto"}, "tool_choice", "only allowed when tools"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", "'g'"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "bad name"}}]},
     "tools[0].function.name", None),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs", "logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"x": 1}}, "logit_bias", "token ids"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": -101}}, "logit_bias", "[-100, 100]"),
    ("/v1/chat/completions", {**CHAT, "user": "u" * 257}, "user", None),
    ("/v1/chat/completions", {**CHAT, "store": True}, "store", "does not store"),
    ("/v1/chat/completions", {**CHAT, "service_tier": "flex"}, "service_tier", "flex"),
    ("/v1/chat/completions", {**CHAT, "modalities": ["text", "audio"]}, "modalities", "text only"),
    ("/v1/chat/completions", {**CHAT, "n": 17}, "n", None),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, "response_format.type", None),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "42"}]},
     "messages[0].tool_call_id", "tool_call_id"),
    ("/v1/completions", {"model": "smollm2", "prompt": "x", "max_completion_tokens": 3}, "max_completion_tokens",
     "Unrecognized request argument"),
    ("/v1/completions", {"model": "smollm2", "prompt": [[1, 2, 3]]}, "prompt", "token ids"),
    ("/v1/completions", {"model": "smollm2", "prompt": "x", "echo": True}, "echo", None),
    ("/v1/completions", {"model": "smollm2", "prompt": "x", "best_of": 3}, "best_of", None),
    ("/v1/completions", {"model": "smollm2", "prompt": "x", "suffix": " end"}, "suffix", "suffix"),
    ("/v1/completions", {"model": "smollm2", "prompt": "x", "logprobs": 6}, "logprobs", None),
    ("/v1/completions", {"model": "smollm2", "prompt": ["p"] * 17}, "prompt", "16"),
]


@pytest.mark.parametrize("path,body,param,needle", REFUSED)
def test_refused_with_a_400_naming_the_parameter(suite: Suite, path: str, body: dict[str, Any], param: str,
                                                 needle: str | None) -> None:
    r = post(suite, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    if needle:
        assert needle in err["message"], err
    assert r.headers["X-Request-Id"]


def test_the_sdk_sees_the_unknown_parameter(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2", messages=CHAT["messages"], max_tokens=4,
                                       extra_body={"ignore_eos": True})
    assert caught.value.param == "ignore_eos"
    assert "Unrecognized request argument supplied: ignore_eos" in caught.value.message


def test_accepted_fields_with_their_fixed_meaning(client: openai.OpenAI) -> None:
    """What clients send that onebox honours as OpenAI means it: no 400."""
    resp = client.chat.completions.create(
        model="smollm2", messages=[{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                                   {"role": "user", "content": [{"type": "text", "text": "Say"},
                                                                {"type": "text", "text": " hi."}]}],
        max_tokens=3, temperature=0, store=False, metadata={"app": "test"}, service_tier="auto", modalities=["text"],
        user="someone", seed=1, frequency_penalty=0.1, presence_penalty=0.1, stop=["\n\n"], logprobs=False,
        parallel_tool_calls=True, n=1, extra_body={"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1})
    assert resp.choices[0].message.content is not None
    assert resp.choices[0].message.refusal is None


# -- the rest of the request surface ---------------------------------------------------

def test_max_completion_tokens_wins_over_max_tokens(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="smollm2", messages=COUNT, temperature=0, max_tokens=50,
                                          max_completion_tokens=4)
    assert resp.usage is not None and 0 < resp.usage.completion_tokens <= 4
    assert resp.choices[0].finish_reason == "length"


def test_x_request_id_is_echoed(suite: Suite) -> None:
    r = post(suite, "/v1/chat/completions", CHAT, **{"X-Request-Id": "app-42.trace:7"})
    assert r.status_code == 200 and r.headers["X-Request-Id"] == "app-42.trace:7"
    assert r.json()["id"] != "chatcmpl-app-42.trace:7"  # our own id stays in the body
    with suite.client() as c:
        with c.stream("POST", "/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 2,
                                                       "stream": True}, headers={"X-Request-Id": "stream-1"}) as s:
            assert s.headers["X-Request-Id"] == "stream-1"
            assert events(s.read().decode())[-1] == "[DONE]"
        bad = c.post("/v1/chat/completions", json={**CHAT, "bogus": 1}, headers={"X-Request-Id": "err-1"})
        assert bad.status_code == 400 and bad.headers["X-Request-Id"] == "err-1"
        # Not usable (too long, odd characters): ignored, ours is sent.
        for theirs in ("x" * 129, "has space", "semi;colon"):
            r = c.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": theirs})
            assert r.status_code == 200 and r.headers["X-Request-Id"] == r.json()["id"].removeprefix("chatcmpl-")
    log = suite.log_text("router")
    assert "x-request-id is app-42.trace:7" in log and "x-request-id is stream-1" in log


def _ledger_row(suite: Suite, request_id: str) -> tuple[Any, ...]:
    deadline = time.monotonic() + 10
    while True:
        db = open_ledger(suite.dir / "state" / "ledger.db", readonly=True)
        try:
            rows = db.all("SELECT user, prompt_tokens, completion_tokens, status FROM calls WHERE request_id = ?",
                          (request_id,))
        finally:
            db.close()
        if rows or time.monotonic() > deadline:
            assert len(rows) == 1, rows
            return tuple(rows[0])
        time.sleep(0.2)


def test_user_is_recorded_in_the_ledger(suite: Suite) -> None:
    r = post(suite, "/v1/chat/completions", {**CHAT, "user": "end-user-7"})
    assert r.status_code == 200
    user, prompt, completion, status = _ledger_row(suite, r.headers["X-Request-Id"])
    assert (user, status) == ("end-user-7", 200) and prompt and completion
    r = post(suite, "/v1/completions", {"model": "smollm2", "prompt": "Hi", "max_tokens": 2})
    assert _ledger_row(suite, r.headers["X-Request-Id"])[0] is None


# -- n choices, lists of prompts -----------------------------------------------------

def test_n_choices(client: openai.OpenAI) -> None:
    one = client.chat.completions.create(model="smollm2", messages=COUNT, max_tokens=6, temperature=0)
    resp = client.chat.completions.create(model="smollm2", messages=COUNT, max_tokens=6, temperature=0.8, seed=7,
                                          n=2)
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.message.content for c in resp.choices)
    assert resp.usage is not None and one.usage is not None
    assert resp.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert 2 <= resp.usage.completion_tokens <= 12
    # Choice k samples with seed + k (test_fan_out_bodies_seeds_and_usage); the text of a
    # seeded choice is not compared across requests: a seed is best effort (README).


def test_n_choices_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="smollm2", messages=COUNT, max_tokens=6, temperature=0, n=2,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, list[str]] = {0: [], 1: []}
    for c in chunks:
        for ch in c.choices:
            text[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finishes[ch.index].append(ch.finish_reason)
    assert text[0] and text[0] == text[1]  # greedy: the same text twice
    assert finishes == {0: ["length"], 1: ["length"]}
    usage = [c for c in chunks if c.usage is not None]
    assert len(usage) == 1 and chunks[-1] is usage[0] and chunks[-1].choices == []
    assert usage[0].usage is not None and usage[0].usage.completion_tokens == 12


def test_a_list_of_prompts(client: openai.OpenAI) -> None:
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    singles = [client.completions.create(model="smollm2", prompt=p, max_tokens=4, temperature=0).choices[0].text
               for p in prompts]
    resp = client.completions.create(model="smollm2", prompt=prompts, max_tokens=4, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1]
    assert [c.text for c in resp.choices] == singles
    # With n: index = prompt_index * n + choice.
    both = client.completions.create(model="smollm2", prompt=prompts, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [singles[0], singles[0], singles[1], singles[1]]
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model="smollm2", prompt=prompts, max_tokens=4, temperature=0,
                                           stream=True):
        for ch in chunk.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert streamed == {0: singles[0], 1: singles[1]}


def test_a_client_gone_mid_stream_cancels_every_choice(suite: Suite) -> None:
    body = {"model": "smollm2", "prompt": "1, 2, 3, 4,", "max_tokens": 1500, "temperature": 0, "stream": True,
            "n": 2}
    with suite.client() as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(lines)
            call_id = json.loads(first[6:])["id"].removeprefix("cmpl-")
            next(lines)
    deadline = time.monotonic() + 10
    wanted = [f"request {call_id} cancelled", f"request {call_id}-1 cancelled"]
    while time.monotonic() < deadline and not all(w in suite.log_text("infer@smollm2") for w in wanted):
        time.sleep(0.1)
    log = suite.log_text("infer@smollm2")
    assert all(w in log for w in wanted), wanted


# -- with the worker side (daemons/infer) ---------------------------------------------

def test_logit_bias_bans_the_greedy_first_token(suite: Suite) -> None:
    import llama_cpp

    from daemons import models
    body = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}
    first = post(suite, "/v1/completions", body).json()["choices"][0]["text"]
    assert first
    vocab = llama_cpp.Llama(str(models.resolve(MODEL_PATH, Path("/nonexistent"))), vocab_only=True, verbose=False)
    token = vocab.tokenize(first.encode(), add_bos=False, special=False)[0]
    banned = post(suite, "/v1/completions", {**body, "logit_bias": {str(token): -100}}).json()["choices"][0]["text"]
    assert banned != first


class Person(pydantic.BaseModel):
    name: str
    age: int


WEATHER_TOOL: list[Any] = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_structured_output_logprobs_and_tools_end_to_end(client: openai.OpenAI) -> None:
    parsed = client.chat.completions.parse(
        model="smollm2", messages=[{"role": "user", "content": "Ada is 36 years old. Describe her as JSON."}],
        response_format=Person, max_tokens=60, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Person)
    lp = client.chat.completions.create(model="smollm2", messages=CHAT["messages"], max_tokens=3, temperature=0,
                                        logprobs=True, top_logprobs=2).choices[0].logprobs
    assert lp is not None and lp.content is not None and len(lp.content) == 3
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp.content)
    with client.chat.completions.stream(model="smollm2", messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                        tools=WEATHER_TOOL, tool_choice="required", max_tokens=60,
                                        temperature=0) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert final.choices[0].finish_reason == "tool_calls" and calls
    assert all(c.function.name == "get_weather" and "city" in json.loads(c.function.arguments)
               for c in calls)


# -- in-process: shaping the worker's replies, fan-out bookkeeping -------------------

def _stub(replies: list[list[tuple[str, dict[str, Any]]]] | None = None) -> Router:
    """A router over a stub worker of model `m` answering with `replies`, one per call
    (then a one-word reply)."""
    rt = Router({"models": {"m": {"path": MODEL_PATH}}})
    rt.broker.workers["infer/m"] = [StubWorker(capacity=16)]
    script = list(replies or [])

    def handler(body: dict[str, Any]) -> StubCall:
        return StubCall(script.pop(0) if script else [("partial", {"text": "hi"}), ("final", {
            "finish_reason": "stop", "usage": {"prompt_tokens": 5, "completion_tokens": 1}})])
    rt.broker.handlers["infer/m"] = handler
    return rt


TOOL_PARTIALS: list[tuple[str, dict[str, Any]]] = [
    ("partial", {"tool_calls": [{"index": 0, "id": "call_a", "name": "get_weather", "arguments": "{\"city\": "}]}),
    ("partial", {"tool_calls": [{"index": 0, "arguments": "\"Oslo\"}"}]}),
    ("partial", {"tool_calls": [{"index": 1, "id": "call_b", "name": "get_time", "arguments": "{}"}]}),
    ("final", {"finish_reason": "tool_calls", "usage": {"prompt_tokens": 30, "completion_tokens": 12}}),
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time"}}]


def test_tool_calls_are_shaped_as_openai() -> None:
    async def run() -> None:
        with _stub(replies=[TOOL_PARTIALS, TOOL_PARTIALS]) as rt:
            ex = await asgi_call(rt.app, "POST", "/v1/chat/completions", chat("m", tools=TOOLS))
            assert ex.status == 200, ex.body
            body = rt.broker.calls[0][1]
            assert body["tools"][0] == {"name": "get_weather", "description": "", "strict": False,
                                        "parameters": TOOLS[0]["function"]["parameters"]}  # type: ignore[index]
            assert body["tool_choice"] == "auto" and body["parallel_tool_calls"] is True
            choice = ex.json()["choices"][0]
            assert choice["finish_reason"] == "tool_calls"
            assert choice["message"]["content"] is None
            assert choice["message"]["tool_calls"] == [
                {"id": "call_a", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": "{\"city\": \"Oslo\"}"}},
                {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]
            ex = await asgi_call(rt.app, "POST", "/v1/chat/completions", chat("m", tools=TOOLS, stream=True))
            deltas = [e["choices"][0]["delta"] for e in events(ex.body.decode())[:-1]]
            calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
            assert calls == [
                [{"index": 0, "id": "call_a", "type": "function",
                  "function": {"name": "get_weather", "arguments": "{\"city\": "}}],
                [{"index": 0, "function": {"arguments": "\"Oslo\"}"}}],
                [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]]
            assert events(ex.body.decode())[-2]["choices"][0]["finish_reason"] == "tool_calls"
    asyncio.run(run())


def test_the_sdk_assembles_streamed_tool_calls() -> None:
    """The openai SDK's own stream helper over the router's chunks."""
    async def run() -> list[Any]:
        with _stub(replies=[TOOL_PARTIALS]) as rt:
            transport = httpx.ASGITransport(app=rt.app)
            async with openai.AsyncOpenAI(base_url="http://onebox/v1", api_key="x", max_retries=0,
                                          http_client=httpx.AsyncClient(transport=transport)) as client:
                async with client.chat.completions.stream(
                        model="m", messages=[{"role": "user", "content": "weather?"}],
                        tools=TOOLS) as stream:  # type: ignore[arg-type]
                    final = await stream.get_final_completion()
            return list(final.choices[0].message.tool_calls or [])
    calls = asyncio.run(run())
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("call_a", "get_weather", "{\"city\": \"Oslo\"}"), ("call_b", "get_time", "{}")]


# The SDK warns while it serialises its own parsed message (its `parsed` field is typed None).
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")
def test_the_sdk_sends_its_replies_back_in_the_history() -> None:
    """A client that appends the SDK's message objects (a tool call, a parsed reply) to
    its messages, as the SDK's docs do, sends fields of the earlier reply: accepted."""
    json_reply: list[tuple[str, dict[str, Any]]] = [("partial", {"text": "{\"name\": \"Ada\", \"age\": 36}"}),
                                                    ("final", {"finish_reason": "stop", "usage": {}})]

    async def run() -> list[Any]:
        with _stub(replies=[TOOL_PARTIALS, json_reply]) as rt:
            transport = httpx.ASGITransport(app=rt.app)
            async with openai.AsyncOpenAI(base_url="http://onebox/v1", api_key="x", max_retries=0,
                                          http_client=httpx.AsyncClient(transport=transport)) as client:
                ask: list[Any] = [{"role": "user", "content": "weather?"}]
                first = await client.chat.completions.create(model="m", messages=ask, tools=TOOLS)  # type: ignore[arg-type]
                second = await client.chat.completions.parse(model="m", messages=ask, response_format=Person)
                assert second.choices[0].message.parsed == Person(name="Ada", age=36)
                history = [*ask, first.choices[0].message, second.choices[0].message,
                           {"role": "tool", "tool_call_id": "call_a", "content": "sunny"}]
                await client.chat.completions.create(model="m", messages=history, tools=TOOLS)  # type: ignore[arg-type]
            return list(rt.broker.calls[2][1]["messages"])
    messages = asyncio.run(run())
    assert [m["role"] for m in messages] == ["user", "assistant", "assistant", "tool"]
    assert messages[1]["content"] == "" and [c["id"] for c in messages[1]["tool_calls"]] == ["call_a", "call_b"]
    assert messages[2] == {"role": "assistant", "content": "{\"name\": \"Ada\", \"age\": 36}"}


LOGPROBS = [
    ("partial", {"text": "Hel", "logprobs": [{"token": "Hel", "logprob": -0.5, "bytes": [72, 101, 108],
                                              "top_logprobs": [{"token": "Hel", "logprob": -0.5, "bytes": [72, 101, 108]},
                                                               {"token": "Hi", "logprob": -1.5}]}]}),
    ("partial", {"text": "lo", "logprobs": [{"token": "lo", "logprob": -0.1, "top_logprobs": []}]}),
    ("final", {"finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}),
]


def test_logprobs_are_shaped_as_openai() -> None:
    async def run() -> None:
        with _stub(replies=[LOGPROBS, LOGPROBS, LOGPROBS, [("final", {"finish_reason": "stop", "usage": {}})]]) as rt:
            ex = await asgi_call(rt.app, "POST", "/v1/chat/completions", chat("m", logprobs=True, top_logprobs=2))
            assert rt.broker.calls[0][1]["logprobs"] == 2
            lp = ex.json()["choices"][0]["logprobs"]
            assert lp["refusal"] is None
            assert [e["token"] for e in lp["content"]] == ["Hel", "lo"]
            assert lp["content"][0]["top_logprobs"][1] == {"token": "Hi", "logprob": -1.5, "bytes": [72, 105]}
            assert lp["content"][1]["bytes"] == [108, 111]
            ex = await asgi_call(rt.app, "POST", "/v1/chat/completions", chat("m", logprobs=True, stream=True))
            assert rt.broker.calls[1][1]["logprobs"] == 0
            streamed = [e["choices"][0]["logprobs"] for e in events(ex.body.decode())[:-1]]
            assert [[x["token"] for x in s["content"]] for s in streamed if s] == [["Hel"], ["lo"]]
            ex = await asgi_call(rt.app, "POST", "/v1/completions", {"model": "m", "prompt": "x", "logprobs": 1})
            assert ex.json()["choices"][0]["logprobs"] == {
                "tokens": ["Hel", "lo"], "token_logprobs": [-0.5, -0.1], "top_logprobs": [{"Hel": -0.5, "Hi": -1.5}, {}],
                "text_offset": [0, 3]}
            ex = await asgi_call(rt.app, "POST", "/v1/chat/completions", chat("m"))
            assert rt.broker.calls[3][1]["logprobs"] is None and ex.json()["choices"][0]["logprobs"] is None
    asyncio.run(run())


def test_the_bus_body() -> None:
    async def run() -> None:
        with _stub() as rt:
            request = chat("m", max_tokens=9, logit_bias={"17": -100, "3": 2.5}, user="u", response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True}},
                tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
                parallel_tool_calls=False)
            request["messages"] = [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "noon"}]
            ex = await asgi_call(rt.app, "POST", "/v1/chat/completions", request, headers={"X-Request-Id": "t-1"})
            assert ex.status == 200, ex.body
            body = rt.broker.calls[0][1]
            assert body["messages"] == [
                {"role": "user", "content": "ab"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
                {"role": "tool", "content": "noon", "tool_call_id": "c1"}]
            assert body["logit_bias"] == [[3, 2.5], [17, -100.0]] and body["user"] == "u"
            assert body["response_format"] == {"type": "json_schema", "schema": {"type": "object"}, "strict": True}
            assert body["tool_choice"] == {"name": "get_time"} and body["parallel_tool_calls"] is False
            assert body["client_request_id"] == "t-1" and body["max_tokens"] == 9
            await asgi_call(rt.app, "POST", "/v1/chat/completions",
                            chat("m", response_format={"type": "json_object"}))
            assert rt.broker.calls[1][1]["response_format"] == {"type": "json_object"}
            assert "tools" not in rt.broker.calls[1][1] and "client_request_id" not in rt.broker.calls[1][1]
            await asgi_call(rt.app, "POST", "/v1/chat/completions", chat("m", response_format={"type": "text"}))
            assert "response_format" not in rt.broker.calls[2][1]
    asyncio.run(run())


def test_fan_out_bodies_seeds_and_usage() -> None:
    calls = choices.bodies({"kind": "completion", "prompt": "a", "seed": 2**63 - 1}, ["a", "b"], 2)
    assert [(c["prompt"], c["seed"]) for c in calls] == [("a", 2**63 - 1), ("a", 0), ("b", 2**63 - 1), ("b", 0)]
    assert [c.get("seed") for c in choices.bodies({"seed": None}, None, 3)] == [None, None, None]
    finals = [{"usage": {"prompt_tokens": p, "completion_tokens": c, "cached_tokens": k}}
              for p, c, k in ((10, 4, 0), (10, 5, 10), (7, 3, 0), (7, 2, 7))]
    assert choices.usage(finals, 2) == {"prompt_tokens": 17, "completion_tokens": 14, "cached_tokens": 0}


def test_fan_out_reserves_for_every_choice_and_writes_one_row() -> None:
    async def reserved(n: int) -> tuple[float, Any, int]:
        raw = {"models": {"m": {"path": MODEL_PATH, "prompt_price_per_1k": 1.0, "completion_price_per_1k": 1.0}},
               "principals": {"alice": {"budget": 100.0, "budget_period": "day"}}}
        with Router(raw) as rt:
            rt.broker.workers["infer/m"] = [StubWorker(capacity=16)]
            rt.broker.handlers["infer/m"] = lambda body: StubCall([("partial", {"text": "x"}), ("final", {
                "finish_reason": "stop", "usage": {"prompt_tokens": 5, "completion_tokens": 1}})], delay_s=0.05)
            task = asyncio.ensure_future(asgi_call(rt.app, "POST", "/v1/chat/completions", chat("m", max_tokens=8, n=n)))
            await asyncio.sleep(0.02)
            held = rt.limits()["reserved"]
            ex = await task
            await spin()
            assert ex.status == 200 and len(ex.json()["choices"]) == n
            assert rt.ledger_rows() == 1 and len(rt.broker.calls) == n
            return held, ex.json()["usage"], rt.limits()["concurrent"]
    one, usage1, _ = asyncio.run(reserved(1))
    three, usage3, concurrent = asyncio.run(reserved(3))
    assert one > 0 and three == pytest.approx(3 * one)
    assert usage3 == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8} and concurrent == 0
    assert usage1["completion_tokens"] == 1


def test_one_failing_choice_fails_the_call_and_cancels_the_others() -> None:
    from daemons.bus.errors import BusError

    class Failing(StubCall):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            yield ("partial", {"text": "a"})
            await asyncio.sleep(0.01)
            raise BusError("the engine broke", 500)

    async def run() -> None:
        with _stub() as rt:
            made: list[StubCall] = []

            def handler(body: dict[str, Any]) -> StubCall:
                made.append(Failing([]) if len(made) == 1 else StubCall(
                    [("partial", {"text": "x"})] + [("partial", {"text": "y"})] * 50 + [("final", {})], delay_s=0.01))
                return made[-1]
            rt.broker.handlers["infer/m"] = handler
            ex = await asgi_call(rt.app, "POST", "/v1/chat/completions", chat("m", n=3))
            await spin()
            assert ex.status == 500 and "the engine broke" in ex.json()["error"]["message"], ex.body
            assert all(c.closed for c in made) and rt.in_flight("m") == 0 and rt.limits()["concurrent"] == 0
            made.clear()
            ex = await asgi_call(rt.app, "POST", "/v1/chat/completions", chat("m", n=3, stream=True))
            await spin()
            last = events(ex.body.decode())[-1]
            assert "the engine broke" in last["error"]["message"]
            assert all(c.closed for c in made) and rt.in_flight("m") == 0
    asyncio.run(run())


def test_shape_without_the_app() -> None:
    shape = Shape("m", "id", chat=True)
    reply = Reply()
    reply.add({"text": "Hi "})
    reply.add({"text": "there", "tool_calls": [{"index": 0, "name": "f", "arguments": "{}"}]})
    choice = shape.choice(0, reply)
    assert choice["message"]["content"] == "Hi there" and choice["message"]["tool_calls"][0]["id"].startswith("call_")
    spaced = Reply()
    spaced.add({"text": "\n", "tool_calls": [{"index": 0, "id": "c", "name": "f", "arguments": "{}"}]})
    assert shape.choice(0, spaced)["message"]["content"] is None  # whitespace around calls is no content
    assert shape.partial_chunk(0, {}) is None
    assert shape.partial_chunk(2, {"text": "x"})["choices"][0]["index"] == 2  # type: ignore[index]
