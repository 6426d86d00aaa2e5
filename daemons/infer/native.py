"""A thin typed layer over llama.cpp's low-level API (llama-cpp-python's ctypes module).

Only the feeder thread calls into a `Context`. Every return code is checked: pitfalls
that abort the process in llama.cpp (more tokens than n_batch in one batch, position
gaps) are refused here before the call.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import llama_cpp

from daemons.infer.request import GenRequest

llama_log = logging.getLogger("llama.cpp")

# llama-cpp-python's own greedy/penalty defaults, so one request matches its output.
PENALTY_LAST_N = 64

_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error


class LlamaError(Exception):
    """A llama.cpp call failed."""


class KvFull(LlamaError):
    """llama_decode returned 1: no KV slot for the batch."""


class _LogForwarder:
    """Routes llama.cpp's log lines to Python logging ("llama.cpp" logger, debug
    unless llama.cpp says warning/error) and lets a caller capture them for a while."""

    def __init__(self) -> None:
        self._buf = ""
        self._level = logging.DEBUG
        self._lock = threading.Lock()
        self._captured: list[str] | None = None
        self.callback = llama_cpp.llama_log_callback(self._on_log)

    def _on_log(self, level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        with self._lock:
            if level != 5:  # 5: continues the previous line at its level
                self._level = _LEVELS.get(level, logging.DEBUG)
            self._buf += text.decode("utf-8", "replace")
            while "\n" in self._buf:
                line, self._buf = self._buf.split("\n", 1)
                if self._captured is not None:
                    self._captured.append(line)
                if line.strip():
                    llama_log.log(self._level, "%s", line)

    @contextmanager
    def capture(self) -> Iterator[list[str]]:
        lines: list[str] = []
        with self._lock:
            self._captured = lines
        try:
            yield lines
        finally:
            with self._lock:
                self._captured = None


_forwarder: _LogForwarder | None = None


def forward_llama_logs() -> _LogForwarder:
    """Install the forwarder once per process (replacing llama-cpp-python's printer)."""
    global _forwarder
    if _forwarder is None:
        _forwarder = _LogForwarder()
        llama_cpp.llama_log_set(_forwarder.callback, ctypes.c_void_p(0))
    return _forwarder


@dataclass(frozen=True)
class KvShape:
    """What one KV cell costs, from the GGUF metadata (f16 K and V, every layer)."""

    n_layer: int
    n_head_kv: int
    key_length: int
    value_length: int
    bytes_per_value: int = 2

    @property
    def bytes_per_cell(self) -> int:
        return self.n_layer * self.n_head_kv * (self.key_length + self.value_length) * self.bytes_per_value


def meta(model: Any, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode() if n >= 0 else None


def kv_shape(model: Any) -> KvShape:
    arch = meta(model, "general.architecture") or "llama"
    n_layer = llama_cpp.llama_model_n_layer(model)
    n_head = llama_cpp.llama_model_n_head(model)
    n_head_kv = llama_cpp.llama_model_n_head_kv(model)
    n_embd = llama_cpp.llama_model_n_embd(model)
    head = n_embd // max(1, n_head)

    def length(kind: str) -> int:
        value = meta(model, f"{arch}.attention.{kind}_length")
        return int(value) if value and value.isdigit() else head

    return KvShape(n_layer, n_head_kv, length("key"), length("value"))


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


# llama.cpp's own account of what it allocated besides weights and KV.
_MIB = re.compile(r"(?:compute|output) buffer size\s*=\s*([\d.]+)\s*MiB")


class Context:
    """One llama_context: `n_seq_max` sequences over a unified pool of `n_cells` cells."""

    def __init__(self, model: Any, n_cells: int, n_seq_max: int, n_batch: int, threads: int,
                 flash_attn: bool) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_cells
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.kv_unified = True
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        # Explicit, never "auto": batched output is compared with single runs only
        # under the same setting (the CPU flash-attention kernel varies with row count).
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        with forward_llama_logs().capture() as lines:
            ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            raise LlamaError(f"llama_init_from_model failed ({n_cells} cells, {n_seq_max} sequences)")
        self.ctx = ctx
        self.model = model
        self.compute_bytes = int(sum(float(m.group(1)) for m in map(_MIB.search, lines) if m) * 2**20)
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


class Batch:
    """A reusable llama_batch; `add` refuses what would abort llama.cpp."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.n = 0

    def clear(self) -> None:
        self.n = 0
        self.raw.n_tokens = 0

    def add(self, seq: int, tokens: Sequence[int], pos: int, logits_last: bool) -> int:
        """Append tokens of one sequence at positions pos..; returns the batch index of
        the last one (where its logits are, when asked for)."""
        k = len(tokens)
        if k > self.capacity - self.n:
            raise LlamaError(f"batch overflow: {self.n} + {k} > n_batch {self.capacity}")
        raw, i = self.raw, self.n
        for j, tok in enumerate(tokens):
            raw.token[i + j] = tok
            raw.pos[i + j] = pos + j
            raw.n_seq_id[i + j] = 1
            raw.seq_id[i + j][0] = seq
            raw.logits[i + j] = 0
        if logits_last:
            raw.logits[i + k - 1] = 1
        self.n += k
        raw.n_tokens = self.n
        return i + k - 1

    def close(self) -> None:
        if self.raw is not None:
            llama_cpp.llama_batch_free(self.raw)
            self.raw = None


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


class Pieces:
    """Token -> bytes, cached (the vocab never changes)."""

    def __init__(self, vocab: Any) -> None:
        self.vocab = vocab
        self._cache: dict[int, bytes] = {}
        self._buf = ctypes.create_string_buffer(256)

    def __call__(self, token: int) -> bytes:
        piece = self._cache.get(token)
        if piece is None:
            n = llama_cpp.llama_token_to_piece(self.vocab, token, self._buf, len(self._buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
                piece = bytes(buf.raw[:max(0, n)])
            else:
                piece = bytes(self._buf.raw[:n])
            self._cache[token] = piece
        return piece
