"""The continuous-batching engine: many requests, one llama context, one KV-cell pool.

The feeder thread owns every llama call. Each turn it takes new requests and cancels
from the main thread, admits waiting requests while a sequence and enough cells are
free (prompt + output reservation, minus what the prefix cache already holds), then
runs one step: one llama_batch with the next token of every decoding sequence plus
prompt chunks of prefilling ones, up to `step_tokens`; one llama_decode; each
sequence sampled from its own logits with its own sampler chain.

Cells are accounted in a `PrefixTree` (daemons/infer/prefix.py), so what admission
promises is what llama.cpp has: a request never finds the pool full mid-generation
(with the default full output reservation). Requests prefilling at the same time that
share a prompt prefix compute it once: the later one waits while the earlier one
decodes the shared part, then takes those cells by seq_cp.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import OrderedDict, deque
from typing import Any

import llama_cpp

from daemons.bus.errors import RequestError
from daemons.bus.worker import Emitter, Request
from daemons.config import ModelConfig
from daemons.feeder import Feeder, Inbox, OnFeeder, TestHooks
from daemons.infer import request as request_mod
from daemons.infer.model import Model
from daemons.infer.native import Context, Sampler
from daemons.infer.prefix import PrefixTree
from daemons.infer.reply import Reply, Usage
from daemons.infer.seq import Pending, Seq
from daemons.llama import KvFull, LlamaError, Pieces

log = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0
# Before a step's cost is known, allow this long per token before calling the loop stalled.
FIRST_STEPS_S_PER_TOKEN = 0.25
# Prefill order: a prompt waiting this many seconds counts as this many tokens shorter.
AGING_TOKENS_PER_S = 100.0


class BatchEngine(OnFeeder):
    def __init__(self, model: Model, mc: ModelConfig, emitter: Emitter, ctx: Context,
                 stall_s: float = 1.0, hooks: TestHooks | None = None) -> None:
        self.model = model
        self.mc = mc
        self.emit = emitter
        self.ctx = ctx
        self.pieces = Pieces(model.lm.vocab)
        self.tree = PrefixTree(n_swa=int(llama_cpp.llama_model_n_swa(model.lm.model)))
        self.kv_cells = ctx.n_cells
        self.step_tokens = min(mc.step_tokens, ctx.n_batch)
        self.cache_on = mc.cached_prefixes > 0
        self.inbox: Inbox[tuple[Request, request_mod.GenRequest]] = Inbox()
        self.feeder = Feeder(self._turn, self._fail_all, cpus=mc.feeder_cpus, priority=mc.feeder_priority,
                             stall_s=stall_s, hooks=hooks)
        self.waiting: deque[Pending] = deque()
        self.active: dict[int, Seq] = {}
        # Cached prefixes, least recently used first, each with `decoded` at its last use.
        self.cached: OrderedDict[int, int] = OrderedDict()
        self.free_ids = list(range(ctx.n_seq_max - 1, -1, -1))
        self._order = 0
        # Counters (feeder thread writes, status readers only read).
        self.served = 0
        self.generated = 0
        self.lookups = 0
        self.hits = 0
        self.tokens_saved = 0
        self.steps = 0
        self.decoded = 0  # tokens through llama_decode (prompt and generated)
        self.decode_s = 0.0  # time inside llama_decode
        self.step_s = 0.0  # time in whole steps (decode + batching + sampling + output)
        self._rate: deque[tuple[float, int]] = deque()
        self._snapshot: dict[str, Any] = {}
        self._snapshot_at = 0.0

    # -- Handler seam (main thread) ---------------------------------------------------

    def submit(self, req: Request) -> None:
        gen = request_mod.parse(req.body)
        self.inbox.put((req, gen))

    def cancel(self, request_id: str) -> None:
        self.inbox.cancel(request_id)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._refresh_snapshot(force=True)
        log.info("feeder starting: %d slots, %d KV cells, %d tokens per step, %d cached prefixes",
                 self.mc.slots, self.kv_cells, self.step_tokens, self.mc.cached_prefixes)
        self.feeder.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.inbox.wake()
        if self.feeder.stop(timeout):
            for s in list(self.active.values()):
                s.sampler.close()
            self.ctx.close()

    def status(self) -> str:
        st = self._snapshot
        kv = st.get("kv_cells", {})
        pc = st.get("prefix_cache", {})
        return (f"{st.get('slots', {}).get('busy', 0)}/{self.mc.slots} slots busy, {st.get('queue', 0)} queued; "
                f"KV {kv.get('used', 0)}/{self.kv_cells} cells ({kv.get('cached', 0)} cached); "
                f"{st.get('tokens_per_s', 0.0):.1f} tokens/s; prefix hits {pc.get('hits', 0)}/{pc.get('lookups', 0)}; "
                f"{self.served} served")

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
            p = self.waiting.popleft()
            self.emit.error(p.req.id, 500, "inference failed: internal error in the engine; see its log")
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

    def _apply_cancels(self, cancels: set[str]) -> None:
        for rid in cancels:
            for p in list(self.waiting):
                if p.req.id == rid:
                    self.waiting.remove(p)
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
                self.emit.error(p.req.id, 503, (
                    f"no sequence and KV cells came free before the deadline (waited "
                    f"{time.monotonic() - p.arrived:.1f} s; {len(self.active)}/{self.mc.slots} slots busy, "
                    f"{self._free_for_admission()} of {self.kv_cells} cells unreserved, {len(self.waiting)} waiting)"))
        for s in list(self.active.values()):
            if now > s.req.deadline:
                self._fail(s, 504, f"deadline passed after {s.produced} generated tokens")

    # -- admission ----------------------------------------------------------------------

    def _reserve_out(self, max_new: int) -> int:
        return max_new if self.mc.output_reserve == 0 else min(max_new, self.mc.output_reserve)

    def _future(self) -> int:
        """Cells running sequences may still take within their reservations."""
        tree = self.tree
        return sum(max(0, s.reserve_target - tree.length(s.id)) for s in self.active.values())

    def _free_for_admission(self) -> int:
        return self.kv_cells - self.tree.used - self._future()

    def _admit(self) -> None:
        while self.waiting and len(self.active) < self.mc.slots:
            p = self.waiting[0]
            target = len(p.prompt) + self._reserve_out(p.max_new) - 1
            m = self.tree.match(None, p.prompt, len(p.prompt) - 1) if self.cache_on else None
            shared = m.length if m is not None else 0
            need = max(1, target - shared)
            free = self._free_for_admission()
            if need > free:
                if need > free + self.tree.evictable(set(self.cached), m.node if m else None):
                    return  # first come, first served: the head waits for cells
            # n_seq_max = slots + cached_prefixes: with a slot free, an id is free too.
            assert self.free_ids, "no free sequence id with a free slot"
            seed = p.gen.seed if p.gen.seed is not None else random.getrandbits(32)
            # Built before anything is taken, so a failure here leaks no sequence id.
            sampler = Sampler(p.gen, seed, self.model.n_vocab)
            self.waiting.popleft()
            sid = self.free_ids.pop()
            self._order += 1
            s = Seq(id=sid, order=self._order, req=p.req, gen=p.gen, prompt=p.prompt, max_new=p.max_new,
                    reserve_target=target, sampler=sampler, reply=Reply(self.emit, p.req.id, p.gen.stop, p.gen.fitted))
            s.sampler.accept_prompt(p.prompt)
            self.active[sid] = s
            self.lookups += 1
            if m is not None and shared:
                self._attach(s, m)
            while self._free_for_admission() < 0 and self.cached:
                self._evict_one()
            for other in self.active.values() if self.cache_on else ():
                if other is not s and other.prefilling:
                    n = _common_prefix(other.prompt, s.prompt, len(s.prompt) - 1)
                    if n > shared:
                        s.lcp[other.order] = n
            log.debug("admitted %s as sequence %d: %d prompt tokens (%d cached), up to %d new",
                      p.req.id, sid, len(p.prompt), shared, p.max_new)

    def _attach(self, s: Seq, m: Any) -> None:
        start = self.tree.length(s.id)
        src = self.tree.attach(s.id, m)
        if src is None:
            return
        self.ctx.seq_cp(src, s.id, start, m.length)
        gained = m.length - start
        if s.shared == 0:
            self.hits += 1
        s.shared += gained
        self.tokens_saved += gained
        for holder in m.node.holders:
            if holder in self.cached:
                self.cached.move_to_end(holder)
                self.cached[holder] = self.decoded

    def _evict_one(self) -> int:
        sid, _ = self.cached.popitem(last=False)
        freed = self.tree.remove(sid)
        self.ctx.seq_rm(sid)
        self.free_ids.append(sid)
        return freed

    def _release(self, s: Seq, keep: bool) -> int:
        """Take `s` out of the running set; keep its cells as a cached prefix or free them."""
        self.active.pop(s.id, None)
        s.sampler.close()
        if keep and self.cache_on and self.tree.length(s.id):
            self.cached[s.id] = self.decoded
            while len(self.cached) > self.mc.cached_prefixes:
                self._evict_one()
            return 0
        freed = self.tree.remove(s.id)
        self.ctx.seq_rm(s.id)
        self.free_ids.append(s.id)
        return freed

    def _fail(self, s: Seq, code: int, message: str) -> None:
        self._release(s, keep=False)
        self.emit.error(s.req.id, code, message)

    # -- one decode step ----------------------------------------------------------------

    def _waits_for_leader(self, s: Seq, pos: int) -> bool:
        """True while an earlier request at the same point is decoding the prefix both
        prompts share: those cells are taken by seq_cp once they exist."""
        if not s.lcp:
            return False
        leaf = self.tree.leaf.get(s.id, self.tree.root)
        for a in self.active.values():
            n = s.lcp.get(a.order)
            if (n is not None and n > pos and a.prefilling and a.order < s.order
                    and self.tree.length(a.id) == pos and self.tree.holds(a.id, leaf)):
                return True
        return False

    def _step(self) -> None:
        batch = self.ctx.batch
        batch.clear()
        entries: list[tuple[Seq, list[int], int]] = []
        tree = self.tree
        extra = 0  # cells taken this step beyond their sequences' reservations
        for s in list(self.active.values()):
            if s.pending is None:
                continue
            pos = tree.length(s.id)
            if pos >= s.reserve_target:
                if not self._room_beyond_reservation(s, extra):
                    self._finish(s, "length")
                    continue
                extra += 1
            entries.append((s, [s.pending], batch.add(s.id, [s.pending], pos, True)))
        budget = self.step_tokens - batch.n
        for s in self._prefill_order():
            pos = tree.length(s.id)
            if self.cache_on:  # cells that exist cost nothing to take, even in a full step
                m = tree.match(s.id, s.prompt, len(s.prompt) - 1)
                if m.length > pos:
                    self._attach(s, m)
                    pos = m.length
            if budget <= 0 or self._waits_for_leader(s, pos):
                continue
            take = min(len(s.prompt) - pos, budget, self._branch_point(s, pos) - pos)
            toks = s.prompt[pos:pos + take]
            done = pos + take == len(s.prompt)
            idx = batch.add(s.id, toks, pos, done)
            entries.append((s, toks, idx if done else -1))
            budget -= take
        if not entries:
            return
        began = time.monotonic()
        if not self._decode(entries):
            return
        took = time.monotonic() - began
        self.decode_s += took
        if took > 1.0:
            log.debug("a decode step of %d tokens took %.2f s (CPU contention?)", batch.n, took)
        for s, toks, _ in entries:
            tree.append(s.id, toks)
        self.steps += 1
        self.decoded += batch.n
        self._forget_stale()
        now = time.monotonic()
        produced = 0
        for s, _, idx in entries:
            if idx < 0 or self.active.get(s.id) is not s:
                continue
            token = s.sampler.sample(self.ctx, idx)
            produced += 1
            self._on_token(s, token)
        self._rate.append((now, produced))

    def _forget_stale(self) -> None:
        """Drop cached prefixes unused for `cache_forget_tokens` decoded tokens: each
        step's attention runs over every cell up to the highest in use, theirs too, and
        a reuse grows less likely with time."""
        limit = self.mc.cache_forget_tokens
        while limit and self.cached:
            sid, last_used = next(iter(self.cached.items()))  # the least recently used
            if self.decoded - last_used <= limit:
                return
            log.debug("forgetting cached sequence %d (%d cells; unused for %d decoded tokens)",
                      sid, self.tree.length(sid), self.decoded - last_used)
            self._evict_one()

    def _branch_point(self, s: Seq, pos: int) -> int:
        """Where `s` must end this step's chunk: its prompt's end, or, with a sliding
        window, the first point past `pos` where a later request waiting on it branches
        off (a sequence can give its cells only while no longer than the match; see
        PrefixTree)."""
        stop = len(s.prompt)
        if self.tree.n_swa:
            for f in self.active.values():
                n = f.lcp.get(s.order)
                if n is not None and pos < n < stop and f.prefilling and f.order > s.order:
                    stop = n
        return stop

    def _prefill_order(self) -> list[Seq]:
        """Shortest remaining prompt first, so a burst of short chats is not stuck
        behind a long document (first-token latency); waiting ages a request forward
        (AGING_TOKENS_PER_S) so a long prompt is never starved."""
        now = time.monotonic()
        tree = self.tree
        return sorted((s for s in self.active.values() if s.prefilling),
                      key=lambda s: (len(s.prompt) - tree.length(s.id) - AGING_TOKENS_PER_S * (now - s.reply.started),
                                     s.order))

    def _room_beyond_reservation(self, s: Seq, taken: int) -> bool:
        """A sequence past its output reservation may take an unreserved cell (`taken`
        already went to others this step), evicting cached prefixes for it; none left
        means it must stop."""
        while self.kv_cells - self.tree.used - self._future() - taken < 1:
            if not self.cached:
                log.warning("request %s: no free KV cell beyond its reservation; ending it early", s.req.id)
                return False
            self._evict_one()
        return True

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
                        exc, self.tree.used, self.kv_cells)
            while self.cached:
                self._evict_one()
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

    def _on_token(self, s: Seq, token: int) -> None:
        if self.model.is_eog(token):
            s.reply.first_token()
            self._finish(s, "stop")
            return
        s.produced += 1
        self.generated += 1
        if s.reply.piece(self.pieces(token)):
            self._finish(s, "stop")
        elif s.produced >= s.max_new:
            self._finish(s, "length")
        else:
            s.pending = token

    def _finish(self, s: Seq, reason: str) -> None:
        elapsed = s.reply.finish(reason, Usage(len(s.prompt), s.produced, s.shared))
        self.served += 1
        log.debug("request %s: %d prompt (%d cached) + %d generated tokens in %.2f s (%s)",
                  s.req.id, len(s.prompt), s.shared, s.produced, elapsed, reason)
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
        used = self.tree.used
        busy = len(self.active)
        self._snapshot = {
            "engine": "batch",
            "slots": {"total": self.mc.slots, "busy": busy, "free": self.mc.slots - busy},
            "kv_cells": {"total": self.kv_cells, "used": used, "free": self.kv_cells - used,
                         "cached": self.tree.evictable(set(self.cached)),
                         "reserved": self._future()},
            "queue": len(self.waiting),
            "tokens_per_s": round(rate, 1),
            "prefix_cache": {"lookups": self.lookups, "hits": self.hits,
                             "hit_rate": round(self.hits / self.lookups, 3) if self.lookups else 0.0,
                             "tokens_saved": self.tokens_saved, "cached_sequences": len(self.cached)},
            "served": self.served,
            "generated_tokens": self.generated,
            "steps": self.steps,
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
