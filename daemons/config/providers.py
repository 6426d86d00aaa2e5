"""Upstream providers ([providers.NAME]) and the models they serve ([remote_models.NAME])."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

from daemons.config.schema import setting

# Query parameters that carry a credential (Gemini's ?key=, Azure's ?api-key=, tokens).
_SECRET_PARAM = re.compile(r"(api[-_]?)?key|.*token|secret|password|sig|signature", re.IGNORECASE)
# Environment variables other tools read keys from; onebox never does.
_KEY_VARIABLE = re.compile(r".*_API_(KEY|TOKEN)$")
NO_KEYS_HERE = "put the key in a credential file ([providers.NAME] key_file, or /etc/onebox/credentials/NAME)"


def _url(value: str) -> str | None:
    if not value.startswith(("http://", "https://")):
        return f"expected an http:// or https:// URL, got {value!r}"
    # The URL is logged at start and shown in errors: a key in it would be too. The
    # messages below never repeat the URL, since it holds a secret.
    parts = urlsplit(value)
    if parts.username is not None or parts.password is not None:
        return f"must not hold credentials (user:password@): {NO_KEYS_HERE}"
    if any(_SECRET_PARAM.fullmatch(name) for name, _ in parse_qsl(parts.query, keep_blank_values=True)):
        return f"must not carry a key in its query string: {NO_KEYS_HERE}"
    return None


def keys_in_environment(env: Mapping[str, str]) -> list[str]:
    """The names of variables in `env` that look like API keys (OPENAI_API_KEY, ...):
    never read, so a daemon warns about them rather than seeming to use them."""
    return sorted(name for name in env if _KEY_VARIABLE.fullmatch(name.upper()))


@dataclass(frozen=True)
class ProviderConfig:
    kind: Literal["openai", "anthropic"] = setting(
        "openai", '"openai": any OpenAI-compatible endpoint (OpenAI, vLLM, llama-server, LiteLLM, Ollama);\n'
                  "\"anthropic\": Anthropic's Messages API, through an adapter (streaming included).")
    base_url: str = setting("", 'e.g. "https://api.openai.com/v1" (with the /v1) or "https://api.anthropic.com".',
                            check=_url, example="https://api.openai.com/v1")
    key_file: str = setting(
        "", "A file holding the API key. Empty: $CREDENTIALS_DIRECTORY/providers_NAME under systemd (the\n"
            "unit loads /etc/onebox/credentials/NAME), else /etc/onebox/credentials/NAME when it exists,\n"
            "else no key (a local vLLM, say). Never put a key in this file or the environment.")
    timeout_s: float = setting(120.0, "Longest one upstream call may take (and never past the request's deadline).",
                               gt=0)
    connect_timeout_s: float = setting(5.0, "", gt=0)
    retries: int = setting(2, "Retries on 429, 5xx and connection errors before any reply arrived, with exponential\n"
                              "backoff and jitter (a 429's Retry-After is honoured).", ge=0, le=10)
    breaker_failures: int = setting(5, "Failed calls in a row that open the circuit: calls then fail at once (and a\n"
                                       "fallback is tried) until breaker_reset_s has passed and one call succeeds.",
                                    ge=1)
    breaker_reset_s: float = setting(30.0, "", gt=0)
    max_connections: int = setting(100, "", ge=1)

    def key_path(self, name: str) -> Path | None:
        if self.key_file:
            return Path(self.key_file)
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if creds:
            return Path(creds) / f"providers_{name}"
        default = Path("/etc/onebox/credentials") / name
        return default if default.exists() else None


@dataclass(frozen=True)
class RemoteModelConfig:
    provider: str = setting("", "The [providers.NAME] that serves it.", example="openai")
    model: str = setting("", "The provider's name for it; empty means the table's name.")
    prompt_price_per_1k: float = setting(0.0, "The provider's prices, in [costs] currency.", ge=0)
    completion_price_per_1k: float = setting(0.0, "", ge=0)
    default_max_tokens: int = setting(1024, "max_tokens when a request gives none.", ge=1)
    context_tokens: int = setting(128_000, "Its context length: bounds what a request can cost (budgets reserve that).",
                                  ge=64)
    max_in_flight: int = setting(64, "Calls in flight at once; more wait in the fair queue.", ge=1, le=10_000)
    queue_depth: int = setting(256, "Requests that may wait; more get 429.", ge=1)
    fallback: tuple[str, ...] = setting((), "Models tried in order when this one fails (5xx, 429, timeout, circuit open).")

    def problems(self) -> Iterator[str]:
        if not self.provider:
            yield "provider: required (a [providers.NAME])"
