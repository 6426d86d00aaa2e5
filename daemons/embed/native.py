"""An embedding model in llama.cpp: tokenizing with its own vocabulary and special tokens,
and one context that embeds many inputs per llama_decode (one sequence id each) and
reads back each sequence's pooled vector."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from daemons.llama import Batch, LlamaError, context_params, init_context, meta

log = logging.getLogger(__name__)

POOLING = {llama_cpp.LLAMA_POOLING_TYPE_MEAN: "mean", llama_cpp.LLAMA_POOLING_TYPE_CLS: "cls",
           llama_cpp.LLAMA_POOLING_TYPE_LAST: "last"}


class EmbedModel:
    """Weights, vocabulary and what the GGUF says about pooling, dimension and context."""

    def __init__(self, path: Path) -> None:
        try:
            self.lm = internals.LlamaModel(path_model=str(path), params=llama_cpp.llama_model_default_params(),
                                           verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise LlamaError(f"cannot load {path}: {exc}") from None
        model = self.lm.model
        self.path = path
        self.vocab = self.lm.vocab
        self.dim = int(llama_cpp.llama_model_n_embd(model))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        arch = meta(model, "general.architecture") or "?"
        pooling = meta(model, f"{arch}.pooling_type")
        self.pooling = int(pooling) if pooling and pooling.isdigit() else llama_cpp.LLAMA_POOLING_TYPE_NONE
        if self.pooling not in POOLING:
            raise LlamaError(f"{path.name} ({arch}) has no mean, CLS or last-token pooling in its metadata "
                             f"({arch}.pooling_type = {pooling}): not an embedding model this daemon can serve")
        self.name = meta(model, "general.name") or path.stem
        v = self.vocab
        self.prefix = [int(llama_cpp.llama_vocab_bos(v))] if llama_cpp.llama_vocab_get_add_bos(v) else []
        self.suffix = ([int(llama_cpp.llama_vocab_sep(v))] if llama_cpp.llama_vocab_get_add_sep(v) else []) + \
            ([int(llama_cpp.llama_vocab_eos(v))] if llama_cpp.llama_vocab_get_add_eos(v) else [])

    @property
    def size_bytes(self) -> int:
        return int(self.lm.size())

    def describe(self) -> str:
        return (f"{self.name}: {self.dim} dimensions, {POOLING[self.pooling]} pooling, context {self.n_ctx_train}, "
                f"{self.n_vocab} tokens")

    def tokenize(self, text: str) -> list[int]:
        """With the model's own special tokens (e.g. [CLS] ... [SEP]); text that looks like
        a special token is text."""
        return list(self.lm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def wrap(self, tokens: list[int]) -> list[int]:
        """Token ids a client sent: the special tokens the model adds to text, added too."""
        return self.prefix + tokens + self.suffix

    def fit(self, tokens: list[int], limit: int) -> list[int]:
        """Cut to `limit` tokens, keeping the closing special token(s) the model expects."""
        keep = self.suffix if tokens[-len(self.suffix):] == self.suffix else []
        return tokens[:limit - len(keep)] + keep if len(tokens) > limit else tokens


class EmbedContext:
    """Up to `n_seqs` inputs and `n_tokens` tokens per decode, pooled per sequence."""

    def __init__(self, model: EmbedModel, n_tokens: int, n_seqs: int, threads: int) -> None:
        # One micro-batch per decode matters here: n_ubatch below n_batch makes llama.cpp
        # split a batch, and a non-causal model then fails an assertion (the process aborts).
        # The unified pool lets one sequence use the whole context (a causal embedding
        # model keeps KV cells).
        params = context_params(n_tokens, n_tokens, n_seqs, threads)
        params.embeddings = True
        ctx, self.compute_bytes = init_context(model.lm.model, params, f"{n_tokens} tokens, {n_seqs} sequences")
        self.ctx = ctx
        self.model = model
        self.n_tokens = int(llama_cpp.llama_n_batch(ctx))
        self.n_seqs = int(llama_cpp.llama_n_seq_max(ctx))
        if self.n_tokens < n_tokens or self.n_seqs < n_seqs:
            llama_cpp.llama_free(ctx)
            raise LlamaError(f"llama.cpp gave n_batch {self.n_tokens}, n_seq_max {self.n_seqs}; asked for "
                             f"{n_tokens}, {n_seqs}")
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.batch = Batch(self.n_tokens)

    def embed(self, inputs: list[list[int]], normalize: bool) -> np.ndarray:
        """One decode: the pooled vector of each input, as float32 rows."""
        if len(inputs) > self.n_seqs:
            raise LlamaError(f"{len(inputs)} inputs in one batch; the context holds {self.n_seqs}")
        batch = self.batch
        batch.clear()
        for seq, tokens in enumerate(inputs):
            batch.add(seq, tokens, 0, logits_last=True, every=True)
        if self.mem:
            llama_cpp.llama_memory_clear(self.mem, True)
        rc = llama_cpp.llama_decode(self.ctx, batch.raw)
        if rc != 0:
            raise LlamaError(f"llama_decode returned {rc} for {len(inputs)} inputs of {batch.n} tokens")
        dim = self.model.dim
        out = np.empty((len(inputs), dim), dtype=np.float32)
        for seq in range(len(inputs)):
            ptr = llama_cpp.llama_get_embeddings_seq(self.ctx, seq)
            if not ptr:
                raise LlamaError(f"llama_get_embeddings_seq({seq}) returned nothing")
            out[seq] = np.frombuffer(ctypes.string_at(ptr, dim * 4), dtype=np.float32)
        if normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out /= np.maximum(norms, 1e-12)
        return out

    def close(self) -> None:
        if self.ctx:
            self.batch.close()
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
