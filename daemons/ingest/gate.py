"""Ingestion yields to inference.

On a small box the embedding and OCR work of ingestion competes with the inference
daemons for the same cores, and llama.cpp's threads wait for each other at every step:
one of them kept off its core stalls the whole decode. Measured here (2 cores,
scripts/bench/ingest.py) with ingestion running flat out beside 8 chatting clients:
first-token latency x14.7 and tokens/s down to 6%. Niceness alone does not prevent
that (the embedding daemon also serves queries and runs at normal priority).

So before each embedding batch and each OCR document the pipeline asks the gate, which
reads the broker's view of every worker (`mmi.status`, at most every `POLL_S`): while
any inference worker has requests in flight, ingestion waits. A wait ends after
`max_wait_s` even if inference stays busy, so under constant load ingestion still
moves, a small batch at a time (a quarter of embed_batch), instead of starving.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from daemons.bus.client import BusClient
from daemons.bus.errors import BusError

log = logging.getLogger(__name__)

POLL_S = 0.25
STATUS_TIMEOUT_S = 2.0


def inference_in_flight(snapshot: dict[str, Any]) -> int:
    services: dict[str, Any] = snapshot.get("services", {})
    return sum(int(w.get("in_flight", 0)) for name, entry in services.items() if name.startswith("infer/")
               for w in entry.get("workers", []))


class InferenceGate:
    def __init__(self, bus: BusClient, max_wait_s: float, enabled: bool = True) -> None:
        self.bus = bus
        self.max_wait_s = max_wait_s
        self.enabled = enabled
        self._lock = threading.Lock()
        self._checked = 0.0
        self._busy = False
        self.waited_s = 0.0  # in all, for the status

    def busy(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= POLL_S:
                self._checked = now
                try:
                    snap = self.bus.request("mmi.status", {}, timeout=STATUS_TIMEOUT_S)
                    self._busy = inference_in_flight(snap) > 0
                except BusError as exc:  # no broker: nothing to yield to
                    log.debug("mmi.status failed: %s", exc)
                    self._busy = False
            return self._busy

    def wait(self, stop: threading.Event) -> bool:
        """Return once inference is idle (True), or after max_wait_s or on stop (False:
        inference is still busy, so the caller does as little as it can at a time)."""
        if not self.enabled:
            return True
        started = time.monotonic()
        while (busy := self.busy()) and not stop.is_set() and time.monotonic() - started < self.max_wait_s:
            stop.wait(POLL_S)
        self.waited_s += time.monotonic() - started
        return not busy
