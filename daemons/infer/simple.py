"""The one-request-at-a-time engine: a thread that runs queued requests in turn.

It implements the bus `Handler` seam (submit / cancel / alive); the continuous-
batching engine replaces it behind the same seam without touching bus or router.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable

from daemons import cpu
from daemons.bus.errors import RequestError
from daemons.bus.worker import Emitter, Request
from daemons.config import ModelConfig
from daemons.infer import request as request_mod
from daemons.infer.model import Model
from daemons.infer.native import Pieces
from daemons.infer.textstream import StopMatcher, Utf8Stream

log = logging.getLogger(__name__)

# A loop that has not come round for this long is hung (the watchdog pings stop).
DEFAULT_STALL_LIMIT_S = 30.0


class SimpleEngine:
    def __init__(self, model: Model, mc: ModelConfig, emitter: Emitter,
                 stall_limit: float = DEFAULT_STALL_LIMIT_S) -> None:
        self.stall_limit = stall_limit
        self.model = model
        # llama-cpp-python's own detokenize truncates pieces over 32 bytes to nothing.
        self.pieces = Pieces(model.lm.vocab)
        self.mc = mc
        self.emit = emitter
        self._queue: queue.Queue[tuple[Request, request_mod.GenRequest]] = queue.Queue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="feeder", daemon=True)
        self.beat = time.monotonic()
        self.current: str | None = None
        self.served = 0
        self.generated = 0
        # Test-only hook: when set, the loop calls it each turn (used to hang the feeder).
        self.on_turn: Callable[[], None] | None = None

    # -- Handler seam ------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        # Bounded by the worker, which refuses requests beyond `capacity` before this.
        self._queue.put((req, request_mod.parse(req.body)))

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)

    def alive(self) -> bool:
        return time.monotonic() - self.beat < self.stall_limit

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def status(self) -> str:
        busy = f"generating {self.current}" if self.current else "idle"
        return f"{busy}; {self._queue.qsize()} queued; {self.served} served, {self.generated} tokens"

    # -- the loop ----------------------------------------------------------------------

    def _loop(self) -> None:
        cpu.pin_current_thread(cpu.parse_cpus(self.mc.feeder_cpus))
        cpu.set_fifo_current_thread(self.mc.feeder_priority)
        while not self._stop.is_set():
            self.beat = time.monotonic()
            if self.on_turn is not None:
                self.on_turn()
            try:
                req, gen = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if self._take_cancel(req.id):
                continue
            self.current = req.id
            try:
                self._run(req, gen)
            except RequestError as exc:
                self.emit.error(req.id, exc.code, exc.message)
            except Exception as exc:
                log.exception("request %s failed", req.id)
                self.emit.error(req.id, 500, f"inference failed: {type(exc).__name__}: {exc}")
            finally:
                self.current = None
                self._take_cancel(req.id)

    def _take_cancel(self, request_id: str) -> bool:
        with self._lock:
            if request_id in self._cancelled:
                self._cancelled.discard(request_id)
                return True
            return False

    def _is_cancelled(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._cancelled

    def _run(self, req: Request, gen: request_mod.GenRequest) -> None:
        model = self.model
        prompt = model.prompt_tokens(gen)
        model.check_fits(prompt)
        limit = model.n_ctx - len(prompt)
        max_new = min(gen.max_tokens or self.mc.default_max_tokens, limit)
        model.llama.set_seed(gen.seed if gen.seed is not None else random.getrandbits(32))
        utf8 = Utf8Stream()
        stops = StopMatcher(gen.stop)
        produced = 0
        finish = "length"
        hit = False
        started = time.monotonic()
        for token in model.llama.generate(
            prompt, top_k=gen.top_k, top_p=gen.top_p, min_p=gen.min_p, temp=gen.temperature,
            repeat_penalty=gen.repeat_penalty, frequency_penalty=gen.frequency_penalty,
            presence_penalty=gen.presence_penalty, reset=True,
        ):
            self.beat = time.monotonic()
            if self._is_cancelled(req.id):
                log.info("request %s cancelled after %d tokens", req.id, produced)
                return
            if time.time() > req.deadline:
                raise RequestError(f"deadline passed after {produced} generated tokens", 504)
            if model.is_eog(token):
                finish = "stop"
                break
            produced += 1
            text, hit = stops.feed(utf8.feed(self.pieces(token)))
            if text:
                self.emit.partial(req.id, {"text": text})
            if hit:
                finish = "stop"
                break
            if produced >= max_new:
                break
        if not hit:
            tail, hit = stops.feed(utf8.flush())
            tail = tail if hit else tail + stops.flush()
            if tail:
                self.emit.partial(req.id, {"text": tail})
        elapsed = time.monotonic() - started
        self.served += 1
        self.generated += produced
        self.emit.final(req.id, {
            "finish_reason": finish,
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": produced},
            "timings": {"seconds": round(elapsed, 4)},
        })
        log.debug("request %s: %d prompt + %d generated tokens in %.2f s (%s)",
                  req.id, len(prompt), produced, elapsed, finish)
