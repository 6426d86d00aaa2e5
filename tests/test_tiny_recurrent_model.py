"""The generated tiny recurrent (Mamba) GGUF loads and runs in llama-cpp-python."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

from tests.models.tiny_recurrent import NAME, write_tiny_recurrent


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_recurrent(tmp_path_factory.mktemp("tiny") / "tiny-recurrent.gguf")


@pytest.fixture(scope="module")
def llm(model_path: Path) -> Iterator[llama_cpp.Llama]:
    model = llama_cpp.Llama(model_path=str(model_path), n_ctx=256, verbose=False)
    try:
        yield model
    finally:
        model.close()  # frees the context and the model (llama_model_free)


def _greedy(llm: llama_cpp.Llama, prompt: str) -> tuple[str, str | None, int]:
    out = llm.create_completion(prompt, max_tokens=16, temperature=0)
    assert not isinstance(out, Iterator)
    choice = out["choices"][0]
    return choice["text"], choice["finish_reason"], out["usage"]["completion_tokens"]


def test_small_and_deterministic(model_path: Path, tmp_path: Path) -> None:
    size = model_path.stat().st_size
    assert 100_000 < size < 4_000_000
    again = write_tiny_recurrent(tmp_path / "again.gguf")
    other = write_tiny_recurrent(tmp_path / "other.gguf", seed=1)
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert hashlib.sha256(again.read_bytes()).hexdigest() == digest
    assert hashlib.sha256(other.read_bytes()).hexdigest() != digest


def test_loads_as_recurrent(llm: llama_cpp.Llama) -> None:
    model = llm._model.model
    assert llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
    assert llama_cpp.llama_model_is_recurrent(model)
    assert llm.metadata["general.architecture"] == "mamba"
    assert llm.metadata["general.name"] == NAME
    assert "tokenizer.chat_template" in llm.metadata


def test_tokenizer_round_trips(llm: llama_cpp.Llama) -> None:
    hello = llm.tokenize(b"hello", add_bos=False)
    assert len(hello) == 1  # the merges make "hello" a single token
    for text in (b"hello", b"Hello, world!\n", " caf\u00e9 \u2603".encode()):
        assert llm.detokenize(llm.tokenize(text, add_bos=False)) == text
    # The chat template's markers are single control tokens.
    assert len(llm.tokenize(b"<|im_start|>", add_bos=False, special=True)) == 1


def test_greedy_completion_repeats(llm: llama_cpp.Llama) -> None:
    first = _greedy(llm, "hello")
    second = _greedy(llm, "hello")
    assert first == second
    text, finish_reason, n = first
    assert text and text.isascii() and text.isprintable()
    assert (finish_reason, n) == ("length", 16)


def test_state_reset_between_prompts(llm: llama_cpp.Llama) -> None:
    a = _greedy(llm, "hello world")
    b = _greedy(llm, "the weather today")
    assert a[0] != b[0]
    # Each prompt gives the same answer as before, whatever ran in between.
    assert _greedy(llm, "hello world") == a
    assert _greedy(llm, "the weather today") == b
    # A prompt that extends the previous one (a prefix hit, which a recurrent
    # state cannot roll back) still matches a fresh evaluation.
    c = _greedy(llm, "the weather today is")
    assert _greedy(llm, "hello") != c
    assert _greedy(llm, "the weather today is") == c


def test_chat_completion_renders(llm: llama_cpp.Llama) -> None:
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
    )
    assert not isinstance(out, Iterator)
    assert out["usage"]["prompt_tokens"] > 5  # the ChatML markers were rendered
    assert out["choices"][0]["message"]["content"]


def test_vocab_only_reports_recurrent(model_path: Path) -> None:
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    start = time.perf_counter()
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
    elapsed = time.perf_counter() - start
    assert model is not None
    try:
        assert llama_cpp.llama_model_is_recurrent(model)
        assert not llama_cpp.llama_model_is_hybrid(model)
        assert llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)) > 256
    finally:
        llama_cpp.llama_model_free(model)
    assert elapsed < 2.0
