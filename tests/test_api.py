"""The OpenAI-compatible API end to end: real router, real worker, real model."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.harness import Suite

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}


@pytest.fixture
def client(suite: Suite) -> Iterator[openai.OpenAI]:
    """The official openai client, pointed at the Unix socket through an httpx transport."""
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(suite.api_socket)), timeout=60)
    with openai.OpenAI(base_url="http://onebox/v1", api_key="unused", http_client=http, max_retries=0) as c:
        yield c


def test_openai_client_chat(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=16, temperature=0,
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage is not None and resp.usage.prompt_tokens > 5
    assert 0 < resp.usage.completion_tokens <= 16
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_openai_client_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Name three colours."}], max_tokens=12,
        temperature=0, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text
    assert finishes == ["length"] or finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens <= 12
    assert len({c.id for c in chunks}) == 1


def test_stream_matches_non_stream_greedy(client: openai.OpenAI) -> None:
    args = dict(model="smollm2", messages=[{"role": "user", "content": "Tell me a fact about the sea."}],
                max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**args).choices[0].message.content  # type: ignore[call-overload]
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stream=True, **args) if c.choices)  # type: ignore[call-overload]
    assert whole == streamed


def test_completions_endpoint(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert resp.object == "text_completion"
    assert resp.choices[0].text
    assert resp.usage is not None and resp.usage.completion_tokens <= 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0, stream=True))
    assert streamed == resp.choices[0].text


def test_stop_sequence(client: openai.OpenAI) -> None:
    base = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = base.choices[0].text
    assert len(text) > 4
    stop = text[3:5]
    stopped = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0,
                                        stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    args = dict(model="smollm2", prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=1234)
    a = client.completions.create(**args).choices[0].text  # type: ignore[call-overload]
    b = client.completions.create(**args).choices[0].text  # type: ignore[call-overload]
    assert a == b


def test_models_health_ready(suite: Suite) -> None:
    with suite.client() as c:
        models = c.get("/v1/models").json()
        assert models["object"] == "list"
        assert [m["id"] for m in models["data"]] == ["smollm2"]
        assert c.get("/health").json() == {"status": "ok"}
        ready = c.get("/ready")
        assert ready.status_code == 200 and ready.json()["services"] == {"infer/smollm2": 1}


def test_curl_over_unix_socket(suite: Suite) -> None:
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "60", "--unix-socket", str(suite.api_socket),
         "http://localhost/v1/chat/completions", "-H", "Content-Type: application/json", "-d", json.dumps(CHAT)],
        capture_output=True, text=True, check=True,
    )
    body = json.loads(out.stdout)
    assert body["choices"][0]["message"]["content"]
    stream = subprocess.run(
        ["curl", "-sSN", "--max-time", "60", "--unix-socket", str(suite.api_socket),
         "http://localhost/v1/chat/completions", "-d", json.dumps({**CHAT, "stream": True})],
        capture_output=True, text=True, check=True,
    )
    events = [line for line in stream.stdout.splitlines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b"", 400, None),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400, "model"),
    (json.dumps({"model": "smollm2", "messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"model": "smollm2", "messages": []}).encode(), 400, "messages"),
    (json.dumps({"model": "smollm2", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, None),
    (json.dumps({**CHAT, "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({**CHAT, "max_tokens": -5}).encode(), 400, "max_tokens"),
    (json.dumps({**CHAT, "n": 17}).encode(), 400, "n"),
    (json.dumps({**CHAT, "stop": [""]}).encode(), 400, "stop"),
    (json.dumps({**CHAT, "model": "no-such-model"}).encode(), 404, "does not exist"),
]


@pytest.mark.parametrize("body,status,needle", BAD)
def test_bad_input_gets_openai_error(suite: Suite, body: bytes, status: int, needle: str | None) -> None:
    with suite.client() as c:
        r = c.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["type"] == ("invalid_request_error")
    if needle:
        assert needle in err["message"] or needle == err["param"]


def test_prompt_over_context_is_400(suite: Suite) -> None:
    with suite.client() as c:
        r = c.post("/v1/completions", json={"model": "smollm2", "prompt": "hello " * 3000, "max_tokens": 4})
    assert r.status_code == 400
    assert "this model's limit is" in r.json()["error"]["message"]


def test_oversized_body_is_413(suite: Suite) -> None:
    with suite.client() as c:
        r = c.post("/v1/completions", content=b"x" * (9 * 1024 * 1024), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large"


def test_oversized_chunked_body_is_413(suite: Suite) -> None:
    """No Content-Length (chunked transfer) does not get past the limit."""
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"x" * (1024 * 1024)

    with suite.client() as c:
        r = c.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "body_too_large"
        # A small chunked body still works.
        body = json.dumps({"model": "smollm2", "prompt": "Hi", "max_tokens": 2}).encode()
        ok = c.post("/v1/completions", content=iter([body[:10], body[10:]]), headers={"Content-Type": "application/json"})
        assert ok.status_code == 200, ok.text


def test_deadline_is_504(suite: Suite) -> None:
    with suite.client() as c:
        # Greedy counting never ends early, so the deadline is what stops it.
        r = c.post("/v1/completions", json={"model": "smollm2", "prompt": "1, 2, 3, 4,", "max_tokens": 1500,
                                            "temperature": 0}, headers={"X-Request-Timeout": "0.3"})
        assert r.status_code == 504, r.text
        assert r.json()["error"]["type"] == "timeout"
        bad = c.post("/v1/completions", json={"model": "smollm2", "prompt": "x"}, headers={"X-Request-Timeout": "soon"})
        assert bad.status_code == 400
        # The worker is free again: a normal request still works.
        ok = c.post("/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200


def test_client_gone_before_a_whole_reply_cancels_on_worker(suite: Suite) -> None:
    """Not streamed: the client gives up (its own timeout) while the reply is being
    generated; the router must notice and CANCEL, not let it run to the deadline."""
    body = {"model": "smollm2", "prompt": "1, 2, 3, 4,", "max_tokens": 1500, "temperature": 0}
    before = suite.log_text("infer@smollm2").count(" cancelled after ")
    with suite.client(timeout=1.5) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json=body)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if suite.log_text("infer@smollm2").count(" cancelled after ") > before:
            break
        time.sleep(0.1)
    assert suite.log_text("infer@smollm2").count(" cancelled after ") == before + 1
    assert "the client went away before the reply" in suite.log_text("router")
    with suite.client() as c:
        assert c.post("/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_client_disconnect_cancels_on_worker(suite: Suite) -> None:
    # Greedy counting runs long: the client, not the model, ends this stream.
    body = {"model": "smollm2", "prompt": "1, 2, 3, 4,", "max_tokens": 1500, "temperature": 0, "stream": True}
    with suite.client() as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: ")
            call_id = json.loads(first[6:])["id"].removeprefix("cmpl-")
        # Closed mid-stream: the router must send CANCEL and the worker must drop it.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if f"request {call_id} cancelled" in suite.log_text("infer@smollm2"):
            break
        time.sleep(0.1)
    log = suite.log_text("infer@smollm2")
    assert f"request {call_id} cancelled" in log
    with suite.client() as c:
        assert c.post("/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 2}).status_code == 200
