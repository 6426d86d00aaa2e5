"""engine = "batch" on a model it cannot serve (recurrent: Mamba) falls back to the simple
engine, says so in the log, and serves through the same API with its own status map.
The model is a tiny random-weight Mamba GGUF written by the test (tests/models/)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.harness import running_suite, write_config
from tests.models.tiny_recurrent import write_tiny_recurrent


def test_recurrent_model_falls_back_to_the_simple_engine(fresh_dir: Path) -> None:
    gguf = write_tiny_recurrent(fresh_dir / "tiny-mamba.gguf")
    config = write_config(fresh_dir, name="mamba", model={"path": str(gguf), "n_ctx": 256, "engine": "batch"})
    with running_suite(fresh_dir, config, model="mamba") as suite, suite.client() as c:
        child = suite.children["infer@mamba"]
        assert "simple engine" in child.ready_status, child.ready_status
        log = suite.log_text("infer@mamba")
        assert 'engine "batch" cannot serve this model (recurrent/hybrid' in log and 'using engine "simple"' in log
        body = {"model": "mamba", "prompt": "hello", "max_tokens": 12, "temperature": 0}
        whole = c.post("/v1/completions", json=body)
        assert whole.status_code == 200, whole.text
        assert whole.json()["usage"]["completion_tokens"] == 12
        text = whole.json()["choices"][0]["text"]
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == text
        chat = c.post("/v1/chat/completions", json={"model": "mamba", "max_tokens": 5,
                                                    "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200, chat.text
        status = suite.wait_status(lambda b: b["models"]["mamba"]["workers"][0].get("served", 0) >= 3,
                                   what="the simple engine's status map")
        worker = status["models"]["mamba"]["workers"][0]
        assert worker["engine"] == "simple" and worker["slots"]["total"] == 1
        assert worker["generated_tokens"] >= 12 + 12 + 1
        # Bad input is still a clear 400, not a crash.
        bad = c.post("/v1/completions", json={"model": "mamba", "prompt": "x " * 400, "max_tokens": 4})
        assert bad.status_code == 400 and "limit" in bad.json()["error"]["message"]
