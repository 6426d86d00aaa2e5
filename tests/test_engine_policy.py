"""The batch engine's scheduling with the real model, in process and one step at a
time (each `_turn()` is one llama_decode step; no feeder thread, no bus): a long
prompt prefilling never costs a decoding stream its token in a step, the step budget
follows the inter-token target once the step cost is learnt, long prompts do not
stack, and a pool too small for every admitted request's output preempts and
resumes instead of failing, with greedy output equal to the same request alone."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemons import models
from daemons.bus.worker import Emitter, Request
from daemons.config import ModelConfig
from daemons.infer import main as infer_main
from daemons.infer import memory
from daemons.infer.engine import BatchEngine
from daemons.infer.model import Model
from tests.harness import MODEL_PATH

COUNTING = "1, 2, 3, 4,"


class Recorder(Emitter):
    """Keeps every reply, per request, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.text: dict[str, str] = {}
        self.finals: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, tuple[int, str]] = {}

    def partial(self, request_id: str, data: dict[str, Any]) -> None:
        self.text[request_id] = self.text.get(request_id, "") + data["text"]

    def final(self, request_id: str, data: dict[str, Any]) -> None:
        self.finals[request_id] = data

    def error(self, request_id: str, code: int, message: str) -> None:
        self.errors[request_id] = (code, message)


@pytest.fixture(scope="module")
def model() -> Iterator[Model]:
    mc = ModelConfig(path=MODEL_PATH, n_ctx=2048, kv_tokens=4096, threads=2)
    m = Model.load(models.resolve(MODEL_PATH, Path("/nonexistent")), mc, "batch")
    yield m


def engine(model: Model, **settings: Any) -> tuple[BatchEngine, Recorder]:
    fields = {"path": MODEL_PATH, "n_ctx": 2048, "kv_tokens": 4096, "threads": 2, "slots": 8, "step_tokens": 256,
              "cached_prefixes": 0, **settings}
    mc = ModelConfig(**fields)
    model.n_ctx = min(mc.n_ctx, mc.kv_tokens)  # as Model.load sets it
    ctx = infer_main.make_context(model, mc, memory.rss_bytes())
    rec = Recorder()
    return BatchEngine(model, mc, rec, ctx), rec


def completion(rid: str, prompt: str, max_tokens: int) -> Request:
    return Request(rid, time.time() + 600, {"kind": "completion", "prompt": prompt, "max_tokens": max_tokens,
                                            "temperature": 0})


def run(e: BatchEngine, rec: Recorder, ids: list[str], turns: int = 5000) -> None:
    for _ in range(turns):
        if all(i in rec.finals or i in rec.errors for i in ids):
            return
        e._turn()
    raise AssertionError(f"not finished after {turns} turns: {e.status()}")


def close(e: BatchEngine) -> None:
    for s in list(e.active.values()):
        s.sampler.close()
    e.ctx.close()


def document(n_words: int) -> str:
    return " ".join(f"item {i} of the inventory is a box of screws." for i in range(n_words // 9)) + \
        " Summarise the inventory."


def test_a_long_prompt_prefilling_never_costs_a_stream_its_token(model: Model) -> None:
    e, rec = engine(model, itl_target_ms=100, itl_stretch=0)
    try:
        chats = [f"chat{i}" for i in range(4)]
        for i, rid in enumerate(chats):
            e.submit(completion(rid, f"{COUNTING} {i}", 200))
        for _ in range(30):  # all decoding, and the step cost learnt from these steps
            e._turn()
        assert all(s.pending is not None for s in e.active.values())
        e.submit(completion("doc", document(1300), 8))
        chunks = []
        while "doc" not in rec.finals:
            before = {s.req.id: s.produced for s in e.active.values() if s.pending is not None}
            doc = next((s for s in e.active.values() if s.req.id == "doc"), None)
            held = e.kv.length(doc.id) if doc is not None else 0
            e._turn()
            doc = next((s for s in e.active.values() if s.req.id == "doc"), None)
            if doc is not None and doc.prefilling:
                chunks.append(e.kv.length(doc.id) - held)
            for s in e.active.values():
                if s.req.id in before:  # decoding before this step: exactly one more token
                    assert s.produced == before[s.req.id] + 1, (s.req.id, e.last_budget)
            assert len(chunks) < 400, "the document is not being prefilled"
        # The document went in many chunks, each what the 100 ms target left, not 256.
        assert len(chunks) >= 4 and max(chunks) < 256, chunks
        assert e.cost.ready and e.status_map()["step_budget"] < 256
        run(e, rec, chats)
        assert not rec.errors
    finally:
        close(e)


def test_long_prompts_do_not_stack_but_short_ones_pass(model: Model) -> None:
    e, rec = engine(model, itl_target_ms=0, itl_stretch=0, max_long_prefills=1)
    try:
        e.submit(completion("doc1", document(900), 4))
        e.submit(completion("doc2", document(800), 4))
        e.submit(completion("chat", COUNTING, 4))
        e._turn()
        admitted = {s.req.id for s in e.active.values()}
        assert admitted == {"doc1", "chat"}, admitted  # doc2 waits for doc1's prefill; chat goes past it
        assert [p.req.id for p in e.waiting] == ["doc2"]
        while any(s.req.id == "doc1" and s.prefilling for s in e.active.values()):
            assert [p.req.id for p in e.waiting] == ["doc2"]
            e._turn()
        run(e, rec, ["doc1", "doc2", "chat"])
        assert not rec.errors and len(rec.finals) == 3
    finally:
        close(e)


def test_preempted_requests_all_complete_with_their_solo_greedy_output(model: Model) -> None:
    """640 cells, output_reserve 16: all three are admitted (prompt + 16 each) but
    together they need ~3 x 260 cells. The pool runs dry mid-generation, the most
    recently admitted gives its cells back and resumes later: all complete, none fails,
    each text equal to its solo run."""
    prompts = {"count": COUNTING, "tens": "10, 20, 30, 40,", "letters": "a, b, c, d, e,"}
    solo: dict[str, str] = {}
    e, rec = engine(model, kv_tokens=2048)
    try:
        for rid, prompt in prompts.items():
            e.submit(completion(rid, prompt, 250))
            run(e, rec, [rid])
            solo[rid] = rec.text[rid]
            assert rec.finals[rid]["usage"]["completion_tokens"] == 250
    finally:
        close(e)
    e, rec = engine(model, kv_tokens=640, n_ctx=640, output_reserve=16, slots=4)
    try:
        for rid, prompt in prompts.items():
            e.submit(completion(rid, prompt, 250))
        run(e, rec, list(prompts))
        assert not rec.errors, rec.errors
        assert e.preemptions >= 1 and e.status_map()["preemptions"] == e.preemptions
        for rid in prompts:
            assert rec.finals[rid]["finish_reason"] == "length"
            assert rec.finals[rid]["usage"]["completion_tokens"] == 250
            assert rec.text[rid] == solo[rid], rid
        assert e.kv.used <= 640 and not e.active and not e.waiting
    finally:
        close(e)
