"""Real clients against the real suite (issue 15, item 6): the official `openai` SDK's
async client for each part of the request surface, and LiteLLM's SDK (`openai/<model>`
with `api_base`, over TCP with an API key) as apps use it.

The sync client's side is in tests/test_openai_params.py; what is there is not repeated
here. One suite (router + smollm2 worker, TCP listener) for the whole module. Outputs are
checked as an app would check them: JSON parsed and validated by a pydantic model made
from the same schema (strict, extra fields forbidden, string lengths bounded).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import openai
import pydantic
import pytest

from openai.lib.streaming.chat import ChatCompletionStreamState

from tests.harness import MODEL_PATH, Suite, running_suite, write_config

# LiteLLM reads this when imported: its bundled cost map, not one fetched from the network.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

T = TypeVar("T")
MODEL = "smollm2"
HELLO: list[Any] = [{"role": "user", "content": "Say hello."}]
COUNT: list[Any] = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Box:
    suite: Suite
    base_url: str  # over TCP: http://127.0.0.1:PORT/v1
    key: str

    def run(self, fn: Callable[[openai.AsyncOpenAI], Awaitable[T]], tcp: bool = False, key: str | None = None) -> T:
        """`fn` with an AsyncOpenAI client in a loop of its own: on the Unix socket (as the
        README shows), or over TCP with an API key."""
        async def main() -> T:
            if tcp:
                http = httpx.AsyncClient(timeout=60)
                url, api_key = self.base_url, key or self.key
            else:
                http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(self.suite.api_socket)),
                                         timeout=60)
                url, api_key = "http://onebox/v1", "unused"
            async with openai.AsyncOpenAI(base_url=url, api_key=api_key, http_client=http, max_retries=0) as c:
                return await fn(c)
        return asyncio.run(main())


@pytest.fixture(scope="module")
def box() -> Iterator[Box]:
    port = free_port()
    # Short path: Unix socket paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="onebox-") as d:
        config = write_config(Path(d), extra=f'[router]\ntcp = "127.0.0.1:{port}"\n')
        with running_suite(Path(d), config) as suite:
            with suite.client() as c:  # the router's own user on the socket: an admin
                made = c.post("/v1/keys", json={"principal": "clients", "name": "test_clients"})
            assert made.status_code == 200, made.text
            yield Box(suite, f"http://127.0.0.1:{port}/v1", made.json()["key"])


# -- schemas, and the pydantic models that check output against them -------------------

class Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)


class Person(Strict):
    name: str = pydantic.Field(max_length=20)
    age: int


PERSON_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["name", "age"],
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}}}
PERSON_FORMAT: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA,
                                                             "strict": True}}
ADA: list[Any] = [{"role": "user", "content": "Ada is 36 years old. Give her name and age as JSON."}]


class Weather(Strict):
    city: str = pydantic.Field(max_length=30)


class Clock(Strict):
    timezone: Literal["UTC", "CET", "PST"]


TOOLS: list[Any] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                       "properties": {"city": {"type": "string", "maxLength": 30}}}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The time now in a timezone",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["timezone"],
                       "properties": {"timezone": {"type": "string", "enum": ["UTC", "CET", "PST"]}}}}}]
ARGS: dict[str, type[Strict]] = {"get_weather": Weather, "get_time": Clock}
OSLO: list[Any] = [{"role": "user", "content": "What is the weather in Oslo?"}]
NAMED: Any = {"type": "function", "function": {"name": "get_time"}}


def check_calls(calls: list[Any] | None, only: str | None = None) -> list[tuple[str, Strict]]:
    """Each call well formed, to a declared tool, with arguments valid for its schema."""
    assert calls, "no tool_calls"
    out = []
    for call in calls:
        assert call.id and call.type == "function", call
        assert call.function.name in ARGS and (only is None or call.function.name == only), call
        out.append((call.function.name, ARGS[call.function.name].model_validate_json(call.function.arguments)))
    return out


# -- the openai SDK, async: structured outputs ------------------------------------------

def test_json_object(box: Box) -> None:
    async def go(c: openai.AsyncOpenAI) -> None:
        r = await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Describe a cat in JSON with keys name and colour."}],
            response_format={"type": "json_object"}, max_tokens=80, temperature=0)
        assert r.choices[0].finish_reason == "stop", r.choices[0]
        assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    box.run(go)


def test_json_schema_strict_streamed_and_not(box: Box) -> None:
    async def go(c: openai.AsyncOpenAI) -> None:
        r = await c.chat.completions.create(model=MODEL, messages=ADA, response_format=PERSON_FORMAT, max_tokens=60,
                                            temperature=0)
        assert r.choices[0].finish_reason == "stop", r.choices[0]
        Person.model_validate_json(r.choices[0].message.content or "")
        text, finish = "", None
        async for chunk in await c.chat.completions.create(model=MODEL, messages=ADA, response_format=PERSON_FORMAT,
                                                           max_tokens=60, temperature=0, stream=True):
            for ch in chunk.choices:
                text += ch.delta.content or ""
                finish = ch.finish_reason or finish
        assert finish == "stop", text
        Person.model_validate_json(text)
    box.run(go)


def test_parse_with_a_pydantic_model(box: Box) -> None:
    # beta.chat.completions is the name the issue (and older SDKs) use; newer ones have
    # chat.completions.parse too (the sync test uses that).
    async def go(c: openai.AsyncOpenAI) -> None:
        beta = getattr(getattr(c, "beta", None), "chat", None)
        completions = beta.completions if beta is not None else c.chat.completions
        r = await completions.parse(model=MODEL, messages=ADA, response_format=Person, max_tokens=60, temperature=0)
        assert r.choices[0].finish_reason == "stop", r.choices[0]
        assert isinstance(r.choices[0].message.parsed, Person)
        # pydantic tools: the SDK parses each call's arguments into its model.
        r2 = await completions.parse(model=MODEL, messages=OSLO, tools=[openai.pydantic_function_tool(Weather)],
                                     tool_choice="required", max_tokens=40, temperature=0)
        assert r2.choices[0].finish_reason == "tool_calls"
        calls = r2.choices[0].message.tool_calls or []
        assert calls and all(isinstance(call.function.parsed_arguments, Weather) for call in calls)
    box.run(go)


# -- tool calls ---------------------------------------------------------------------

def test_tool_calls_required_and_named(box: Box) -> None:
    async def go(c: openai.AsyncOpenAI) -> None:
        r = await c.chat.completions.create(model=MODEL, messages=OSLO, tools=TOOLS, tool_choice="required",
                                            max_tokens=60, temperature=0)
        assert r.choices[0].finish_reason == "tool_calls"
        check_calls(r.choices[0].message.tool_calls)
        r = await c.chat.completions.create(model=MODEL, messages=OSLO, tools=TOOLS, tool_choice=NAMED,
                                            parallel_tool_calls=False, max_tokens=60, temperature=0)
        assert r.choices[0].finish_reason == "tool_calls"
        assert len(check_calls(r.choices[0].message.tool_calls, only="get_time")) == 1
    box.run(go)


def test_streamed_tool_calls_by_the_sdk_helper_and_by_hand(box: Box) -> None:
    ask: dict[str, Any] = dict(model=MODEL, messages=OSLO, tools=TOOLS, tool_choice="required", max_tokens=60,
                               temperature=0)

    async def go(c: openai.AsyncOpenAI) -> None:
        done: list[str] = []
        async with c.chat.completions.stream(**ask) as stream:
            async for event in stream:
                if event.type == "tool_calls.function.arguments.done":
                    done.append(event.name)
            final = await stream.get_final_completion()
        assert final.choices[0].finish_reason == "tool_calls"
        assert done == [name for name, _ in check_calls(final.choices[0].message.tool_calls)]
        # By hand, as OpenAI streams them: id, type and name in a call's first delta only;
        # and the same chunks through the SDK helper's own accumulator.
        state: ChatCompletionStreamState[None] = ChatCompletionStreamState(input_tools=TOOLS)
        calls: dict[int, dict[str, str]] = {}
        finish = None
        async for chunk in await c.chat.completions.create(**{**ask, "tool_choice": NAMED}, stream=True):
            state.handle_chunk(chunk)
            for ch in chunk.choices:
                finish = ch.finish_reason or finish
                for d in ch.delta.tool_calls or []:
                    if d.index not in calls:
                        assert d.id and d.type == "function" and d.function and d.function.name, d
                        calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                    else:
                        assert d.id is None and (d.function is None or d.function.name is None), d
                    calls[d.index]["arguments"] += (d.function.arguments or "") if d.function else ""
        assert finish == "tool_calls" and sorted(calls) == list(range(len(calls)))
        assert [(call["name"], ARGS[call["name"]].model_validate_json(call["arguments"]))
                for _, call in sorted(calls.items())] == check_calls(
            state.get_final_completion().choices[0].message.tool_calls, only="get_time")
        assert [call["id"] for _, call in sorted(calls.items())] == [
            call.id for call in state.get_final_completion().choices[0].message.tool_calls or []]
    box.run(go)


def test_a_second_turn_with_the_tool_result(box: Box) -> None:
    async def go(c: openai.AsyncOpenAI) -> None:
        first = await c.chat.completions.create(model=MODEL, messages=OSLO, tools=TOOLS, tool_choice="required",
                                                parallel_tool_calls=False, max_tokens=60, temperature=0)
        message = first.choices[0].message
        check_calls(message.tool_calls)
        assert message.tool_calls
        history: list[Any] = [*OSLO, message]  # the SDK's own message object, as its docs do
        without = await c.chat.completions.create(model=MODEL, messages=history + [
            {"role": "user", "content": "Go on."}], tools=TOOLS, tool_choice="none", max_tokens=1, temperature=0)
        history.append({"role": "tool", "tool_call_id": message.tool_calls[0].id,
                        "content": json.dumps({"city": "Oslo", "sky": "sunny", "celsius": 21})})
        r = await c.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                            max_tokens=24, temperature=0)
        assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
        assert r.choices[0].finish_reason in ("stop", "length")
        # The tool's result reached the model's prompt.
        assert r.usage is not None and without.usage is not None
        assert r.usage.prompt_tokens > without.usage.prompt_tokens + 10
    box.run(go)


# -- logprobs, n, and the rest of the request surface ---------------------------------

def test_logprobs_streamed_and_not(box: Box) -> None:
    ask: dict[str, Any] = dict(model=MODEL, messages=COUNT, max_tokens=4, temperature=0, logprobs=True,
                               top_logprobs=2)

    async def go(c: openai.AsyncOpenAI) -> None:
        r = await c.chat.completions.create(**ask)
        lp = r.choices[0].logprobs
        assert lp is not None and lp.content is not None and r.usage is not None
        assert len(lp.content) == r.usage.completion_tokens
        assert "".join(t.token for t in lp.content) == r.choices[0].message.content
        for t in lp.content:
            assert isinstance(t.token, str) and isinstance(t.logprob, float) and t.logprob <= 0
            assert t.bytes is not None and bytes(t.bytes).decode() == t.token
            assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
            assert all(top.bytes is not None and bytes(top.bytes).decode(errors="replace") for top in t.top_logprobs)
            # Greedy: the token chosen is the likeliest one.
            assert (t.top_logprobs[0].token, t.top_logprobs[0].logprob) == (t.token, pytest.approx(t.logprob))
        streamed: list[Any] = []
        text = ""
        async for chunk in await c.chat.completions.create(**ask, stream=True):
            for ch in chunk.choices:
                text += ch.delta.content or ""
                if ch.logprobs and ch.logprobs.content:
                    streamed += ch.logprobs.content
        # Each chunk's tokens, in the same shape. (Not compared with the reply above: a
        # prompt's logits vary a little with where its KV cells lie: README, seed.)
        assert len(streamed) == 4 and "".join(t.token for t in streamed) == text
        for t in streamed:
            assert t.bytes is not None and bytes(t.bytes).decode() == t.token and t.logprob <= 0
            assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
    box.run(go)


def test_n_two_choices(box: Box) -> None:
    async def go(c: openai.AsyncOpenAI) -> None:
        r = await c.chat.completions.create(model=MODEL, messages=COUNT, n=2, max_tokens=5, temperature=0.9, seed=3)
        assert [ch.index for ch in r.choices] == [0, 1]
        assert all(ch.message.content and ch.finish_reason == "length" for ch in r.choices)
        assert r.usage is not None and r.usage.completion_tokens == 10
    box.run(go)


def test_max_completion_tokens_wins_streamed(box: Box) -> None:
    async def go(c: openai.AsyncOpenAI) -> None:
        usage = None
        async for chunk in await c.chat.completions.create(
                model=MODEL, messages=COUNT, max_tokens=40, max_completion_tokens=3, temperature=0, stream=True,
                stream_options={"include_usage": True}):
            usage = chunk.usage or usage
        assert usage is not None and 0 < usage.completion_tokens <= 3
    box.run(go)


def test_stop_streamed_and_not(box: Box) -> None:
    async def go(c: openai.AsyncOpenAI) -> None:
        free = await c.chat.completions.create(model=MODEL, messages=COUNT, max_tokens=24, temperature=0)
        text = free.choices[0].message.content or ""
        assert len(text) > 10, text
        stop = text[len(text) // 2:][:2]
        want = text[:text.index(stop)]
        stops = ["@@@", "<never>", stop, "###"]  # up to 4
        r = await c.chat.completions.create(model=MODEL, messages=COUNT, max_tokens=24, temperature=0, stop=stops)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, "stop")
        got, finish = "", None
        async for chunk in await c.chat.completions.create(model=MODEL, messages=COUNT, max_tokens=24,
                                                           temperature=0, stop=stops, stream=True):
            for ch in chunk.choices:
                got += ch.delta.content or ""
                finish = ch.finish_reason or finish
        assert (got, finish) == (want, "stop")
    box.run(go)


def test_logit_bias(box: Box) -> None:
    import llama_cpp

    from daemons import models
    vocab = llama_cpp.Llama(str(models.resolve(MODEL_PATH, Path("/nonexistent"))), vocab_only=True, verbose=False)
    ask: dict[str, Any] = dict(model=MODEL, messages=HELLO, max_tokens=1, temperature=0)

    async def go(c: openai.AsyncOpenAI) -> None:
        first = (await c.chat.completions.create(**ask)).choices[0].message.content or ""
        token = vocab.tokenize(first.encode(), add_bos=False, special=False)
        assert len(token) == 1, (first, token)
        banned = await c.chat.completions.create(**ask, logit_bias={str(token[0]): -100})
        assert banned.choices[0].message.content != first
        banana = vocab.tokenize(b" banana", add_bos=False, special=False)[-1]
        boosted = await c.chat.completions.create(**{**ask, "max_tokens": 2}, logit_bias={str(banana): 100})
        assert boosted.choices[0].message.content == vocab.detokenize([banana, banana]).decode()
    box.run(go)


def test_refused_parameters_are_bad_requests(box: Box) -> None:
    async def go(c: openai.AsyncOpenAI) -> None:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as caught:
                await c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, stream=stream,
                                                extra_body={"guided_regex": "[a-z]+"})
            assert caught.value.param == "guided_regex"
            assert "Unrecognized request argument supplied: guided_regex" in caught.value.message
        with pytest.raises(openai.BadRequestError) as caught:
            await c.chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
        assert caught.value.param == "messages[0].content[1]" and "cannot read images" in caught.value.message
    box.run(go)


def test_the_sdk_over_tcp_with_a_key(box: Box) -> None:
    async def go(c: openai.AsyncOpenAI) -> str | None:
        return (await c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)).choices[0].message.content

    assert box.run(go, tcp=True)
    with pytest.raises(openai.AuthenticationError):
        box.run(go, tcp=True, key="ob-00000000-not-a-key")


# -- LiteLLM's SDK ------------------------------------------------------------------

@pytest.fixture(scope="module")
def litellm(box: Box) -> Any:
    import litellm as lite
    lite.suppress_debug_info = True  # no "Give Feedback / Get Help" banners
    lite.telemetry = False  # older versions phone home unless told not to; harmless on newer ones
    lite.success_callback, lite.failure_callback, lite.callbacks = [], [], []
    return lite


def lite_args(box: Box, **kw: Any) -> dict[str, Any]:
    return {"model": f"openai/{MODEL}", "api_base": box.base_url, "api_key": box.key, "temperature": 0, **kw}


def test_litellm_chat_and_stream(box: Box, litellm: Any) -> None:
    r = litellm.completion(**lite_args(box, messages=COUNT, max_tokens=8))
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    chunks = list(litellm.completion(**lite_args(box, messages=COUNT, max_tokens=8, stream=True)))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["length"]
    assert litellm.stream_chunk_builder(chunks).choices[0].message.content


def test_litellm_json_mode(box: Box, litellm: Any) -> None:
    r = litellm.completion(**lite_args(box, messages=ADA, max_tokens=60, response_format={"type": "json_object"}))
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    r = litellm.completion(**lite_args(box, messages=ADA, max_tokens=60, response_format=PERSON_FORMAT))
    assert r.choices[0].finish_reason == "stop"
    Person.model_validate_json(r.choices[0].message.content)


def test_litellm_tools(box: Box, litellm: Any) -> None:
    r = litellm.completion(**lite_args(box, messages=OSLO, max_tokens=60, tools=TOOLS, tool_choice="required"))
    assert r.choices[0].finish_reason == "tool_calls"
    check_calls(r.choices[0].message.tool_calls)
    # Streamed, and put back together by LiteLLM's own chunk builder.
    chunks = list(litellm.completion(**lite_args(box, messages=OSLO, max_tokens=60, tools=TOOLS,
                                                 tool_choice=NAMED, stream=True)))
    rebuilt = litellm.stream_chunk_builder(chunks)
    assert rebuilt.choices[0].finish_reason == "tool_calls"
    check_calls(rebuilt.choices[0].message.tool_calls, only="get_time")


def test_litellm_acompletion(box: Box, litellm: Any) -> None:
    async def go() -> Any:
        return await litellm.acompletion(**lite_args(box, messages=HELLO, max_tokens=4))
    r = asyncio.run(go())
    assert r.choices[0].message.content and r.usage.completion_tokens <= 4
