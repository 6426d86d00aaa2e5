"""GET /metrics: Prometheus metrics of the router, on a registry the app is given.

Counters and histograms move as requests flow (daemons/router/dispatch.py). What the
workers say of themselves — KV cells, prefix-cache hits, queue, liveness — is read from
the broker's view when Prometheus scrapes, so it is as fresh as the last heartbeat.
Principals appear only by class (interactive, batch), never by name: a label per
person would grow without bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_GAP_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
CIRCUIT = {"closed": 0, "half-open": 1, "open": 2}


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter("onebox_requests", "API calls by model, principal class and HTTP status.",
                                ["model", "principal_class", "status"], registry=registry)
        self.ttft = Histogram("onebox_time_to_first_token_seconds", "From the request to its first token.",
                              ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token = Histogram("onebox_inter_token_seconds", "Gaps between streamed tokens.", ["model"],
                                     buckets=TOKEN_GAP_BUCKETS, registry=registry)
        self.duration = Histogram("onebox_request_duration_seconds", "From the request to its last byte.", ["model"],
                                  buckets=LATENCY_BUCKETS, registry=registry)
        self.tokens = Counter("onebox_tokens", "Tokens in (prompt) and out (completion).", ["model", "direction"],
                              registry=registry)
        self.spend = Counter("onebox_spend", "Cost of served calls, in the configured currency.",
                             ["model", "principal_class", "provider"], registry=registry)
        self.limited = Counter("onebox_limited_requests", "Requests refused by a principal's limit (429).",
                               ["limit"], registry=registry)
        self.fallbacks = Counter("onebox_fallbacks", "Requests served by another model than the one asked for.",
                                 ["model", "to", "reason"], registry=registry)
        self.local_only_refusals = Counter("onebox_local_only_refusals",
                                           "Upstream routes not taken because the request was local_only.",
                                           ["model"], registry=registry)
        self.upstream_errors = Counter("onebox_upstream_errors", "Failed upstream calls by provider and kind.",
                                       ["provider", "kind"], registry=registry)
        self.circuit = Gauge("onebox_upstream_circuit_state", "0 closed, 1 half-open, 2 open.", ["provider"],
                             registry=registry)
        self.queue_depth = Gauge("onebox_queue_depth", "Requests waiting in the router's fair queue.", ["model"],
                                 registry=registry)
        self.in_flight = Gauge("onebox_in_flight", "Requests the router has sent on and not finished.", ["model"],
                               registry=registry)
        self.ledger_pending = Gauge("onebox_ledger_pending_rows", "Ledger rows not yet written to ledger.db.",
                                    registry=registry)

    def circuit_state(self, provider: str, state: str) -> None:
        self.circuit.labels(provider).set(CIRCUIT.get(state, 0))

    def watch_workers(self, snapshot: Callable[[], dict[str, Any]], expected: Callable[[], Iterable[str]]) -> None:
        self.registry.register(WorkerCollector(snapshot, expected))


class WorkerCollector(Collector):
    """Per service and model, from the workers' heartbeats: liveness, KV cells, cache."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], expected: Callable[[], Iterable[str]]) -> None:
        self.snapshot = snapshot
        self.expected = expected

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        services: dict[str, Any] = self.snapshot()["services"]
        live = GaugeMetricFamily("onebox_workers_live", "Live workers per bus service.", labels=["service"])
        for name in sorted(set(services) | set(self.expected())):
            live.add_metric([name], len(services.get(name, {}).get("workers", [])))
        yield live
        kv_used = GaugeMetricFamily("onebox_kv_cells_used", "KV cells in use (cached prefixes included).",
                                    labels=["model"])
        kv_total = GaugeMetricFamily("onebox_kv_cells", "KV cells in the pool.", labels=["model"])
        engine_queue = GaugeMetricFamily("onebox_engine_queue_depth", "Requests waiting inside the inference daemon.",
                                         labels=["model"])
        lookups = CounterMetricFamily("onebox_prefix_cache_lookups", "Prefix-cache lookups.", labels=["model"])
        hits = CounterMetricFamily("onebox_prefix_cache_hits", "Prefix-cache hits.", labels=["model"])
        saved = CounterMetricFamily("onebox_prefix_cache_tokens_saved", "Prompt tokens not prefilled again.",
                                    labels=["model"])
        preempted = CounterMetricFamily("onebox_preemptions", "Running requests whose KV cells were taken back "
                                        "when the pool ran out (each resumed later).", labels=["model"])
        for name, entry in sorted(services.items()):
            if not name.startswith("infer/"):
                continue
            model = name[len("infer/"):]
            workers = entry.get("workers", [])
            cells = [w.get("kv_cells") or {} for w in workers]
            cache = [w.get("prefix_cache") or {} for w in workers]
            kv_used.add_metric([model], sum(int(c.get("used", 0)) for c in cells))
            kv_total.add_metric([model], sum(int(c.get("total", 0)) for c in cells))
            engine_queue.add_metric([model], sum(int(w.get("queue", 0) or 0) for w in workers))
            lookups.add_metric([model], sum(int(c.get("lookups", 0)) for c in cache))
            hits.add_metric([model], sum(int(c.get("hits", 0)) for c in cache))
            saved.add_metric([model], sum(int(c.get("tokens_saved", 0)) for c in cache))
            preempted.add_metric([model], sum(int(w.get("preemptions", 0) or 0) for w in workers))
        yield from (kv_used, kv_total, engine_queue, lookups, hits, saved, preempted)
