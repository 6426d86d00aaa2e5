"""Fair admission: one bounded queue per model, principals served in turn.

A model takes so many requests at once (its daemon's slots, or a remote model's
max_in_flight); the rest wait here. When a place frees, the next request comes from
the interactive class (batch gets one place in BATCH_SHARE, so it is never starved
either), and within a class from the principal after the one served last: a principal
with 50 requests waiting gets one place per round, like a principal with one. A full
queue answers 429 with Retry-After at once; a request whose deadline passes while it
waits gets 504 saying how long it waited.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from daemons.router.errors import APIError

log = logging.getLogger(__name__)

CLASSES = ("interactive", "batch")
BATCH_SHARE = 5  # of every 5 places freed while both classes wait, batch gets 1
EWMA = 0.1


@dataclass(eq=False)
class Ticket:
    principal: str
    priority: str
    future: asyncio.Future[None]
    queued_at: float = field(default_factory=time.monotonic)


class Place:
    """A place in flight: give it back once (the call has ended)."""

    def __init__(self, queue: FairQueue) -> None:
        self.queue = queue
        self.started = time.monotonic()
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.queue._release(time.monotonic() - self.started)


class FairQueue:
    def __init__(self, model: str, depth: int, limit: Callable[[], int], retry_after_s: float) -> None:
        self.model = model
        self.depth = depth
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.waiting: dict[str, OrderedDict[str, deque[Ticket]]] = {c: OrderedDict() for c in CLASSES}
        self.queued = 0
        self.turn = 0
        self.service_s = 1.0  # moving average of how long a place is held
        self.admitted = 0

    # -- what the rest of the router asks ---------------------------------------------

    def depth_of(self, priority: str | None = None) -> int:
        if priority is None:
            return self.queued
        return sum(len(q) for q in self.waiting[priority].values())

    def expected_wait(self, priority: str = "interactive") -> float:
        """Seconds a request arriving now would wait, from the queue ahead of it and how
        long places are held (an estimate for overflow and Retry-After)."""
        ahead = self.depth_of("interactive") + (self.depth_of("batch") if priority == "batch" else 0)
        limit = max(1, self.limit())
        if self.in_flight < limit and ahead == 0:
            return 0.0
        return (ahead + 1) / limit * self.service_s

    def try_acquire(self) -> Place | None:
        """A place now if one is free and nobody waits, else None (nothing queued). With
        no await between this and a decision, two requests cannot both see the room."""
        if self.queued == 0 and self.in_flight < self.limit():
            self.in_flight += 1
            self.admitted += 1
            return Place(self)
        return None

    async def acquire(self, principal: str, priority: str, deadline: float) -> Place:
        if priority not in self.waiting:
            priority = "interactive"
        place = self.try_acquire()
        if place is not None:
            return place
        if self.queued >= self.depth:
            wait = self.expected_wait(priority)
            raise APIError(429, f"the queue for model {self.model!r} is full ({self.queued} requests waiting); "
                                "retry later", "queue_full",
                           headers={"Retry-After": str(max(1, math.ceil(max(wait, self.retry_after_s))))})
        ticket = Ticket(principal, priority, asyncio.get_running_loop().create_future())
        self.waiting[priority].setdefault(principal, deque()).append(ticket)
        self.queued += 1
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that
            # arrives as the place is granted, and the place would never be given back.
            async with asyncio.timeout(max(0.0, deadline - time.time())):
                await asyncio.shield(ticket.future)
        except TimeoutError:
            if not ticket.future.done():
                self._forget(ticket)
                waited = time.monotonic() - ticket.queued_at
                raise APIError(504, f"the request waited {waited:.1f} s in the queue for model {self.model!r} "
                                    f"({self.queued} still waiting) and its deadline passed", "deadline_exceeded") \
                    from None
        except BaseException:
            if not ticket.future.done():
                self._forget(ticket)
                raise
            # Granted just as the caller was cancelled: hand the place straight back.
            Place(self).release()
            raise
        return Place(self)

    def kick(self) -> None:
        """Hand out places that became free without a release (a worker joined)."""
        self._dispatch()

    # -- internals ---------------------------------------------------------------------

    def _forget(self, ticket: Ticket) -> None:
        queues = self.waiting[ticket.priority]
        q = queues.get(ticket.principal)
        if q is not None and ticket in q:
            q.remove(ticket)
            self.queued -= 1
            if not q:
                del queues[ticket.principal]

    def _release(self, held_s: float) -> None:
        self.in_flight -= 1
        self.service_s += EWMA * (held_s - self.service_s)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.queued and self.in_flight < self.limit():
            ticket = self._next()
            self.in_flight += 1
            self.admitted += 1
            ticket.future.set_result(None)

    def _next(self) -> Ticket:
        self.turn += 1
        interactive, batch = self.waiting["interactive"], self.waiting["batch"]
        queues = batch if batch and (not interactive or self.turn % BATCH_SHARE == 0) else interactive
        principal, q = next(iter(queues.items()))
        ticket = q.popleft()
        self.queued -= 1
        del queues[principal]
        if q:
            queues[principal] = q  # to the back of the round
        return ticket
