"""The embedding daemon end to end: router + onebox-embed@minilm on the converted
all-MiniLM-L6-v2, through the official openai client and plain HTTP, checked against an
independent numpy forward pass (tests/reference/minilm.py)."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.harness import Suite, write_config
from tests.reference.corpus import SENTENCES, model_zip
from tests.reference.minilm import MiniLM

GGUF = "all_minilm_l6_v2/all-MiniLM-L6-v2.f16.gguf"
EMBED = f'[embeddings.minilm]\npath = "{GGUF}"\nthreads = 2\n'


@pytest.fixture(scope="module")
def esuite() -> Iterator[Suite]:
    with tempfile.TemporaryDirectory(prefix="onebox-") as d:
        suite = Suite(Path(d), write_config(Path(d), extra=EMBED))
        try:
            suite.start_router()
            suite.start_daemon("embed", "minilm")
            suite.wait_for(lambda c: c.get("/ready").json()["services"].get("embed/minilm") == 1, 20,
                           "the embed worker")
            yield suite
        finally:
            suite.stop()


@pytest.fixture
def client(esuite: Suite) -> Iterator[openai.OpenAI]:
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(esuite.api_socket)), timeout=60)
    with openai.OpenAI(base_url="http://onebox/v1", api_key="unused", http_client=http, max_retries=0) as c:
        yield c


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def post(s: Suite, body: dict[str, Any]) -> httpx.Response:
    with s.client() as c:
        return c.post("/v1/embeddings", json=body)


def test_openai_client_float_and_base64(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model="minilm", input=["Hello world", "Goodbye"])
    assert floats.object == "list" and len(floats.data) == 2
    assert [d.index for d in floats.data] == [0, 1]
    v = np.asarray(floats.data[0].embedding)
    assert v.shape == (384,) and abs(np.linalg.norm(v) - 1) < 1e-4
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 4 + 3  # [CLS] ... [SEP]
    # The openai client asks for base64 by default when numpy is around and decodes it itself.
    b64 = client.embeddings.create(model="minilm", input="Hello world", encoding_format="base64")
    raw = b64.data[0].embedding
    decoded = np.frombuffer(base64.b64decode(raw), dtype="<f4") if isinstance(raw, str) else np.asarray(raw)
    assert cosine(decoded, v) > 0.999999


def test_matches_the_independent_reference(esuite: Suite) -> None:
    """The daemon's vectors against a numpy MiniLM forward pass on 20 varied sentences
    (accents, CJK, emoji, code, a ~500-token paragraph), sent as one batched request."""
    reference = MiniLM(model_zip())
    r = post(esuite, {"model": "minilm", "input": SENTENCES})
    assert r.status_code == 200, r.text
    got = [d["embedding"] for d in r.json()["data"]]
    scores = [cosine(g, reference.embed(text)) for g, text in zip(got, SENTENCES)]
    print(f"cosine vs reference: min {min(scores):.6f}, mean {np.mean(scores):.6f}")
    assert len(scores) == 20 and min(scores) >= 0.999, scores


def test_related_pairs_score_higher_than_unrelated(esuite: Suite) -> None:
    pairs = [("A man is playing a guitar.", "Someone plays an instrument."),
             ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
             ("How do I reset my password?", "I forgot my login credentials."),
             ("Stock markets fell sharply today.", "Shares dropped on the exchange.")]
    texts = [t for p in pairs for t in p]
    vecs = [d["embedding"] for d in post(esuite, {"model": "minilm", "input": texts}).json()["data"]]
    for i in range(len(pairs)):
        related = cosine(vecs[2 * i], vecs[2 * i + 1])
        for j in range(len(pairs)):
            if j != i:
                assert related > cosine(vecs[2 * i], vecs[2 * j + 1]), (pairs[i], pairs[j])


def test_batched_and_single_requests_agree(esuite: Suite) -> None:
    texts = SENTENCES[:12]
    batched = [d["embedding"] for d in post(esuite, {"model": "minilm", "input": texts}).json()["data"]]
    with cf.ThreadPoolExecutor(6) as ex:
        singles = list(ex.map(lambda t: post(esuite, {"model": "minilm", "input": t}).json()["data"][0]["embedding"],
                              texts))
    for b, s in zip(batched, singles):
        assert cosine(b, s) >= 0.9999


def test_token_ids_give_the_text_vector(esuite: Suite) -> None:
    """Token arrays are the model's own vocabulary; its [CLS]/[SEP] are added as for text."""
    text = "hello world"
    by_text = post(esuite, {"model": "minilm", "input": text}).json()["data"][0]["embedding"]
    by_ids = post(esuite, {"model": "minilm", "input": [7592, 2088]}).json()
    assert cosine(by_text, by_ids["data"][0]["embedding"]) > 0.99999
    assert len(post(esuite, {"model": "minilm", "input": [[7592], [2088, 7592]]}).json()["data"]) == 2


def test_over_the_limit_is_400_or_cut_as_asked(esuite: Suite) -> None:
    long = "word " * 700
    r = post(esuite, {"model": "minilm", "input": ["short", long]})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "input[1] is 702 tokens" in msg and "at most 512" in msg, msg
    cut = post(esuite, {"model": "minilm", "input": ["short", long], "onebox": {"truncate": True}})
    assert cut.status_code == 200, cut.text
    assert cut.json()["usage"]["prompt_tokens"] == 3 + 512


def test_bad_requests_are_clear_400s(esuite: Suite) -> None:
    cases = [
        ({"model": "minilm", "input": []}, "input"),
        ({"model": "minilm", "input": [1.5]}, "input"),
        ({"model": "minilm", "input": "x", "dimensions": 128}, "cannot shorten"),
        ({"model": "minilm", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "minilm", "input": [999999]}, "not in the model's vocabulary"),
        ({"model": "minilm", "input": ["x"] * 3000}, "at most 2048"),
    ]
    for body, needle in cases:
        r = post(esuite, body)
        assert r.status_code == 400 and needle in r.json()["error"]["message"] + str(r.json()["error"]["param"]), \
            (body, r.text[:300])
    r = post(esuite, {"model": "nosuch", "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = post(esuite, {"model": "smollm2", "input": "x"})
    assert r.status_code == 404 and "chat model" in r.json()["error"]["message"]
    # dimensions equal to the model's own is fine.
    assert post(esuite, {"model": "minilm", "input": "x", "dimensions": 384}).status_code == 200


def test_listed_in_models_and_status(esuite: Suite) -> None:
    with esuite.client() as c:
        listed = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert listed["minilm"]["kind"] == "embedding" and listed["minilm"]["ready"] is True
    body = esuite.wait_status(lambda b: b["services"]["embed/minilm"]["workers"][0].get("embedded", 0) > 0,
                              what="the embed worker's status")
    w = body["services"]["embed/minilm"]["workers"][0]
    assert w["dimensions"] == 384 and w["pooling"] == "mean" and w["batches"] > 0


def test_a_big_request_does_not_starve_a_small_one(esuite: Suite) -> None:
    """500 inputs are spread over many batches; a one-input request sent meanwhile is
    answered long before the big one finishes."""
    big = [f"sentence number {i} about the weather in town" for i in range(500)]
    with cf.ThreadPoolExecutor(2) as ex:
        started = time.monotonic()
        fut = ex.submit(post, esuite, {"model": "minilm", "input": big})
        time.sleep(0.3)
        t0 = time.monotonic()
        small = post(esuite, {"model": "minilm", "input": "quick one"})
        small_s = time.monotonic() - t0
        r = fut.result(timeout=120)
        big_s = time.monotonic() - started
    assert small.status_code == 200 and r.status_code == 200
    assert len(r.json()["data"]) == 500
    print(f"small request {small_s:.2f} s while a 500-input one took {big_s:.2f} s")
    assert small_s < big_s / 3, (small_s, big_s)


def test_killed_embed_daemon_gives_503_and_a_restarted_one_is_used(esuite: Suite) -> None:
    esuite.children["embed@minilm"].signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        r = post(esuite, {"model": "minilm", "input": "x"})
        if r.status_code == 503:
            break
        assert time.monotonic() < deadline, "still 200 after the embed daemon was killed"
    assert r.json()["error"]["code"] == "no_worker" and "Retry-After" in r.headers
    esuite.start_daemon("embed", "minilm")
    assert post(esuite, {"model": "minilm", "input": "back again"}).status_code == 200
