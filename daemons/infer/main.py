"""onebox-infer@MODEL: load one model, register `infer/MODEL` with the broker, serve."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

import zmq

from daemons import config as config_mod
from daemons import models, service
from daemons.bus.worker import Worker
from daemons.config import ConfigError, ModelConfig
from daemons.infer import memory, native
from daemons.infer.engine import BatchEngine
from daemons.infer.model import Model, ModelError
from daemons.infer.simple import SimpleEngine

log = logging.getLogger("daemons.infer")

# Test-only: while this file exists the feeder loop blocks, as a hung decode would.
HANG_FILE_ENV = "ONEBOX_TEST_HANG_FILE"


def hang_hook(path: str) -> None:
    while Path(path).exists():
        time.sleep(0.1)


def make_context(model: Model, mc: ModelConfig, runtime_bytes: int) -> native.Context | None:
    """The batch engine's llama context, or None (after logging why) when this model or
    the memory budget rules it out: model + KV is checked before anything is allocated,
    then again with the compute buffers llama.cpp reserved."""
    why = native.unsupported_reason(model.lm.model)
    if why:
        log.error("engine \"batch\" cannot serve %s: %s; set engine = \"simple\"", model.path.name, why)
        return None
    shape = native.kv_shape(model.lm.model)
    plan = memory.MemoryPlan(model=model.size_bytes, kv_cells=mc.kv_tokens, bytes_per_cell=shape.bytes_per_cell,
                             compute=0, runtime=runtime_bytes, budget=memory.budget_bytes(mc.memory_budget_mb))
    if not plan.fits:
        log.error("memory budget exceeded: %s; lower kv_tokens or raise memory_budget_mb", plan.describe())
        return None
    try:
        ctx = native.Context(model.lm.model, n_cells=mc.kv_tokens, n_seq_max=mc.slots + mc.cached_prefixes,
                             n_batch=mc.step_tokens, threads=mc.threads, flash_attn=mc.flash_attn)
    except native.LlamaError as exc:
        log.error("cannot create the llama context: %s (out of memory?) — %s", exc, plan.describe())
        return None
    plan = dataclasses.replace(plan, compute=ctx.compute_bytes)
    if not plan.fits:
        ctx.close()
        log.error("memory budget exceeded: %s; lower kv_tokens or step_tokens, or raise memory_budget_mb",
                  plan.describe())
        return None
    log.info("memory: %s (KV: %d layers x %d KV heads x (%d + %d) x 2 B per cell)", plan.describe(),
             shape.n_layer, shape.n_head_kv, shape.key_length, shape.value_length)
    return ctx


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
    runtime_bytes = memory.rss_bytes()
    started = time.monotonic()
    if mc.engine == "batch":
        native.forward_llama_logs()
    try:
        model = Model.load(path, mc)
    except ModelError as exc:
        log.error("%s (a corrupt or unsupported GGUF?)", exc)
        return service.EX_CONFIG
    log.info("loaded %s in %.1f s: %s", path.name, time.monotonic() - started, model.describe())
    ctx: native.Context | None = None
    if mc.engine == "batch":
        ctx = make_context(model, mc, runtime_bytes)
        if ctx is None:
            return service.EX_CONFIG
    if signals.count:
        return service.EX_OK

    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    service_name = f"infer/{args.model}"
    worker = Worker(zctx, config.paths.bus_endpoint, service_name, mc.capacity, config.bus,
                    meta={"model": args.model, "n_ctx": model.n_ctx, "engine": mc.engine})
    # Under systemd the watchdog interval bounds how long a decode step may stall.
    stall = min(30.0, 2 * notifier.watchdog_interval) if notifier.watchdog_interval else 30.0
    engine: SimpleEngine | BatchEngine
    if ctx is not None:
        engine = BatchEngine(model, mc, worker.emitter, ctx, stall_limit=stall)
        worker.status_provider = engine.status_map
    else:
        engine = SimpleEngine(model, mc, worker.emitter, stall_limit=stall)
    hang = os.environ.get(HANG_FILE_ENV)
    if hang:
        log.warning("test hook %s=%s is set: the feeder blocks while that file exists", HANG_FILE_ENV, hang)
        engine.on_turn = lambda: hang_hook(hang)
    engine.start()
    shape = (f"batch engine: {mc.slots} slots, {mc.kv_tokens} KV cells" if ctx is not None else "simple engine")
    notifier.ready(f"serving {service_name} ({path.name}, n_ctx {model.n_ctx}, {mc.threads} threads, {shape})")

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
        zctx.term()
    log.info("%s stopped (%s)", service_name, signals.name)
    return service.EX_OK


if __name__ == "__main__":
    sys.exit(main())
