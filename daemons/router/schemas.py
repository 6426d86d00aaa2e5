"""OpenAI request bodies the router accepts, checked by pydantic.

Fields OpenAI defines that onebox does not act on are accepted and ignored (clients
send them by default); fields with values onebox cannot honour (n > 1) are refused.
The router turns a checked request into the bus body an inference worker takes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 16


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class Sampling(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=100_000)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repeat_penalty: float = Field(default=1.0, ge=0.0, le=10.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None
    # onebox's extensions: never send this request upstream; serve it in the batch class.
    local_only: bool = False
    priority: Literal["interactive", "batch"] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_body(self) -> dict[str, Any]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "repeat_penalty": self.repeat_penalty,
            "seed": self.seed,
            "stop": stops,
        }


class RagOptions(BaseModel):
    """onebox's extension to chat completions: answer from the document index."""

    model_config = ConfigDict(extra="forbid")
    collection: str | None = Field(default=None, min_length=1, max_length=256)
    k: int | None = Field(default=None, ge=1, le=100)
    mode: Literal["hybrid", "vector", "text"] | None = None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    rag: RagOptions | None = None

    def question(self) -> str:
        """What a RAG chat retrieves for: the last user message."""
        for m in reversed(self.messages):
            if m.role == "user" and m.text().strip():
                return m.text()
        return ""

    def body(self) -> dict[str, Any]:
        sampling = self.sampling_body()
        if sampling["max_tokens"] is None:
            sampling["max_tokens"] = self.max_completion_tokens
        return {
            "kind": "chat",
            "messages": [{"role": m.role, "content": m.text()} for m in self.messages],
            **sampling,
        }


class CompletionRequest(Sampling):
    prompt: str | list[str]
    # OpenAI's documented default for /v1/completions.
    max_tokens: int | None = Field(default=16, ge=1, le=1_000_000)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return value

    def body(self) -> dict[str, Any]:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return {"kind": "completion", "prompt": prompt, **self.sampling_body()}
