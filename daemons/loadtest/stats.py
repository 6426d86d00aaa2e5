"""A step's outcomes as figures: TTFT, inter-token and end-to-end latency percentiles,
tokens/s, errors by kind; and the verdict, whether the step broke the targets."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from daemons.loadtest.users import Outcome


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between the closest ranks (numpy's
    default), so p99 of a few dozen samples is not simply the maximum."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Dist:
    p50: float
    p99: float
    mean: float
    max: float
    n: int

    @classmethod
    def of(cls, values: list[float], scale: float = 1.0) -> Dist | None:
        if not values:
            return None
        v = [x * scale for x in values]
        return cls(percentile(v, 50), percentile(v, 99), sum(v) / len(v), max(v), len(v))

    def to_json(self) -> dict[str, Any]:
        return {"p50": round(self.p50, 4), "p99": round(self.p99, 4), "mean": round(self.mean, 4),
                "max": round(self.max, 4), "n": self.n}


@dataclass
class Step:
    """What one step measured. `window_s` is the time the users kept sending (the
    planned duration, or less when interrupted); requests in flight at its end ran on
    (`drain_s`) and count with it. Tokens/s and requests/s are over both: tokens
    streamed (a content chunk a token), successful requests."""

    users: int
    planned_s: float
    window_s: float
    drain_s: float
    interrupted: bool
    ok: int
    errors: int
    errors_by_kind: dict[str, int]
    error_samples: dict[str, str]
    cancelled: int  # in flight when interrupted: neither success nor error
    ttft_s: Dist | None
    itl_ms: Dist | None
    e2e_s: Dist | None
    tokens_per_s: float
    requests_per_s: float
    completion_tokens: int
    by_kind: dict[str, int]
    prompt_tokens_mean: dict[str, float] = field(default_factory=dict)
    broke: str | None = None

    @property
    def requests(self) -> int:
        return self.ok + self.errors

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, Any]:
        def dist(d: Dist | None) -> dict[str, Any] | None:
            return None if d is None else d.to_json()

        return {
            "users": self.users, "planned_s": self.planned_s, "window_s": round(self.window_s, 3),
            "drain_s": round(self.drain_s, 3), "interrupted": self.interrupted,
            "requests": self.requests, "ok": self.ok, "errors": self.errors,
            "error_rate": round(self.error_rate, 4), "errors_by_kind": self.errors_by_kind,
            "error_samples": self.error_samples, "cancelled": self.cancelled,
            "ttft_s": dist(self.ttft_s), "itl_ms": dist(self.itl_ms), "e2e_s": dist(self.e2e_s),
            "tokens_per_s": round(self.tokens_per_s, 2), "requests_per_s": round(self.requests_per_s, 3),
            "completion_tokens": self.completion_tokens, "by_kind": self.by_kind,
            "prompt_tokens_mean": {k: round(v, 1) for k, v in self.prompt_tokens_mean.items()},
            "broke": self.broke,
        }


def summarize(users: int, outcomes: list[Outcome], start: float, window_end: float, finished_at: float,
              planned_s: float, interrupted: bool) -> Step:
    """The figures of one step whose users sent from `start` to `window_end` and whose
    last request ended at `finished_at` (perf_counter times)."""
    done = [o for o in outcomes if o.finished]
    ok = [o for o in done if o.ok]
    failed = [o for o in done if not o.ok]
    kinds = Counter(o.error or "unknown" for o in failed)
    samples: dict[str, str] = {}
    for o in failed:
        samples.setdefault(o.error or "unknown", o.message)
    window = max(window_end - start, 1e-9)
    # Throughput over the whole step, drain included: counting the sending time alone
    # gives 0 tokens/s to a step whose requests outlast it (long prompts), and the drain
    # (users stopping one by one) is short next to it when the requests are short.
    whole = max(finished_at - start, 1e-9)
    streamed = sum(len(o.token_times) for o in outcomes)
    prompts: dict[str, list[int]] = {}
    for o in ok:
        if o.prompt_tokens is not None:
            prompts.setdefault(o.kind, []).append(o.prompt_tokens)
    return Step(
        users=users, planned_s=planned_s, window_s=window, drain_s=max(0.0, finished_at - window_end),
        interrupted=interrupted, ok=len(ok), errors=len(failed), errors_by_kind=dict(kinds.most_common()),
        error_samples=samples, cancelled=sum(1 for o in outcomes if o.cancelled),
        ttft_s=Dist.of([o.ttft for o in ok if o.ttft is not None]),
        itl_ms=Dist.of([g for o in ok for g in o.gaps], 1000.0),
        e2e_s=Dist.of([o.e2e for o in ok if o.e2e is not None]),
        tokens_per_s=streamed / whole,
        requests_per_s=len(ok) / whole,
        completion_tokens=sum(o.tokens for o in ok),
        by_kind=dict(Counter(o.kind for o in done)),
        prompt_tokens_mean={k: sum(v) / len(v) for k, v in prompts.items()},
    )


@dataclass(frozen=True)
class Targets:
    """When a step counts as broken: more errors than `max_error_rate` (0: any error),
    or a p99 over its target."""

    max_error_rate: float = 0.0
    p99_ttft_s: float | None = None
    p99_e2e_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"max_error_rate": self.max_error_rate, "p99_ttft_s": self.p99_ttft_s, "p99_e2e_s": self.p99_e2e_s}


def kinds_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} x{n}" for kind, n in counts.items())


def verdict(step: Step, targets: Targets) -> str | None:
    """Why the step broke the targets, or None."""
    reasons: list[str] = []
    if step.errors and step.error_rate > targets.max_error_rate:
        if targets.max_error_rate > 0:
            reasons.append(f"errors {step.errors}/{step.requests} ({step.error_rate:.1%}, over "
                           f"{targets.max_error_rate:.1%}): {kinds_text(step.errors_by_kind)}")
        else:
            reasons.append(f"first errors, {step.errors}/{step.requests}: {kinds_text(step.errors_by_kind)}")
    if targets.p99_ttft_s is not None and step.ttft_s is not None and step.ttft_s.p99 > targets.p99_ttft_s:
        reasons.append(f"p99 TTFT {step.ttft_s.p99:.2f} s over {targets.p99_ttft_s:g} s")
    if targets.p99_e2e_s is not None and step.e2e_s is not None and step.e2e_s.p99 > targets.p99_e2e_s:
        reasons.append(f"p99 end-to-end {step.e2e_s.p99:.2f} s over {targets.p99_e2e_s:g} s")
    return "; ".join(reasons) or None


def steps_for(users: int) -> list[int]:
    """1, 2, 4 ... below `users`, then `users` itself: 26 -> 1, 2, 4, 8, 16, 26."""
    if users < 1:
        raise ValueError("users must be at least 1")
    out = []
    n = 1
    while n < users:
        out.append(n)
        n *= 2
    return out + [users]
