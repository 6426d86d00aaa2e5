"""The batch engine's policies, one decision per function, with no llama calls: how
many tokens the next step may carry (sized from a target inter-token latency and the
engine's measured step cost), which prompts get prefill chunks and how big, which
waiting requests may be admitted while long prompts are prefilling, and which running
sequence gives its cells back when the pool runs dry.

Latency-aware chunked prefill (Sarathi-Serve's idea): every decoding sequence gets its
token each step, and prompt chunks fill the rest of a step budget that keeps the step
under `itl_target_ms` and under `itl_stretch` times a step of the decoding sequences
alone. The cost of a step is learnt online (`StepCost`): a least-squares
fit, with older steps weighing less, of

    seconds = fixed + tokens x (per_token + per_token_per_kcell x cells / 1000)
                    + outputs x per_output

— the matmuls cost per token; attention costs per token per cell in use (it runs over
every cell up to the highest one used); sampling and output cost per sampled token.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

# Prefill order: a prompt waiting this many seconds counts as this many tokens shorter.
AGING_TOKENS_PER_S = 100.0
# A step always has room for this many prompt tokens, however slow steps are, so a long
# prompt is never starved by a crowd of decoding sequences. Small, so that the streams'
# slow-down stays what itl_stretch says on a slow CPU too (16 prompt tokens cost twice a
# decode step of 8 streams on this 2-core box).
MIN_PREFILL_TOKENS = 4
# itl_stretch never holds a step under this: a stream with a token every 50 ms reads as
# smoothly as one at 10 ms, and a few cheap decoders must not starve the prompts behind
# them (26 requests arriving together: the first to decode would otherwise hold the rest
# to a few prompt tokens a step).
STRETCH_FLOOR_S = 0.05
# Steps timed before the fit is used (until then the step budget is step_tokens).
WARMUP_STEPS = 8
# Each older step weighs this much less than the next (a half-life of ~35 steps).
FORGET = 0.98

K = TypeVar("K")


class StepCost:
    """An online model of what a decode step costs, from every step's timing."""

    FEATURES = 4  # 1, tokens, tokens x kcells, outputs

    def __init__(self) -> None:
        self._a = np.zeros((self.FEATURES, self.FEATURES))
        self._b = np.zeros(self.FEATURES)
        self.steps = 0
        self._theta: np.ndarray | None = None
        # Seconds per token, as an average: the fallback when the fit is not sensible.
        self._per_token = 0.0

    @staticmethod
    def _x(tokens: int, cells: int, outputs: int) -> np.ndarray:
        return np.array([1.0, tokens, tokens * cells / 1000.0, outputs])

    def observe(self, tokens: int, cells: int, outputs: int, seconds: float) -> None:
        if tokens <= 0 or not math.isfinite(seconds) or seconds <= 0:
            return
        x = self._x(tokens, cells, outputs)
        self._a = FORGET * self._a + np.outer(x, x)
        self._b = FORGET * self._b + x * seconds
        rate = seconds / tokens
        self._per_token = rate if self.steps == 0 else FORGET * self._per_token + (1 - FORGET) * rate
        self.steps += 1
        self._theta = None

    @property
    def ready(self) -> bool:
        return self.steps >= WARMUP_STEPS

    def theta(self) -> np.ndarray:
        """(fixed, per_token, per_token_per_kcell, per_output), none negative."""
        if self._theta is None:
            # Scaled so that the condition number says whether the steps seen so far
            # vary enough to tell the terms apart.
            scale = np.sqrt(np.maximum(np.diag(self._a), 1e-300))
            a = self._a / np.outer(scale, scale)
            theta = np.array([0.0, self._per_token, 0.0, 0.0])  # tokens alone: never too optimistic
            if np.linalg.cond(a) < 1e6:
                # A term that does not matter fits to about zero, either side: none
                # may be negative (a step never gets cheaper with more work).
                fit = np.maximum(np.linalg.solve(a, self._b / scale) / scale, 0.0)
                if fit[1] + fit[2] > 0:
                    theta = fit
            self._theta = theta
        return self._theta

    def predict(self, tokens: int, cells: int, outputs: int) -> float:
        return float(self._x(tokens, cells, outputs) @ self.theta())

    def tokens_within(self, seconds: float, cells: int, outputs: int) -> int:
        """The most tokens a step with `outputs` sampled tokens may carry in `seconds`."""
        fixed, per_token, per_kcell, per_output = self.theta()
        per = per_token + per_kcell * cells / 1000.0
        room = seconds - fixed - per_output * outputs
        return int(room / per) if per > 0 and room > 0 else 0


def step_budget(cost: StepCost, itl_target_s: float, cap: int, decoding: int, cells: int,
                stretch: float = 0.0) -> int:
    """Tokens the next step may carry: all of `cap` while no one is decoding (no stream
    to keep steady), while the cost is not yet known, or when both limits are off (0);
    else what keeps the step within the target — `itl_target_s`, and `stretch` times
    what the step would cost with the decoding sequences alone (but not under
    STRETCH_FLOOR_S), so that streams slow by at most that factor whatever the CPU's
    speed — at least every decoding sequence's
    token plus MIN_PREFILL_TOKENS, never more than `cap` (the batch size)."""
    if decoding == 0 or not cost.ready:
        return cap
    limits = [itl_target_s] if itl_target_s > 0 else []
    if stretch > 0:
        limits.append(max(STRETCH_FLOOR_S, stretch * cost.predict(decoding, cells, decoding)))
    if not limits:
        return cap
    fits = cost.tokens_within(min(limits), cells, decoding)
    return min(cap, max(decoding + MIN_PREFILL_TOKENS, fits))


@dataclass
class Prompt(Generic[K]):
    """A sequence with prompt tokens still to decode, as the scheduler sees it."""

    key: K
    remaining: int
    waited_s: float
    order: int
    cap: int  # the most it may take this step: `remaining`, less where it must stop; 0 to wait
    long: bool = False  # more than a step's worth in all (is_long): held to the stretched budget


def prefill_order(prompts: Iterable[Prompt[K]]) -> list[Prompt[K]]:
    """Shortest remaining prompt first, so a burst of short chats is not stuck behind a
    long document (first-token latency); waiting ages a request forward
    (AGING_TOKENS_PER_S) so a long prompt is never starved."""
    return sorted(prompts, key=lambda p: (p.remaining - AGING_TOKENS_PER_S * p.waited_s, p.order))


def chunks(prompts: Iterable[Prompt[K]], budget: int, long_budget: int | None = None) -> list[tuple[K, int]]:
    """Prompt chunks for this step, in prefill order: each as many tokens as its cap
    and the budget allow, long prompts together no more than `long_budget` (the
    itl_stretch share: a short prompt costs the streams one slower step, a long one
    would slow every step for as long as it prefills)."""
    out: list[tuple[K, int]] = []
    room_long = budget if long_budget is None else min(budget, long_budget)
    for p in prefill_order(prompts):
        if budget <= 0:
            break
        take = min(p.cap, p.remaining, budget, room_long if p.long else budget)
        if take > 0:
            out.append((p.key, take))
            budget -= take
            room_long -= take if p.long else 0
    return out


def is_long(prompt_tokens: int, step_tokens: int) -> bool:
    """A prompt that needs more than one full step to prefill."""
    return prompt_tokens > step_tokens


def may_start_prefill(prompt_tokens: int, step_tokens: int, long_prefilling: int, max_long: int) -> bool:
    """Long prompts do not stack: at most `max_long` of them prefill at once (0: no
    limit); a short one may always start."""
    return not is_long(prompt_tokens, step_tokens) or max_long == 0 or long_prefilling < max_long


class Ranked(Protocol):
    rank: int  # first admission number: kept when a preempted request comes back


R = TypeVar("R", bound=Ranked)


def victim(running: Iterable[R]) -> R | None:
    """Whom to preempt when the pool runs dry: the most recently admitted (first
    admission, so a request that was preempted once keeps its place)."""
    return max(running, key=lambda s: s.rank, default=None)
