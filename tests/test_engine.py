"""The continuous-batching engine end to end: real router, real worker, real model."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import MODEL_PATH, Suite, running_suite, write_config

COUNTING = "1, 2, 3, 4,"  # SmolLM2 keeps counting at temperature 0: a long, steady request
SYSTEM = ("You are the support assistant of a small hardware shop. Answer in one short sentence, "
          "politely, and never invent prices, opening hours or stock levels you were not told. " * 4)


def status(s: Suite) -> dict[str, Any]:
    """The worker's engine state; it comes with heartbeats, so wait for the first."""
    body = s.wait_status(lambda b: len(b["models"]["smollm2"]["workers"]) == 1
                         and "slots" in b["models"]["smollm2"]["workers"][0], timeout=5, what="the engine's state")
    return dict(body["models"]["smollm2"]["workers"][0])


def wait_for(what: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(0.05)
    return False


def sse_events(r: httpx.Response) -> list[str]:
    return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


# -- the default engine, default pool ----------------------------------------------------


def test_status_describes_the_engine(suite: Suite) -> None:
    st = status(suite)
    assert st["engine"] == "batch"
    assert st["slots"]["total"] >= 16 and st["slots"]["busy"] + st["slots"]["free"] == st["slots"]["total"]
    kv = st["kv_cells"]
    assert kv["used"] + kv["free"] == kv["total"] and 0 <= kv["cached"] <= kv["used"]
    assert {"queue", "tokens_per_s", "prefix_cache"} <= set(st)
    assert {"hits", "lookups", "hit_rate", "tokens_saved"} <= set(st["prefix_cache"])


def test_sixteen_concurrent_streams_are_whole_and_well_formed(suite: Suite) -> None:
    def one(i: int) -> tuple[str, dict[str, Any], list[str]]:
        body = {"model": "smollm2", "stream": True, "max_tokens": 24, "temperature": 0.7, "seed": i,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": f"Tell me something about the number {i}."}]}
        with suite.client(timeout=120) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = sse_events(r)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert len({ch["id"] for ch in chunks}) == 1
        assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
        finishes = [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]]
        assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
        text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
        usage = chunks[-1]["usage"]
        return text, usage, finishes

    with cf.ThreadPoolExecutor(16) as ex:
        results = list(ex.map(one, range(16)))
    for text, usage, finishes in results:
        assert text.strip()
        assert 0 < usage["completion_tokens"] <= 24
        if finishes[-1] == "length":
            assert usage["completion_tokens"] == 24


def test_repeated_system_prompt_is_a_prefix_cache_hit(suite: Suite) -> None:
    before = status(suite)["prefix_cache"]
    with suite.client() as c:
        for q in ("Do you sell screws?", "Can I return a drill?"):
            r = c.post("/v1/chat/completions", json={
                "model": "smollm2", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]})
            assert r.status_code == 200
    assert wait_for(lambda: status(suite)["prefix_cache"]["lookups"] >= before["lookups"] + 2)
    after = status(suite)["prefix_cache"]
    assert after["hits"] >= before["hits"] + 1
    assert after["tokens_saved"] - before["tokens_saved"] >= 150  # the system prompt is ~170 tokens


def test_requests_arriving_together_prefill_a_shared_prefix_once(suite: Suite) -> None:
    system = SYSTEM.replace("hardware shop", "bicycle shop")  # not in the cache yet
    before = status(suite)["prefix_cache"]

    def ask(i: int) -> int:
        with suite.client(timeout=120) as c:
            return c.post("/v1/chat/completions", json={
                "model": "smollm2", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": f"Question number {i}?"}]}).status_code

    with cf.ThreadPoolExecutor(6) as ex:
        assert list(ex.map(ask, range(6))) == [200] * 6
    assert wait_for(lambda: status(suite)["prefix_cache"]["lookups"] >= before["lookups"] + 6)
    after = status(suite)["prefix_cache"]
    # At most one of the six computed the system prompt (whichever arrived first).
    assert after["hits"] - before["hits"] >= 5
    assert after["tokens_saved"] - before["tokens_saved"] >= 5 * 150


def test_a_cached_prefix_unused_for_cache_forget_tokens_is_dropped(fresh_dir: Path) -> None:
    cfg = write_config(fresh_dir, model={"cache_forget_tokens": 300})
    with running_suite(fresh_dir, cfg) as s:
        def ask(question: str) -> int:
            with s.client() as c:
                r = c.post("/v1/chat/completions", json={
                    "model": "smollm2", "max_tokens": 4, "temperature": 0,
                    "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]})
            assert r.status_code == 200, r.text
            return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

        assert ask("Do you sell screws?") < 50
        assert ask("Can I return a drill?") >= 100  # the system prompt, reused within 300 decoded tokens
        with s.client(timeout=120) as c:  # ~410 tokens decoded, none of them the system prompt
            assert c.post("/v1/completions", json=counting(400)).status_code == 200
        assert ask("Do you sell paint?") < 50  # forgotten: computed again
        assert "forgetting cached sequence" in s.log_text("infer@smollm2")


# -- a deliberately small pool -----------------------------------------------------------


@pytest.fixture(scope="module")
def small() -> Iterator[Suite]:
    """512 cells: one counting request with max_tokens 400 takes most of the pool. No
    prefix cache, so every finished request gives all its cells back."""
    with tempfile.TemporaryDirectory(prefix="onebox-") as d:
        cfg = write_config(Path(d), model={"n_ctx": 1024, "kv_tokens": 512, "slots": 4, "step_tokens": 64,
                                           "capacity": 8, "cached_prefixes": 0})
        with running_suite(Path(d), cfg) as s:
            yield s


def counting(max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {"model": "smollm2", "prompt": COUNTING, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def test_greedy_matches_llama_cpp_python(small: Suite) -> None:
    """Same prompt, greedy, the same flash-attention setting (on, the default): the same text.

    Bit-identical logits also need the request's KV cells at the same places as in a
    fresh context (the attention sums run over cell indices), so this runs where no
    cached prefix occupies the pool; batched or cached runs may differ in late tokens."""
    import llama_cpp

    from daemons.models import resolve

    path = resolve(MODEL_PATH, Path("/nonexistent"))
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, flash_attn=True, verbose=False)
    try:
        for prompt in ("The capital of France is", "def fibonacci(n):", COUNTING):
            ref = llm.create_completion(prompt, max_tokens=40, temperature=0, repeat_penalty=1.0)
            with small.client() as c:
                ours = c.post("/v1/completions", json={"model": "smollm2", "prompt": prompt, "max_tokens": 40,
                                                       "temperature": 0}).json()
            assert ours["choices"][0]["text"] == ref["choices"][0]["text"], prompt  # type: ignore[index]
    finally:
        llm.close()


def test_prompt_over_the_pool_is_400(small: Suite) -> None:
    with small.client() as c:
        r = c.post("/v1/completions", json={"model": "smollm2", "prompt": "hello " * 800, "max_tokens": 4})
    assert r.status_code == 400
    assert "this model's limit is 511" in r.json()["error"]["message"]


def post(s: Suite, body: dict[str, Any], **kw: Any) -> httpx.Response:
    with s.client(timeout=120) as c:
        return c.post("/v1/completions", json=body, **kw)


def test_admission_queues_a_request_until_cells_free(small: Suite) -> None:
    with cf.ThreadPoolExecutor(3) as ex:
        first = ex.submit(post, small, counting(400))
        assert wait_for(lambda: status(small)["slots"]["busy"] == 1)
        second = ex.submit(post, small, counting(400))
        # 11 + 400 cells reserved for the first leave too few for the second: it waits.
        assert wait_for(lambda: status(small)["queue"] == 1, 5), status(small)
        assert status(small)["slots"]["busy"] == 1
        # A third with a short deadline waits too, then gets a clear 503 (not a crash, not OOM).
        # 4 s: the engine gives up 1 s before the deadline, more than a decode step even on
        # a loaded machine, so its 503 always comes before the router's own 504.
        third = ex.submit(post, small, counting(400), headers={"X-Request-Timeout": "4"})
        r3 = third.result(timeout=30)
        r1, r2 = first.result(timeout=120), second.result(timeout=120)
    assert r1.status_code == 200 and r2.status_code == 200
    assert r1.json()["usage"]["completion_tokens"] == 400 and r2.json()["usage"]["completion_tokens"] == 400
    assert r1.json()["choices"][0]["text"] == r2.json()["choices"][0]["text"]
    assert r3.status_code == 503, r3.text
    assert "before the deadline" in r3.json()["error"]["message"]


def test_a_queued_stream_whose_client_leaves_is_dropped(small: Suite) -> None:
    """Streamed, but still queued for cells (no first token, so no response yet): a
    client that gives up must take the request out of the engine's queue."""
    assert wait_for(lambda: status(small)["slots"]["busy"] == 0)
    before = small.log_text("infer@smollm2").count("cancelled while waiting")
    with cf.ThreadPoolExecutor(1) as ex:
        first = ex.submit(post, small, counting(400))
        assert wait_for(lambda: status(small)["slots"]["busy"] == 1)
        # The first takes about 3 s here; give up well before it frees its cells.
        with small.client(timeout=1) as c:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json=counting(400, stream=True))
        assert wait_for(lambda: small.log_text("infer@smollm2").count("cancelled while waiting") == before + 1)
        assert wait_for(lambda: status(small)["queue"] == 0)
        assert first.result(timeout=120).status_code == 200


def test_cancel_frees_the_sequence_and_its_cells(small: Suite) -> None:
    assert wait_for(lambda: status(small)["slots"]["busy"] == 0)
    with small.client(timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=counting(400, stream=True)) as r:
            lines = r.iter_lines()
            first = next(lines)
            call_id = json.loads(first[6:])["id"].removeprefix("cmpl-")
            next(lines)
            assert wait_for(lambda: status(small)["slots"]["busy"] == 1)
            assert status(small)["kv_cells"]["reserved"] > 0
    # Closed mid-stream: the worker must drop the request and free its cells at once.
    assert wait_for(lambda: f"request {call_id} cancelled" in small.log_text("infer@smollm2"))
    assert wait_for(lambda: status(small)["slots"]["busy"] == 0)
    st = status(small)
    assert st["kv_cells"]["reserved"] == 0 and st["kv_cells"]["used"] == 0
    with small.client() as c:
        assert c.post("/v1/completions", json=counting(4)).status_code == 200


def test_overcommitted_requests_are_preempted_and_resumed_not_cut_short(fresh_dir: Path) -> None:
    """output_reserve = 16 admits two 400-token requests into 512 cells; when the pool
    runs dry the later one is preempted (its stream pauses) and resumes once the other
    finishes: both complete all 400 tokens with the same greedy text, and status and
    /metrics count the preemption."""
    cfg = write_config(fresh_dir, model={"n_ctx": 1024, "kv_tokens": 512, "slots": 4, "step_tokens": 64,
                                         "cached_prefixes": 0, "output_reserve": 16})
    with running_suite(fresh_dir, cfg) as s:
        with cf.ThreadPoolExecutor(2) as ex:
            results = [f.result(timeout=180) for f in [ex.submit(post, s, counting(400)) for _ in range(2)]]
        assert [r.status_code for r in results] == [200, 200], [r.text for r in results]
        assert [r.json()["usage"]["completion_tokens"] for r in results] == [400, 400]
        assert results[0].json()["choices"][0]["text"] == results[1].json()["choices"][0]["text"]
        log = s.log_text("infer@smollm2")
        assert "no KV slot" not in log, "the pool overflowed"
        assert "preempted request" in log and "back as sequence" in log
        assert wait_for(lambda: status(s).get("preemptions", 0) >= 1)
        with s.client() as c:
            metrics = c.get("/metrics").text
        assert 'onebox_preemptions_total{model="smollm2"}' in metrics
        assert 'onebox_preemptions_total{model="smollm2"} 0.0' not in metrics


# -- startup checks ------------------------------------------------------------------------


def run_infer(directory: Path, **model: Any) -> subprocess.CompletedProcess[str]:
    cfg = write_config(directory, model=model)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONEBOX") and k != "NOTIFY_SOCKET"}
    return subprocess.run([sys.executable, "-m", "daemons.ctl.main", "infer", "smollm2", "--config", str(cfg)],
                          capture_output=True, text=True, env=env, timeout=60)


def test_memory_budget_too_small_exits_78_with_the_numbers(fresh_dir: Path) -> None:
    r = run_infer(fresh_dir, kv_tokens=16384, memory_budget_mb=200)
    assert r.returncode == 78, r.stderr[-2000:]
    assert "memory budget exceeded" in r.stderr
    assert "KV 360 MiB (16384 cells x 23040 B)" in r.stderr and "budget 200 MiB" in r.stderr
    # Model + KV (~330 MiB with runtime and headroom) fit, the compute buffers do not
    # (4096-token steps without flash attention: ~600 MiB): caught once the context exists.
    r = run_infer(fresh_dir, kv_tokens=4096, step_tokens=4096, flash_attn=False, memory_budget_mb=600)
    assert r.returncode == 78, r.stderr[-2000:]
    assert "compute buffers" in r.stderr and "memory budget exceeded" in r.stderr
