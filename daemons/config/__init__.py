"""The one typed config object, read from TOML with ONEBOX_* environment overrides.

Each section is declared once (daemons/config/core.py, router.py, models.py: types,
constraints and docs on each field, see schema.py) and listed as a field of `Config`.
Every daemon builds a `Config` once in `main()` with the sections it reads: errors in
those stop it (exit 78), errors in the others are not its business. `onebox config
check` reads them all and prints every error.

Overrides, applied after the file:
  ONEBOX_RUNTIME_DIR, ONEBOX_STATE_DIR, ONEBOX_MODELS_DIR, ONEBOX_LOG_LEVEL
  ONEBOX__SECTION__KEY=value   any key, e.g. ONEBOX__ROUTER__TCP=127.0.0.1:8080
                               (value read as a TOML value when it parses, else a string)
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from daemons.config.access import AuthConfig, CostConfig, PrincipalConfig
from daemons.config.core import BusConfig, LogConfig, PathsConfig
from daemons.config.embeddings import EmbeddingConfig
from daemons.config.ingest import CollectionConfig, IngestConfig, SearchConfig
from daemons.config.models import ModelConfig
from daemons.config.ocr import OcrConfig
from daemons.config.providers import ProviderConfig, RemoteModelConfig
from daemons.config.router import RouterConfig
from daemons.config.schema import ConfigError, build, is_section, render_section

__all__ = ["AuthConfig", "BusConfig", "CollectionConfig", "Config", "ConfigError", "CostConfig", "DEFAULT_CONFIG",
           "EmbeddingConfig", "IngestConfig", "LogConfig", "ModelConfig", "OcrConfig", "PathsConfig",
           "PrincipalConfig", "ProviderConfig", "RemoteModelConfig", "SearchConfig", "RouterConfig", "SECTIONS",
           "load", "parse", "render_defaults"]

DEFAULT_CONFIG = Path("/etc/onebox/onebox.toml")
T = TypeVar("T")


@dataclass(frozen=True)
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig, metadata={"doc": ""})
    log: LogConfig = field(default_factory=LogConfig, metadata={"doc": ""})
    bus: BusConfig = field(default_factory=BusConfig, metadata={"doc": ""})
    router: RouterConfig = field(default_factory=RouterConfig, metadata={"doc": ""})
    models: dict[str, ModelConfig] = field(default_factory=dict, metadata={
        "doc": 'One table per model; the key (here "smollm2") is the model name clients send and the\n'
               "instance of onebox-infer@.service.", "example": "smollm2"})
    embeddings: dict[str, EmbeddingConfig] = field(default_factory=dict, metadata={
        "doc": "One table per embedding model, served by onebox-embed@NAME.service at POST /v1/embeddings;\n"
               'the key (here "minilm") is the model name clients send. Names are shared with [models]:\n'
               "each must be unique.", "example": "minilm"})
    ocr: OcrConfig = field(default_factory=OcrConfig, metadata={
        "doc": "OCR of scanned PDFs and images with tesseract (onebox-ocr.service)."})
    ingest: IngestConfig = field(default_factory=IngestConfig, metadata={
        "doc": "Document ingestion (onebox-ingest.service): inbox folders to the retrieval index, index.db."})
    collections: dict[str, CollectionConfig] = field(default_factory=dict, metadata={
        "doc": "One table per inbox folder: its files are the collection NAME (POST /v1/search filters by it,\n"
               'chat completions take "rag": {"collection": NAME}).', "example": "default"})
    search: SearchConfig = field(default_factory=SearchConfig, metadata={
        "doc": "Retrieval: POST /v1/search and RAG in chat completions (read by the router)."})
    auth: AuthConfig = field(default_factory=AuthConfig, metadata={
        "doc": "Identity (read by the router): API keys over TCP, the caller's uid on the Unix socket."})
    principals: dict[str, PrincipalConfig] = field(default_factory=dict, metadata={
        "doc": "One table per principal (a person, team or app): who it is on the Unix socket, whether it is\n"
               "an admin, its admission class and its limits. [principals.default] applies to every caller\n"
               "no table names (API keys made for another name, unlisted Unix users).", "example": "default"})
    costs: CostConfig = field(default_factory=CostConfig, metadata={
        "doc": "Prices for the ledger (ledger.db) and budgets."})
    providers: dict[str, ProviderConfig] = field(default_factory=dict, metadata={
        "doc": "Upstream providers the router may send requests to ([remote_models.NAME] says which models).",
        "example": "openai"})
    remote_models: dict[str, RemoteModelConfig] = field(default_factory=dict, metadata={
        "doc": "Models served by a provider, under the name clients send (unique among [models],\n"
               "[embeddings] and these); [models.NAME] fallback and overflow_wait_s send local traffic here.",
        "example": "gpt-4o-mini"})
    source: str = "<defaults>"

    def embedding(self, key: str) -> EmbeddingConfig:
        return self._named(self.embeddings, "embeddings", key)

    def ingest_embedding(self) -> str | None:
        """The [embeddings.NAME] that ingestion and search use: [ingest] embedding, else the first."""
        return self.ingest.embedding or next(iter(self.embeddings), None)

    def collection_dirs(self) -> dict[str, Path]:
        return {name: c.path(self.paths.state, name) for name, c in self.collections.items()}

    def principal(self, name: str) -> PrincipalConfig:
        """The principal's table, else [principals.default], else no limits."""
        found = self.principals.get(name) or self.principals.get("default")
        return found if found is not None else PrincipalConfig()

    def chat_models(self) -> list[str]:
        """Every model name a chat or completion request may send: local, then remote."""
        return list(self.models) + list(self.remote_models)

    def fallback(self, model: str) -> tuple[str, ...]:
        if model in self.models:
            return self.models[model].fallback
        if model in self.remote_models:
            return self.remote_models[model].fallback
        return ()

    def model(self, key: str) -> ModelConfig:
        return self._named(self.models, "models", key)

    def _named(self, tables: dict[str, T], section: str, key: str) -> T:
        try:
            return tables[key]
        except KeyError:
            known = ", ".join(sorted(tables)) or "none"
            raise ConfigError(f"{self.source}: no [{section}.{key}] (configured: {known})") from None


@dataclass(frozen=True)
class Section:
    name: str
    cls: type
    # True for a table of named tables ([models.NAME]), False for one table.
    named: bool
    doc: str
    example: str = ""


def _sections() -> dict[str, Section]:
    out: dict[str, Section] = {}
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        hint = hints[f.name]
        if is_section(hint):
            out[f.name] = Section(f.name, hint, False, f.metadata.get("doc", ""))
        elif typing.get_origin(hint) is dict:
            out[f.name] = Section(f.name, typing.get_args(hint)[1], True, f.metadata.get("doc", ""),
                                  f.metadata.get("example", "NAME"))
    return out


SECTIONS = _sections()
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _set_path(raw: dict[str, Any], dotted: list[str], value: Any) -> None:
    node = raw
    for part in dotted[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(dotted)}: {part} is not a table")
    node[dotted[-1]] = value


def parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


SHORT_OVERRIDES = {
    "ONEBOX_RUNTIME_DIR": ["paths", "runtime_dir"],
    "ONEBOX_STATE_DIR": ["paths", "state_dir"],
    "ONEBOX_MODELS_DIR": ["paths", "models_dir"],
    "ONEBOX_LOG_LEVEL": ["log", "level"],
}


def apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, dotted in SHORT_OVERRIDES.items():
        if env.get(name):
            value = env[name].lower() if name == "ONEBOX_LOG_LEVEL" else env[name]
            _set_path(raw, dotted, value)
    for name, text in env.items():
        if name.startswith("ONEBOX__"):
            dotted = [p.lower() for p in name[len("ONEBOX__"):].split("__") if p]
            if len(dotted) < 2:
                raise ConfigError(f"{name}: expected ONEBOX__SECTION__KEY")
            _set_path(raw, dotted, parse_env_value(text))


def _tables(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = raw.get(name, {})
    return value if isinstance(value, Mapping) else {}


def _cross_checks(raw: Mapping[str, Any]) -> Iterable[str]:
    """What no one section can check: model names are unique, and what they name exists."""
    named = {s: _tables(raw, s) for s in ("models", "embeddings", "remote_models")}
    seen: dict[str, str] = {}
    for section, tables in named.items():
        for key in tables:
            if key in seen:
                yield f"[{seen[key]}.{key}] and [{section}.{key}]: a model name clients send must be unique"
            seen.setdefault(key, section)
    providers = _tables(raw, "providers")
    for key, table in named["remote_models"].items():
        provider = table.get("provider") if isinstance(table, Mapping) else None
        if isinstance(provider, str) and provider and provider not in providers:
            yield f"remote_models.{key}.provider: no [providers.{provider}]"
    chat = set(named["models"]) | set(named["remote_models"])
    for section in ("models", "remote_models"):
        for key, table in named[section].items():
            chain = table.get("fallback", []) if isinstance(table, Mapping) else []
            for target in chain if isinstance(chain, list) else []:
                if target not in chat:
                    yield f"{section}.{key}.fallback: no chat model {target!r} in [models] or [remote_models]"
                elif target == key:
                    yield f"{section}.{key}.fallback: a model cannot fall back to itself"


def parse_sections(raw: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Every section built from `raw`, and the errors found in each ("" for the file's own)."""
    errors: dict[str, list[str]] = {"": []}
    values: dict[str, Any] = {}
    for name in raw:
        if name not in SECTIONS:
            errors[""].append(f"unknown section [{name}] (known: {', '.join(SECTIONS)})")
    errors[""].extend(_cross_checks(raw))
    for name, sec in SECTIONS.items():
        errs: list[str] = []
        data = raw.get(name, {})
        if sec.named:
            tables: dict[str, Any] = {}
            if not isinstance(data, Mapping):
                errs.append(f"{name}: expected tables [{name}.NAME], got {type(data).__name__}")
                data = {}
            for key, table in data.items():
                if not set(key) <= NAME_CHARS:
                    errs.append(f"{name}.{key}: names are letters, digits, '-', '_', '.'")
                    continue
                tables[key] = build(sec.cls, table, f"{name}.{key}", errs)
            values[name] = tables
        else:
            values[name] = build(sec.cls, data, name, errs)
        errors[name] = errs
    return values, errors


def parse(raw: Mapping[str, Any], source: str = "<string>", sections: Iterable[str] | None = None) -> Config:
    """A Config from parsed TOML. Raises ConfigError listing every error in the file's
    own structure and in `sections` (all of them by default); others keep their defaults."""
    values, errors = parse_sections(raw)
    wanted = list(SECTIONS) if sections is None else list(sections)
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise ValueError(f"no such config section: {unknown[0]}")  # a bug in the caller
    found = errors[""] + [e for s in wanted for e in errors[s]]
    if found:
        lines = [f"{source}: {e}" for e in found]
        raise ConfigError(lines[0] if len(lines) == 1 else f"{source}: {len(lines)} errors:\n  "
                          + "\n  ".join(found), lines)
    for name in SECTIONS:
        if name not in wanted:
            values[name] = {} if SECTIONS[name].named else SECTIONS[name].cls()
    return Config(source=source, **values)


def read(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> tuple[Path, dict[str, Any]]:
    """The file's TOML with the environment's overrides applied."""
    env = os.environ if env is None else env
    path = Path(path or env.get("ONEBOX_CONFIG") or DEFAULT_CONFIG)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        apply_env(raw, env)
    except ConfigError as exc:
        raise ConfigError(f"environment: {exc}") from None
    return path, raw


def load(path: Path | str | None = None, env: Mapping[str, str] | None = None,
         sections: Iterable[str] | None = None) -> Config:
    """Read the config file (ONEBOX_CONFIG or /etc/onebox/onebox.toml by default)."""
    path, raw = read(path, env)
    return parse(raw, str(path), sections)


HEADER = """\
# onebox configuration. Every key is optional unless marked required; the values below
# are the defaults. Written by `onebox config defaults` from the declarations in
# daemons/config/. After editing, run `onebox config check` (it lists every error).
# Environment overrides: ONEBOX_RUNTIME_DIR, ONEBOX_STATE_DIR, ONEBOX_MODELS_DIR,
# ONEBOX_LOG_LEVEL, and ONEBOX__SECTION__KEY=value for any key
# (e.g. ONEBOX__ROUTER__TCP=127.0.0.1:8080). A bad value stops a daemon with exit 78."""


def render_defaults() -> str:
    """The documented default config, from the section declarations."""
    lines = HEADER.splitlines()
    for sec in SECTIONS.values():
        table = f"{sec.name}.{sec.example}" if sec.named else sec.name
        lines += render_section(sec.cls, table, sec.doc)
    return "\n".join(lines) + "\n"


def as_dict(config: Config) -> dict[str, Any]:
    """The effective config, for a debug log line."""
    return dataclasses.asdict(config)
