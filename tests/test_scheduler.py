"""The batch engine's policies without a model: the step budget from a target
inter-token latency and the learnt step cost, the prefill plan, long prompts that do
not stack, the preemption victim, and the KV-cell ledger's books under random
admit / grow / finish / cancel / evict / preempt sequences (with a stand-in for
llama.cpp's memory that checks every seq_cp and seq_rm against what it holds)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from daemons.infer import scheduler
from daemons.infer.kv import KvLedger
from daemons.infer.scheduler import MIN_PREFILL_TOKENS, STRETCH_FLOOR_S, Prompt, StepCost, step_budget

# -- the step cost model --------------------------------------------------------------


def trained(fixed: float, per_token: float, per_kcell: float, per_output: float, steps: int = 60) -> StepCost:
    """A model fed steps of many shapes whose cost is exactly the given formula."""
    rng = random.Random(1)
    cost = StepCost()
    for _ in range(steps):
        tokens, cells = rng.randint(1, 256), rng.randint(0, 16000)
        outputs = rng.randint(1, min(tokens, 32))
        seconds = fixed + tokens * (per_token + per_kcell * cells / 1000) + outputs * per_output
        cost.observe(tokens, cells, outputs, seconds)
    return cost


def test_the_fit_recovers_the_cost_of_a_step() -> None:
    cost = trained(0.004, 0.003, 0.0002, 0.0005)
    assert cost.ready
    assert cost.theta() == pytest.approx([0.004, 0.003, 0.0002, 0.0005], rel=1e-3, abs=1e-7)
    assert cost.predict(100, 5000, 10) == pytest.approx(0.004 + 100 * 0.004 + 10 * 0.0005, rel=1e-3)


def test_the_fit_follows_a_change_in_speed() -> None:
    """Older steps weigh less: the machine got twice as slow (another process on the
    cores) and within a couple of hundred steps the model says so."""
    cost = trained(0.0, 0.004, 0.0, 0.0)
    for _ in range(300):
        cost.observe(64, 1000, 8, 64 * 0.008)
    assert cost.predict(64, 1000, 8) == pytest.approx(64 * 0.008, rel=0.1)


def test_steps_of_one_shape_fall_back_to_the_average_per_token() -> None:
    """Every step alike cannot separate the terms; the model must still predict
    sensibly (never negative, never zero per token)."""
    cost = StepCost()
    for _ in range(20):
        cost.observe(32, 500, 32, 0.16)
    assert cost.predict(32, 500, 32) == pytest.approx(0.16, rel=0.05)
    assert cost.tokens_within(0.32, 500, 32) == pytest.approx(64, abs=2)


def test_no_budget_shaping_until_the_cost_is_known_or_when_off() -> None:
    cost = StepCost()
    assert step_budget(cost, 0.25, 256, decoding=20, cells=4000) == 256  # not learnt yet
    cost = trained(0.002, 0.004, 0.0, 0.0)
    assert step_budget(cost, 0.0, 256, decoding=20, cells=4000) == 256  # target off
    assert step_budget(cost, 0.25, 256, decoding=0, cells=4000) == 256  # nobody streaming


def test_the_budget_keeps_a_step_within_the_target() -> None:
    cost = trained(0.002, 0.004, 0.0001, 0.0)
    budget = step_budget(cost, 0.25, 256, decoding=25, cells=8000)
    assert cost.predict(budget, 8000, 25) <= 0.25 < cost.predict(budget + 1, 8000, 25)
    # More cells in use make each token dearer: fewer fit.
    assert step_budget(cost, 0.25, 256, decoding=25, cells=16000) < budget


def test_a_crowd_of_decoders_still_leaves_room_for_some_prefill() -> None:
    cost = trained(0.0, 0.02, 0.0, 0.0)  # 20 ms a token: 25 decoders alone take 0.5 s
    assert step_budget(cost, 0.25, 256, decoding=25, cells=1000) == 25 + MIN_PREFILL_TOKENS
    # ... but never more than a batch holds.
    assert step_budget(cost, 0.25, 27, decoding=25, cells=1000) == 27


# -- the prefill plan -----------------------------------------------------------------


def test_shortest_first_with_aging_and_caps() -> None:
    doc = Prompt("doc", remaining=3000, waited_s=0.0, order=1, cap=3000)
    chat = Prompt("chat", remaining=40, waited_s=0.0, order=2, cap=40)
    waiting = Prompt("follower", remaining=30, waited_s=0.0, order=3, cap=0)  # waits for a leader's cells
    assert scheduler.chunks([doc, chat, waiting], 100) == [("chat", 40), ("doc", 60)]
    # A document that waited 30 s counts 3,000 tokens shorter: it goes first.
    old = Prompt("doc", remaining=3000, waited_s=30.0, order=1, cap=3000)
    assert scheduler.chunks([old, chat], 100) == [("doc", 100)]
    # A cap below the remaining prompt (a branch point) ends the chunk there.
    capped = Prompt("doc", remaining=3000, waited_s=0.0, order=1, cap=10)
    assert scheduler.chunks([capped, chat], 100) == [("chat", 40), ("doc", 10)]
    assert scheduler.chunks([doc], 0) == []


def test_long_prompts_do_not_stack() -> None:
    assert scheduler.may_start_prefill(3000, 256, long_prefilling=0, max_long=1)
    assert not scheduler.may_start_prefill(3000, 256, long_prefilling=1, max_long=1)
    assert scheduler.may_start_prefill(200, 256, long_prefilling=5, max_long=1)  # short: always
    assert scheduler.may_start_prefill(3000, 256, long_prefilling=5, max_long=0)  # no limit


@dataclass
class Ranked:
    name: str
    rank: int


def test_the_victim_is_the_most_recently_admitted() -> None:
    running = [Ranked("a", 1), Ranked("c", 7), Ranked("b", 3)]
    v = scheduler.victim(running)
    assert v is not None and v.name == "c"
    assert scheduler.victim([]) is None


# -- the KV-cell ledger -----------------------------------------------------------------


class Memory:
    """llama.cpp's memory as the ledger drives it: which positions each sequence holds.
    Fails on a copy from positions the source does not hold or a removal of a sequence
    that holds nothing it was given."""

    def __init__(self) -> None:
        self.held: dict[int, set[int]] = {}

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        want = set(range(p0, p1))
        assert want <= self.held.get(src, set()), f"seq_cp from {src} of positions it lacks"
        self.held.setdefault(dst, set()).update(want)

    def seq_rm(self, seq: int) -> None:
        self.held.pop(seq, None)

    def decode(self, seq: int, start: int, n: int) -> None:
        self.held.setdefault(seq, set()).update(range(start, start + n))


@dataclass
class Running:
    id: int
    reserve_target: int
    tokens: list[int]


def test_the_ledger_never_leaks_or_double_frees_under_random_traffic() -> None:
    rng = random.Random(7)
    mem = Memory()
    n_cells, n_seq = 2000, 12
    kv = KvLedger(mem, n_cells, n_seq, cached_max=4)
    running: dict[int, Running] = {}
    prefixes = [[rng.randrange(50) for _ in range(rng.randint(5, 60))] for _ in range(4)]
    decoded = 0
    for step in range(3000):
        op = rng.random()
        if op < 0.25 and len(running) + len(kv.cached) < n_seq:  # admit, sharing what is cached
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randint(1, 40))]
            target = len(tokens) + rng.randint(0, 30)
            m = kv.match(None, tokens, len(tokens) - 1)
            shared = m.length if m is not None else 0
            if target - shared > kv.free_for_admission(running.values()) + kv.evictable(m.node if m else None):
                continue
            sid = kv.take_id()
            assert sid not in running and sid not in kv.cached
            r = Running(sid, target, tokens)
            running[sid] = r
            if m is not None and shared:
                assert kv.attach(sid, m, decoded) == shared
            kv.make_room(running.values(), 0)
        elif op < 0.7 and running:  # one sequence decodes a chunk within its reservation
            r = rng.choice(list(running.values()))
            pos = kv.length(r.id)
            n = min(rng.randint(1, 16), r.reserve_target - pos)
            if n <= 0:
                continue
            toks = (r.tokens + [rng.randrange(50) for _ in range(n)])[pos:pos + n]
            mem.decode(r.id, pos, n)
            kv.append(r.id, toks)
            decoded += n
            if len(r.tokens) < pos + n:
                r.tokens = r.tokens[:pos] + toks
        elif op < 0.85 and running:  # finish (kept as cached prefix), cancel or preempt
            r = running.pop(rng.choice(list(running)))
            kv.release(r.id, keep=rng.random() < 0.7, decoded=decoded)
        elif kv.cached:
            kv.evict_one()
        kv.forget_stale(decoded, 4000)
        kv.tree.check()
        assert kv.used <= n_cells and kv.free_for_admission(running.values()) >= 0
        ids = set(running) | set(kv.cached) | set(kv.free_ids)
        assert len(ids) == n_seq == len(running) + len(kv.cached) + len(kv.free_ids), "a sequence id leaked"
        # What llama.cpp holds is exactly what the books say, sequence by sequence.
        for sid in set(running) | set(kv.cached):
            assert mem.held.get(sid, set()) == set(range(kv.length(sid))), sid
        for sid in kv.free_ids:
            assert sid not in mem.held
    for sid in list(running):
        kv.release(sid, keep=False, decoded=decoded)
    kv.evict_all()
    assert kv.used == 0 and not mem.held and len(kv.free_ids) == n_seq


def test_the_stretch_bounds_a_step_by_the_decode_only_step() -> None:
    cost = trained(0.002, 0.004, 0.0001, 0.0)
    decode_only = cost.predict(25, 8000, 25)
    budget = step_budget(cost, 0.0, 256, decoding=25, cells=8000, stretch=2.5)
    assert 25 + MIN_PREFILL_TOKENS < budget < 256
    assert cost.predict(budget, 8000, 25) <= 2.5 * decode_only < cost.predict(budget + 1, 8000, 25)
    # The tighter of the two limits wins; with both off the step is the whole batch.
    assert step_budget(cost, 0.25, 256, 25, 8000, stretch=100.0) == step_budget(cost, 0.25, 256, 25, 8000)
    assert step_budget(cost, 1.0, 256, 25, 8000, stretch=2.5) == budget
    assert step_budget(cost, 0.0, 256, 25, 8000, stretch=0.0) == 256
    # A few cheap decoders: the stretch never holds a step under STRETCH_FLOOR_S.
    one = step_budget(cost, 0.0, 256, decoding=1, cells=500, stretch=1.5)
    assert 1.5 * cost.predict(1, 500, 1) < STRETCH_FLOOR_S
    assert cost.predict(one, 500, 1) <= STRETCH_FLOOR_S < cost.predict(one + 1, 500, 1)


def test_long_prompts_keep_to_the_stretched_budget_short_ones_do_not() -> None:
    prompts = [Prompt("doc", 1500, 0.0, 1, 1500, long=True), Prompt("chat1", 30, 0.0, 2, 30),
               Prompt("chat2", 40, 0.0, 3, 40)]
    assert scheduler.chunks(prompts, 200, long_budget=10) == [("chat1", 30), ("chat2", 40), ("doc", 10)]
    assert scheduler.chunks(prompts, 50, long_budget=10) == [("chat1", 30), ("chat2", 20)]
    assert scheduler.chunks(prompts, 200) == [("chat1", 30), ("chat2", 40), ("doc", 130)]
