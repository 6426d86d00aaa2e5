"""Where the router keeps its books on a box (the router and `onebox keys`/`usage` agree)."""

from __future__ import annotations

from pathlib import Path

from daemons.config import Config


def ledger_path(config: Config) -> Path:
    return config.paths.state / "ledger.db"


def key_paths(config: Config) -> tuple[Path, Path]:
    """(keys.db, the HMAC secret its keys are hashed with)."""
    state = config.paths.state
    return state / "keys.db", Path(config.auth.secret_file) if config.auth.secret_file else state / "keys.secret"
