"""engine = "simple" (one request at a time) stays a working choice."""

from __future__ import annotations

import json
from pathlib import Path

from tests.harness import running_suite, write_config


def test_simple_engine_serves_streamed_and_whole(fresh_dir: Path) -> None:
    config = write_config(fresh_dir, model={"engine": "simple"})
    body = {"model": "smollm2", "prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0,
            # 0 is some clients' "no penalty"; llama.cpp would divide by it.
            "repeat_penalty": 0}
    with running_suite(fresh_dir, config) as suite, suite.client() as c:
        whole = c.post("/v1/completions", json=body)
        assert whole.status_code == 200, whole.text
        text = whole.json()["choices"][0]["text"]
        assert text.startswith(" 5, 6"), text
        assert whole.json()["usage"]["completion_tokens"] == 12
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == text
        assert "simple engine" in suite.children["infer@smollm2"].ready_status
