"""onebox-infer@MODEL: load one model, register `infer/MODEL` with the broker, serve."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import zmq

from daemons import config as config_mod
from daemons import models, service
from daemons.bus.worker import Worker
from daemons.config import ConfigError
from daemons.infer.model import Model, ModelError
from daemons.infer.simple import SimpleEngine

log = logging.getLogger("daemons.infer")

# Test-only: while this file exists the feeder loop blocks, as a hung decode would.
HANG_FILE_ENV = "ONEBOX_TEST_HANG_FILE"


def hang_hook(path: str) -> None:
    while Path(path).exists():
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="onebox infer",
        description="Run an inference daemon for one model (a [models.MODEL] table in the config).",
    )
    parser.add_argument("model", help="the model's key in the config, e.g. smollm2")
    parser.add_argument("--config", help="config file (default: $ONEBOX_CONFIG or /etc/onebox/onebox.toml)")
    args = parser.parse_args(argv)
    config = service.load_config_or_exit(args.config)
    service.setup_logging(config.log.level, f"infer@{args.model}")
    log.debug("effective config: %s", config_mod.as_dict(config))
    try:
        mc = config.model(args.model)
        path = models.resolve(mc.path, config.paths.models)
    except (ConfigError, FileNotFoundError) as exc:
        log.error("config error: %s", exc)
        return service.EX_CONFIG

    signals = service.Signals()
    signals.install()
    notifier = service.Notifier()
    notifier.status(f"loading {path.name}")
    started = time.monotonic()
    try:
        model = Model.load(path, mc)
    except ModelError as exc:
        log.error("%s (a corrupt or unsupported GGUF?)", exc)
        return service.EX_CONFIG
    log.info("loaded %s in %.1f s: %s", path.name, time.monotonic() - started, model.describe())
    if signals.count:
        return service.EX_OK

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    service_name = f"infer/{args.model}"
    worker = Worker(ctx, config.paths.bus_endpoint, service_name, mc.capacity, config.bus,
                    meta={"model": args.model, "n_ctx": model.n_ctx, "engine": mc.engine})
    # Under systemd the watchdog interval bounds how long a decode step may stall.
    stall = min(30.0, 2 * notifier.watchdog_interval) if notifier.watchdog_interval else 30.0
    engine = SimpleEngine(model, mc, worker.emitter, stall_limit=stall)
    hang = os.environ.get(HANG_FILE_ENV)
    if hang:
        log.warning("test hook %s=%s is set: the feeder blocks while that file exists", HANG_FILE_ENV, hang)
        engine.on_turn = lambda: hang_hook(hang)
    engine.start()
    notifier.ready(f"serving {service_name} ({path.name}, n_ctx {model.n_ctx}, {mc.threads} threads)")

    last_status = 0.0

    def tick() -> None:
        nonlocal last_status
        if engine.alive():
            notifier.progress()
        now = time.monotonic()
        if now - last_status >= 2.0:
            last_status = now
            notifier.status(f"{service_name}: {engine.status()}")

    try:
        worker.run(engine, should_stop=lambda: signals.count, on_tick=tick,
                   drain_timeout=config.router.shutdown_timeout_s)
    except Exception:
        log.exception("worker loop failed")
        return service.EX_SOFTWARE
    finally:
        notifier.stopping(f"{service_name} stopping")
        engine.stop()
        worker.close()
        ctx.term()
    log.info("%s stopped (%s)", service_name, signals.name)
    return service.EX_OK


if __name__ == "__main__":
    sys.exit(main())
