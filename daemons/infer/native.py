"""The inference daemon's llama.cpp context: one unified KV pool for many sequences,
and each request's sampler chain. Only the feeder thread calls into a `Context`. What
any llama.cpp daemon needs (errors, logs, batches, pieces) is in daemons/llama.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp

from daemons.infer.request import GenRequest
from daemons.llama import Batch, KvFull, LlamaError, context_params, init_context, meta
from daemons.infer.memory import KV_TYPES, row_bytes

# llama-cpp-python's own greedy/penalty defaults, so one request matches its output.
PENALTY_LAST_N = 64
# [models.NAME] kv_type -> llama.cpp's ggml_type for type_k and type_v.
GGML_TYPES: dict[str, int] = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0,
                              "q4_0": llama_cpp.GGML_TYPE_Q4_0}


def ggml_type(kv_type: str) -> int:
    try:
        return GGML_TYPES[kv_type]
    except KeyError:
        raise ValueError(f"kv_type {kv_type!r}: expected one of {', '.join(GGML_TYPES)}") from None


@dataclass(frozen=True)
class KvShape:
    """What one KV cell costs, from the GGUF metadata: K and V of every layer, each head
    stored in blocks of the cache type (daemons/infer/memory.py row_bytes)."""

    n_layer: int
    n_head_kv: int
    key_length: int
    value_length: int
    kv_type: str = "f16"

    @property
    def bytes_per_cell(self) -> int:
        """ValueError when a head is not whole blocks of kv_type (llama.cpp would refuse)."""
        return self.n_layer * self.n_head_kv * (row_bytes(self.key_length, self.kv_type)
                                                + row_bytes(self.value_length, self.kv_type))

    @property
    def value_bytes(self) -> str:
        """Bytes per value as the plan prints them: "2 B" (f16), "34/32 B" (q8_0)."""
        block, size = KV_TYPES[self.kv_type]
        return f"{size} B" if block == 1 else f"{size}/{block} B"


def kv_shape(model: Any, kv_type: str = "f16") -> KvShape:
    arch = meta(model, "general.architecture") or "llama"
    n_layer = llama_cpp.llama_model_n_layer(model)
    n_head = llama_cpp.llama_model_n_head(model)
    n_head_kv = llama_cpp.llama_model_n_head_kv(model)
    n_embd = llama_cpp.llama_model_n_embd(model)
    head = n_embd // max(1, n_head)

    def length(kind: str) -> int:
        value = meta(model, f"{arch}.attention.{kind}_length")
        return int(value) if value and value.isdigit() else head

    return KvShape(n_layer, n_head_kv, length("key"), length("value"), kv_type)


def unsupported_reason(model: Any) -> str | None:
    """Why the batch engine cannot serve this model (its cells are not plain KV)."""
    if llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model):
        return "recurrent/hybrid models keep per-sequence state, not shareable KV cells"
    if llama_cpp.llama_model_has_encoder(model):
        return "encoder-decoder models are not supported"
    return None


def batch_refusal(path: str) -> str | None:
    """unsupported_reason() of the GGUF at `path`, read from its metadata alone (a
    vocabulary-only load: milliseconds, no weights); None when it cannot be read (the
    real load will then say why)."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    if not model:
        return None
    try:
        return unsupported_reason(model)
    finally:
        llama_cpp.llama_model_free(model)


class Context:
    """One llama_context: `n_seq_max` sequences over a unified pool of `n_cells` cells."""

    def __init__(self, model: Any, n_cells: int, n_seq_max: int, n_batch: int, threads: int,
                 flash_attn: bool, kv_type: str = "f16") -> None:
        params = context_params(n_cells, n_batch, n_seq_max, threads)
        # Explicit, never "auto": batched output is compared with single runs only
        # under the same setting (the CPU flash-attention kernel varies with row count).
        # (With "auto" llama.cpp would also turn it on by itself for a quantized V.)
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.type_k = params.type_v = ggml_type(kv_type)
        self.kv_type = kv_type
        ctx, self.compute_bytes = init_context(model, params, f"{n_cells} cells, {n_seq_max} sequences, "
                                                              f"{kv_type} KV")
        self.ctx = ctx
        self.model = model
        self.n_batch = int(llama_cpp.llama_n_batch(ctx))
        self.n_cells = int(llama_cpp.llama_n_ctx(ctx))
        self.n_seq_max = int(llama_cpp.llama_n_seq_max(ctx))
        if self.n_batch < n_batch or self.n_cells < n_cells or self.n_seq_max < n_seq_max:
            llama_cpp.llama_free(ctx)
            raise LlamaError(f"llama.cpp gave n_batch {self.n_batch}, n_ctx {self.n_cells}, n_seq_max "
                             f"{self.n_seq_max}; asked for {n_batch}, {n_cells}, {n_seq_max}")
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.batch = Batch(self.n_batch)

    def decode(self) -> None:
        """Decode the current batch; raises KvFull (rc 1) or LlamaError (anything else)."""
        n = self.batch.n
        if n == 0:
            return
        rc = llama_cpp.llama_decode(self.ctx, self.batch.raw)
        if rc == 1:
            raise KvFull(f"llama_decode: no KV slot for a batch of {n} tokens")
        if rc != 0:
            raise LlamaError(f"llama_decode returned {rc} for a batch of {n} tokens"
                             + (" (invalid batch)" if rc == -1 else ""))

    def seq_rm(self, seq: int) -> None:
        if not llama_cpp.llama_memory_seq_rm(self.mem, seq, -1, -1):
            raise LlamaError(f"llama_memory_seq_rm({seq}) failed")

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        llama_cpp.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def close(self) -> None:
        if self.ctx:
            self.batch.close()
            llama_cpp.llama_free(self.ctx)
            self.ctx = None


class Sampler:
    """One request's sampler chain: its own parameters and seed."""

    def __init__(self, gen: GenRequest, seed: int, n_vocab: int) -> None:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if not chain:
            raise LlamaError("llama_sampler_chain_init failed")
        self.chain = chain
        repeat = gen.repeat_penalty  # request.parse maps 0 to 1.0: llama.cpp divides by it
        self.penalized = repeat != 1.0 or gen.frequency_penalty != 0.0 or gen.presence_penalty != 0.0
        add = llama_cpp.llama_sampler_chain_add
        if self.penalized:
            add(chain, llama_cpp.llama_sampler_init_penalties(
                n_vocab, PENALTY_LAST_N, repeat, gen.frequency_penalty, gen.presence_penalty))
        if gen.temperature == 0.0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if gen.top_k > 0:
                add(chain, llama_cpp.llama_sampler_init_top_k(gen.top_k))
            if gen.top_p < 1.0:
                add(chain, llama_cpp.llama_sampler_init_top_p(gen.top_p, 1))
            if gen.min_p > 0.0:
                add(chain, llama_cpp.llama_sampler_init_min_p(gen.min_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(gen.temperature))
            add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def accept_prompt(self, tokens: Sequence[int]) -> None:
        """Penalties look at recent tokens, the prompt's included."""
        if self.penalized:
            for tok in tokens[-PENALTY_LAST_N:]:
                llama_cpp.llama_sampler_accept(self.chain, tok)

    def sample(self, ctx: Context, index: int) -> int:
        """Sample from the logits at batch `index` (and accept the token)."""
        return int(llama_cpp.llama_sampler_sample(self.chain, ctx.ctx, index))

    def close(self) -> None:
        if self.chain:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None


