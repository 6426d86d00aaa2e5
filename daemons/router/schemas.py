"""OpenAI request bodies the router accepts, checked by pydantic.

Nothing is silently ignored. A field that is neither OpenAI's nor one of onebox's
extensions (EXTENSIONS) is a 400 naming it ("Unrecognized request argument supplied:
foo", as OpenAI answers); an OpenAI field with a value onebox cannot honour (store:
true, echo: true, an image part, service_tier: "flex") is a 400 naming it too. A null
top-level field means its default, as in OpenAI's API. docs/api.md lists every field
and what onebox does with it. The router turns a checked request into the bus body an
inference worker takes (`body()`; the contract is in docs/api.md as well).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.config import JsonDict

from daemons.router.errors import APIError

MAX_STOP = 4  # OpenAI's limit
MAX_N = 16  # choices per prompt
MAX_PROMPTS = 16  # prompts in one /v1/completions request
MAX_CHOICES = 64  # prompts x n
MAX_LOGIT_BIAS = 300
MAX_TOOLS = 128
MAX_TOP_LOGPROBS = 20
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"
_TOKEN_ID = re.compile(r"^[0-9]{1,10}$")

# onebox's own request fields, beyond OpenAI's (docs/api.md).
EXTENSIONS = ("top_k", "min_p", "repeat_penalty", "local_only", "priority", "rag")
STRICT = ConfigDict(extra="forbid")


def _only(value: object, allowed: object, why: str) -> None:
    if value is not None and value != allowed:
        raise ValueError(f"must be {json.dumps(allowed)} (or left out): {why}")


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False
    include_obfuscation: bool | None = None

    @field_validator("include_obfuscation")
    @classmethod
    def _obfuscation(cls, value: bool | None) -> bool | None:
        _only(value, False, "onebox does not pad streamed chunks")
        return value


# What `ChatRequest.check` asks of the parts and messages that one field alone cannot
# say, in the documented schema too (GET /openapi.json), so clients and fuzzers know it.
PART_RULES: JsonDict = {"allOf": [
    {"properties": {"type": {"enum": ["text", "refusal"]}}},
    {"if": {"properties": {"type": {"const": "text"}}}, "then": {"required": ["text"], "properties": {
        "text": {"type": "string"}}}},
    {"if": {"properties": {"type": {"const": "refusal"}}}, "then": {"required": ["refusal"], "properties": {
        "refusal": {"type": "string"}}}},
]}
MESSAGE_RULES: JsonDict = {"allOf": [
    {"if": {"properties": {"role": {"const": "tool"}}}, "then": {"required": ["tool_call_id"], "properties": {
        "tool_call_id": {"type": "string"}}}},
    {"if": {"properties": {"role": {"not": {"const": "assistant"}}}}, "then": {"properties": {
        "tool_calls": {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}}}},
]}


class ContentPart(BaseModel):
    """One part of a message's content; only text is read (`ChatRequest.check`)."""

    model_config = ConfigDict(extra="allow", json_schema_extra=PART_RULES)
    type: str
    text: str | None = None
    refusal: str | None = None


class FunctionCall(BaseModel):
    model_config = STRICT
    name: str = Field(pattern=TOOL_NAME)
    arguments: str


class ToolCall(BaseModel):
    """A call an earlier assistant turn made, sent back in the history."""

    model_config = STRICT
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall
    # What the openai SDK's stream helper adds to a call it assembled, sent back as is.
    index: int | None = None
    parsed_arguments: Any = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=MESSAGE_RULES)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=256)
    # What an SDK echoes back from an earlier reply: accepted when empty, or (annotations,
    # and `parsed`, the SDK's own parse of `content`) as output that does not steer the reply.
    refusal: None = None
    function_call: None = None
    audio: None = None
    annotations: list[Any] | None = None
    parsed: Any = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or part.refusal or "" for part in self.content)

    def bus(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


def _nullable(schema: dict[str, Any]) -> None:
    """The documented schema says what `Sampling._nulls` does: an optional top-level
    field may be null (its default); a required one may not (null is left out)."""
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        alternatives = prop.get("anyOf", [prop])
        if name not in required and not any(a.get("type") == "null" for a in alternatives):
            schema["properties"][name] = {"anyOf": [prop, {"type": "null"}]}


class Sampling(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_nullable)
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(default=None, json_schema_extra={"anyOf": [  # what _stop checks
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP}, {"type": "null"}]})
    logit_bias: dict[str, float] | None = Field(default=None, json_schema_extra={  # what _logit_bias checks
        "propertyNames": {"pattern": _TOKEN_ID.pattern}, "maxProperties": MAX_LOGIT_BIAS,
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}})
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    user: str | None = Field(default=None, max_length=256)
    # OpenAI fields accepted with the one meaning onebox gives them.
    store: bool | None = Field(default=None, json_schema_extra={"enum": [False, None]})
    metadata: dict[str, str] | None = None
    service_tier: str | None = Field(default=None, json_schema_extra={"enum": ["auto", "default", None]})
    # onebox's extensions (EXTENSIONS).
    top_k: int = Field(default=0, ge=0, le=100_000)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, ge=0.0, le=10.0)
    local_only: bool = False  # never send this request upstream
    priority: Literal["interactive", "batch"] | None = None  # serve it in the batch class

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        """A null top-level field is its default (OpenAI's nullable parameters)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens")
        for token, bias in value.items():
            if not _TOKEN_ID.match(token):
                raise ValueError(f"keys are token ids (integers as strings), not {token!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"the bias of token {token} must be in [-100, 100]")
        return value

    @field_validator("store")
    @classmethod
    def _store(cls, value: bool | None) -> bool | None:
        _only(value, False, "onebox does not store completions (its ledger keeps only usage)")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())):
            raise ValueError("at most 16 pairs, keys up to 64 and values up to 512 characters")
        return value

    @field_validator("service_tier")
    @classmethod
    def _service_tier(cls, value: str | None) -> str | None:
        if value not in (None, "auto", "default"):
            raise ValueError(f"onebox serves one tier: 'auto' or 'default', not {value!r}")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def max_output(self) -> int | None:
        return self.max_tokens

    def check(self) -> None:
        """What needs more than one field, as a 400 naming the parameter."""
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true", "stream_options")

    def logprobs_body(self) -> int | None:
        return None

    def sampling_body(self) -> dict[str, Any]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        body: dict[str, Any] = {
            "max_tokens": self.max_output,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "repeat_penalty": self.repeat_penalty,
            "seed": self.seed,
            "stop": stops,
            "logit_bias": sorted([int(t), float(b)] for t, b in (self.logit_bias or {}).items()),
            "logprobs": self.logprobs_body(),
        }
        if self.user is not None:
            body["user"] = self.user
        return body


def invalid(message: str, param: str) -> APIError:
    return APIError(400, message, "invalid_request", param)


class RagOptions(BaseModel):
    """onebox's extension to chat completions: answer from the document index."""

    model_config = STRICT
    collection: str | None = Field(default=None, min_length=1, max_length=256)
    k: int | None = Field(default=None, ge=1, le=100)
    mode: Literal["hybrid", "vector", "text"] | None = None


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is needed with type 'json_schema', and only then")
        return self

    def bus(self) -> dict[str, Any] | None:
        if self.type == "text":
            return None
        if self.json_schema is None or self.json_schema.schema_ is None:
            return {"type": "json_object"}
        return {"type": "json_schema", "schema": self.json_schema.schema_, "strict": bool(self.json_schema.strict)}


class FunctionDef(BaseModel):
    model_config = STRICT
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = STRICT
    name: str = Field(pattern=TOOL_NAME)


class NamedToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: NamedFunction


# What a content part of each kind would need from the model.
MEDIA = {"image_url": "cannot read images (it has no vision)", "input_image": "cannot read images (it has no vision)",
         "input_audio": "cannot take audio input", "file": "cannot read files (send their text, or ingest them "
                                                          "for RAG)"}


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    modalities: list[str] | None = Field(default=None, json_schema_extra={"anyOf": [
        {"type": "array", "items": {"const": "text"}, "minItems": 1, "maxItems": 1}, {"type": "null"}]})
    # onebox's extension: answer from the document index.
    rag: RagOptions | None = None

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and value != ["text"]:
            raise ValueError("onebox generates text only: modalities must be ['text']")
        return value

    @property
    def max_output(self) -> int | None:
        # The newer field wins when a client sends both.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check(self) -> None:
        super().check()
        for i, m in enumerate(self.messages):
            for j, part in enumerate(m.content if isinstance(m.content, list) else []):
                where = f"messages[{i}].content[{j}]"
                if part.type in MEDIA:
                    raise invalid(f"{where}: the model '{self.model}' {MEDIA[part.type]}", where)
                if (part.type == "text" and part.text is None) or (part.type == "refusal" and part.refusal is None):
                    raise invalid(f"{where}: a {part.type} part needs its {part.type}", where)
                if part.type not in ("text", "refusal"):
                    raise invalid(f"{where}: unknown content part type {part.type!r}", f"{where}.type")
            if m.role == "tool" and m.tool_call_id is None:
                raise invalid(f"messages[{i}]: a tool message needs the tool_call_id it answers",
                              f"messages[{i}].tool_call_id")
            if m.tool_calls and m.role != "assistant":
                raise invalid(f"messages[{i}]: only assistant messages carry tool_calls", f"messages[{i}].tool_calls")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise invalid("tools: each function needs its own name", "tools")
        if self.tool_choice is not None and not self.tools:
            raise invalid("tool_choice is only allowed when tools are given", "tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise invalid(f"tool_choice names the function {self.tool_choice.function.name!r}, which is not in "
                          "tools", "tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs needs logprobs set to true", "top_logprobs")

    def question(self) -> str:
        """What a RAG chat retrieves for: the last user message."""
        for m in reversed(self.messages):
            if m.role == "user" and m.text().strip():
                return m.text()
        return ""

    def logprobs_body(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": "chat", "messages": [m.bus() for m in self.messages], **self.sampling_body()}
        fmt = self.response_format.bus() if self.response_format is not None else None
        if fmt is not None:
            body["response_format"] = fmt
        if self.tools:
            body["tools"] = [{"name": t.function.name, "description": t.function.description or "",
                              "parameters": t.function.parameters or {"type": "object", "properties": {}},
                              "strict": bool(t.function.strict)} for t in self.tools]
            choice = self.tool_choice or "auto"
            body["tool_choice"] = {"name": choice.function.name} if isinstance(choice, NamedToolChoice) else choice
            body["parallel_tool_calls"] = self.parallel_tool_calls
        return body

    def prompts(self) -> int:
        return 1


class CompletionRequest(Sampling):
    prompt: str | list[Any] = Field(json_schema_extra={"anyOf": [  # what _prompts checks
        {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_PROMPTS}]})
    # OpenAI's documented default for /v1/completions.
    max_tokens: int | None = Field(default=16, ge=1, le=1_000_000)
    logprobs: int | None = Field(default=None, ge=0, le=5)  # the legacy form: how many alternatives
    echo: bool | None = Field(default=None, json_schema_extra={"enum": [False, None]})
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[Any]) -> str | list[Any]:
        if isinstance(value, str):
            return value
        if value and all(isinstance(p, int) and not isinstance(p, bool) for p in value) or \
                value and all(isinstance(p, list) for p in value):
            raise ValueError("token ids are not supported: send the prompt as text")
        if not value or not all(isinstance(p, str) for p in value):
            raise ValueError("a string or a list of strings")
        if len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return value

    @field_validator("echo")
    @classmethod
    def _echo(cls, value: bool | None) -> bool | None:
        _only(value, False, "onebox does not return the prompt with the completion")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None) -> int | None:
        _only(value, 1, "onebox does not rank candidates server-side; ask for n choices")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("onebox does not support insertion (suffix)")
        return value

    def check(self) -> None:
        super().check()
        if len(self.prompt_list()) * self.n > MAX_CHOICES:
            raise invalid(f"prompts x n must be at most {MAX_CHOICES}", "n")

    def prompt_list(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else [str(p) for p in self.prompt]

    def prompts(self) -> int:
        return len(self.prompt_list())

    def logprobs_body(self) -> int | None:
        return self.logprobs

    def body(self) -> dict[str, Any]:
        """The bus body of the first prompt (choices.bodies makes one per choice)."""
        return {"kind": "completion", "prompt": self.prompt_list()[0], **self.sampling_body()}
