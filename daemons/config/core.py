"""Sections every daemon reads: where files live, logging, the bus."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from daemons.config.schema import setting

LogLevel = Literal["debug", "info", "warning", "error", "critical"]


@dataclass(frozen=True)
class PathsConfig:
    runtime_dir: str = setting("/run/onebox", "Sockets: api.sock (the OpenAI API) and bus.sock (the daemons' ZeroMQ bus).")
    state_dir: str = setting("/var/lib/onebox", "State: index.db, ledger.db, markdown/, inbox/, models/.")
    models_dir: str = setting("", "Where model files are looked up first; empty means STATE_DIR/models. After it,\n"
                                  "installed model packages (site-packages) are searched.")

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
    level: LogLevel = setting("info", "debug, info, warning, error or critical.")


@dataclass(frozen=True)
class BusConfig:
    heartbeat_interval_s: float = setting(
        1.0, "Heartbeats both ways; a peer silent for heartbeat_liveness intervals is dead. A daemon\n"
             "whose engine makes no progress for two intervals (at least 2 s) leaves the bus until it\n"
             "does, so the router stops sending it requests within three heartbeats.", ge=0.05, le=60)
    heartbeat_liveness: int = setting(3, "", ge=2, le=20)
    max_message_bytes: int = setting(4 * 1024 * 1024, "Larger bus messages are refused (a bad peer cannot exhaust memory).",
                                     ge=64 * 1024)
    client_wait_s: float = setting(
        10.0, "How long a call from one daemon to another (ingest to ocr, say) waits for a worker of that\n"
              "service to register before it fails (within the call's own deadline).", ge=0)
