"""The one-request-at-a-time engine: llama-cpp-python's high-level API on the feeder.

It serves the models the batch engine cannot (recurrent and hybrid ones keep one state
per sequence, not KV cells that can be shared; encoder-decoder ones), and anyone who
sets engine = "simple". Prompt preparation, the text output and the feeder loop are
the batch engine's own (Model.prepare, Reply, daemons/feeder.py).
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections import deque
from typing import Any

import numpy as np
from llama_cpp import LogitsProcessorList
from llama_cpp.llama_grammar import LlamaGrammar

from daemons.bus.errors import RequestError
from daemons.bus.worker import Emitter, Request
from daemons.config import ModelConfig
from daemons.feeder import Feeder, OnFeeder, TestHooks
from daemons.infer import request as request_mod
from daemons.infer.model import Model
from daemons.infer.reply import Reply, Usage
from daemons.llama import Pieces

log = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0
# Allowed per prompt token while llama.cpp prefills (the first token comes after it).
PREFILL_S_PER_TOKEN = 0.05
INTERNAL = "inference failed: internal error in the engine; see its log"


class SimpleEngine(OnFeeder):
    def __init__(self, model: Model, mc: ModelConfig, emitter: Emitter, stall_s: float = 1.0,
                 hooks: TestHooks | None = None) -> None:
        self.model = model
        # llama-cpp-python's own detokenize truncates pieces over 32 bytes to nothing.
        self.pieces = Pieces(model.lm.vocab)
        self.mc = mc
        self.emit = emitter
        self._queue: queue.Queue[tuple[Request, request_mod.GenRequest]] = queue.Queue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self.feeder = Feeder(self._turn, self._fail_current, cpus=mc.feeder_cpus, priority=mc.feeder_priority,
                             stall_s=stall_s, hooks=hooks)
        self.current: str | None = None
        self.served = 0
        self.generated = 0
        self._rate: deque[tuple[float, int]] = deque()

    # -- Engine seam -----------------------------------------------------------------

    def submit(self, req: Request) -> None:
        # Bounded by the worker, which refuses requests beyond `capacity` before this.
        gen = request_mod.parse(req.body)
        if gen.logprobs is not None:
            raise RequestError("logprobs are not available with engine = \"simple\" (the batch engine has them)", 400)
        if gen.client_request_id:
            log.info("request %s: the client's x-request-id is %s", req.id, gen.client_request_id)
        self._queue.put((req, gen))

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)

    def start(self) -> None:
        self.feeder.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.feeder.stop(timeout)

    def status(self) -> str:
        busy = f"generating {self.current}" if self.current else "idle"
        return f"{busy}; {self._queue.qsize()} queued; {self.served} served, {self.generated} tokens"

    def status_map(self) -> dict[str, Any]:
        now = time.monotonic()
        while self._rate and self._rate[0][0] < now - RATE_WINDOW_S:
            self._rate.popleft()
        busy = 1 if self.current else 0
        return {"engine": "simple", "slots": {"total": 1, "busy": busy, "free": 1 - busy},
                "queue": self._queue.qsize(), "tokens_per_s": round(len(self._rate) / RATE_WINDOW_S, 1),
                "served": self.served, "generated_tokens": self.generated, "pid": os.getpid()}

    # -- the loop (feeder thread) ------------------------------------------------------

    def _turn(self) -> None:
        try:
            req, gen = self._queue.get(timeout=0.2)
        except queue.Empty:
            return
        if self._take_cancel(req.id):
            return
        self.current = req.id
        try:
            self._run(req, gen)
        except RequestError as exc:
            self.emit.error(req.id, exc.code, exc.message)
        finally:
            self.current = None
            self._take_cancel(req.id)

    def _fail_current(self, exc: Exception) -> None:
        if self.current is not None:
            self.emit.error(self.current, 500, INTERNAL)

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
        prompt, max_new = model.prepare(gen, self.mc.default_max_tokens)
        model.llama.set_seed(gen.seed if gen.seed is not None else random.getrandbits(32))
        reply = Reply(self.emit, req.id, gen.stop, gen.fitted, model.tool_parser(gen))
        produced = 0
        finish = "length"
        self.feeder.expect(2.0 + PREFILL_S_PER_TOKEN * len(prompt))
        for token in model.llama.generate(
            prompt, top_k=gen.top_k, top_p=gen.top_p, min_p=gen.min_p, temp=gen.temperature,
            repeat_penalty=gen.repeat_penalty, frequency_penalty=gen.frequency_penalty,
            presence_penalty=gen.presence_penalty, reset=True, grammar=grammar(gen),
            logits_processor=logit_bias(gen),
        ):
            self.feeder.progress()
            if self._is_cancelled(req.id):
                log.info("request %s cancelled after %d tokens", req.id, produced)
                return
            if time.time() > req.deadline:
                raise RequestError(f"deadline passed after {produced} generated tokens", 504)
            if model.is_eog(token):
                reply.first_token()
                finish = "stop"
                break
            produced += 1
            self._rate.append((time.monotonic(), 1))
            if reply.piece(self.pieces(token)):
                finish = "stop"
                break
            if produced >= max_new:
                break
        elapsed = reply.finish(finish, Usage(len(prompt), produced))
        self.served += 1
        self.generated += produced
        log.debug("request %s: %d prompt + %d generated tokens in %.2f s (%s)",
                  req.id, len(prompt), produced, elapsed, finish)


def grammar(gen: request_mod.GenRequest) -> LlamaGrammar | None:
    return None if gen.grammar is None else LlamaGrammar.from_string(gen.grammar, verbose=False)


def logit_bias(gen: request_mod.GenRequest) -> LogitsProcessorList | None:
    if not gen.logit_bias:
        return None
    tokens = np.array(list(gen.logit_bias), dtype=np.intc)
    biases = np.array(list(gen.logit_bias.values()), dtype=np.single)

    def add(_ids: Any, scores: Any) -> Any:
        valid = tokens < len(scores)
        scores[tokens[valid]] += biases[valid]
        return scores

    return LogitsProcessorList([add])
