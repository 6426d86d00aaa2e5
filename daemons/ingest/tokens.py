"""The embedding model's tokenizer without its weights, so the ingestion daemon can cut
documents into chunks that fit the model's context exactly as the embedding daemon
will count them.

llama.cpp loads a GGUF with `vocab_only` in milliseconds and a few MiB; tokenizing
here and in daemons/embed/native.py runs the same code on the same vocabulary, so a
chunk counted to fit is never refused or truncated by the embedding daemon.

One Tokenizer may be shared by threads: llama.cpp tokenizes and renders pieces from
read-only tables (each call has its own session state), the ctypes calls release the
GIL, and the Python side keeps no shared buffers (the piece cache is a dict whose
entries never change once written).
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import llama_cpp
from llama_cpp import _internals as internals

from daemons.llama import LlamaError, meta

# How Hugging Face's BERT tokenizers tidy decoded WordPiece text
# (`clean_up_tokenization_spaces`): llama.cpp renders every word-start piece with a
# leading space, punctuation included, which gives "hello , it ' s".
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
_CLEANUP = re.compile("|".join(re.escape(a) for a, _ in _CLEANUPS))
_CLEANED = dict(_CLEANUPS)


class Tokenizer:
    """A GGUF's vocabulary: count, encode and decode text without the special tokens
    the model adds around each input (`specials` says how many those are)."""

    def __init__(self, path: Path) -> None:
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        try:
            self._lm = internals.LlamaModel(path_model=str(path), params=params, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise LlamaError(f"cannot load the vocabulary of {path}: {exc}") from None
        self.path = path
        model = self._lm.model
        vocab = self._vocab = self._lm.vocab
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
        if self.n_ctx_train <= 0:
            # vocab_only skips the hyperparameters, so llama.cpp reports 0: the GGUF says it.
            arch = meta(model, "general.architecture")
            value = meta(model, f"{arch}.context_length") if arch else None
            self.n_ctx_train = int(value) if value and value.isdigit() else 0
        # The vectors' dimension: vocab_only skips the hyperparameters too, so from the GGUF.
        arch_name = meta(model, "general.architecture")
        dims = meta(model, f"{arch_name}.embedding_length") if arch_name else None
        self.dims = int(dims) if dims and dims.isdigit() else 0
        # As EmbedModel.prefix/suffix: what llama_tokenize(add_special=True) puts around text.
        self.specials = int(bool(llama_cpp.llama_vocab_get_add_bos(vocab))) + \
            int(bool(llama_cpp.llama_vocab_get_add_sep(vocab))) + \
            int(bool(llama_cpp.llama_vocab_get_add_eos(vocab)))
        self._wordpiece = int(llama_cpp.llama_vocab_type(vocab)) == llama_cpp.LLAMA_VOCAB_TYPE_WPM
        self._pieces: dict[int, bytes] = {}

    def count(self, text: str) -> int:
        """Tokens in `text`, without the specials. With no output buffer llama.cpp
        tokenizes and returns minus the number of tokens, so nothing is copied."""
        data = text.encode("utf-8", "replace")
        if not data:
            return 0
        n = int(llama_cpp.llama_tokenize(self._vocab, data, len(data), None, 0, False, False))
        if n == -(2**31):
            raise LlamaError(f"llama_tokenize failed on {len(data)} bytes")
        return -n if n < 0 else n

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without the specials; text that looks like a special
        token (e.g. "[SEP]") is text, as the embedding daemon reads it."""
        data = text.encode("utf-8", "replace")
        if not data:
            return []
        room = len(data) + 8
        for _ in range(2):
            buf = (llama_cpp.llama_token * room)()
            n = int(llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, room, False, False))
            if n >= 0:
                return list(buf[:n])
            if n == -(2**31):
                break
            room = -n
        raise LlamaError(f"llama_tokenize failed on {len(data)} bytes")

    def decode(self, tokens: list[int]) -> str:
        """Readable text of token ids. WordPiece loses case and accents, so this is for
        showing, not for getting the original back; special tokens render as nothing."""
        for tok in tokens:
            if not 0 <= tok < self.n_vocab:
                raise ValueError(f"token {tok} is not in the vocabulary (0..{self.n_vocab - 1})")
        text = b"".join(map(self._piece, tokens)).decode("utf-8", "replace")
        # Word-start pieces carry a leading space (WordPiece's "##" continuation pieces
        # do not; SentencePiece's "▁" becomes one), which the first word does not need.
        text = text.removeprefix(" ")
        if self._wordpiece:
            text = _CLEANUP.sub(lambda m: _CLEANED[m.group(0)], text)
        return text

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = int(llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False))
            if n < 0:  # minus the size it needs
                buf = ctypes.create_string_buffer(-n)
                n = int(llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False))
            piece = self._pieces[token] = buf.raw[:max(0, n)]
        return piece

    def close(self) -> None:
        self._lm.close()  # type: ignore[no-untyped-call]  # llama-cpp-python's own, unannotated
