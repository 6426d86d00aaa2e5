"""A numpy reference for sentence-transformers' all-MiniLM-L6-v2 (BERT), independent of llama.cpp.

It reads the same model.zip (or extracted directory) the converter reads, tokenizes
with the `tokenizers` package from the model's own tokenizer.json, runs the BERT
encoder in float64 and pools as the model's sentence-transformers config says (mean
over the attention mask for MiniLM), then L2-normalises when modules.json has a
Normalize module. Nothing here is shared with daemons/embed/convert.py, so a
mistake in the converter's tensor mapping or vocabulary cannot hide in both.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load as load_safetensors
from tokenizers import Tokenizer

F64 = npt.NDArray[np.float64]

_SQRT2 = math.sqrt(2.0)
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x: F64) -> F64:
    # BERT's "gelu" is the exact erf form, not the tanh approximation.
    out: F64 = 0.5 * x * (1.0 + _erf(x / _SQRT2))
    return out


def _layer_norm(x: F64, weight: F64, bias: F64, eps: float) -> F64:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    out: F64 = (x - mean) / np.sqrt(var + eps) * weight + bias
    return out


def _read_files(source: Path) -> dict[str, bytes]:
    """The model's files by path relative to its root (the folder holding config.json)."""
    if source.is_dir():
        return {str(p.relative_to(source)): p.read_bytes() for p in source.rglob("*") if p.is_file()}
    with zipfile.ZipFile(source) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        root = min((n[: -len("config.json")] for n in names if n.split("/")[-1] == "config.json"), key=len)
        return {n[len(root) :]: zf.read(n) for n in names if n.startswith(root)}


class MiniLM:
    """BERT forward pass + sentence-transformers pooling, from safetensors and tokenizer.json."""

    def __init__(self, source: Path) -> None:
        files = _read_files(source)
        self.config: dict[str, Any] = json.loads(files["config.json"])
        self.eps = float(self.config.get("layer_norm_eps", 1e-12))
        self.n_head = int(self.config["num_attention_heads"])
        self.n_layer = int(self.config["num_hidden_layers"])
        self.w = {
            k.removeprefix("bert."): v.astype(np.float64)
            for k, v in load_safetensors(files["model.safetensors"]).items()
            if v.dtype.kind == "f"
        }
        self.tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        # tokenizer.json ships with truncation to 128 and padding to 128: both would change
        # what is embedded, so the reference sees exactly the text's tokens.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        modules = json.loads(files["modules.json"])
        pooling_dir = next(m["path"] for m in modules if m["type"].endswith(".Pooling"))
        pooling = json.loads(files[f"{pooling_dir}/config.json"])
        if pooling.get("pooling_mode_mean_tokens"):
            self.pooling = "mean"
        elif pooling.get("pooling_mode_cls_token"):
            self.pooling = "cls"
        else:
            raise ValueError(f"reference implements mean and cls pooling only, not {pooling}")
        self.normalize = any(m["type"].endswith(".Normalize") for m in modules)

    def tokenize(self, text: str) -> list[int]:
        """Token ids with [CLS]/[SEP] added by tokenizer.json's post-processor."""
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=True).ids
        return ids

    def hidden_states(self, ids: list[int], type_ids: list[int] | None = None) -> F64:
        """The last layer's hidden states, one row per token (a single unpadded sequence)."""
        w = self.w
        n = len(ids)
        if n > w["embeddings.position_embeddings.weight"].shape[0]:
            raise ValueError(f"{n} tokens is past the model's {w['embeddings.position_embeddings.weight'].shape[0]}")
        types = np.zeros(n, dtype=np.int64) if type_ids is None else np.asarray(type_ids)
        x = (
            w["embeddings.word_embeddings.weight"][np.asarray(ids)]
            + w["embeddings.position_embeddings.weight"][:n]
            + w["embeddings.token_type_embeddings.weight"][types]
        )
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        d = x.shape[1]
        hd = d // self.n_head
        for i in range(self.n_layer):
            p = f"encoder.layer.{i}."

            def lin(name: str, h: F64) -> F64:
                out: F64 = h @ w[p + name + ".weight"].T + w[p + name + ".bias"]
                return out

            # (n, d) -> (heads, n, head_dim)
            q = lin("attention.self.query", x).reshape(n, self.n_head, hd).transpose(1, 0, 2)
            k = lin("attention.self.key", x).reshape(n, self.n_head, hd).transpose(1, 0, 2)
            v = lin("attention.self.value", x).reshape(n, self.n_head, hd).transpose(1, 0, 2)
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            ctx = (probs @ v).transpose(1, 0, 2).reshape(n, d)
            x = _layer_norm(
                x + lin("attention.output.dense", ctx),
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
                self.eps,
            )
            h = _gelu(lin("intermediate.dense", x))
            x = _layer_norm(
                x + lin("output.dense", h),
                w[p + "output.LayerNorm.weight"],
                w[p + "output.LayerNorm.bias"],
                self.eps,
            )
        return x

    def embed(self, text: str) -> F64:
        """The sentence embedding sentence-transformers' encode() gives for `text`.

        Untruncated: sentence-transformers itself cuts input at sentence_bert_config.json's
        max_seq_length (256 for MiniLM), so past that the two differ by design.
        """
        ids = self.tokenize(text)
        states = self.hidden_states(ids)
        # One unpadded sequence: its attention mask is all ones, so masked mean = mean.
        mask = np.ones((len(ids), 1))
        pooled: F64 = (states * mask).sum(axis=0) / mask.sum() if self.pooling == "mean" else states[0]
        if self.normalize:
            pooled = pooled / max(float(np.linalg.norm(pooled)), 1e-12)
        return pooled
