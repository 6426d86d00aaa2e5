"""The skeleton every worker daemon runs on: `run()` owns the lifecycle, the daemon
supplies only `load()` — what it serves and the engine that serves it.

run(): parse the arguments; load the config, checking the sections the daemon reads
(exit 78); configure logging; record signals; call `load()` (which may take long: it
can ask systemd for more time with `Loading.extend()`); build the engine on the bus
worker's emitter and start it; serve on the bus, saying READY=1 once the broker has
acknowledged the registration (or after one heartbeat with no broker) — the watchdog and the
bus heartbeats fed only while the engine is alive, a STATUS= line every few seconds —
until SIGTERM/SIGINT (drain for the daemon's own shutdown timeout, a second signal
escalates) or until the engine gives up (exit 70, so systemd restarts it). STOPPING=1,
engine stopped, sockets closed, the ZeroMQ context ended, in that order.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

from daemons import config as config_mod
from daemons import service
from daemons.bus.worker import Emitter, Handler, Worker
from daemons.config import Config

log = logging.getLogger(__name__)

STATUS_EVERY_S = 2.0
# How long a hung engine thread is given to notice the stop before the process exits anyway.
ENGINE_STOP_S = 5.0


class Engine(Handler, Protocol):
    """What serves a worker daemon's requests; see `Handler` for submit/cancel/alive/status_map."""

    def start(self) -> None:
        """Start the engine's own threads (after READY=1 would be true)."""

    def stop(self, timeout: float) -> None:
        """Stop them, waiting up to `timeout`; requests in flight were already cancelled."""

    def status(self) -> str:
        """One line for `systemctl status` (STATUS=)."""

    def failed(self) -> str | None:
        """Why the engine gave up for good, or None; the daemon then exits 70."""


class LoadError(Exception):
    """The daemon cannot serve (a missing or corrupt model...): logged, exit `code`."""

    def __init__(self, message: str, code: int = service.EX_CONFIG) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Served:
    """What `load()` returns: the service to register and how to build its engine."""

    service: str
    capacity: int
    # Built once the bus worker exists, on its thread-safe emitter.
    engine: Callable[[Emitter], Engine]
    ready_status: str
    # On SIGTERM: how long requests in flight may finish (the daemon's own setting).
    shutdown_timeout_s: float
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Loading:
    """What `load()` gets: the config and arguments, and the daemon's own sd_notify."""

    config: Config
    args: argparse.Namespace
    notifier: service.Notifier
    signals: service.Signals

    @property
    def stall_s(self) -> float:
        """An engine loop silent this long is stalled: two heartbeat intervals, and at
        least 2 s (a busy 2-core box can keep a thread off the CPU for a fraction of a
        second), so the router stops sending it requests within three heartbeats."""
        return max(2.0, 2 * self.config.bus.heartbeat_interval_s)

    def extend(self, seconds: float, status: str) -> None:
        """A slow step is starting (loading a model): keep systemd's start timeout away."""
        self.notifier.extend_timeout(seconds, status)


Load = Callable[[Loading], Served]


def run(*, prog: str, description: str, sections: Sequence[str], load: Load,
        name: Callable[[argparse.Namespace], str] | str,
        arguments: Callable[[argparse.ArgumentParser], None] | None = None,
        argv: list[str] | None = None) -> int:
    """A worker daemon's whole main(); returns its exit code."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if arguments is not None:
        arguments(parser)
    parser.add_argument("--config", help="config file (default: $ONEBOX_CONFIG or /etc/onebox/onebox.toml)")
    args = parser.parse_args(argv)
    config = service.load_config_or_exit(args.config, sections)
    label = name(args) if callable(name) else name
    service.setup_logging(config.log.level, label)
    log.debug("effective config: %s", config_mod.as_dict(config))
    signals = service.Signals()
    signals.install()
    notifier = service.Notifier()
    started = time.monotonic()
    try:
        served = load(Loading(config, args, notifier, signals))
    except LoadError as exc:
        log.error("%s", exc)
        return exc.code
    if signals.count:
        log.info("%s stopped while loading (%s)", label, signals.name)
        return service.EX_OK
    return serve(config, served, notifier, signals, started)


def serve(config: Config, served: Served, notifier: service.Notifier, signals: service.Signals,
          started: float) -> int:
    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    worker = Worker(zctx, config.paths.bus_endpoint, served.service, served.capacity, config.bus, meta=served.meta)
    engine = served.engine(worker.emitter)
    engine.start()

    def ready() -> None:
        # Once the broker has the registration: a client that sees the unit active can
        # reach it through the router at once.
        notifier.ready(served.ready_status)
        log.info("%s ready after %.1f s", served.service, time.monotonic() - started)

    last_status = 0.0
    gave_up: str | None = None

    def should_stop() -> int:
        return signals.count + (2 if gave_up else 0)

    def tick() -> None:
        nonlocal last_status, gave_up
        if engine.alive():
            notifier.progress()
        if gave_up is None:
            gave_up = engine.failed()
        now = time.monotonic()
        if now - last_status >= STATUS_EVERY_S:
            last_status = now
            notifier.status(f"{served.service}: {engine.status()}")

    code = service.EX_OK
    try:
        worker.run(engine, should_stop=should_stop, on_tick=tick, drain_timeout=served.shutdown_timeout_s,
                   on_registered=ready)
        if gave_up:
            log.critical("%s: %s", served.service, gave_up)
            code = service.EX_SOFTWARE
    except Exception:
        log.exception("worker loop failed")
        code = service.EX_SOFTWARE
    finally:
        notifier.stopping(f"{served.service} stopping")
        engine.stop(ENGINE_STOP_S)
        worker.close()
        # term() waits for every socket; they all belong to this thread and are closed.
        zctx.term()
    log.info("%s stopped (%s)", served.service, "engine failed" if gave_up else signals.name)
    return code
