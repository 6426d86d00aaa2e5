"""The suite's daemons, in one table.

Everything that needs to know which daemons exist reads this: `onebox up` (what to
start, in order), the `onebox` subcommands, `scripts/install` (which units to enable),
`onebox tune` (where each unit runs), the router (`/ready` expects a live worker for
each enabled service; `/v1/status`), and the tests that check every registered daemon
has its unit, its subcommand and its README row. Adding a daemon is one row here plus
its package and its unit.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from daemons import config as config_mod
from daemons.config import Config, ConfigError

Placement = Literal["router", "infer", "background"]


def always(config: Config) -> bool:
    return True


@dataclass(frozen=True)
class Daemon:
    # The `onebox NAME` subcommand and the name in logs and `onebox up`.
    name: str
    # Its entry point: a module with main(argv) -> int.
    module: str
    # One line for `onebox --help`.
    summary: str
    # Its systemd unit, a template ("onebox-infer@.service") when it has instances.
    unit: str
    # Config sections it reads: errors there stop it (exit 78), others are not its business.
    sections: tuple[str, ...]
    # The bus service it registers, "{key}" replaced by the instance key; None for the
    # router, which is the broker.
    service: str | None
    # Where `onebox tune` places it: with the router (housekeeping CPUs), the inference
    # CPUs, or the background ones.
    placement: Placement
    # A config section of named tables ([models.NAME]): one instance per table.
    instances_of: str | None = None
    # Whether the config turns it on.
    enabled: Callable[[Config], bool] = always
    # The `onebox` subcommand that runs it, when not its name (`onebox ingest` is the
    # command that copies files in; the daemon is `onebox ingest-daemon`).
    command: str = ""

    @property
    def cmd(self) -> str:
        return self.command or self.name


@dataclass(frozen=True)
class Instance:
    daemon: Daemon
    key: str | None = None

    @property
    def label(self) -> str:
        """"router", "infer@smollm2": the name in logs, `onebox up` and the tests."""
        return self.daemon.name if self.key is None else f"{self.daemon.name}@{self.key}"

    @property
    def unit(self) -> str:
        return self.daemon.unit.replace("@.", f"@{self.key}.") if self.key is not None else self.daemon.unit

    @property
    def service(self) -> str | None:
        s = self.daemon.service
        return s.replace("{key}", self.key or "") if s is not None else None

    def argv(self, config_path: Path | str, python: str = sys.executable) -> list[str]:
        key = [self.key] if self.key is not None else []
        return [python, "-m", self.daemon.module, *key, "--config", str(config_path)]


CORE = ("paths", "log", "bus")

ROUTER = Daemon(
    name="router", module="daemons.router.main", summary="run the router daemon (API + bus broker)",
    unit="onebox-router.service", sections=(*CORE, "router", "models", "embeddings", "ocr", "ingest", "collections",
                                            "search", "auth", "principals", "costs", "providers", "remote_models"),
    service=None,
    placement="router",
)
INFER = Daemon(
    name="infer", module="daemons.infer.main", summary="run an inference daemon for one model",
    unit="onebox-infer@.service", sections=(*CORE, "models"), service="infer/{key}", placement="infer",
    instances_of="models",
)

EMBED = Daemon(
    name="embed", module="daemons.embed.main", summary="run an embedding daemon for one model",
    unit="onebox-embed@.service", sections=(*CORE, "embeddings"), service="embed/{key}", placement="background",
    instances_of="embeddings",
)

OCR = Daemon(
    name="ocr", module="daemons.ocr.main", summary="run the OCR daemon (tesseract, a pool of processes)",
    unit="onebox-ocr.service", sections=(*CORE, "ocr", "collections"), service="ocr", placement="background",
    enabled=lambda config: config.ocr.enabled,
)

INGEST = Daemon(
    name="ingest", module="daemons.ingest.main", summary="run the ingestion daemon (inbox folders to the index)",
    unit="onebox-ingest.service", sections=(*CORE, "ingest", "collections", "embeddings", "search", "ocr"),
    service="ingest", placement="background", command="ingest-daemon",
    enabled=lambda config: config.ingest.enabled and bool(config.collections) and bool(config.embeddings),
)

# In start order: the router (the broker) first, stopped last; ingestion after the
# daemons it calls.
DAEMONS: tuple[Daemon, ...] = (ROUTER, INFER, EMBED, OCR, INGEST)


def by_name(name: str, daemons: Sequence[Daemon] = DAEMONS) -> Daemon:
    for d in daemons:
        if d.name == name:
            return d
    raise KeyError(name)


def instances(config: Config, daemons: Sequence[Daemon] = DAEMONS) -> list[Instance]:
    """What runs for this config, in start order."""
    out: list[Instance] = []
    for d in daemons:
        if not d.enabled(config):
            continue
        if d.instances_of is None:
            out.append(Instance(d))
        else:
            tables = getattr(config, d.instances_of)
            out.extend(Instance(d, key) for key in tables)
    return out


def expected_services(config: Config, daemons: Sequence[Daemon] = DAEMONS) -> list[str]:
    """The bus services that must have a live worker for the suite to be ready."""
    return [s for s in (i.service for i in instances(config, daemons)) if s is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m daemons.registry",
        description="Print the systemd units this config runs (for scripts/install), one per line.",
    )
    parser.add_argument("what", choices=["units", "templates"],
                        help="units: the instances to enable; templates: every registered unit file")
    parser.add_argument("--config", help="config file (default: $ONEBOX_CONFIG or /etc/onebox/onebox.toml)")
    args = parser.parse_args(argv)
    if args.what == "templates":
        print("\n".join(d.unit for d in DAEMONS))
        return 0
    try:
        config = config_mod.load(args.config)
    except ConfigError as exc:
        print(f"onebox: config error: {exc}", file=sys.stderr)
        return 78
    print("\n".join(i.unit for i in instances(config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
