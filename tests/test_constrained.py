"""The batch engine's constrained output, in process with the real model: JSON from
response_format (json_object and json_schema), tool calls (required and named, with
arguments matching the tool's schema), logprobs computed from the logits the sampler
used, and logit_bias — each next to unconstrained sequences in the same steps."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemons import models
from daemons.bus.errors import RequestError
from daemons.bus.worker import Emitter, Request
from daemons.config import ModelConfig
from daemons.infer import constrain, tools
from daemons.infer import main as infer_main
from daemons.infer import memory
from daemons.infer import request as request_mod
from daemons.infer.engine import BatchEngine
from daemons.infer.model import Model
from tests.harness import MODEL_PATH

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}}
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}
TIME = {"name": "get_time", "description": "The time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}},
                       "required": ["zone"]}}


class Recorder(Emitter):
    def __init__(self) -> None:
        super().__init__()
        self.parts: dict[str, list[dict[str, Any]]] = {}
        self.finals: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, tuple[int, str]] = {}

    def partial(self, request_id: str, data: dict[str, Any]) -> None:
        self.parts.setdefault(request_id, []).append(data)

    def final(self, request_id: str, data: dict[str, Any]) -> None:
        self.finals[request_id] = data

    def error(self, request_id: str, code: int, message: str) -> None:
        self.errors[request_id] = (code, message)

    def text(self, rid: str) -> str:
        return "".join(p.get("text", "") for p in self.parts.get(rid, []))

    def calls(self, rid: str) -> list[dict[str, Any]]:
        return [c for p in self.parts.get(rid, []) for c in p.get("tool_calls", [])]

    def logprobs(self, rid: str) -> list[dict[str, Any]]:
        return [e for p in self.parts.get(rid, []) for e in p.get("logprobs", [])]


@pytest.fixture(scope="module")
def model() -> Iterator[Model]:
    mc = ModelConfig(path=MODEL_PATH, n_ctx=2048, kv_tokens=4096, threads=2)
    yield Model.load(models.resolve(MODEL_PATH, Path("/nonexistent")), mc, "batch")


@pytest.fixture()
def engine(model: Model, request: pytest.FixtureRequest) -> Iterator[tuple[BatchEngine, Recorder]]:
    cached = getattr(request, "param", 0)  # cached prefixes: 0 turns prefix sharing off
    mc = ModelConfig(path=MODEL_PATH, n_ctx=2048, kv_tokens=4096, threads=2, slots=8, cached_prefixes=cached)
    model.n_ctx = min(mc.n_ctx, mc.kv_tokens)
    rec = Recorder()
    e = BatchEngine(model, mc, rec, infer_main.make_context(model, mc, memory.rss_bytes()))
    yield e, rec
    for s in list(e.active.values()):
        s.sampler.close()
    e.ctx.close()


def chat(rid: str, text: str, max_tokens: int = 80, **extra: Any) -> Request:
    return Request(rid, time.time() + 600, {"kind": "chat", "messages": [{"role": "user", "content": text}],
                                            "max_tokens": max_tokens, "temperature": 0, **extra})


def run(e: BatchEngine, rec: Recorder, ids: list[str]) -> None:
    for _ in range(3000):
        if all(i in rec.finals or i in rec.errors for i in ids):
            assert not rec.errors, rec.errors
            return
        e._turn()
    raise AssertionError("not finished")


def matches(value: Any, schema: dict[str, Any]) -> bool:
    """Enough of JSON Schema for the schemas above."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return isinstance(value, dict) and all(k in value for k in schema.get("required", [])) and \
            (schema.get("additionalProperties", True) is not False or set(value) <= set(props)) and \
            all(matches(v, props[k]) for k, v in value.items() if k in props)
    if kind == "array":
        return isinstance(value, list) and len(value) <= schema.get("maxItems", math.inf) and \
            all(matches(v, schema["items"]) for v in value)
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", math.inf)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return True


def test_json_output_parses_and_matches_its_schema_next_to_free_text(engine: tuple[BatchEngine, Recorder]) -> None:
    e, rec = engine
    fmt = {"type": "json_schema", "schema": PERSON, "strict": True}
    e.submit(chat("free", "Tell me about owls.", 60))
    e.submit(chat("schema", "Describe a person called Ada as JSON.", 120, response_format=fmt))
    e.submit(chat("object", "Give me a JSON object about cats.", 120, response_format={"type": "json_object"}))
    e.submit(chat("free2", "Tell me about trains.", 60))
    run(e, rec, ["free", "schema", "object", "free2"])
    person = json.loads(rec.text("schema"))
    assert matches(person, PERSON), person
    assert rec.finals["schema"]["finish_reason"] == "stop"
    # Any JSON object; a small model may go on adding keys until max_tokens (as with
    # OpenAI, the text is then cut off, finish_reason "length"); a finished one parses.
    if rec.finals["object"]["finish_reason"] == "stop":
        assert isinstance(json.loads(rec.text("object")), dict)
    else:
        assert rec.text("object").startswith("{") and rec.finals["object"]["finish_reason"] == "length"
    assert not rec.text("free").lstrip().startswith("{")  # the unconstrained ones are prose


def test_a_schema_the_grammar_cannot_enforce_is_refused_by_name() -> None:
    bad = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}}
    with pytest.raises(RequestError, match="keyword 'minimum'") as err:
        request_mod.parse(chat("x", "hi", response_format={"type": "json_schema", "schema": bad}).body)
    assert err.value.code == 400
    with pytest.raises(RequestError, match="format 'email'"):
        constrain.json_grammar({"type": "json_schema", "schema": {"type": "string", "format": "email"}})


def test_a_required_tool_call_is_a_valid_call_with_matching_arguments(engine: tuple[BatchEngine, Recorder]) -> None:
    e, rec = engine
    decl = {"tools": [WEATHER, TIME]}
    e.submit(chat("req", "What is the weather in Oslo?", 100, tool_choice="required", **decl))
    e.submit(chat("named", "Hello!", 100, tool_choice={"name": "get_time"}, **decl))
    e.submit(chat("free", "Tell me about bees.", 40))
    run(e, rec, ["req", "named", "free"])
    for rid, allowed in (("req", {"get_weather", "get_time"}), ("named", {"get_time"})):
        calls = rec.calls(rid)
        assert calls and rec.finals[rid]["finish_reason"] == "tool_calls", (rec.parts[rid], rec.finals[rid])
        for i, c in enumerate(calls):
            assert c["index"] == i and c["id"].startswith("call_") and c["name"] in allowed
            schema = next(t for t in (WEATHER, TIME) if t["name"] == c["name"])["parameters"]
            assert matches(json.loads(c["arguments"]), schema), c
        assert not rec.text(rid).strip()  # a call, not prose around it
    assert rec.finals["free"]["finish_reason"] in ("stop", "length") and rec.text("free")


def test_parsing_tool_calls_from_streamed_text() -> None:
    p = tools.ToolCalls({"f"}, parallel=True, bare_json=False)
    out = [p.feed(piece) for piece in ["Sure. <tool", "_call>\n{\"name\": \"f\", ", "\"arguments\": {\"x\": 1}}\n</tool",
                                       "_call>\n<tool_call>\n{\"name\": \"nope\", \"arguments\": {}}\n</tool_call>"]]
    text = "".join(t for t, _ in out)
    calls = [c for _, cs in out for c in cs]
    assert text.startswith("Sure. ") and "nope" in text  # an undeclared tool stays text
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("f", {"x": 1})]
    # The model stopped before closing the block: still a call.
    p = tools.ToolCalls({"f"}, parallel=False, bare_json=False)
    assert p.feed('<tool_call>\n{"name": "f", "arguments": {}}') == ("", [])
    assert [c["name"] for c in p.finish()[1]] == ["f"]
    # A native template's bare JSON reply.
    p = tools.ToolCalls({"f"}, parallel=True, bare_json=True)
    assert p.feed('{"name": "f", "parameters": {"y": "z"}}') == ("", [])
    text, calls = p.finish()
    assert text == "" and json.loads(calls[0]["arguments"]) == {"y": "z"}


def test_tool_history_renders_in_the_generic_format(model: Model) -> None:
    gen = request_mod.parse({"kind": "chat", "tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 degrees and rain"}]})
    rendered = model.lm.detokenize(model.prompt_tokens(gen)).decode()
    assert "<tools>" in rendered and '"name": "get_weather"' in rendered
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}' in rendered
    assert "<tool_response>\n12 degrees and rain\n</tool_response>" in rendered


def test_logprobs_come_from_the_logits_the_greedy_sampler_used(engine: tuple[BatchEngine, Recorder]) -> None:
    e, rec = engine
    e.submit(chat("lp", "Count from one to five.", 12, logprobs=3))
    e.submit(chat("plain", "Count from one to five.", 12))
    run(e, rec, ["lp", "plain"])
    entries = rec.logprobs("lp")
    assert len(entries) == rec.finals["lp"]["usage"]["completion_tokens"]
    assert rec.text("lp") == rec.text("plain")  # logprobs change nothing in the output
    assert "".join(x["token"] for x in entries) == rec.text("lp")
    for x in entries:
        top = x["top_logprobs"]
        assert len(top) == 3 and x["logprob"] <= 0 and bytes(x["bytes"]).decode() == x["token"]
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert top[0]["token"] == x["token"] and top[0]["logprob"] == x["logprob"]
        assert sum(math.exp(t["logprob"]) for t in top) <= 1.0 + 1e-6


def test_logit_bias_bans_the_greedy_first_token(engine: tuple[BatchEngine, Recorder], model: Model) -> None:
    e, rec = engine
    e.submit(chat("a", "Say hello.", 4, logprobs=0))
    run(e, rec, ["a"])
    first = model.lm.tokenize(rec.logprobs("a")[0]["token"].encode(), add_bos=False, special=True)
    assert len(first) == 1
    e.submit(chat("b", "Say hello.", 4, logit_bias=[[first[0], -100]], logprobs=0))
    run(e, rec, ["b"])
    assert rec.logprobs("b")[0]["token"] != rec.logprobs("a")[0]["token"]


@pytest.mark.parametrize("engine", [8], indirect=True)
def test_n_choices_prefill_their_prompt_once(engine: tuple[BatchEngine, Recorder], model: Model) -> None:
    """The router sends n > 1 as n calls with the same prompt at once (daemons/router/
    choices.py): the engine shares the prompt's cells among them instead of computing
    them n times."""
    e, rec = engine
    ids = [f"choice{i}" for i in range(4)]
    for rid in ids:
        e.submit(chat(rid, "Write a haiku about the sea.", 16))
    run(e, rec, ids)
    prompt = rec.finals[ids[0]]["usage"]["prompt_tokens"]
    assert e.tokens_saved >= 3 * (prompt - 1), (e.tokens_saved, prompt)
    assert sum(rec.finals[i]["usage"]["cached_tokens"] for i in ids) >= 3 * (prompt - 1)
    assert len({rec.text(i) for i in ids}) == 1  # greedy: the same answer four times
