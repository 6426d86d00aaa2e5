"""[models.NAME] kv_type: a quantized KV cache (llama.cpp's type_k/type_v) end to end:
served by a real daemon, the start log and `onebox plan` agreeing on its memory, and
the configs llama.cpp cannot run refused before anything is allocated."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from daemons import config as config_mod
from daemons.bus import serve
from daemons.config import ConfigError, ModelConfig
from daemons.ctl import doctor_cmd
from daemons.infer import main as infer_main
from daemons.infer import native
from tests.harness import Suite, running_suite, write_config
from tests.test_engine import run_infer, sse_events
from tests.test_plan import check_plan_matches_log, run_json

# SmolLM2-135M: 30 layers x 3 KV heads x (64 + 64) values; q8_0 is 34 B per 32 of them.
F16_CELL, Q8_CELL, Q4_CELL = 23_040, 12_240, 6_480
REFUSED = "kv_type: q8_0 needs flash_attn = true"


@pytest.fixture(scope="module")
def q8() -> Iterator[Suite]:
    """One router + a smollm2 worker with a q8_0 KV cache, shared by the module."""
    with tempfile.TemporaryDirectory(prefix="onebox-") as d:
        cfg = write_config(Path(d), model={"kv_type": "q8_0", "kv_tokens": 4096, "slots": 4,
                                           "memory_budget_mb": 2048})
        with running_suite(Path(d), cfg) as s:
            yield s


def chat(stream: bool) -> dict[str, Any]:
    return {"model": "smollm2", "messages": [{"role": "user", "content": "Name three colours."}],
            "max_tokens": 24, "temperature": 0, "stream": stream}


def test_a_q8_0_cache_serves_chat_completions_whole_and_streamed(q8: Suite) -> None:
    with q8.client(timeout=60) as c:
        whole = c.post("/v1/chat/completions", json=chat(False))
        assert whole.status_code == 200, whole.text
        body = whole.json()
        text = body["choices"][0]["message"]["content"]
        assert text.strip() and body["usage"]["completion_tokens"] > 0
        with c.stream("POST", "/v1/chat/completions", json=chat(True)) as r:
            assert r.status_code == 200
            events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    streamed = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
    assert streamed.strip()
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_its_start_log_names_q8_0_and_matches_the_plan(q8: Suite, capsys: pytest.CaptureFixture[str]) -> None:
    log = q8.log_text("infer@smollm2")
    assert "(KV q8_0: 30 layers x 3 KV heads x (64 + 64) x 34/32 B per cell)" in log
    assert f"(4096 cells x {Q8_CELL} B)" in log
    assert "batch engine: 4 slots, 4096 KV cells, q8_0 KV cache" in q8.children["infer@smollm2"].ready_status
    report = check_plan_matches_log(log, q8.config, "q8_0", capsys)
    assert report["bytes_per_token"] == Q8_CELL and report["configured"]["kv"] == 4096 * Q8_CELL


def test_quantized_kv_without_flash_attention_is_refused(fresh_dir: Path) -> None:
    cfg = write_config(fresh_dir, model={"kv_type": "q8_0", "flash_attn": False})
    with pytest.raises(ConfigError, match=REFUSED):
        config_mod.load(cfg, sections=("paths", "models"))
    r = run_infer(fresh_dir, kv_type="q8_0", flash_attn=False)
    assert r.returncode == 78, r.stderr[-2000:]
    assert REFUSED in r.stderr and "set flash_attn = true" in r.stderr
    assert "llama_init_from_model" not in r.stderr  # refused before any model or context exists
    assert not list(ModelConfig(kv_type="q4_0", flash_attn=True).problems())
    assert not list(ModelConfig(kv_type="f16", flash_attn=False).problems())


def test_a_head_that_is_not_whole_blocks_is_a_clear_error_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp refuses a cache type whose blocks do not divide a head: the daemon says
    so before it makes a context (no such GGUF ships, so the shape is made up)."""
    assert native.KvShape(30, 3, 64, 64, "q4_0").bytes_per_cell == Q4_CELL
    assert native.KvShape(30, 3, 64, 64).bytes_per_cell == F16_CELL
    odd = native.KvShape(2, 1, 40, 40, "q8_0")
    with pytest.raises(ValueError, match="not whole blocks"):
        _ = odd.bytes_per_cell
    monkeypatch.setattr(native, "kv_shape", lambda model, kv_type="f16": odd)

    stub = SimpleNamespace(lm=SimpleNamespace(model=None))  # nothing past kv_shape may touch it
    with pytest.raises(serve.LoadError, match="kv_type q8_0 cannot hold this model's KV heads .*not whole blocks"):
        infer_main.make_context(stub, ModelConfig(path="x.gguf", kv_type="q8_0"), 0)  # type: ignore[arg-type]


def test_plan_and_doctor_use_the_configured_kv_type(fresh_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(fresh_dir, model={"kv_type": "q4_0"})
    _, report = run_json(capsys, "--config", str(cfg), "--model", "smollm2", "--users", "2")
    assert report["kv_type"] == "q4_0" and report["bytes_per_token"] == Q4_CELL
    assert report["memory"]["bytes_per_cell"] == Q4_CELL and report["configured"]["bytes_per_cell"] == Q4_CELL
    assert 'kv_type = "q4_0"' in report["recommended"]["toml"]
    # Asked for f16 instead: sized for it, and the table says to change it.
    _, report = run_json(capsys, "--config", str(cfg), "--model", "smollm2", "--users", "2", "--kv-type", "f16")
    assert report["kv_type"] == "f16" and report["bytes_per_token"] == F16_CELL
    assert report["configured"]["kv_type"] == "q4_0"  # what the daemon will start with
    assert 'kv_type = "f16"' in report["recommended"]["toml"]
    (estimate,) = doctor_cmd.estimate(config_mod.load(cfg, sections=("paths", "models")))
    assert estimate.plan is not None and estimate.plan.bytes_per_cell == Q4_CELL


def test_the_simple_engine_honours_kv_type(fresh_dir: Path) -> None:
    cfg = write_config(fresh_dir, model={"engine": "simple", "kv_type": "q8_0"})
    with running_suite(fresh_dir, cfg) as suite, suite.client(timeout=60) as c:
        r = c.post("/v1/completions", json={"model": "smollm2", "prompt": "1, 2, 3, 4,", "max_tokens": 8,
                                            "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        assert "simple engine, q8_0 KV cache" in suite.children["infer@smollm2"].ready_status
        assert "K (q8_0)" in suite.log_text("infer@smollm2")
