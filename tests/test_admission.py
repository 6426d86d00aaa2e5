"""Fair admission (daemons/router/admission.py) as pure asyncio logic: a bounded queue
per model, principals in turn, interactive before batch with a share for batch, 429
when full, 504 when a deadline passes, cancellation, and a random run that checks the
accounting after every step.

Every test runs its own event loop with asyncio.run; waiting is in loop turns
(asyncio.sleep(0)), never in wall time, except the deadline test (50 ms).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from daemons.router.admission import BATCH_SHARE, CLASSES, FairQueue, Place
from daemons.router.errors import APIError


def far() -> float:
    return time.time() + 60.0


async def spin(turns: int = 20) -> None:
    """Let every task that can run, run (a grant takes a few loop turns to reach its waiter)."""
    for _ in range(turns):
        await asyncio.sleep(0)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class Crowd:
    """Tasks that each wait for a place on `queue` and note the order they got one."""

    def __init__(self, queue: FairQueue) -> None:
        self.queue = queue
        self.order: list[str] = []
        self.places: dict[str, Place] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def want(self, label: str, principal: str, priority: str = "interactive", deadline: float | None = None) -> None:
        async def go() -> None:
            place = await self.queue.acquire(principal, priority, far() if deadline is None else deadline)
            self.order.append(label)
            self.places[label] = place

        self.tasks[label] = asyncio.create_task(go())

    def release_last(self) -> None:
        self.places[self.order[-1]].release()


def queue(limit: int | Callable[[], int] = 1, depth: int = 100, retry_after_s: float = 2.0) -> FairQueue:
    return FairQueue("m", depth, limit if callable(limit) else (lambda: limit), retry_after_s)


async def held_by_one() -> tuple[FairQueue, Place, Crowd]:
    """A queue of one place, held by "X" (everyone after waits), and a crowd for it."""
    q = queue(limit=1)
    blocker = await q.acquire("X", "interactive", far())
    return q, blocker, Crowd(q)


# -- placing ------------------------------------------------------------------------


def test_a_place_is_given_at_once_while_under_the_limit() -> None:
    async def main() -> None:
        q = queue(limit=2)
        a = await q.acquire("alice", "interactive", far())
        b = await q.acquire("bob", "batch", far())
        assert isinstance(a, Place) and isinstance(b, Place)
        assert (q.in_flight, q.queued, q.admitted) == (2, 0, 2)
        a.release()
        assert q.in_flight == 1
        c = await q.acquire("carol", "interactive", far())
        assert (q.in_flight, q.queued, q.admitted) == (2, 0, 3)
        b.release()
        c.release()
        assert q.in_flight == 0

    run(main())


def test_an_unknown_priority_is_queued_as_interactive() -> None:
    async def main() -> None:
        q = queue()
        held = await q.acquire("x", "interactive", far())
        crowd = Crowd(q)
        crowd.want("a", "alice", "urgent")
        await spin()
        assert q.depth_of("interactive") == 1
        held.release()
        await spin()
        assert crowd.order == ["a"]

    run(main())


def test_principals_take_turns_and_each_is_served_in_order() -> None:
    async def main() -> None:
        q, blocker, crowd = await held_by_one()
        for i in range(1, 6):
            crowd.want(f"H{i}", "H")
        await spin()
        crowd.want("L1", "L")
        await spin()
        assert q.queued == 6
        assert crowd.order == []
        blocker.release()
        await spin()
        while len(crowd.order) < 6:
            n = len(crowd.order)
            crowd.release_last()
            await spin()
            assert len(crowd.order) == n + 1  # one place freed, one handed out
            assert q.in_flight == 1
        assert crowd.order == ["H1", "L1", "H2", "H3", "H4", "H5"]
        crowd.release_last()
        assert (q.in_flight, q.queued) == (0, 0)

    run(main())


def test_round_robin_over_three_principals_and_one_joining_later() -> None:
    async def main() -> None:
        q, blocker, crowd = await held_by_one()
        for i in range(1, 4):
            crowd.want(f"A{i}", "A")
        for i in range(1, 3):
            crowd.want(f"B{i}", "B")
        crowd.want("C1", "C")
        await spin()
        blocker.release()
        await spin()
        for _ in range(2):  # A1, B1 served: then D arrives, behind C, A and B in the round
            crowd.release_last()
            await spin()
        crowd.want("D1", "D")
        await spin()
        while len(crowd.order) < 7:
            crowd.release_last()
            await spin()
        assert crowd.order == ["A1", "B1", "C1", "A2", "B2", "D1", "A3"]

    run(main())


def test_interactive_goes_first_and_batch_gets_one_place_in_batch_share() -> None:
    assert BATCH_SHARE == 5

    async def main() -> None:
        q, blocker, crowd = await held_by_one()
        for i in range(1, 4):
            crowd.want(f"b{i}", "batcher", "batch")  # batch queued first
        for i in range(1, 11):
            crowd.want(f"I{i}", "chat", "interactive")
        await spin()
        assert (q.depth_of("interactive"), q.depth_of("batch"), q.depth_of()) == (10, 3, 13)
        blocker.release()
        await spin()
        while len(crowd.order) < 13:
            crowd.release_last()
            await spin()
        assert crowd.order == ["I1", "I2", "I3", "I4", "b1", "I5", "I6", "I7", "I8", "b2", "I9", "I10", "b3"]

    run(main())


def test_batch_alone_is_served_and_interactive_arriving_later_overtakes_it() -> None:
    async def main() -> None:
        q, blocker, crowd = await held_by_one()
        for i in range(1, 4):
            crowd.want(f"b{i}", "batcher", "batch")
        await spin()
        blocker.release()
        await spin()
        assert crowd.order == ["b1"]
        crowd.want("I1", "chat", "interactive")
        await spin()
        crowd.release_last()
        await spin()
        assert crowd.order == ["b1", "I1"]

    run(main())


# -- refusing -------------------------------------------------------------------------


def test_a_full_queue_answers_429_with_retry_after_at_once() -> None:
    async def main() -> None:
        q = queue(limit=1, depth=2, retry_after_s=2.0)
        blocker = await q.acquire("X", "interactive", far())
        crowd = Crowd(q)
        crowd.want("a", "alice")
        crowd.want("b", "bob")
        await spin()
        assert q.queued == 2
        with pytest.raises(APIError) as info:
            await q.acquire("carol", "interactive", far())
        err = info.value
        assert err.status == 429
        assert err.code == "queue_full"
        assert "model 'm'" in err.message
        assert "2 requests waiting" in err.message
        retry = err.headers["Retry-After"]
        assert retry.isdigit() and int(retry) >= 1
        assert int(retry) == 3  # (2 ahead + 1) / 1 place * 1 s held, above retry_after_s = 2
        assert q.queued == 2  # the refused one was never queued
        blocker.release()
        await spin()
        assert crowd.order == ["a"]

    run(main())


def test_a_full_queue_retry_after_is_never_below_retry_after_s() -> None:
    async def main() -> None:
        q = queue(limit=4, depth=0, retry_after_s=2.5)
        for _ in range(4):
            await q.acquire("X", "interactive", far())
        with pytest.raises(APIError) as info:
            await q.acquire("carol", "batch", far())
        assert info.value.headers == {"Retry-After": "3"}

    run(main())


def test_a_deadline_passing_while_waiting_is_a_504_and_the_ticket_is_dropped() -> None:
    async def main() -> None:
        q, blocker, crowd = await held_by_one()
        crowd.want("late", "alice", deadline=time.time() + 0.05)
        crowd.want("patient", "bob")
        await spin()
        assert q.queued == 2
        task = crowd.tasks["late"]
        await asyncio.wait([task], timeout=2.0)
        assert task.done()
        err = task.exception()
        assert isinstance(err, APIError)
        assert err.status == 504
        assert err.code == "deadline_exceeded"
        assert "waited" in err.message and "model 'm'" in err.message
        assert "deadline passed" in err.message
        assert "(1 still waiting)" in err.message
        assert q.queued == 1
        assert "alice" not in q.waiting["interactive"]
        blocker.release()
        await spin()
        assert crowd.order == ["patient"]
        assert q.in_flight == 1
        crowd.release_last()
        assert (q.in_flight, q.queued) == (0, 0)

    run(main())


def test_a_deadline_already_past_is_a_504_without_waiting() -> None:
    async def main() -> None:
        q = queue(limit=1)
        blocker = await q.acquire("X", "interactive", far())
        with pytest.raises(APIError) as info:
            await q.acquire("alice", "interactive", time.time() - 1)
        assert info.value.status == 504
        assert q.queued == 0 and q.waiting["interactive"] == {}
        blocker.release()
        assert q.in_flight == 0

    run(main())


# -- cancelling -----------------------------------------------------------------------


def test_a_cancelled_waiter_leaves_no_ticket_and_no_place() -> None:
    async def main() -> None:
        q, blocker, crowd = await held_by_one()
        for label in ("H1", "H2", "H3"):
            crowd.want(label, "H")
        crowd.want("L1", "L")
        await spin()
        crowd.tasks["H2"].cancel()  # from the middle of its principal's line
        crowd.tasks["L1"].cancel()  # the only one of its principal
        await spin()
        assert crowd.tasks["H2"].cancelled() and crowd.tasks["L1"].cancelled()
        assert q.queued == 2
        assert list(q.waiting["interactive"]) == ["H"]
        assert q.in_flight == 1
        blocker.release()
        await spin()
        crowd.release_last()
        await spin()
        assert crowd.order == ["H1", "H3"]
        crowd.release_last()
        assert (q.in_flight, q.queued) == (0, 0)

    run(main())


def test_a_waiter_cancelled_as_it_is_granted_gives_the_place_back() -> None:
    """The place is handed to the waiter (release -> dispatch) and, before the waiter
    runs again, the waiter is cancelled (its client went away): the place must come
    back to the queue, and the waiter must end cancelled, not holding a place that no
    one will ever release."""

    async def main() -> None:
        q, blocker, crowd = await held_by_one()
        crowd.want("a", "alice")
        crowd.want("b", "bob")
        await spin()
        blocker.release()  # a is granted now, synchronously
        assert (q.in_flight, q.queued) == (1, 1)
        crowd.tasks["a"].cancel()  # at the same moment
        await spin()
        assert crowd.tasks["a"].cancelled(), f"cancelled waiter returned a place; in_flight = {q.in_flight}"
        # The place went on to the next in line.
        assert crowd.order == ["b"]
        assert (q.in_flight, q.queued) == (1, 0)
        crowd.release_last()
        assert q.in_flight == 0

    run(main())


def test_a_waiter_cancelled_just_before_it_is_granted_gives_the_place_back() -> None:
    async def main() -> None:
        q, blocker, crowd = await held_by_one()
        crowd.want("a", "alice")
        crowd.want("b", "bob")
        await spin()
        crowd.tasks["a"].cancel()  # cancel first, then the release in the same loop turn
        blocker.release()
        await spin()
        assert crowd.tasks["a"].cancelled()
        assert crowd.order == ["b"]
        assert (q.in_flight, q.queued) == (1, 0)
        crowd.release_last()
        assert q.in_flight == 0

    run(main())


# -- kick, expected_wait, release -----------------------------------------------------


def test_kick_hands_out_places_when_the_limit_grows() -> None:
    async def main() -> None:
        limit = [1]
        q = queue(limit=lambda: limit[0])
        blocker = await q.acquire("X", "interactive", far())
        crowd = Crowd(q)
        for label, who in (("a1", "a"), ("a2", "a"), ("b1", "b")):
            crowd.want(label, who)
        await spin()
        q.kick()  # nothing has changed: nothing happens
        await spin()
        assert (crowd.order, q.in_flight, q.queued) == ([], 1, 3)
        limit[0] = 3  # two workers joined
        q.kick()
        await spin()
        assert crowd.order == ["a1", "b1"]
        assert (q.in_flight, q.queued) == (3, 1)
        limit[0] = 10
        q.kick()
        await spin()
        assert crowd.order == ["a1", "b1", "a2"]
        assert (q.in_flight, q.queued) == (4, 0)
        blocker.release()
        for p in crowd.places.values():
            p.release()
        assert q.in_flight == 0

    run(main())


def test_expected_wait_is_zero_with_room_and_grows_with_the_queue() -> None:
    async def main() -> None:
        q = queue(limit=2)
        assert q.expected_wait() == 0.0
        assert q.expected_wait("batch") == 0.0
        held = [await q.acquire("X", "interactive", far())]
        assert q.expected_wait() == 0.0  # one place is still free
        held.append(await q.acquire("X", "interactive", far()))
        assert q.service_s == 1.0
        assert q.expected_wait() == pytest.approx(0.5)  # (0 ahead + 1) / 2 places * 1 s
        crowd = Crowd(q)
        waits = []
        for i in range(4):
            crowd.want(f"i{i}", "p")
            await spin()
            waits.append(q.expected_wait())
        assert waits == pytest.approx([1.0, 1.5, 2.0, 2.5])
        crowd.want("b0", "p", "batch")
        crowd.want("b1", "p", "batch")
        await spin()
        # Batch waits behind interactive and batch; interactive only behind interactive.
        assert q.expected_wait("interactive") == pytest.approx(2.5)
        assert q.expected_wait("batch") == pytest.approx(3.5)
        for t in crowd.tasks.values():
            t.cancel()
        await spin()
        assert q.queued == 0
        assert q.expected_wait() == pytest.approx(0.5)

    run(main())


def test_expected_wait_follows_how_long_places_are_held() -> None:
    async def main() -> None:
        q = queue(limit=1)
        p = await q.acquire("X", "interactive", far())
        p.started -= 11.0  # as if it had been held 11 s
        p.release()
        assert q.service_s == pytest.approx(2.0, abs=0.01)  # 1 + 0.1 * (11 - 1)
        await q.acquire("X", "interactive", far())
        assert q.expected_wait() == pytest.approx(2.0, abs=0.01)

    run(main())


def test_releasing_a_place_twice_does_nothing_the_second_time() -> None:
    async def main() -> None:
        q = queue(limit=2)
        a = await q.acquire("X", "interactive", far())
        await q.acquire("Y", "interactive", far())
        crowd = Crowd(q)
        crowd.want("w1", "w")
        crowd.want("w2", "w")
        await spin()
        a.release()
        await spin()
        assert crowd.order == ["w1"]
        assert (q.in_flight, q.queued) == (2, 1)
        service = q.service_s
        a.release()
        await spin()
        assert crowd.order == ["w1"]  # no place for w2 out of thin air
        assert (q.in_flight, q.queued) == (2, 1)
        assert q.service_s == service
        assert not a.held

    run(main())


# -- a random run -------------------------------------------------------------------


def test_random_acquire_release_cancel_keeps_the_accounting_right() -> None:
    rng = random.Random(20240313)

    async def main() -> dict[str, int]:
        limit = [3]
        q = FairQueue("m", 6, lambda: limit[0], 1.0)
        pending: list[asyncio.Task[Place]] = []
        held: list[Place] = []
        seen = {"granted": 0, "full": 0, "cancelled": 0, "kicks": 0, "cancelled_with_place": 0}
        cancelled: set[asyncio.Task[Place]] = set()

        def start() -> None:
            who = rng.choice("abcd")
            pending.append(asyncio.create_task(q.acquire(who, rng.choice(CLASSES), far())))

        def release() -> None:
            place = held.pop(rng.randrange(len(held)))
            place.release()
            if rng.random() < 0.2:
                place.release()  # a second release must do nothing

        def cancel() -> None:
            task = rng.choice(pending)
            task.cancel()
            cancelled.add(task)

        for step in range(500):
            r = rng.random()
            if r < 0.45:
                start()
            elif r < 0.75 and held:
                release()
            elif r < 0.88 and pending:
                cancel()
            elif r < 0.96 and held and pending:
                release()  # and cancel in the same loop turn: maybe the one just granted
                cancel()
            elif r >= 0.98 and limit[0] < 6:
                limit[0] += 1
                q.kick()
                seen["kicks"] += 1
            settled = False
            while not settled:
                await spin()
                settled = True
                for task in [t for t in pending if t.done()]:
                    pending.remove(task)
                    if task.cancelled():
                        seen["cancelled"] += 1
                        continue
                    exc = task.exception()
                    if exc is not None:
                        assert isinstance(exc, APIError) and exc.status == 429, exc
                        seen["full"] += 1
                        continue
                    if task in cancelled:
                        # Cancelled, yet it returned a place: its caller is gone (unless_gone
                        # raised ClientGone) and would never release it. Count the leak, give
                        # the place back here so the rest of the run can still be checked (and
                        # let the waiter it goes to run), fail at the end.
                        seen["cancelled_with_place"] += 1
                        task.result().release()
                        settled = False
                        continue
                    held.append(task.result())
                    seen["granted"] += 1
            where = f"step {step}"
            assert q.in_flight <= limit[0], where
            assert q.in_flight == len(held) == sum(p.held for p in held), where
            assert q.queued == len(pending), where
            assert q.queued == q.depth_of("interactive") + q.depth_of("batch"), where
            assert all(q_ for c in CLASSES for q_ in q.waiting[c].values()), where  # no empty lines kept
            assert q.queued <= q.depth, where
            if q.in_flight < limit[0]:
                assert q.queued == 0, where  # never a free place while someone waits
        for task in pending:
            task.cancel()
        await spin()
        for place in held:
            place.release()
        assert (q.in_flight, q.queued) == (0, 0)
        assert q.admitted >= seen["granted"]  # and the rest were places given back by cancelled waiters
        return seen

    seen = run(main())
    assert seen["cancelled_with_place"] == 0, f"cancelled waiters that returned a place (leaked): {seen}"
    # The run did exercise every path.
    assert seen["granted"] > 50 and seen["full"] > 5 and seen["cancelled"] > 20 and seen["kicks"] > 0, seen
