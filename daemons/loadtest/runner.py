"""The ramp: step after step with more users (1, 2, 4 ... N), each sending for a fixed
time; requests in flight when a step's time is up run to their end (each bounded by the
request timeout) before the next step starts, so every step measures exactly its number
of users. `stop` (set on Ctrl-C) ends the current step at once, keeping what it has."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from daemons.loadtest.stats import Step, Targets, summarize, verdict
from daemons.loadtest.users import ClientFactory, Outcome, User
from daemons.loadtest.workload import Workload

TICK_S = 0.25  # how often the progress callback runs

# (step index, seconds into the step's sending time, the step's outcomes so far)
OnTick = Callable[[int, float, list[Outcome]], None]
OnStep = Callable[[int, Step], None]


@dataclass(frozen=True)
class Plan:
    steps: list[int]
    duration_s: float
    think_s: float = 0.0
    timeout_s: float = 300.0
    seed: int = 0
    stop_at_break: bool = False
    # Requests sent (and not counted) before the first step: the first request after
    # the model loads pays for warming up its buffers and caches, and would be step 1's p99.
    warmup: int = 1


class Ramp:
    def __init__(self, plan: Plan, workload: Workload, clients: ClientFactory, targets: Targets) -> None:
        self.plan = plan
        self.workload = workload
        self.clients = clients
        self.targets = targets
        self.users: list[User] = []
        self.steps: list[Step] = []
        self.stop = asyncio.Event()

    @property
    def interrupted(self) -> bool:
        return self.stop.is_set()

    @property
    def broke_at(self) -> int | None:
        """The index of the first step that broke the targets."""
        return next((i for i, s in enumerate(self.steps) if s.broke), None)

    def _user(self, index: int) -> User:
        while len(self.users) <= index:
            self.users.append(User(len(self.users), self.clients(), self.workload, self.plan.seed,
                                   self.plan.think_s, self.plan.timeout_s))
        return self.users[index]

    async def warm_up(self) -> None:
        user = self._user(0)
        for _ in range(self.plan.warmup):
            request = asyncio.create_task(user.request(self.workload.pick(user.rng), []))
            stopper = asyncio.create_task(self.stop.wait())
            await asyncio.wait([request, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in (request, stopper):
                task.cancel()
            await asyncio.gather(request, stopper, return_exceptions=True)
            if self.stop.is_set():
                return

    async def run(self, on_tick: OnTick, on_step: OnStep) -> None:
        try:
            await self.warm_up()
            for index, users in enumerate(self.plan.steps):
                if self.stop.is_set():
                    return
                step = await self._step(index, users, on_tick)
                step.broke = verdict(step, self.targets)
                self.steps.append(step)
                on_step(index, step)
                if self.stop.is_set() or (step.broke and self.plan.stop_at_break):
                    return
        finally:
            # Users persist from step to step (their keep-alive connections with them).
            await asyncio.gather(*(u.aclose() for u in self.users), return_exceptions=True)

    async def _step(self, index: int, users: int, on_tick: OnTick) -> Step:
        self._user(users - 1)
        outcomes: list[Outcome] = []
        start = time.perf_counter()
        until = start + self.plan.duration_s
        tasks = [asyncio.create_task(u.loop(until, outcomes)) for u in self.users[:users]]
        stopper = asyncio.create_task(self.stop.wait())
        stopped_at: float | None = None
        try:
            while pending := [t for t in tasks if not t.done()]:
                await asyncio.wait([*pending, stopper], timeout=TICK_S, return_when=asyncio.FIRST_COMPLETED)
                now = time.perf_counter()
                on_tick(index, min(now, until) - start, outcomes)
                if stopper.done():
                    stopped_at = now
                    break
        finally:
            for task in tasks:
                task.cancel()
            stopper.cancel()
            results = await asyncio.gather(*tasks, stopper, return_exceptions=True)
        for result in results:  # a bug in a user's loop must not pass for a quiet step
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result
        window_end = until if stopped_at is None else min(until, stopped_at)
        return summarize(users, outcomes, start, window_end, time.perf_counter(), self.plan.duration_s,
                         interrupted=stopped_at is not None)
