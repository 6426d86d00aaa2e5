"""`onebox loadtest`: the figures it computes, and whole runs against a real router and
the smollm2 inference daemon (one suite for the module, with loopback TCP too), kept to
a few seconds each: a ramp to 2 users with JSON and a chart, Ctrl-C mid-step, TCP
without a key, and RAG with no index."""

from __future__ import annotations

import json
import os
import random
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemons.loadtest.stats import Dist, Step, Targets, percentile, steps_for, verdict
from daemons.loadtest.target import chat_models
from daemons.loadtest.users import Outcome
from daemons.loadtest.workload import Shape, UsageError, Workload, parse_weights
from tests.harness import interrupt, running_suite, write_config

LOADTEST = [sys.executable, "-m", "daemons.ctl.loadtest_cmd"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- the figures, without daemons ------------------------------------------------------


def test_steps_double_up_to_the_users_asked_for() -> None:
    assert steps_for(26) == [1, 2, 4, 8, 16, 26]
    assert steps_for(16) == [1, 2, 4, 8, 16]
    assert steps_for(2) == [1, 2]
    assert steps_for(1) == [1]
    with pytest.raises(ValueError):
        steps_for(0)


def test_percentiles_interpolate_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    random.Random(1).shuffle(values)
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0


def step(errors: int = 0, ok: int = 10, ttft_p99: float = 0.5, e2e_p99: float = 2.0) -> Step:
    return Step(users=4, planned_s=10, window_s=10, drain_s=0, interrupted=False, ok=ok, errors=errors,
                errors_by_kind={"429 overloaded": errors} if errors else {}, error_samples={}, cancelled=0,
                ttft_s=Dist(0.1, ttft_p99, 0.2, ttft_p99, ok), itl_ms=Dist(10, 20, 12, 30, 100),
                e2e_s=Dist(1.0, e2e_p99, 1.2, e2e_p99, ok), tokens_per_s=100, requests_per_s=1,
                completion_tokens=640, by_kind={"chat": ok + errors})


def test_a_step_breaks_on_errors_or_a_p99_over_its_target() -> None:
    assert verdict(step(), Targets()) is None
    assert "429 overloaded x1" in (verdict(step(errors=1), Targets()) or "")
    # 1 in 11 is under a 10 % allowance, 2 in 12 is over it.
    assert verdict(step(errors=1), Targets(max_error_rate=0.1)) is None
    assert "over 10.0%" in (verdict(step(errors=2), Targets(max_error_rate=0.1)) or "")
    assert verdict(step(ttft_p99=0.5), Targets(p99_ttft_s=1)) is None
    assert "p99 TTFT 1.50 s over 1 s" in (verdict(step(ttft_p99=1.5), Targets(p99_ttft_s=1)) or "")
    assert "p99 end-to-end 9.00 s over 5 s" in (verdict(step(e2e_p99=9), Targets(p99_e2e_s=5)) or "")


def test_outcome_timings_come_from_the_chunks() -> None:
    out = Outcome("chat", started=10.0, ended=11.0, ok=True, token_times=[10.2, 10.3, 10.5])
    assert out.ttft == pytest.approx(0.2)
    assert out.gaps == pytest.approx([0.1, 0.2])
    assert out.e2e == pytest.approx(1.0)
    assert out.tokens == 3  # no usage chunk: the content chunks
    out.completion_tokens = 4
    assert out.tokens == 4


def test_workload_bodies_and_weights() -> None:
    rng = random.Random(0)
    rag = Workload("m", "rag", Shape()).body("rag", rng)
    assert rag["rag"] == {} and rag["stream"] is True and rag["stream_options"] == {"include_usage": True}
    named = Workload("m", "rag", Shape(collection="manuals")).body("rag", rng)
    assert named["rag"] == {"collection": "manuals"}
    assert "rag" not in Workload("m", "chat", Shape()).body("chat", rng)
    long = Workload("m", "long", Shape(long_tokens=1000)).prompt("long", rng)
    assert 700 < len(long.split()) < 1000  # about a word a token, less the template's share
    mixed = Workload("m", "mixed", Shape(weights=parse_weights("chat=1,long=1")))
    assert {mixed.pick(rng) for _ in range(50)} == {"chat", "long"}
    with pytest.raises(UsageError):
        parse_weights("chat=1,video=2")
    with pytest.raises(UsageError):
        parse_weights("chat=0")


def test_the_first_chat_model_is_picked_with_its_context_when_listed() -> None:
    body = {"data": [{"id": "minilm", "kind": "embedding"}, {"id": "smollm2", "kind": "chat", "ready": True},
                     {"id": "other", "max_model_len": 8192}]}
    models = chat_models(body)
    assert [m.id for m in models] == ["smollm2", "other"]
    assert models[0].ready is True and models[0].context is None and models[1].context == 8192


# -- whole runs against real daemons ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Target:
    dir: Path
    config: Path
    url: str


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="onebox-") as d:
        config = write_config(Path(d), extra=f'[router]\ntcp = "127.0.0.1:{port}"\n')
        with running_suite(Path(d), config):
            yield Target(Path(d), config, f"http://127.0.0.1:{port}")


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ONEBOX")}


def loadtest(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(LOADTEST + list(args), capture_output=True, text=True, timeout=timeout, env=env())


def last_json(stdout: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return doc


def test_a_ramp_to_two_users_writes_its_figures_and_a_chart(target: Target, tmp_path: Path) -> None:
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    # Short answers: a step waits for its last requests, and on 2 busy cores 64 tokens can take seconds.
    r = loadtest("--config", str(target.config), "--users", "2", "--duration", "3", "--mix", "chat",
                 "--max-tokens", "16", "--json", str(out), "--plot", str(png))
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    assert doc["model"] == "smollm2" and doc["broke_at"] is None and not doc["interrupted"]
    assert doc["context"] == {"tokens": 2048, "source": "config"}
    assert [s["users"] for s in doc["steps"]] == [1, 2]
    for s in doc["steps"]:
        assert s["errors"] == 0 and s["errors_by_kind"] == {} and s["ok"] >= 1, s
        for key in ("ttft_s", "itl_ms", "e2e_s"):
            assert isinstance(s[key]["p50"], float) and s[key]["p99"] >= s[key]["p50"] > 0, (key, s)
        assert s["tokens_per_s"] > 0 and s["completion_tokens"] > 0
        assert 10 < s["prompt_tokens_mean"]["chat"] < 80  # ~20 words and the chat template
    assert "TTFT s p50/p99" in r.stdout and "did not break: up to 2 user(s)" in r.stdout
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000


def read_until(stream: Any, needle: str, timeout: float) -> str:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle.encode() not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{needle!r} not printed within {timeout} s; got:\n{seen.decode(errors='replace')}"
        if select.select([stream], [], [], remaining)[0]:
            chunk = os.read(stream.fileno(), 65536)
            assert chunk, f"output ended before {needle!r}:\n{seen.decode(errors='replace')}"
            seen += chunk
    return seen.decode(errors="replace")


def test_ctrl_c_mid_step_reports_what_it_has_over_tcp_with_a_key(target: Target, tmp_path: Path) -> None:
    made = subprocess.run([sys.executable, "-m", "daemons.ctl.main", "keys", "create", "loadtester", "--config",
                           str(target.config)], capture_output=True, text=True, timeout=60, env=env())
    assert made.returncode == 0, made.stderr
    key = tmp_path / "key"
    key.write_text(made.stdout.strip() + "\n")
    proc = subprocess.Popen(LOADTEST + ["--url", target.url, "--api-key-file", str(key), "--users", "4",
                                        "--duration", "3", "--max-tokens", "16", "--json", "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    try:
        assert proc.stderr is not None
        read_until(proc.stderr, "step 1/3", timeout=30)
        time.sleep(0.7)  # into step 2
    finally:
        stdout, stderr = interrupt(proc)
    text = stdout.decode()
    assert proc.returncode == 130, text + stderr.decode()
    assert "interrupted after" in text and "interrupted at 2 user(s)" in text
    doc = last_json(text)
    assert doc["interrupted"] is True and [s["users"] for s in doc["steps"]] == [1, 2]
    first, partial = doc["steps"]
    assert first["errors"] == 0 and first["ok"] >= 1 and not first["interrupted"]
    assert partial["interrupted"] and partial["window_s"] < 3
    assert partial["errors"] == 0  # the requests Ctrl-C cut off are dropped, not errors


def test_tcp_without_a_key_is_401_by_kind(target: Target) -> None:
    r = loadtest("--url", target.url, "--model", "smollm2", "--users", "1", "--duration", "1", "--json", "-")
    assert r.returncode == 1, r.stdout + r.stderr  # it broke at the first step
    step = last_json(r.stdout)["steps"][0]
    assert step["ok"] == 0 and set(step["errors_by_kind"]) == {"401 invalid_api_key"}, step
    assert "401 invalid_api_key x" in r.stdout and "--api-key-file" in r.stdout
    assert "broke at 1 user(s)" in r.stdout
    # Without --model there is no model to load: one line says why, and what to do.
    r = loadtest("--url", target.url, "--users", "1", "--duration", "1")
    assert r.returncode == 1 and "HTTP 401" in r.stderr and "--api-key-file" in r.stderr, r.stderr


def test_rag_without_an_index_is_an_error_kind_not_a_crash(target: Target) -> None:
    r = loadtest("--config", str(target.config), "--mix", "rag", "--users", "1", "--duration", "1", "--json", "-")
    assert r.returncode == 1, r.stdout + r.stderr
    step = last_json(r.stdout)["steps"][0]
    assert set(step["errors_by_kind"]) == {"503 index_unavailable"}, step
    assert "document index does not exist" in step["error_samples"]["503 index_unavailable"]
    assert "is onebox-ingest running" in r.stdout
