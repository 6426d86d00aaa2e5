"""One [embeddings.NAME] table per embedding model: what the embedding daemon serves."""

from __future__ import annotations

from dataclasses import dataclass

from daemons.config.models import _cpus, _required
from daemons.config.schema import setting


@dataclass(frozen=True)
class EmbeddingConfig:
    path: str = setting(
        "", "An embedding GGUF (pooling and dimension come from its metadata): absolute, or relative\n"
            "to models_dir or to a model package in site-packages. The default is all-MiniLM-L6-v2,\n"
            "converted by scripts/setup (`onebox models convert`).",
        check=_required, example="all_minilm_l6_v2/all-MiniLM-L6-v2.f16.gguf")
    threads: int = setting(2, "CPU threads for llama.cpp.", ge=1, le=1024)
    capacity: int = setting(64, "Requests the daemon accepts at once; more wait in the router until the deadline.",
                            ge=1, le=4096)
    max_inputs: int = setting(2048, "Inputs one request may carry (OpenAI allows 2048).", ge=1, le=100_000)
    batch_tokens: int = setting(
        2048, "Tokens in one llama_decode: inputs arriving together, from any requests, share a batch\n"
              "up to this many tokens (and at least one whole input: it is raised to the model's\n"
              "context length if smaller).", ge=64, le=65536)
    batch_inputs: int = setting(64, "Inputs (sequences) in one batch.", ge=1, le=256)
    batch_wait_ms: float = setting(
        2.0, "How long a batch that is not full waits for more inputs to arrive before it runs, while\n"
             "requests are arriving close together (a lone request never waits).", ge=0, le=1000)
    truncate: bool = setting(
        False, "An input longer than the model's context: false refuses the request with a 400 naming\n"
               "the input and its length; true cuts it to fit. A request may choose with\n"
               '"onebox": {"truncate": true}.')
    normalize: bool = setting(True, "L2-normalise the vectors (as sentence-transformers and OpenAI do).")
    feeder_cpus: str = setting("", 'CPUs for the batching ("feeder") thread, e.g. "1"; empty leaves it unpinned.',
                               check=_cpus)
    feeder_priority: int = setting(0, ">0 switches the feeder to SCHED_FIFO at this priority (needs CAP_SYS_NICE).",
                                   ge=0, le=99)
    shutdown_timeout_s: float = setting(10.0, "On SIGTERM: finish the requests in flight for this long, then cancel them.",
                                        gt=0)
