"""onebox-embed@NAME: load one embedding model, register `embed/NAME`, batch and serve."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from daemons import models, registry
from daemons.bus import serve
from daemons.bus.worker import Emitter
from daemons.config import ConfigError
from daemons.embed.engine import EmbedEngine
from daemons.embed.native import EmbedContext, EmbedModel
from daemons.feeder import TestHooks
from daemons.llama import LlamaError, forward_llama_logs

log = logging.getLogger("daemons.embed")

MIB = 2**20


def load(loading: serve.Loading) -> serve.Served:
    key = loading.args.model
    config = loading.config
    try:
        ec = config.embedding(key)
        path = models.resolve(ec.path, config.paths.models)
    except (ConfigError, FileNotFoundError) as exc:
        raise serve.LoadError(f"config error: {exc}") from None
    loading.extend(300, f"loading {path.name}")
    forward_llama_logs()
    started = time.monotonic()
    try:
        model = EmbedModel(path)
        # One batch must hold the longest input a request may send.
        n_tokens = max(ec.batch_tokens, model.n_ctx_train or 0)
        ctx = EmbedContext(model, n_tokens=n_tokens, n_seqs=ec.batch_inputs, threads=ec.threads)
    except LlamaError as exc:
        raise serve.LoadError(f"{exc} (a corrupt GGUF, or not an embedding model?)") from None
    log.info("loaded %s in %.1f s: %s; model %d MiB, compute buffers %d MiB, batches of %d inputs / %d tokens",
             path.name, time.monotonic() - started, model.describe(), model.size_bytes // MIB,
             ctx.compute_bytes // MIB, ctx.n_seqs, ctx.n_tokens)
    hooks = TestHooks.from_env()

    def engine(emitter: Emitter) -> serve.Engine:
        return EmbedEngine(model, ec, emitter, ctx, stall_s=loading.stall_s, hooks=hooks)

    service_name = registry.Instance(registry.EMBED, key).service or ""
    return serve.Served(
        service=service_name, capacity=ec.capacity, engine=engine, shutdown_timeout_s=ec.shutdown_timeout_s,
        ready_status=(f"serving {service_name} ({path.name}: {model.dim} dimensions, {ctx.n_seqs} inputs / "
                      f"{ctx.n_tokens} tokens per batch)"),
        meta={"model": key, "dimensions": model.dim, "max_input_tokens": min(model.n_ctx_train or ctx.n_tokens,
                                                                             ctx.n_tokens), "engine": "embed"},
    )


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the embedding model's key in the config, e.g. minilm")


def main(argv: list[str] | None = None) -> int:
    return serve.run(
        prog="onebox embed",
        description="Run the embedding daemon for one model (an [embeddings.NAME] table in the config).",
        sections=registry.EMBED.sections, load=load, name=lambda args: f"embed@{args.model}", arguments=arguments,
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
