"""The continuous-batching engine: many requests, one llama context, one KV-cell pool.

The feeder thread owns every llama call. Each turn it takes new requests and cancels
from the main thread, admits waiting requests while a sequence and enough cells are
free, then runs one step: one llama_batch with the next token of every decoding
sequence plus prompt chunks of prefilling ones; one llama_decode; each sequence
sampled from its own logits with its own sampler chain.

The pieces, each in its own module:
  - scheduler.py: the policies: the step's token budget (from `itl_target_ms` and the
    step cost it measures), which prompts get chunks, how many long prompts prefill at
    once, whom to preempt;
  - kv.py: the KV-cell ledger (which cells each sequence holds, cached prefixes,
    reservations, sequence ids), in step with llama.cpp's pool;
  - output.py and reply.py: a sampled token to text on the request's stream.

Admission reserves each request's prompt plus its output reservation (all of
max_tokens by default, `output_reserve` to overcommit). When a sequence past its
reservation finds no free cell, even after evicting cached prefixes, the most recently
admitted sequence is preempted: its cells go back (kept as a cached prefix while they
last), its generated tokens and stream stay, and it waits at the head of the queue to
recompute prompt + output and go on; its client sees a pause, never an error.
Requests prefilling at the same time that share a prompt prefix compute it once: the
later one waits while the earlier one decodes the shared part, then takes those cells
by seq_cp.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import deque
from typing import Any

import llama_cpp

from daemons.bus.errors import RequestError
from daemons.bus.worker import Emitter, Request
from daemons.config import ModelConfig
from daemons.feeder import Feeder, Inbox, OnFeeder, TestHooks
from daemons.infer import native, output, scheduler
from daemons.infer import request as request_mod
from daemons.infer.kv import KvLedger
from daemons.infer.model import Model
from daemons.infer.native import Context, Sampler
from daemons.infer.prefix import Match
from daemons.infer.reply import Reply, Usage
from daemons.infer.seq import Pending, Seq
from daemons.llama import KvFull, LlamaError, Pieces

log = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0
# Before a step's cost is known, allow this long per token before calling the loop stalled.
FIRST_STEPS_S_PER_TOKEN = 0.25


class BatchEngine(OnFeeder):
    def __init__(self, model: Model, mc: ModelConfig, emitter: Emitter, ctx: Context,
                 stall_s: float = 1.0, hooks: TestHooks | None = None) -> None:
        self.model = model
        self.mc = mc
        self.emit = emitter
        self.ctx = ctx
        self.pieces = Pieces(model.lm.vocab)
        self.kv = KvLedger(ctx, ctx.n_cells, ctx.n_seq_max, mc.cached_prefixes,
                           n_swa=int(llama_cpp.llama_model_n_swa(model.lm.model)))
        self.kv_cells = ctx.n_cells
        self.step_tokens = min(mc.step_tokens, ctx.n_batch)  # the most one step carries
        self.itl_target_s = mc.itl_target_ms / 1000.0
        self.cost = scheduler.StepCost()
        self.inbox: Inbox[tuple[Request, request_mod.GenRequest]] = Inbox()
        self.feeder = Feeder(self._turn, self._fail_all, cpus=mc.feeder_cpus, priority=mc.feeder_priority,
                             stall_s=stall_s, hooks=hooks)
        self.waiting: deque[Pending] = deque()
        self.active: dict[int, Seq] = {}
        self._order = 0
        # Counters (feeder thread writes, status readers only read).
        self.served = 0
        self.generated = 0
        self.lookups = 0
        self.hits = 0
        self.tokens_saved = 0
        self.preemptions = 0
        self.steps = 0
        self.decoded = 0  # tokens through llama_decode (prompt and generated)
        self.decode_s = 0.0  # time inside llama_decode
        self.step_s = 0.0  # time in whole steps (decode + batching + sampling + output)
        self.last_budget = 0
        self._rate: deque[tuple[float, int]] = deque()
        self._snapshot: dict[str, Any] = {}
        self._snapshot_at = 0.0

    # -- Handler seam (main thread) ---------------------------------------------------

    def submit(self, req: Request) -> None:
        gen = request_mod.parse(req.body)
        if gen.grammar is not None:
            native.check_grammar(self.model.vocab, gen.grammar)
        if gen.client_request_id:
            log.info("request %s: the client's x-request-id is %s", req.id, gen.client_request_id)
        self.inbox.put((req, gen))

    def cancel(self, request_id: str) -> None:
        self.inbox.cancel(request_id)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._refresh_snapshot(force=True)
        limits = ([f"{self.mc.itl_target_ms} ms"] if self.itl_target_s else []) + \
            ([f"{self.mc.itl_stretch:g}x a decode-only step"] if self.mc.itl_stretch else [])
        target = f"prefill within {' and '.join(limits)}" if limits else "no inter-token target"
        log.info("feeder starting: %d slots, %d KV cells, up to %d tokens per step (%s), %d cached prefixes",
                 self.mc.slots, self.kv_cells, self.step_tokens, target, self.mc.cached_prefixes)
        self.feeder.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.inbox.wake()
        if self.feeder.stop(timeout):
            for s in list(self.active.values()):
                s.sampler.close()
            for p in self.waiting:
                if p.resume is not None:
                    p.resume.sampler.close()
            self.ctx.close()

    def status(self) -> str:
        st = self._snapshot
        kv = st.get("kv_cells", {})
        pc = st.get("prefix_cache", {})
        return (f"{st.get('slots', {}).get('busy', 0)}/{self.mc.slots} slots busy, {st.get('queue', 0)} queued; "
                f"KV {kv.get('used', 0)}/{self.kv_cells} cells ({kv.get('cached', 0)} cached); "
                f"{st.get('tokens_per_s', 0.0):.1f} tokens/s; prefix hits {pc.get('hits', 0)}/{pc.get('lookups', 0)}; "
                f"{self.served} served, {self.preemptions} preemptions")

    def status_map(self) -> dict[str, Any]:
        return dict(self._snapshot)

    # -- the loop (feeder thread) ---------------------------------------------------

    def _fail_all(self, exc: Exception) -> None:
        """A turn raised: fail what is in flight and free it all, so no client hangs."""
        log.error("failing %d running and %d waiting request(s) after an engine error", len(self.active),
                  len(self.waiting))
        for s in list(self.active.values()):
            self._fail(s, 500, "inference failed: internal error in the engine; see its log")
        while self.waiting:
            self._drop_waiting(self.waiting.popleft(), 500,
                               "inference failed: internal error in the engine; see its log")
        self._refresh_snapshot(force=True)

    def _turn(self) -> None:
        # Cancels are taken before the inbox is read: the main thread submits a request
        # before it can cancel it, so every cancel taken here finds its request.
        cancels = self.inbox.take_cancels()
        self._intake()
        self._apply_cancels(cancels)
        self._expire()
        self._admit()
        if not self.active:
            self._refresh_snapshot()
            self.inbox.wait(0.2)
            return
        began = time.monotonic()
        self._step()
        self.step_s += time.monotonic() - began
        self._refresh_snapshot()

    # -- intake, cancel, deadlines ----------------------------------------------------

    def _intake(self) -> None:
        for req, gen in self.inbox.take():
            try:
                prompt, max_new = self.model.prepare(gen, self.mc.default_max_tokens)
            except RequestError as exc:
                self.emit.error(req.id, exc.code, exc.message)
                continue
            self.waiting.append(Pending(req, gen, prompt, max_new))

    def _drop_waiting(self, p: Pending, code: int | None, message: str) -> None:
        if p.resume is not None:
            p.resume.sampler.close()
        if code is not None:
            self.emit.error(p.req.id, code, message)

    def _apply_cancels(self, cancels: set[str]) -> None:
        for rid in cancels:
            for p in list(self.waiting):
                if p.req.id == rid:
                    self.waiting.remove(p)
                    self._drop_waiting(p, None, "")
                    log.info("request %s cancelled while waiting", rid)
            for s in list(self.active.values()):
                if s.req.id == rid:
                    freed = self._release(s, keep=False)
                    log.info("request %s cancelled after %d tokens; freed sequence %d and %d cells",
                             rid, s.produced, s.id, freed)

    def _expire(self) -> None:
        now = time.time()
        for p in list(self.waiting):
            if now >= p.give_up_at:
                self.waiting.remove(p)
                after = f" after {p.resume.produced} generated tokens (preempted)" if p.resume else ""
                self._drop_waiting(p, 503, (
                    f"no sequence and KV cells came free before the deadline{after} (waited "
                    f"{time.monotonic() - p.arrived:.1f} s; {len(self.active)}/{self.mc.slots} slots busy, "
                    f"{self.kv.free_for_admission(self.active.values())} of {self.kv_cells} cells unreserved, "
                    f"{len(self.waiting)} waiting)"))
        for s in list(self.active.values()):
            if now > s.req.deadline:
                self._fail(s, 504, f"deadline passed after {s.produced} generated tokens")

    # -- admission ----------------------------------------------------------------------

    def _reserve_out(self, max_new: int) -> int:
        return max_new if self.mc.output_reserve == 0 else min(max_new, self.mc.output_reserve)

    def _long_prefilling(self) -> int:
        return sum(1 for s in self.active.values()
                   if s.prefilling and scheduler.is_long(len(s.tokens) - self.kv.length(s.id), self.step_tokens))

    def _admit(self) -> None:
        """First come, first served for cells; a long prompt that may not start yet
        (scheduler.may_start_prefill) lets the requests behind it go first."""
        long_now = self._long_prefilling()
        i = 0
        while i < len(self.waiting) and len(self.active) < self.mc.slots:
            p = self.waiting[i]
            back = p.resume
            tokens = back.tokens if back is not None else p.prompt
            if not scheduler.may_start_prefill(len(tokens), self.step_tokens, long_now, self.mc.max_long_prefills):
                i += 1
                continue
            produced = back.produced if back is not None else 0
            target = len(p.prompt) + produced + self._reserve_out(p.max_new - produced) - 1
            # A fresh prompt's last token is always decoded (its logits give the first
            # token); a preempted sequence needs no logits at the end of its recompute.
            limit = len(tokens) - (0 if back is not None and back.generated else 1)
            m = self.kv.match(None, tokens, limit)
            shared = m.length if m is not None else 0
            need = max(1, target - shared)
            free = self.kv.free_for_admission(self.active.values())
            if need > free and need > free + self.kv.evictable(m.node if m else None):
                return  # the head waits for cells
            if back is None:
                seed = p.gen.seed if p.gen.seed is not None else random.getrandbits(32)
                # Built before anything is taken, so a failure here leaks no sequence id.
                sampler = Sampler(p.gen, seed, self.model.n_vocab, self.model.vocab)
            del self.waiting[i]
            # n_seq_max = slots + cached_prefixes: with a slot free, an id is free too.
            sid = self.kv.take_id()
            self._order += 1
            if back is None:
                s = Seq(id=sid, order=self._order, rank=self._order, req=p.req, gen=p.gen, prompt=p.prompt,
                        max_new=p.max_new, reserve_target=target, sampler=sampler,
                        reply=Reply(self.emit, p.req.id, p.gen.stop, p.gen.fitted, self.model.tool_parser(p.gen)))
                s.sampler.accept_prompt(p.prompt)
                self.lookups += 1
            else:
                s = back
                s.id, s.order, s.reserve_target, s.lcp, s.pending = sid, self._order, target, {}, None
            self.active[sid] = s
            if scheduler.is_long(len(tokens) - shared, self.step_tokens):
                long_now += 1
            if m is not None and shared:
                self._attach(s, m)
            self.kv.make_room(self.active.values(), 0)
            for other in self.active.values() if self.kv.cache_on else ():
                if other is not s and other.prefilling:
                    n = _common_prefix(other.tokens, s.tokens, limit)
                    if n > shared:
                        s.lcp[other.order] = n
            if back is None:
                log.debug("admitted %s as sequence %d: %d prompt tokens (%d cached), up to %d new",
                          p.req.id, sid, len(p.prompt), shared, p.max_new)
            else:
                log.info("request %s back as sequence %d after preemption: %d tokens to recompute (%d cached), "
                         "%d generated so far", p.req.id, sid, len(tokens), shared, back.produced)

    def _attach(self, s: Seq, m: Match) -> None:
        gained = self.kv.attach(s.id, m, self.decoded)
        if not gained:
            return
        if s.preempted == 0:  # usage counts the prompt's cached tokens, once
            if s.shared == 0:
                self.hits += 1
            s.shared += gained
        self.tokens_saved += gained

    def _release(self, s: Seq, keep: bool) -> int:
        """Take `s` out of the running set; keep its cells as a cached prefix or free them."""
        self.active.pop(s.id, None)
        s.sampler.close()
        return self.kv.release(s.id, keep, self.decoded)

    def _fail(self, s: Seq, code: int, message: str) -> None:
        self._release(s, keep=False)
        self.emit.error(s.req.id, code, message)

    # -- preemption ---------------------------------------------------------------------

    def _preempt(self, v: Seq) -> None:
        """Give `v`'s cells back and queue it at the head to recompute and go on."""
        self.active.pop(v.id)
        held = self.kv.length(v.id)
        self.kv.release(v.id, keep=True, decoded=self.decoded)  # reusable while nobody needs them
        v.preempted += 1
        self.preemptions += 1
        v.requeue_tokens()
        v.pending = None
        self.waiting.appendleft(Pending(v.req, v.gen, v.prompt, v.max_new, resume=v))
        log.info("preempted request %s (sequence %d, %d cells, %d tokens generated): the pool is out of "
                 "cells; it resumes when cells free", v.req.id, v.id, held, v.produced)

    def _room_beyond_reservation(self, s: Seq, taken: int) -> bool:
        """A sequence past its output reservation needs one unreserved cell (`taken`
        went to others this step): evict cached prefixes, then preempt the most
        recently admitted sequence, for it. False when `s` itself was preempted, or
        ended because it is alone and the pool cannot hold more."""
        while self.kv.free_for_admission(self.active.values()) - taken < 1:
            if self.kv.cached:
                self.kv.evict_one()
                continue
            v = scheduler.victim(self.active.values())
            if v is None or len(self.active) == 1:
                log.warning("request %s: no free KV cell beyond its reservation; ending it early", s.req.id)
                self._finish(s, "length")
                return False
            self._preempt(v)
            if v is s:
                return False
        return True

    # -- one decode step ----------------------------------------------------------------

    def _waits_for_leader(self, s: Seq, pos: int) -> bool:
        """True while an earlier request at the same point is decoding the prefix both
        prompts share: those cells are taken by seq_cp once they exist."""
        if not s.lcp:
            return False
        tree = self.kv.tree
        leaf = tree.leaf.get(s.id, tree.root)
        for a in self.active.values():
            n = s.lcp.get(a.order)
            if (n is not None and n > pos and a.prefilling and a.order < s.order
                    and tree.length(a.id) == pos and tree.holds(a.id, leaf)):
                return True
        return False

    def _decoders(self) -> list[Seq]:
        """The sequences that decode a token this step, each with its cell assured."""
        extra = 0  # cells taken this step beyond their sequences' reservations
        out = []
        for s in sorted((s for s in self.active.values() if s.pending is not None), key=lambda s: s.rank):
            if self.active.get(s.id) is not s:
                continue  # preempted for an older one just now
            if self.kv.length(s.id) >= s.reserve_target:
                if not self._room_beyond_reservation(s, extra):
                    continue
                extra += 1
            out.append(s)
        return [s for s in out if self.active.get(s.id) is s]

    def _prefill_plan(self, budget: int, long_budget: int) -> list[tuple[Seq, int]]:
        prompts = []
        now = time.monotonic()
        for s in [s for s in self.active.values() if s.prefilling]:
            pos = self.kv.length(s.id)
            tokens = s.tokens
            if self.kv.cache_on:  # cells that exist cost nothing to take, even in a full step
                m = self.kv.match(s.id, tokens, len(tokens) - (0 if s.generated else 1))
                if m is not None and m.length > pos:
                    self._attach(s, m)
                    pos = m.length
            if pos == len(tokens):  # back from preemption with every cell still cached
                s.pending = s.generated[-1]
                continue
            cap = 0 if self._waits_for_leader(s, pos) else self._branch_point(s, pos) - pos
            prompts.append(scheduler.Prompt(s, len(tokens) - pos, now - s.reply.started, s.order, cap,
                                            scheduler.is_long(len(tokens), self.step_tokens)))
        return scheduler.chunks(prompts, budget, long_budget)

    def _step(self) -> None:
        began = time.monotonic()
        batch = self.ctx.batch
        batch.clear()
        entries: list[tuple[Seq, list[int], int]] = []
        for s in self._decoders():
            assert s.pending is not None
            entries.append((s, [s.pending], batch.add(s.id, [s.pending], self.kv.length(s.id), True)))
        decoding = batch.n
        cells = self.kv.used
        budget = scheduler.step_budget(self.cost, self.itl_target_s, self.step_tokens, decoding, cells)
        stretched = scheduler.step_budget(self.cost, self.itl_target_s, self.step_tokens, decoding, cells,
                                          self.mc.itl_stretch)
        self.last_budget = stretched
        for s, take in self._prefill_plan(budget - decoding, stretched - decoding):
            pos = self.kv.length(s.id)
            toks = s.tokens[pos:pos + take]
            logits = pos + take == len(s.tokens) and not s.generated
            idx = batch.add(s.id, toks, pos, logits)
            entries.append((s, toks, idx if logits else -1))
        if not entries:
            return
        t0 = time.monotonic()
        if not self._decode(entries):
            return
        took = time.monotonic() - t0
        self.decode_s += took
        if took > 1.0:
            log.debug("a decode step of %d tokens took %.2f s (CPU contention?)", batch.n, took)
        for s, toks, _ in entries:
            self.kv.append(s.id, toks)
        self.steps += 1
        self.decoded += batch.n
        self.kv.forget_stale(self.decoded, self.mc.cache_forget_tokens)
        now = time.monotonic()
        produced = 0
        for s, toks, idx in entries:
            if self.active.get(s.id) is not s:
                continue
            if idx < 0:
                if s.generated and s.prefilling and self.kv.length(s.id) == len(s.tokens):
                    s.pending = s.generated[-1]  # recomputed after a preemption: decoding on
                continue
            token = s.sampler.sample(self.ctx, idx)
            produced += 1
            before = s.produced
            reason = output.accept(s, token, self.model, self.pieces)
            self.generated += s.produced - before
            if reason is not None:
                self._finish(s, reason)
        self._rate.append((now, produced))
        self.cost.observe(batch.n, cells, produced, time.monotonic() - began)

    def _branch_point(self, s: Seq, pos: int) -> int:
        """Where `s` must end this step's chunk: its prompt's end, or, with a sliding
        window, the first point past `pos` where a later request waiting on it branches
        off (a sequence can give its cells only while no longer than the match; see
        PrefixTree)."""
        stop = len(s.tokens)
        if self.kv.tree.n_swa:
            for f in self.active.values():
                n = f.lcp.get(s.order)
                if n is not None and pos < n < stop and f.prefilling and f.order > s.order:
                    stop = n
        return stop

    def _step_allowance(self, tokens: int) -> float:
        """How long a step of `tokens` may take before the loop counts as stalled: four
        times what steps have cost so far, with a generous guess until that is known."""
        per_token = self.decode_s / self.decoded if self.decoded >= 256 else FIRST_STEPS_S_PER_TOKEN
        return 2.0 + 4.0 * per_token * tokens

    def _decode(self, entries: list[tuple[Seq, list[int], int]]) -> bool:
        self.feeder.expect(self._step_allowance(self.ctx.batch.n))
        try:
            self.ctx.decode()
            return True
        except KvFull as exc:
            log.warning("%s with %d of %d cells in use by our count; evicting cached prefixes and retrying",
                        exc, self.kv.used, self.kv_cells)
            self.kv.evict_all()
            try:
                self.ctx.decode()
                return True
            except KvFull as again:
                log.error("%s; failing the %d request(s) in this step", again, len(entries))
                code, message = 503, "the KV cache is full; try again"
            except LlamaError as again:
                log.error("%s; failing the %d request(s) in this step", again, len(entries))
                code, message = 500, f"inference failed: {again}"
        except LlamaError as exc:
            log.error("%s; failing the %d request(s) in this step", exc, len(entries))
            code, message = 500, f"inference failed: {exc}"
        for s, _, _ in entries:
            if s.id in self.active:
                self._fail(s, code, message)
        return False

    # -- output ---------------------------------------------------------------------

    def _finish(self, s: Seq, reason: str) -> None:
        elapsed = s.reply.finish(reason, Usage(len(s.prompt), s.produced, s.shared))
        self.served += 1
        log.debug("request %s: %d prompt (%d cached) + %d generated tokens in %.2f s (%s%s)",
                  s.req.id, len(s.prompt), s.shared, s.produced, elapsed, reason,
                  f", preempted {s.preempted} times" if s.preempted else "")
        self._release(s, keep=True)

    # -- status ---------------------------------------------------------------------

    def _refresh_snapshot(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._snapshot_at < 0.25:
            return
        self._snapshot_at = now
        while self._rate and self._rate[0][0] < now - RATE_WINDOW_S:
            self._rate.popleft()
        span = max(1.0, now - self._rate[0][0]) if self._rate else RATE_WINDOW_S
        rate = sum(n for _, n in self._rate) / span if self._rate else 0.0
        busy = len(self.active)
        self._snapshot = {
            "engine": "batch",
            "slots": {"total": self.mc.slots, "busy": busy, "free": self.mc.slots - busy},
            "kv_cells": self.kv.snapshot(self.active.values()),
            "queue": len(self.waiting),
            "tokens_per_s": round(rate, 1),
            "prefix_cache": {"lookups": self.lookups, "hits": self.hits,
                             "hit_rate": round(self.hits / self.lookups, 3) if self.lookups else 0.0,
                             "tokens_saved": self.tokens_saved, "cached_sequences": len(self.kv.cached)},
            "preemptions": self.preemptions,
            "served": self.served,
            "generated_tokens": self.generated,
            "steps": self.steps,
            "step_budget": self.last_budget,
            "decode_s": round(self.decode_s, 2),
            "step_s": round(self.step_s, 2),
            "pid": os.getpid(),
        }


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
