"""`onebox plan`: the KV-cache arithmetic by hand, the CLI's answers and errors, GGUF
headers it must read, and agreement with what the real inference daemon logs at start."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from daemons import config as config_mod
from daemons import plan
from daemons import gguf_header
from daemons.ctl import plan_cmd
from daemons.infer.memory import RUNTIME_HEADROOM
from daemons.models import resolve
from tests.harness import MODEL_PATH, Suite, write_config

GB, GIB, MIB = 10**9, 2**30, 2**20
# The example: a Llama-3-style 20B, GQA with 8 KV heads of 128, 40 layers.
LLAMA_20B = ["--layers", "40", "--kv-heads", "8", "--head-dim", "128"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = plan_cmd.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    rc, out, err = run(capsys, *argv, "--json")
    assert rc in (0, 1), err
    report: dict[str, Any] = json.loads(out)
    return rc, report


# -- the arithmetic, by hand -----------------------------------------------------------

def test_20b_with_gqa_needs_5_gib_per_32k_slot(capsys: pytest.CaptureFixture[str]) -> None:
    per_token = 40 * 8 * 128 * 2 * 2  # layers x KV heads x head dim x (K and V) x 2 B (f16)
    assert per_token == 163_840  # 160 KiB
    per_slot = per_token * 32_768
    assert per_slot == 5_368_709_120 == 5 * GIB  # 5.00 GiB = 5.37 GB
    assert round(per_slot / GB, 2) == 5.37
    # The "≈5.2 GB" is what 32,000 tokens take (4.88 GiB), not 32K = 32,768.
    assert round(per_token * 32_000 / GB, 2) == 5.24

    rc, report = run_json(capsys, *LLAMA_20B, "--ctx", "32K", "--users", "1", "--memory", "64GiB",
                          "--params", "20B", "--weight-bits", "4.5")
    assert rc == 0
    assert report["bytes_per_token"] == per_token
    assert report["per_user"]["kv_bytes"] == per_slot
    assert report["memory"]["kv"] == per_slot and report["memory"]["kv_tokens"] == 32_768
    assert report["model"]["weights_bytes"] == 20 * 10**9 * 4.5 / 8

    rc, text, _ = run(capsys, *LLAMA_20B, "--ctx", "32768", "--users", "1", "--memory", "64GiB")
    line = next(ln for ln in text.splitlines() if "KV per user" in ln)
    assert "5,368,709,120 B" in line and "5.37 GB" in line and "5.00 GiB" in line
    assert "163,840 B (160.0 KiB)" in text
    assert "weights' size is unknown" in text  # no --params, no GGUF: said so


def test_40_kv_heads_push_one_slot_past_25_gb(capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = run_json(capsys, "--layers", "40", "--kv-heads", "40", "--head-dim", "128", "--ctx", "32K",
                          "--users", "1", "--memory", "24GiB")
    per_slot = 40 * 40 * 128 * 2 * 2 * 32_768
    assert report["per_user"]["kv_bytes"] == per_slot == 26_843_545_600  # 26.84 GB, exactly 25.00 GiB
    assert per_slot > 25 * GB
    assert rc == 1 and not report["fits"] and report["fit"]["users"] == 0
    assert report["recommended"] is None


def test_quantized_kv_uses_llama_cpp_block_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    f16 = run_json(capsys, *LLAMA_20B, "--ctx", "32K", "--users", "1", "--memory", "64GiB")[1]
    q8 = run_json(capsys, *LLAMA_20B, "--ctx", "32K", "--users", "1", "--memory", "64GiB", "--kv-type", "q8_0")[1]
    q4 = run_json(capsys, *LLAMA_20B, "--ctx", "32K", "--users", "1", "--memory", "64GiB", "--kv-type", "q4_0")[1]
    # 34 B per 32 values against 2 B a value: 34/64 of f16; q4_0 18/64.
    assert q8["bytes_per_token"] * 64 == f16["bytes_per_token"] * 34 == 40 * 8 * 2 * (128 // 32) * 34 * 64
    assert q4["bytes_per_token"] * 64 == f16["bytes_per_token"] * 18
    for report in (q8, q4):
        assert any("needs flash attention" in n for n in report["notes"])
        assert not any("allocates f16" in n for n in report["notes"])  # it allocates what kv_type says
        assert report["recommended"]["settings"]["flash_attn"] is True
        assert report["recommended"]["settings"]["kv_type"] == report["kv_type"]
        assert f'kv_type = "{report["kv_type"]}"\nflash_attn = true\n' in report["recommended"]["toml"]
    assert "kv_type" not in f16["recommended"]["settings"] and "kv_type" not in f16["recommended"]["toml"]
    assert plan.row_bytes(64, "q4_0") == 36 and plan.row_bytes(64, "f16") == 128
    with pytest.raises(ValueError, match="not whole blocks"):
        plan.row_bytes(40, "q8_0")


def test_a_shared_prefix_is_held_once(capsys: pytest.CaptureFixture[str]) -> None:
    # 4 users of 8,192 tokens whose first 2,048 are the same: 2,048 + 4 x 6,144 cells.
    assert plan.kv_cells(4, 8192, 2048) == 26_624
    assert plan.kv_cells(4, 8192) == 32_768 and plan.kv_cells(0, 8192, 2048) == 0
    rc, report = run_json(capsys, *LLAMA_20B, "--ctx", "8K", "--users", "4", "--shared-prefix", "2K",
                          "--memory", "64GiB")
    assert rc == 0
    assert report["memory"]["kv_tokens"] == 26_624  # already a multiple of llama.cpp's 256
    assert report["memory"]["kv"] == 26_624 * 163_840
    assert report["per_user"]["kv_bytes_past_prefix"] == 6_144 * 163_840
    assert report["recommended"]["settings"]["kv_tokens"] == 26_624
    assert plan.pad_cells(1000) == 1024 and plan.pad_cells(1024) == 1024


def test_users_that_fit_a_budget(capsys: pytest.CaptureFixture[str]) -> None:
    # 40 GiB budget, 10 GiB of weights: 30 GiB less runtime, headroom and compute buffers
    # (well under 1 GiB here) for users of 5 GiB (32K tokens at 160 KiB): 5 fit, not 6.
    base = [*LLAMA_20B, "--ctx", "32K", "--model-bytes", "10GiB", "--memory", "40GiB"]
    rc, report = run_json(capsys, *base)
    assert rc == 0 and report["fit"]["users"] == 5 and report["users"] == 5
    assert report["fit"]["users_with_prefix"] is None
    m = report["memory"]
    assert m["total"] == m["model"] + m["kv"] + m["compute"] + m["runtime"] + RUNTIME_HEADROOM <= 40 * GIB
    assert m["model"] == 10 * GIB and m["kv"] == 5 * 5 * GIB
    assert run_json(capsys, *base, "--users", "5")[0] == 0
    rc, six = run_json(capsys, *base, "--users", "6")
    assert rc == 1 and not six["fits"] and six["memory"]["total"] > 40 * GIB
    assert six["recommended"]["users"] == 5  # what does fit
    # With an 8K prefix shared: 1.25 GiB once, then 3.75 GiB a user: 1.25 + 7 x 3.75 = 27.5 GiB
    # fits in 30 GiB less the overheads; 8 users (31.25 GiB) do not.
    rc, shared = run_json(capsys, *base, "--shared-prefix", "8K")
    assert shared["fit"] == {"users": 5, "users_with_prefix": 7}
    assert shared["recommended"]["settings"] == {"n_ctx": 32_768, "slots": 7, "kv_tokens": 8192 + 7 * 24_576,
                                                 "memory_budget_mb": 40 * 1024, "flash_attn": True}
    assert "[models.NAME]\n" in shared["recommended"]["toml"]
    assert "slots = 7\nkv_tokens = 180224\nmemory_budget_mb = 40960\n" in shared["recommended"]["toml"]


def test_json_shape(capsys: pytest.CaptureFixture[str]) -> None:
    _, report = run_json(capsys, *LLAMA_20B, "--ctx", "4096", "--users", "2", "--memory", "8GiB")
    assert set(report) >= {"model", "kv_type", "bytes_per_token", "daemon_bytes_per_cell", "ctx", "shared_prefix",
                           "users", "per_user", "memory", "fit", "configured", "recommended", "fits", "notes"}
    assert set(report["memory"]) >= {"kv_tokens", "slots", "bytes_per_cell", "model", "kv", "compute", "runtime",
                                     "headroom", "total", "budget", "budget_from", "fits", "weights_known"}
    assert report["model"]["source"] == "explicit" and report["model"]["weights_bytes"] is None
    assert report["configured"] is None  # only for a configured model
    assert set(report["recommended"]) == {"table", "users", "settings", "toml"}
    assert all(isinstance(n, str) for n in report["notes"])


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        plan_cmd.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: onebox plan")
    for flag in ("--model", "--ctx", "--users", "--kv-type", "--memory", "--shared-prefix", "--layers", "--json"):
        assert flag in out


@pytest.mark.parametrize("argv, says", [
    ([], "--layers, --kv-heads, --head-dim missing"),
    (["--layers", "40", "--kv-heads", "8"], "--head-dim missing"),
    ([*LLAMA_20B, "--memory", "24G"], "GiB"),
    ([*LLAMA_20B, "--memory", "lots"], "expected a size"),
    ([*LLAMA_20B, "--kv-type", "q5_1"], "invalid choice"),
    ([*LLAMA_20B, "--kv-heads", "0"], "at least 1"),
    ([*LLAMA_20B, "--ctx", "32"], "at least 64"),
    ([*LLAMA_20B, "--ctx", "4096", "--shared-prefix", "4096"], "--shared-prefix"),
    (["--layers", "2", "--kv-heads", "1", "--head-dim", "40", "--kv-type", "q8_0"], "not whole blocks"),
    ([*LLAMA_20B, "--params", "20B", "--model-bytes", "1GB"], "not both"),
    (["--model", "/nonexistent/model.gguf"], "does not exist"),
    (["--model", str(Path(__file__)), "--users", "1"], "not a GGUF"),
])
def test_bad_input_is_one_clear_error_and_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                 says: str) -> None:
    try:
        rc = plan_cmd.main(argv)
    except SystemExit as exc:  # argparse's own: usage, then the error
        rc = int(exc.code or 0)
    err = capsys.readouterr().err
    assert rc == 2
    assert says in err
    assert "Traceback" not in err


def test_model_with_explicit_numbers_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "--model", str(installed_model()), "--layers", "40")
    assert rc == 2 and err.strip() == "onebox plan: --layers: only without --model (the GGUF says)"


def test_sizes_and_counts_parse() -> None:
    assert plan_cmd.parse_bytes("24GiB") == 24 * GIB and plan_cmd.parse_bytes("24GB") == 24 * GB
    assert plan_cmd.parse_bytes("1.5 TiB") == 3 * 2**39 and plan_cmd.parse_bytes("25769803776") == 24 * GIB
    assert plan_cmd.parse_params("20B") == 20 * 10**9 and plan_cmd.parse_params("135M") == 135 * 10**6
    assert plan_cmd.parse_tokens("32K") == 32_768 and plan_cmd.parse_tokens("32000") == 32_000


# -- GGUF headers ---------------------------------------------------------------------

def write_gguf(path: Path, endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE) -> None:
    """A 4-layer model with per-layer KV heads (one layer without attention), keys and
    values of different sizes, sliding-window layers named in the file, a long vocabulary."""
    w = gguf.GGUFWriter(path, "testarch", endianess=endianess)
    w.add_block_count(4)
    w.add_context_length(8192)
    w.add_embedding_length(1024)
    w.add_feed_forward_length(4096)
    w.add_head_count(16)
    w.add_head_count_kv([8, 8, 0, 4])
    w.add_key_length(128)
    w.add_value_length(96)
    w.add_sliding_window(1024)
    w.add_sliding_window_pattern([True, False, True, False])
    w.add_token_list([f"t{i}" for i in range(5000)])  # longer than the reader keeps
    w.add_tensor("a", np.zeros((4, 8), dtype=np.float32))
    w.add_tensor("b", np.zeros((3, 32), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_reads_per_layer_heads_kv_dims_and_sliding_layers(tmp_path: Path, endianess: gguf.GGUFEndian) -> None:
    path = tmp_path / "test.gguf"
    write_gguf(path, endianess)
    header = gguf_header.read_header(path)
    assert header.tensor_bytes == 4 * 8 * 4 + 3 * 32 * 2
    arch = gguf_header.arch_of(header.metadata)
    assert arch.n_head_kv == (8, 8, 0, 4) and arch.per_layer_heads
    assert (arch.key_length, arch.value_length, arch.n_ctx_train, arch.n_vocab) == (128, 96, 8192, 5000)
    assert arch.n_swa == 1024 and arch.swa_layers == (True, False, True, False)
    assert plan.bytes_per_cell(arch) == (8 + 8 + 0 + 4) * (128 + 96) * 2  # what llama.cpp allocates
    assert plan.daemon_bytes_per_cell(arch, "f16") == 4 * 8 * (128 + 96) * 2  # layer 0's heads x every layer
    # q8_0: 128 and 96 values are 4 and 3 blocks of 34 bytes.
    assert plan.bytes_per_cell(arch, "q8_0") == (8 + 8 + 0 + 4) * (4 + 3) * 34
    assert plan.daemon_bytes_per_cell(arch, "q8_0") == 4 * 8 * (4 + 3) * 34


def test_a_gguf_with_per_layer_heads_plans_with_the_larger_figure(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "test.gguf"
    write_gguf(path)
    rc, report = run_json(capsys, "--model", str(path), "--ctx", "4096", "--users", "2", "--memory", "1GiB")
    assert report["model"]["n_head_kv"] == [8, 8, 0, 4]
    assert report["memory"]["bytes_per_cell"] == report["daemon_bytes_per_cell"] > report["bytes_per_token"]
    notes = " ".join(report["notes"])
    assert "vary by layer" in notes and "differ in size" in notes and "2 of 4 layers" in notes
    assert report["model"]["sliding_window"] == {"n_swa": 1024, "layers": [True, False, True, False]}
    assert f'path = "{path.resolve()}"' in report["recommended"]["toml"]


def installed_model() -> Path:
    return resolve(MODEL_PATH, Path("/nonexistent"))


def test_reads_the_installed_models_header_quickly() -> None:
    started = time.monotonic()
    header = gguf_header.read_header(installed_model())
    assert time.monotonic() - started < 1.0  # gguf's GGUFReader takes seconds for its vocabulary
    arch = gguf_header.arch_of(header.metadata)
    assert (arch.n_layer, arch.n_head_kv[0], arch.key_length, arch.value_length) == (30, 3, 64, 64)
    assert plan.bytes_per_cell(arch) == 23_040  # daemons/config/models.py: "SmolLM2-135M: 22.5 KiB"


# -- against the real daemon ----------------------------------------------------------

MEMORY_LINE = re.compile(
    r"memory: model (\d+) MiB \+ KV (\d+) MiB \((\d+) cells x (\d+) B\) \+ compute buffers (\d+) MiB \+ "
    r"runtime (\d+) MiB \+ headroom (\d+) MiB = (\d+) MiB; budget (\d+) MiB "
    r"\(KV (\w+): (\d+) layers x (\d+) KV heads x \((\d+) \+ (\d+)\) x ([\d/]+) B per cell\)")


def close(a: float, b: float, within: float = 0.01) -> bool:
    return abs(a - b) <= within * max(abs(a), abs(b))


def check_plan_matches_log(log: str, cfg: Path, kv_type: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """`onebox plan` for the config's smollm2 against the daemon's 'memory: ...' line and
    llama.cpp's own account in `log` (the harness logs at debug level): the same cells,
    bytes per cell and budget, compute buffers and the total within 1%. The plan's report."""
    m = MEMORY_LINE.search(log)
    assert m, log[-3000:]
    (model_mib, kv_mib, cells, per_cell, _compute_mib, runtime_mib, headroom_mib, total_mib, budget_mib) = map(
        int, m.groups()[:9])
    logged_type, (layers, heads, key, value), value_bytes = m.group(10), map(int, m.groups()[10:14]), m.group(15)
    assert logged_type == kv_type
    block, size = plan.KV_TYPES[kv_type]
    assert value_bytes == (f"{size}" if block == 1 else f"{size}/{block}")
    # llama.cpp's own account, to two decimals.
    kv_alloc = float(re.findall(r"llama_kv_cache: size =\s*([\d.]+) MiB", log)[-1]) * MIB
    assert re.findall(r"K \((\w+)\):.*V \((\w+)\):", log)[-1] == (kv_type, kv_type)
    buffers = sum(float(x) for x in re.findall(r"(?:compute|output) buffer size =\s*([\d.]+) MiB", log)) * MIB

    _, report = run_json(capsys, "--config", str(cfg), "--model", "smollm2")
    md, now = report["model"], report["configured"]
    assert report["kv_type"] == now["kv_type"] == kv_type  # unasked, the configured kv_type
    assert (md["n_layer"], md["n_head_kv"], md["key_length"], md["value_length"]) == (layers, heads, key, value)
    assert report["bytes_per_token"] == report["daemon_bytes_per_cell"] == now["bytes_per_cell"] == per_cell
    assert per_cell == layers * heads * (key + value) * size // block
    assert now["kv_tokens"] == cells
    assert now["kv"] == cells * per_cell and close(now["kv"], kv_mib * MIB) and close(now["kv"], kv_alloc)
    assert close(now["model"], model_mib * MIB)
    assert close(now["compute"], buffers)  # the estimate, against what llama.cpp reserved
    assert now["headroom"] == headroom_mib * MIB and now["budget"] == budget_mib * MIB
    # The same sum, with the runtime the daemon measured in place of the planner's estimate.
    assert close(now["total"] - now["runtime"] + runtime_mib * MIB, total_mib * MIB)
    return report


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_matches_what_the_inference_daemon_logs_at_start(fresh_dir: Path, capsys: pytest.CaptureFixture[str],
                                                         kv_type: str) -> None:
    cfg = write_config(fresh_dir, model={"kv_tokens": 8192, "slots": 8, "memory_budget_mb": 2048,
                                         "kv_type": kv_type})
    suite = Suite(fresh_dir, cfg)
    try:
        suite.start_router()
        suite.start_infer()
        log = suite.log_text("infer@smollm2")
    finally:
        suite.stop()
    report = check_plan_matches_log(log, cfg, kv_type, capsys)
    assert report["configured"]["kv_tokens"] == 8192 and report["configured"]["slots"] == 8
    assert report["memory"]["budget_from"] == "[models.smollm2] memory_budget_mb"

    # `onebox report` shows the same plan for each configured model.
    plans = plan_cmd.report_plans(config_mod.load(cfg, sections=("paths", "models")))
    assert [p["title"] for p in plans] == ["[models.smollm2]: 8 slots x 2,048 tokens"]
    per_cell = f"{report['bytes_per_token']:,} B"
    assert per_cell == ("23,040 B" if kv_type == "f16" else "12,240 B") and per_cell in plans[0]["text"]
    kv_text = "" if kv_type == "f16" else f", kv_type {kv_type}"
    assert f"as configured now (8 slots, kv_tokens 8,192{kv_text})" in plans[0]["text"]
