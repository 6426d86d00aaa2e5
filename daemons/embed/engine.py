"""Dynamic batching of embedding inputs: many requests, one llama_decode per step.

The feeder thread takes requests as they come, tokenizes their inputs (refusing, or
cutting, one longer than the model's context), and each step fills one batch — up to
`batch_inputs` sequences and `batch_tokens` tokens — taking one input from each
request in turn, so a request of 500 inputs is spread over many steps and a
one-input request that arrives meanwhile is in the next one. A batch that is not full
waits up to `batch_wait_ms` for inputs arriving together. Each request's vectors go
back in order as PARTIALs (raw float32 rows), then a FINAL with its usage.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemons.bus.errors import RequestError
from daemons.bus.worker import Emitter, Request
from daemons.config import EmbeddingConfig
from daemons.embed.native import POOLING, EmbedContext, EmbedModel
from daemons.feeder import Feeder, Inbox, OnFeeder, TestHooks

log = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0
INTERNAL = "embedding failed: internal error in the engine; see its log"


@dataclass(eq=False)  # identity: a request is itself, whatever its fields
class Job:
    req: Request
    inputs: list[list[int]]
    tokens: int
    next: int = 0  # the next input to put in a batch
    done: int = 0  # inputs embedded and sent
    started: float = field(default_factory=time.monotonic)


def parse(body: dict[str, Any], model: EmbedModel, ec: EmbeddingConfig, limit: int) -> tuple[list[list[int]], int]:
    """The inputs' tokens and their total; RequestError (400) for anything else."""
    raw = body.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw)):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise RequestError("input must be a string, a list of strings, or token ids (a list of integers or lists "
                           "of them)", 400)
    if len(raw) > ec.max_inputs:
        raise RequestError(f"input has {len(raw)} items; at most {ec.max_inputs} per request", 400)
    truncate = body.get("truncate", ec.truncate)
    if not isinstance(truncate, bool):
        raise RequestError("onebox.truncate must be true or false", 400)
    inputs: list[list[int]] = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            tokens = model.tokenize(item)
        elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            bad = next((t for t in item if not 0 <= t < model.n_vocab), None)
            if bad is not None:
                raise RequestError(f"input[{i}]: token id {bad} is not in the model's vocabulary (0..{model.n_vocab - 1})",
                                   400)
            tokens = model.wrap(list(item))
        else:
            raise RequestError(f"input[{i}] must be a string or a non-empty list of token ids", 400)
        if len(tokens) > limit:
            if not truncate:
                raise RequestError(f"input[{i}] is {len(tokens)} tokens; this model takes at most {limit} (send "
                                   '"onebox": {"truncate": true} to cut it)', 400)
            tokens = model.fit(tokens, limit)
        inputs.append(tokens)
    return inputs, sum(len(t) for t in inputs)


class EmbedEngine(OnFeeder):
    def __init__(self, model: EmbedModel, ec: EmbeddingConfig, emitter: Emitter, ctx: EmbedContext,
                 stall_s: float = 2.0, hooks: TestHooks | None = None) -> None:
        self.model = model
        self.ec = ec
        self.emit = emitter
        self.ctx = ctx
        # The longest input: what the model was trained on, and what one batch holds.
        self.limit = min(model.n_ctx_train or ctx.n_tokens, ctx.n_tokens)
        self.wait_s = ec.batch_wait_ms / 1000
        self.inbox: Inbox[Request] = Inbox()
        self.jobs: deque[Job] = deque()
        # When the last two requests came (whether a burst is arriving).
        self._arrivals: deque[float] = deque([-1e9, -1e9], maxlen=2)
        self.feeder = Feeder(self._turn, self._fail_all, cpus=ec.feeder_cpus, priority=ec.feeder_priority,
                             stall_s=stall_s, hooks=hooks)
        self.served = 0
        self.embedded = 0
        self.batches = 0
        self.decode_s = 0.0
        self._rate: deque[tuple[float, int]] = deque()

    # -- Engine seam (main thread) ----------------------------------------------------

    def submit(self, req: Request) -> None:
        self.inbox.put(req)

    def cancel(self, request_id: str) -> None:
        self.inbox.cancel(request_id)

    def start(self) -> None:
        self.feeder.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.inbox.wake()
        if self.feeder.stop(timeout):
            self.ctx.close()

    def status(self) -> str:
        pending = sum(len(j.inputs) - j.done for j in list(self.jobs))
        return (f"{len(self.jobs)} request(s), {pending} input(s) waiting; {self.embedded} embedded in "
                f"{self.batches} batches; {self.served} served")

    def status_map(self) -> dict[str, Any]:
        now = time.monotonic()
        while self._rate and self._rate[0][0] < now - RATE_WINDOW_S:
            self._rate.popleft()
        jobs = list(self.jobs)
        return {"engine": "embed", "model": self.model.name, "dimensions": self.model.dim,
                "pooling": POOLING[self.model.pooling], "max_input_tokens": self.limit,
                "queue": len(jobs), "inputs_waiting": sum(len(j.inputs) - j.done for j in jobs),
                "inputs_per_s": round(sum(n for _, n in self._rate) / RATE_WINDOW_S, 1),
                "served": self.served, "embedded": self.embedded, "batches": self.batches,
                "mean_batch": round(self.embedded / self.batches, 1) if self.batches else 0.0,
                "decode_s": round(self.decode_s, 2), "pid": os.getpid()}

    # -- the loop (feeder thread) -------------------------------------------------------

    def _fail_all(self, exc: Exception) -> None:
        while self.jobs:
            self.emit.error(self.jobs.popleft().req.id, 500, INTERNAL)

    def _turn(self) -> None:
        self._intake()
        self._expire()
        if not self.jobs:
            self.inbox.wait(0.2)
            return
        if self.wait_s and self._unscheduled() < self.ec.batch_inputs and self._burst():
            # Not a full batch, and requests are coming close together: give the next
            # ones a moment to join it. A lone client's request runs at once.
            time.sleep(self.wait_s)
            self._intake()
        self._step()

    def _burst(self) -> bool:
        return self._arrivals[-1] - self._arrivals[0] <= 2 * self.wait_s

    def _unscheduled(self) -> int:
        return sum(len(j.inputs) - j.next for j in self.jobs)

    def _intake(self) -> None:
        cancels = self.inbox.take_cancels()
        for req in self.inbox.take():
            if req.id in cancels:
                continue
            try:
                inputs, tokens = parse(req.body, self.model, self.ec, self.limit)
            except RequestError as exc:
                self.emit.error(req.id, exc.code, exc.message)
                continue
            self.jobs.append(Job(req, inputs, tokens))
            self._arrivals.append(time.monotonic())
        if cancels:
            for job in [j for j in self.jobs if j.req.id in cancels]:
                self.jobs.remove(job)
                log.info("request %s cancelled after %d of %d inputs", job.req.id, job.done, len(job.inputs))

    def _expire(self) -> None:
        now = time.time()
        for job in [j for j in self.jobs if now > j.req.deadline]:
            self.jobs.remove(job)
            self.emit.error(job.req.id, 504, f"deadline passed after {job.done} of {len(job.inputs)} inputs")

    def _plan(self) -> list[tuple[Job, int]]:
        """This step's inputs, chosen one from each request in turn until the batch is
        full, and listed request by request (one PARTIAL per request per step)."""
        jobs = list(self.jobs)
        taken = [0] * len(jobs)
        count = tokens = 0
        added = True
        while added and count < self.ec.batch_inputs:
            added = False
            for k, job in enumerate(jobs):
                index = job.next + taken[k]
                if index >= len(job.inputs) or count >= self.ec.batch_inputs:
                    continue
                size = len(job.inputs[index])
                if tokens + size > self.ctx.n_tokens:
                    continue
                taken[k] += 1
                count += 1
                tokens += size
                added = True
        plan = [(job, job.next + i) for k, job in enumerate(jobs) for i in range(taken[k])]
        for k, job in enumerate(jobs):
            job.next += taken[k]
        # The next step starts from the request after the first one served here.
        self.jobs.rotate(-1)
        return plan

    def _step(self) -> None:
        plan = self._plan()
        if not plan:
            return
        began = time.monotonic()
        self.feeder.expect(2.0 + 0.05 * sum(len(job.inputs[i]) for job, i in plan))
        vectors = self.ctx.embed([job.inputs[i] for job, i in plan], self.ec.normalize)
        self.decode_s += time.monotonic() - began
        self.batches += 1
        self.embedded += len(plan)
        self._rate.append((time.monotonic(), len(plan)))
        row = 0
        while row < len(plan):
            job, first = plan[row]
            end = row
            while end < len(plan) and plan[end][0] is job:
                end += 1
            self._send(job, first, vectors[row:end])
            row = end

    def _send(self, job: Job, first: int, rows: np.ndarray) -> None:
        self.emit.partial(job.req.id, {"index": first, "count": len(rows), "dim": self.model.dim,
                                       "vectors": rows.astype("<f4", copy=False).tobytes()})
        job.done += len(rows)
        if job.done == len(job.inputs):
            self.jobs.remove(job)
            self.served += 1
            self.emit.final(job.req.id, {"count": len(job.inputs), "dim": self.model.dim,
                                         "usage": {"prompt_tokens": job.tokens},
                                         "seconds": round(time.monotonic() - job.started, 4)})
