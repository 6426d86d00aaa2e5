"""onebox-ingest: watches the inbox folders and keeps index.db in step with them, through
the OCR and embedding daemons, at a lower CPU priority than inference."""

from __future__ import annotations

import logging
import os
import sys
import threading

from daemons import models, registry
from daemons.bus import serve
from daemons.bus.client import BusClient
from daemons.bus.worker import Emitter
from daemons.config import Config
from daemons.index.write import IndexWriter, open_index
from daemons.ingest.cache import MarkdownCache
from daemons.ingest.engine import IngestEngine
from daemons.ingest.pipeline import Pipeline
from daemons.ingest.queue import JobQueue, Retry
from daemons.ingest.tokens import Tokenizer
from daemons.ingest.watch import Watcher
from daemons.llama import LlamaError
from daemons.store import StoreError

log = logging.getLogger("daemons.ingest")


def check(config: Config) -> str:
    """The embedding model ingestion uses; LoadError for a config that cannot work."""
    if not config.collections:
        raise serve.LoadError("no [collections.NAME] configured: this daemon has nothing to watch")
    key = config.ingest_embedding()
    if key is None or key not in config.embeddings:
        known = ", ".join(config.embeddings) or "none"
        raise serve.LoadError(f"config error: ingest.embedding: no [embeddings.{key}] (configured: {known})")
    folders = config.collection_dirs()
    resolved = {name: path.resolve() for name, path in folders.items()}
    for a, pa in resolved.items():
        for b, pb in resolved.items():
            if a < b and (pa == pb or pa in pb.parents or pb in pa.parents):
                raise serve.LoadError(f"config error: collections.{a} and collections.{b}: folders {pa} and {pb} "
                                      "overlap (a file must belong to one collection)")
    return key


def load(loading: serve.Loading) -> serve.Served:
    config = loading.config
    settings = config.ingest
    key = check(config)
    ec = config.embedding(key)
    try:
        path = models.resolve(ec.path, config.paths.models)
        tokenizer = Tokenizer(path)
    except (FileNotFoundError, LlamaError) as exc:
        raise serve.LoadError(f"embedding model {key}: {exc}") from None
    os.nice(settings.nice)
    index_path = config.paths.state / "index.db"
    try:
        db = open_index(index_path)
    except StoreError as exc:
        raise serve.LoadError(str(exc), 73) from None  # EX_CANTCREAT
    writer = IndexWriter(db)
    writer.set_collections([(name, str(p), config.collections[name].local_only)
                            for name, p in config.collection_dirs().items()])
    identity = f"{key}:{path.name}:{path.stat().st_size}"
    outcome = writer.prepare_vectors(identity, tokenizer.dims, config.search.vectors)
    if outcome == "reset":
        log.warning("the embedding model changed (now %s): every file is embedded again (from the markdown cache)",
                    identity)
    elif outcome == "rebuilt":
        log.info("nearest-neighbour table rebuilt for search.vectors = %s", config.search.vectors)
    lock = threading.RLock()
    queue = JobQueue(db, lock, Retry(settings.max_attempts, settings.backoff_s, settings.backoff_max_s))
    embed_service = registry.Instance(registry.EMBED, key).service or ""
    log.info("ingesting %s with %s (%d dimensions, chunks of %d tokens), OCR %s, nice %d",
             ", ".join(f"{n} <- {p}" for n, p in config.collection_dirs().items()), embed_service,
             tokenizer.dims, settings.chunk_tokens, "on" if config.ocr.enabled else "off", settings.nice)

    def engine(emitter: Emitter) -> serve.Engine:
        bus = BusClient(config.paths.bus_endpoint, config.bus)
        pipeline = Pipeline(settings, queue, writer, bus, embed_service, tokenizer,
                            MarkdownCache(config.paths.state / "markdown"), config.ocr.enabled,
                            folders=config.collection_dirs())
        watcher = Watcher(config.collection_dirs(), pipeline.file_ready, pipeline.file_gone, mode=settings.watch,
                          poll_interval_s=settings.poll_interval_s, settle_s=settings.settle_s, known=queue.known)
        return IngestEngine(emitter, queue, pipeline, watcher, index_path)

    service_name = registry.Instance(registry.INGEST).service or ""
    return serve.Served(
        service=service_name, capacity=16, engine=engine, shutdown_timeout_s=settings.shutdown_timeout_s,
        ready_status=f"serving {service_name}: {len(config.collections)} collection(s) into {index_path}",
        meta={"collections": sorted(config.collections), "embedding": key, "engine": "ingest"},
    )


def main(argv: list[str] | None = None) -> int:
    return serve.run(prog="onebox ingest-daemon", description="Run the ingestion daemon: inbox folders to the index.",
                     sections=registry.INGEST.sections, load=load, name="ingest", argv=argv)


if __name__ == "__main__":
    sys.exit(main())
