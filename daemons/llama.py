"""What every daemon that runs llama.cpp shares: errors, llama.cpp's log lines routed to
Python logging, GGUF metadata, a checked llama_batch, token pieces.

A thin typed layer over llama-cpp-python's ctypes module; every return code is checked
and pitfalls that abort the process in llama.cpp (more tokens than n_batch in one
batch) are refused before the call. The inference and embedding daemons build their
own contexts on it (daemons/infer/native.py, daemons/embed/native.py).
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import llama_cpp

llama_log = logging.getLogger("llama.cpp")

_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error
# llama.cpp's own account of what it allocated besides weights and KV.
BUFFER_MIB = re.compile(r"(?:compute|output) buffer size\s*=\s*([\d.]+)\s*MiB")


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


def context_params(n_ctx: int, n_batch: int, n_seq_max: int, threads: int) -> Any:
    """llama_context_params both daemons start from: one micro-batch per decode
    (n_ubatch = n_batch), one unified cell pool any sequence may fill, no perf counters."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_ubatch = n_batch
    params.n_seq_max = n_seq_max
    params.kv_unified = True
    params.n_threads = threads
    params.n_threads_batch = threads
    params.no_perf = True
    return params


def init_context(model: Any, params: Any, what: str) -> tuple[Any, int]:
    """A llama_context and the bytes of compute/output buffers llama.cpp reserved for it
    (read from its own log lines); LlamaError if it could not be made, with llama.cpp's
    last log line (its reason, e.g. "quantized V cache requires flash_attn to be enabled")."""
    with forward_llama_logs().capture() as lines:
        ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        said = next((line.strip() for line in reversed(lines) if line.strip()), "")
        raise LlamaError(f"llama_init_from_model failed ({what})" + (f": {said}" if said else ""))
    return ctx, int(sum(float(m.group(1)) for m in map(BUFFER_MIB.search, lines) if m) * 2**20)


def meta(model: Any, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode() if n >= 0 else None


class Batch:
    """A reusable llama_batch; `add` refuses what would abort llama.cpp."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.n = 0

    def clear(self) -> None:
        self.n = 0
        self.raw.n_tokens = 0

    def add(self, seq: int, tokens: Sequence[int], pos: int, logits_last: bool, every: bool = False) -> int:
        """Append tokens of one sequence at positions pos..; returns the batch index of
        the last one (where its logits are, when asked for). `every` marks every token
        as an output (embeddings: llama.cpp pools over them)."""
        k = len(tokens)
        if k > self.capacity - self.n:
            raise LlamaError(f"batch overflow: {self.n} + {k} > n_batch {self.capacity}")
        raw, i = self.raw, self.n
        for j, tok in enumerate(tokens):
            raw.token[i + j] = tok
            raw.pos[i + j] = pos + j
            raw.n_seq_id[i + j] = 1
            raw.seq_id[i + j][0] = seq
            raw.logits[i + j] = 1 if every else 0
        if logits_last:
            raw.logits[i + k - 1] = 1
        self.n += k
        raw.n_tokens = self.n
        return i + k - 1

    def close(self) -> None:
        if self.raw is not None:
            llama_cpp.llama_batch_free(self.raw)
            self.raw = None


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
