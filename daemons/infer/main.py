"""onebox-infer@MODEL: load one model, register `infer/MODEL` with the broker, serve.

Only what is about models lives here: which file, which engine, the memory plan. The
lifecycle (config, signals, sd_notify, the bus, drain, exit codes) is daemons/bus/serve.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

from daemons import models, registry
from daemons.bus import serve
from daemons.bus.worker import Emitter
from daemons.config import ConfigError, ModelConfig
from daemons.feeder import TestHooks
from daemons.infer import memory, native
from daemons.infer.engine import BatchEngine
from daemons.infer.model import Model, ModelError
from daemons.infer.simple import SimpleEngine
from daemons.llama import LlamaError, forward_llama_logs

log = logging.getLogger("daemons.infer")

# A large GGUF from a cold page cache: systemd is asked for this much more time.
LOAD_EXTEND_S = 600.0


def make_context(model: Model, mc: ModelConfig, runtime_bytes: int) -> native.Context:
    """The batch engine's llama context. The memory plan (model + KV) is checked before
    anything is allocated, then again with the compute buffers llama.cpp reserved."""
    shape = native.kv_shape(model.lm.model, mc.kv_type)
    try:
        per_cell = shape.bytes_per_cell
    except ValueError as exc:  # llama.cpp would refuse the context (or abort on the row size)
        raise serve.LoadError(f"kv_type {mc.kv_type} cannot hold this model's KV heads ({shape.key_length} + "
                              f"{shape.value_length} values): {exc}; use another kv_type (f16 always works)") from None
    plan = memory.MemoryPlan(model=model.size_bytes, kv_cells=mc.kv_tokens, bytes_per_cell=per_cell,
                             compute=0, runtime=runtime_bytes, budget=memory.budget_bytes(mc.memory_budget_mb))
    if not plan.fits:
        raise serve.LoadError(f"memory budget exceeded: {plan.describe()}; lower kv_tokens or raise memory_budget_mb")
    try:
        ctx = native.Context(model.lm.model, n_cells=mc.kv_tokens, n_seq_max=mc.slots + mc.cached_prefixes,
                             n_batch=mc.step_tokens, threads=mc.threads, flash_attn=mc.flash_attn,
                             kv_type=mc.kv_type)
    except LlamaError as exc:
        raise serve.LoadError(f"cannot create the llama context: {exc} (out of memory?) — {plan.describe()}") from None
    plan = dataclasses.replace(plan, compute=ctx.compute_bytes)
    if not plan.fits:
        ctx.close()
        raise serve.LoadError(f"memory budget exceeded: {plan.describe()}; lower kv_tokens or step_tokens, "
                              "or raise memory_budget_mb")
    log.info("memory: %s (KV %s: %d layers x %d KV heads x (%d + %d) x %s per cell)", plan.describe(),
             shape.kv_type, shape.n_layer, shape.n_head_kv, shape.key_length, shape.value_length, shape.value_bytes)
    return ctx


def choose_engine(path: str, mc: ModelConfig) -> str:
    """The configured engine, or "simple" for a model the batch engine cannot serve."""
    if mc.engine != "batch":
        return mc.engine
    why = native.batch_refusal(path)
    if why:
        log.warning('engine "batch" cannot serve this model (%s): using engine "simple", one request at a '
                    'time (set engine = "simple" to silence this)', why)
        return "simple"
    return "batch"


def load(loading: serve.Loading) -> serve.Served:
    key = loading.args.model
    config = loading.config
    try:
        mc = config.model(key)
        path = models.resolve(mc.path, config.paths.models)
    except (ConfigError, FileNotFoundError) as exc:
        raise serve.LoadError(f"config error: {exc}") from None
    loading.extend(LOAD_EXTEND_S, f"loading {path.name}")
    runtime_bytes = memory.rss_bytes()
    started = time.monotonic()
    forward_llama_logs()
    engine_name = choose_engine(str(path), mc)
    try:
        model = Model.load(path, mc, engine_name)
    except ModelError as exc:
        raise serve.LoadError(f"{exc} (a corrupt or unsupported GGUF?)") from None
    log.info("loaded %s in %.1f s: %s", path.name, time.monotonic() - started, model.describe())
    ctx = make_context(model, mc, runtime_bytes) if engine_name == "batch" else None
    hooks = TestHooks.from_env()

    def engine(emitter: Emitter) -> serve.Engine:
        if ctx is not None:
            return BatchEngine(model, mc, emitter, ctx, stall_s=loading.stall_s, hooks=hooks)
        return SimpleEngine(model, mc, emitter, stall_s=loading.stall_s, hooks=hooks)

    service_name = registry.Instance(registry.INFER, key).service or ""
    shape = (f"batch engine: {mc.slots} slots, {mc.kv_tokens} KV cells" if ctx is not None
             else "simple engine") + f", {mc.kv_type} KV cache"
    return serve.Served(
        service=service_name, capacity=mc.capacity, engine=engine, shutdown_timeout_s=mc.shutdown_timeout_s,
        ready_status=f"serving {service_name} ({path.name}, n_ctx {model.n_ctx}, {mc.threads} threads, {shape})",
        meta={"model": key, "n_ctx": model.n_ctx, "engine": engine_name},
    )


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the model's key in the config, e.g. smollm2")


def main(argv: list[str] | None = None) -> int:
    return serve.run(
        prog="onebox infer", description="Run an inference daemon for one model (a [models.MODEL] table in the config).",
        sections=registry.INFER.sections, load=load, name=lambda args: f"infer@{args.model}", arguments=arguments,
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
