"""The inference daemon's llama.cpp context: one unified KV pool for many sequences,
and each request's sampler chain. Only the feeder thread calls into a `Context`. What
any llama.cpp daemon needs (errors, logs, batches, pieces) is in daemons/llama.py."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

from daemons.bus.errors import RequestError

from daemons.infer.memory import KV_TYPES, row_bytes
from daemons.infer.request import GenRequest
from daemons.llama import Batch, KvFull, LlamaError, context_params, init_context, meta

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
    """One request's sampler chain: its own parameters and seed; with a grammar (JSON
    output, tool calls) and with logprobs, sampled from the logits by hand.

    A grammar masks the tokens that would leave it, which costs a pass over the whole
    vocabulary; as llama.cpp's common_sampler does, the chain picks a token first and
    the grammar checks only that one, masking the vocabulary only when it refuses, so
    constrained sequences cost little more than the rest of the batch."""

    def __init__(self, gen: GenRequest, seed: int, n_vocab: int, vocab: Any = None) -> None:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if not chain:
            raise LlamaError("llama_sampler_chain_init failed")
        self.chain = chain
        self.n_vocab = n_vocab
        self.grammar: Any = None
        self.top_logprobs = gen.logprobs
        # The token just sampled: (its logprob, [(token, logprob)] best first), with logprobs on.
        self.logprob: tuple[float, list[tuple[int, float]]] | None = None
        self._cur: np.ndarray | None = None
        repeat = gen.repeat_penalty  # request.parse maps 0 to 1.0: llama.cpp divides by it
        self.penalized = repeat != 1.0 or gen.frequency_penalty != 0.0 or gen.presence_penalty != 0.0
        # Greedy on the raw logits: the chain's pick is their argmax.
        self.plain_greedy = gen.temperature == 0.0 and not self.penalized and not gen.logit_bias
        add = llama_cpp.llama_sampler_chain_add
        if gen.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(gen.logit_bias))(
                *(llama_cpp.llama_logit_bias(tok, bias) for tok, bias in gen.logit_bias.items()))
            add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(gen.logit_bias), biases))
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
        if gen.grammar is not None:
            if vocab is None:
                self.close()
                raise LlamaError("a grammar needs the model's vocabulary")
            self.grammar = llama_cpp.llama_sampler_init_grammar(vocab, gen.grammar.encode(), b"root")
            if not self.grammar:
                self.close()
                raise RequestError("llama.cpp could not parse the grammar for this request's output constraint "
                                   "(response_format or tools)", 400)

    def accept_prompt(self, tokens: Sequence[int]) -> None:
        """Penalties look at recent tokens, the prompt's included."""
        if self.penalized:
            for tok in tokens[-PENALTY_LAST_N:]:
                llama_cpp.llama_sampler_accept(self.chain, tok)

    def sample(self, ctx: Context, index: int) -> int:
        """Sample from the logits at batch `index` (and accept the token)."""
        if self.grammar is None and self.top_logprobs is None:
            return int(llama_cpp.llama_sampler_sample(self.chain, ctx.ctx, index))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, index), shape=(self.n_vocab,))
        if self.grammar is None:
            token = int(llama_cpp.llama_sampler_sample(self.chain, ctx.ctx, index))
        else:
            token = self._constrained(logits)
            llama_cpp.llama_sampler_accept(self.grammar, token)
            llama_cpp.llama_sampler_accept(self.chain, token)
        if self.top_logprobs is not None:
            self.logprob = logprobs(logits, token, self.top_logprobs)
        return token

    def _constrained(self, logits: np.ndarray) -> int:
        """The token the chain would pick from the logits masked by the grammar."""
        if self.plain_greedy:
            # The masked argmax is the most likely token the grammar allows: try the
            # best few in order, one cheap check each, before masking the vocabulary.
            token = int(logits.argmax())
            if self._allowed(token, float(logits[token])):
                return token
            best = np.argpartition(-logits, GREEDY_TRIES)[:GREEDY_TRIES]
            for t in best[np.argsort(-logits[best], kind="stable")]:
                if self._allowed(int(t), float(logits[t])):
                    return int(t)
            return self._apply(logits, grammar_first=True)
        token = self._apply(logits, grammar_first=False)
        if self._allowed(token, float(logits[token])):
            return token
        return self._apply(logits, grammar_first=True)

    def _apply(self, logits: np.ndarray, grammar_first: bool) -> int:
        """The chain's pick over every token (masked by the grammar first, if asked)."""
        if self._cur is None:
            self._cur = np.zeros(self.n_vocab, dtype=TOKEN_DATA)
            self._cur["id"] = np.arange(self.n_vocab, dtype=np.int32)
        cur = self._cur
        cur["logit"] = logits
        cur["p"] = 0.0
        arr = llama_cpp.llama_token_data_array(
            data=cur.ctypes.data_as(llama_cpp.llama_token_data_p), size=self.n_vocab, selected=-1, sorted=False)
        if grammar_first:
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            raise LlamaError(f"the sampler chain selected no token (selected {arr.selected} of {arr.size})")
        # The chain may sort the array in place: what it selected is an index into it.
        return int(cur["id"][arr.selected])

    def _allowed(self, token: int, logit: float) -> bool:
        one = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, logit, 0.0))
        arr = llama_cpp.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        return bool(np.isfinite(one[0].logit))

    def close(self) -> None:
        if self.chain:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None


def check_grammar(vocab: Any, grammar: str) -> None:
    """RequestError (400) unless llama.cpp parses `grammar` (before the request queues)."""
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        raise RequestError("llama.cpp could not parse the grammar for this request's output constraint "
                           "(response_format or tools)", 400)
    llama_cpp.llama_sampler_free(sampler)


# Greedy under a grammar: the most likely tokens checked one by one before the grammar
# masks the whole vocabulary (a pass over every token's text: milliseconds).
GREEDY_TRIES = 32
# llama_token_data as numpy sees it: the array a sampler chain is applied to.
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """`token`'s log-probability under the model's distribution (the softmax of the raw
    logits, before penalties, temperature and truncation) and the `top` most likely
    tokens with theirs, best first."""
    x = logits.astype(np.float64)
    peak = float(x.max())
    lse = peak + float(np.log(np.exp(x - peak).sum()))
    best: list[tuple[int, float]] = []
    if top > 0:
        idx = np.argpartition(-x, top - 1)[:top]
        idx = idx[np.argsort(-x[idx], kind="stable")]
        best = [(int(i), float(x[i]) - lse) for i in idx]
    return float(x[token]) - lse, best
