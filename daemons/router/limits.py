"""Per-principal limits: spend per period, requests and tokens per minute, requests in flight.

Admission reserves the most a request could use — its cost and tokens if the prompt and
the completion both reach their bounds — and the end of the request settles the
reservation to what it really used. Concurrent requests therefore can never overspend:
each one is admitted only if every reservation already held plus its own still fits.
Everything is checked and taken in one synchronous step on the event loop, so two
requests can never both see the same room.

Money is counted in integer millionths of the currency, so reservations and
settlements add and subtract exactly.
"""

from __future__ import annotations

import calendar
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from daemons.config import PrincipalConfig
from daemons.router.errors import APIError

log = logging.getLogger(__name__)

MICRO = 1_000_000
ADJECTIVE = {"day": "daily", "week": "weekly", "month": "monthly"}
WINDOW_S = 60.0


def micro(amount: float) -> int:
    """An amount of money in millionths, rounded up (reservations never fall short).
    A product within float noise of a whole millionth is that millionth: 0.1 + 0.2, or
    8369.594085, whose product with 1e6 is 8369594085.000001 (rounding to a fixed six
    decimals leaves noise that large, and it would be rounded up)."""
    scaled = amount * MICRO
    whole = round(scaled)
    return whole if math.isclose(scaled, whole, rel_tol=1e-15, abs_tol=1e-6) else math.ceil(scaled)


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """The UTC calendar day, ISO week or month holding `now`: (start, end) in unix time."""
    t = datetime.fromtimestamp(now, timezone.utc)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start, end = day, day + timedelta(days=1)
    elif period == "week":
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    else:
        start = day.replace(day=1)
        end = start + timedelta(days=calendar.monthrange(start.year, start.month)[1])
    return start.timestamp(), end.timestamp()


class LimitExceeded(APIError):
    def __init__(self, message: str, code: str, retry_after: float) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(429, message, code, headers={"Retry-After": str(seconds)})
        self.retry_after = seconds


@dataclass
class Grant:
    """What one admitted request holds until it is settled."""

    principal: str
    cost: int  # millionths reserved
    tokens: int
    stamp: list[float]  # its [time, tokens] entry in the tokens window
    period_start: float
    settled: bool = False


@dataclass
class _State:
    limits: PrincipalConfig
    period_start: float = 0.0
    period_end: float = 0.0
    spent: int = 0  # settled in this period, millionths
    reserved: int = 0
    concurrent: int = 0
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[list[float]] = field(default_factory=deque)
    token_sum: float = 0.0


class Limits:
    """Every principal's counters. `spent_since(principal, since)` gives what the ledger
    already holds for a principal's current period (read once per principal and period)."""

    def __init__(self, spent_since: Callable[[str, float], float], retry_after_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.spent_since = spent_since
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.states: dict[str, _State] = {}

    def _state(self, name: str, limits: PrincipalConfig, now: float) -> _State:
        st = self.states.get(name)
        if st is None or st.limits is not limits:
            st = _State(limits) if st is None else st
            st.limits = limits
            self.states[name] = st
        if now >= st.period_end:
            first = st.period_end == 0.0
            st.period_start, st.period_end = period_bounds(limits.budget_period, now)
            st.spent = micro(self.spent_since(name, st.period_start)) if first and limits.budget > 0 else 0
        while st.requests and st.requests[0] <= now - WINDOW_S:
            st.requests.popleft()
        while st.tokens and st.tokens[0][0] <= now - WINDOW_S:
            st.token_sum -= st.tokens.popleft()[1]
        return st

    def admit(self, name: str, limits: PrincipalConfig, max_cost: float, max_tokens: int) -> Grant:
        """Take the request's reservation, or raise LimitExceeded naming the limit."""
        now = self.clock()
        st = self._state(name, limits, now)
        cost = micro(max_cost)
        if limits.max_concurrent and st.concurrent >= limits.max_concurrent:
            raise LimitExceeded(f"principal {name!r} already has {st.concurrent} requests in flight "
                                f"(max_concurrent = {limits.max_concurrent})", "concurrency_limit_exceeded",
                                self.retry_after_s)
        if limits.requests_per_min and len(st.requests) >= limits.requests_per_min:
            raise LimitExceeded(f"principal {name!r} is over its limit of {limits.requests_per_min} requests "
                                "per minute", "requests_per_min_exceeded", st.requests[0] + WINDOW_S - now)
        if limits.tokens_per_min:
            if max_tokens > limits.tokens_per_min:
                raise LimitExceeded(f"this request may use up to {max_tokens} tokens, more than principal {name!r}'s "
                                    f"limit of {limits.tokens_per_min} tokens per minute: lower max_tokens or send "
                                    "a shorter prompt", "tokens_per_min_exceeded", WINDOW_S)
            if st.token_sum + max_tokens > limits.tokens_per_min:
                raise LimitExceeded(f"principal {name!r} is over its limit of {limits.tokens_per_min} tokens per "
                                    f"minute (this request may use up to {max_tokens})", "tokens_per_min_exceeded",
                                    self._tokens_free_in(st, max_tokens, now))
        if limits.budget > 0:
            budget = micro(limits.budget)
            if st.spent + st.reserved + cost > budget:
                left = max(0, budget - st.spent - st.reserved) / MICRO
                raise LimitExceeded(
                    f"principal {name!r} has {left:.6g} of its {limits.budget:g} {ADJECTIVE[limits.budget_period]} budget "
                    f"left (spent {st.spent / MICRO:.6g}, {st.reserved / MICRO:.6g} held by requests in flight); "
                    f"this request may cost up to {cost / MICRO:.6g}", "budget_exceeded",
                    st.period_end - now if st.reserved == 0 else self.retry_after_s)
        stamp = [now, float(max_tokens)]
        st.concurrent += 1
        st.requests.append(now)
        st.tokens.append(stamp)
        st.token_sum += max_tokens
        st.reserved += cost
        return Grant(name, cost, max_tokens, stamp, st.period_start)

    def settle(self, grant: Grant, cost: float, tokens: int) -> None:
        """The request is over: give back its reservation and count what it used."""
        if grant.settled:
            return
        grant.settled = True
        st = self.states[grant.principal]
        st.concurrent -= 1
        st.reserved -= grant.cost
        used = micro(cost)
        if used > grant.cost:
            log.warning("request of %r cost %.6g, more than the %.6g reserved for it", grant.principal,
                        used / MICRO, grant.cost / MICRO)
        if grant.period_start == st.period_start:
            st.spent += used
        if st.tokens and st.tokens[0][0] <= grant.stamp[0]:  # still in the window's sum
            st.token_sum += tokens - grant.stamp[1]
            grant.stamp[1] = float(tokens)

    def _tokens_free_in(self, st: _State, need: int, now: float) -> float:
        room = st.limits.tokens_per_min - st.token_sum
        for at, n in st.tokens:
            room += n
            if room >= need:
                return at + WINDOW_S - now
        return WINDOW_S

    def snapshot(self, name: str) -> dict[str, float | int]:
        st = self.states.get(name)
        if st is None:
            return {}
        return {"spent": st.spent / MICRO, "reserved": st.reserved / MICRO, "concurrent": st.concurrent,
                "requests_last_min": len(st.requests), "tokens_last_min": int(st.token_sum),
                "period_start": st.period_start, "period_end": st.period_end}
