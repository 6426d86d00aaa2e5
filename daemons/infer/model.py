"""Loading a GGUF with llama-cpp-python and turning requests into prompt tokens.

Chat requests are rendered with the model's own chat template from its GGUF metadata
(the same Jinja2 formatter llama-cpp-python uses), so any GGUF works the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import _internals as internals
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from daemons.bus.errors import RequestError
from daemons.config import ModelConfig
from daemons.infer import native, rag, tools
from daemons.infer.request import GenRequest

log = logging.getLogger(__name__)

# Used when a GGUF carries no chat template (ChatML, the most common convention).
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ModelError(Exception):
    """The model file cannot be loaded."""


class Model:
    """Weights, vocab and chat template of one GGUF. `llama` (llama-cpp-python's
    high-level object, with its own context) exists only for the simple engine; the
    batch engine makes its own low-level context from `lm`."""

    def __init__(self, lm: internals.LlamaModel, path: Path, n_ctx: int, llm: llama_cpp.Llama | None = None) -> None:
        self.lm = lm
        self.llm = llm
        self.path = path
        self.n_ctx = n_ctx
        eos_id, bos_id = lm.token_eos(), lm.token_bos()
        template = lm.metadata().get("tokenizer.chat_template")
        if not template:
            log.warning("%s has no chat template; using ChatML", path.name)
        self.formatter = Jinja2ChatFormatter(
            template=template or FALLBACK_TEMPLATE,
            eos_token=lm.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=lm.token_get_text(bos_id) if bos_id != -1 else "",
        )
        # Its template renders `tools` itself; else onebox's generic format (daemons/infer/tools.py).
        self.native_tools = tools.template_takes_tools(template or "")
        self._vocab = lm.vocab
        self.n_vocab = lm.n_vocab()

    @classmethod
    def load(cls, path: Path, mc: ModelConfig, engine: str) -> Model:
        """Weights and vocab; with engine "simple" also llama-cpp-python's own context."""
        try:
            if engine == "simple":
                # Its own context, with the configured KV cache type (type_k/type_v:
                # a quantized V needs flash_attn, which the config checks).
                cache = native.ggml_type(mc.kv_type)
                llm = llama_cpp.Llama(
                    model_path=str(path), n_ctx=mc.n_ctx, n_threads=mc.threads, n_threads_batch=mc.threads,
                    n_batch=min(512, mc.n_ctx), flash_attn=mc.flash_attn, type_k=cache, type_v=cache,
                    verbose=False,
                )
                return cls(llm._model, path, llm.n_ctx(), llm)
            lm = internals.LlamaModel(path_model=str(path), params=llama_cpp.llama_model_default_params(),
                                      verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(f"cannot load {path}: {exc}") from exc
        return cls(lm, path, min(mc.n_ctx, mc.kv_tokens))

    @property
    def llama(self) -> llama_cpp.Llama:
        if self.llm is None:
            raise RuntimeError("this model was loaded without llama-cpp-python's high-level context")
        return self.llm

    @property
    def size_bytes(self) -> int:
        return int(self.lm.size())

    def describe(self) -> dict[str, Any]:
        return {"file": self.path.name, "n_ctx": self.n_ctx, "n_params": self.lm.n_params(),
                "desc": self.lm.desc()}

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    @property
    def vocab(self) -> Any:
        """llama.cpp's vocabulary pointer (for grammar samplers)."""
        return self._vocab

    def tool_parser(self, req: GenRequest) -> tools.ToolCalls | None:
        """What finds tool calls in this request's output (None: it declares no tools)."""
        if not req.calls_tools:
            return None
        return tools.ToolCalls({t["name"] for t in req.tools}, req.parallel_tool_calls, bare_json=self.native_tools)

    def prompt_tokens(self, req: GenRequest, messages: list[dict[str, Any]] | None = None) -> list[int]:
        if req.kind == "chat":
            msgs = messages if messages is not None else req.messages
            extra: dict[str, Any] = {}
            if self.native_tools:
                msgs = tools.native_messages(msgs)
                if req.calls_tools:
                    extra["tools"] = tools.native_tools(req.tools)
            else:
                msgs = tools.generic_messages(msgs, req.tools, req.tool_choice)
            try:
                rendered = self.formatter(messages=msgs, **extra)  # type: ignore[arg-type]
            except Exception as exc:  # the template's own raise_exception, or a Jinja error
                raise RequestError(f"the model's chat template refused these messages: {exc}", 400)
            return list(self.lm.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special,
                                         special=True))
        return list(self.lm.tokenize(req.prompt.encode(), add_bos=True, special=False))

    def prepare(self, req: GenRequest, default_max_tokens: int) -> tuple[list[int], int]:
        """The prompt's tokens and how many may be generated after them; RequestError
        (400) for a prompt that is empty, too long or cannot be tokenized."""
        try:
            prompt = self.prompt_tokens(req) if req.sources is None else self.fit_sources(req)
        except RequestError:
            raise
        except Exception as exc:  # e.g. text the tokenizer cannot encode: this request only
            log.warning("cannot tokenize a prompt: %s: %s", type(exc).__name__, exc)
            raise RequestError(f"cannot tokenize the prompt: {type(exc).__name__}", 400) from None
        if not prompt:
            raise RequestError("the prompt is empty", 400)
        self.check_fits(prompt)
        return prompt, min(req.max_tokens or default_max_tokens, self.n_ctx - len(prompt))

    def fit_sources(self, req: GenRequest) -> list[int]:
        """The prompt with as many of the RAG sources (best first) as fit in the context
        with room for the answer: fewer sources rather than a prompt that cannot run.
        Records how many in req.fitted["sources_used"]."""
        sources = req.sources or []
        room = self.n_ctx - min(req.answer_tokens, req.max_tokens or req.answer_tokens)

        def build(n: int) -> list[int]:
            return self.prompt_tokens(req, rag.messages_with_sources(req.messages, sources[:n]))

        best, prompt = 0, build(0)
        if sources and len(prompt) < room:
            full = build(len(sources))
            if len(full) <= room:
                best, prompt = len(sources), full
            else:  # the largest n that fits: the prompt only grows with n
                lo, hi = 0, len(sources)
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    candidate = build(mid)
                    if len(candidate) <= room:
                        lo, prompt = mid, candidate
                    else:
                        hi = mid
                best = lo
        req.fitted["sources_used"] = best
        if best < len(sources):
            log.info("RAG: %d of %d source(s) fit in the context (%d tokens, %d kept for the answer)", best,
                     len(sources), self.n_ctx, self.n_ctx - room)
        return prompt

    def check_fits(self, prompt: list[int]) -> None:
        if len(prompt) >= self.n_ctx:
            raise RequestError(
                f"prompt is {len(prompt)} tokens; this model's limit is {self.n_ctx - 1}", 400
            )
