"""A GGUF file's metadata and tensor sizes, read from its header without loading any
weights, and the model's shape (plan.Arch) from that metadata. `onebox plan` and
`onebox doctor` use it; `onebox models` the tensors' types (daemons/formats.py)."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from daemons import plan

# -- reading a GGUF header -------------------------------------------------------------
# gguf's GGUFReader turns every vocabulary string into numpy objects (3.3 s for the
# 135M default model); the plan needs a few keys and the tensors' sizes, so this walks
# the header with gguf's own type tables and skips long arrays, in milliseconds.

_SCALARS = {gguf.GGUFValueType.UINT8: "B", gguf.GGUFValueType.INT8: "b", gguf.GGUFValueType.UINT16: "H",
            gguf.GGUFValueType.INT16: "h", gguf.GGUFValueType.UINT32: "I", gguf.GGUFValueType.INT32: "i",
            gguf.GGUFValueType.FLOAT32: "f", gguf.GGUFValueType.BOOL: "?", gguf.GGUFValueType.UINT64: "Q",
            gguf.GGUFValueType.INT64: "q", gguf.GGUFValueType.FLOAT64: "d"}
KEEP_ARRAY = 4096  # longer arrays (the vocabulary, merges) are skipped; their length is kept


class GgufError(Exception):
    """Not a GGUF this planner can read."""


@dataclass(frozen=True)
class Skipped:
    """A long array: only its length was read."""

    count: int


@dataclass(frozen=True)
class Tensor:
    """One tensor's entry in the header: its shape (ggml order, ne[0] first) and type."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int  # a GGMLQuantizationType value; may be one gguf does not know

    @property
    def type_name(self) -> str:
        try:
            return gguf.GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type {self.ggml_type}"

    @property
    def elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Header:
    metadata: dict[str, Any]
    tensor_bytes: int | None  # None: a tensor type gguf does not know
    tensors: tuple[Tensor, ...] = ()


class _Cursor:
    def __init__(self, buf: mmap.mmap, order: str) -> None:
        self.buf = buf
        self.order = order
        self.pos = 0

    def scalar(self, code: str) -> Any:
        value = struct.unpack_from(self.order + code, self.buf, self.pos)[0]
        self.pos += struct.calcsize(code)
        return value

    def take(self, n: int) -> bytes:
        if n > len(self.buf) - self.pos:
            raise GgufError("truncated header")
        data = self.buf[self.pos:self.pos + n]
        self.pos += n
        return data

    def string(self) -> str:
        return self.take(self.scalar("Q")).decode("utf-8", "replace")

    def value(self, vtype: int) -> Any:
        if vtype == gguf.GGUFValueType.STRING:
            return self.string()
        if vtype == gguf.GGUFValueType.ARRAY:
            etype, count = self.scalar("I"), self.scalar("Q")
            # Every element takes at least a byte: a corrupt count cannot loop for long.
            if count > len(self.buf) - self.pos:
                raise GgufError("truncated header")
            if count <= KEEP_ARRAY:
                return [self.value(etype) for _ in range(count)]
            if etype == gguf.GGUFValueType.STRING:
                for _ in range(count):
                    self.take(self.scalar("Q"))
            elif etype in _SCALARS:
                self.take(count * struct.calcsize(_SCALARS[gguf.GGUFValueType(etype)]))
            else:
                raise GgufError(f"unsupported array of type {etype}")
            return Skipped(count)
        try:
            return self.scalar(_SCALARS[gguf.GGUFValueType(vtype)])
        except (KeyError, ValueError):
            raise GgufError(f"unknown value type {vtype}") from None


def read_header(path: Path) -> Header:
    """The metadata and the total bytes of the tensors (what llama.cpp reports as the
    model's size), from the header alone."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf)
    except (ValueError, OSError) as exc:  # mmap of an empty file is a ValueError
        raise GgufError(f"cannot read {path}: {exc}") from None
    except struct.error:
        raise GgufError(f"{path}: truncated header") from None


def _parse(buf: mmap.mmap) -> Header:
    if buf[:4] != b"GGUF":
        raise GgufError("not a GGUF file (no GGUF magic)")
    # Big-endian files (for s390x) say so by a version that reads byte-swapped.
    order = ">" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF == 0 else "<"
    cur = _Cursor(buf, order)
    cur.pos = 4
    version = cur.scalar("I")
    if version < 2:
        raise GgufError(f"GGUF version {version} is too old (2 or later)")
    n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("I"))
    total: int | None = 0
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("I")
        if n_dims > 8:  # GGML_MAX_DIMS is 4: a corrupt count
            raise GgufError(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(cur.scalar("Q") for _ in range(n_dims))
        ttype = cur.scalar("I")
        cur.scalar("Q")  # offset
        tensor = Tensor(name, shape, ttype)
        tensors.append(tensor)
        try:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (KeyError, ValueError):
            total = None
            continue
        if total is not None:
            total += tensor.elements // block * size
    return Header(metadata, total, tuple(tensors))


# -- the model's shape from its metadata ---------------------------------------------

# llama.cpp's sliding-window layer patterns for architectures whose GGUF does not list
# them (llama-model.cpp set_swa_pattern): every nth layer is global, the others slide.
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "gpt-oss": 2}


def _int(meta: dict[str, Any], key: str, default: int | None = None) -> int:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        if value is None:
            raise GgufError(f"no {key} in the metadata (not a language model?)")
        raise GgufError(f"{key} is {value!r}, not a number")
    return value


def _per_layer(meta: dict[str, Any], key: str, n_layer: int, default: Any = None) -> tuple[int, ...]:
    value = meta.get(key, default)
    if isinstance(value, list):
        if len(value) != n_layer or not all(isinstance(v, int) for v in value):
            raise GgufError(f"{key} has {len(value)} entries for {n_layer} layers")
        return tuple(value)
    return (_int(meta, key, value),) * n_layer


def arch_of(meta: dict[str, Any]) -> plan.Arch:
    a = str(meta.get("general.architecture", "llama"))
    n_layer = _int(meta, f"{a}.block_count")
    heads = _per_layer(meta, f"{a}.attention.head_count", n_layer)
    kv_heads = _per_layer(meta, f"{a}.attention.head_count_kv", n_layer, meta.get(f"{a}.attention.head_count"))
    n_embd = _int(meta, f"{a}.embedding_length")
    head = n_embd // max(1, heads[0])  # llama.cpp's default head size: layer 0's
    ff = meta.get(f"{a}.feed_forward_length", 0)
    vocab = meta.get(f"{a}.vocab_size", meta.get("tokenizer.ggml.tokens"))
    n_vocab = vocab.count if isinstance(vocab, Skipped) else len(vocab) if isinstance(vocab, list) else vocab
    n_swa = _int(meta, f"{a}.attention.sliding_window", 0)
    swa_layers: tuple[bool, ...] | None = None
    pattern = meta.get(f"{a}.attention.sliding_window_pattern", SWA_PATTERNS.get(a))
    if n_swa and isinstance(pattern, list) and len(pattern) == n_layer:
        swa_layers = tuple(bool(p) for p in pattern)
    elif n_swa and isinstance(pattern, int):
        swa_layers = tuple(pattern == 0 or il % pattern < pattern - 1 for il in range(n_layer))
    return plan.Arch(
        n_layer=n_layer, n_head_kv=kv_heads, n_head=max(heads),
        key_length=_int(meta, f"{a}.attention.key_length", head),
        value_length=_int(meta, f"{a}.attention.value_length", head),
        n_embd=n_embd, n_ff=max(ff) if isinstance(ff, list) else _int(meta, f"{a}.feed_forward_length", 0),
        n_vocab=n_vocab if isinstance(n_vocab, int) else 0,
        n_ctx_train=_int(meta, f"{a}.context_length", 0), n_swa=n_swa, swa_layers=swa_layers,
        recurrent=any(k.startswith((f"{a}.ssm.", f"{a}.wkv.")) for k in meta),
    )
