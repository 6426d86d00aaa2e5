"""One request inside the batch engine: its tokens, sampler and output stream."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from daemons.bus.worker import Request
from daemons.infer.native import Sampler
from daemons.infer.reply import Reply
from daemons.infer.request import GenRequest


@dataclass
class Pending:
    """Accepted and tokenized, waiting for a sequence and enough free cells."""

    req: Request
    gen: GenRequest
    prompt: list[int]
    max_new: int
    arrived: float = field(default_factory=time.monotonic)
    give_up_at: float = 0.0  # unix time
    # A preempted request waiting to come back: its sampler, stream and tokens so far.
    resume: Seq | None = None

    def __post_init__(self) -> None:
        # Stop waiting a little before the deadline (a decode step may be running when
        # it passes), so the answer is this engine's clear 503, not the router's 504.
        margin = min(1.0, 0.25 * max(0.0, self.req.deadline - time.time()))
        self.give_up_at = self.req.deadline - margin


@dataclass
class Seq:
    """Admitted: holds sequence id `id` in the llama context until it finishes."""

    id: int
    order: int  # admission number, unique for the engine's life
    rank: int  # its first admission number: kept when it is preempted and comes back
    req: Request
    gen: GenRequest
    prompt: list[int]
    max_new: int
    reserve_target: int  # positions reserved at admission: prompt + output reservation - 1
    sampler: Sampler
    reply: Reply
    # Longest common prefix with each earlier-admitted request (by order) that was
    # prefilling when this one arrived: the cells it may share instead of computing.
    lcp: dict[int, int] = field(default_factory=dict)
    shared: int = 0  # prompt tokens taken from other sequences' cells
    pending: int | None = None  # sampled, not yet decoded; None while prefilling
    produced: int = 0
    generated: list[int] = field(default_factory=list)  # every token produced, pending last
    preempted: int = 0  # times its cells were taken back for others
    refill: list[int] = field(default_factory=list)  # see `tokens`

    @property
    def prefilling(self) -> bool:
        return self.pending is None

    @property
    def tokens(self) -> list[int]:
        """What must be in its cells before it decodes on: the prompt, and after a
        preemption what it had generated too (all but the pending token, decoded next
        as before)."""
        return self.prompt if not self.refill else self.refill

    def requeue_tokens(self) -> None:
        """Set what a preempted sequence recomputes when it comes back."""
        self.refill = self.prompt + self.generated[:-1] if self.generated else []
