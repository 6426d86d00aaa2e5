"""Per-principal limits (daemons/router/limits.py) as pure logic: budgets with
reservations, calendar periods, requests, tokens and requests in flight.

The clock is injected (a FakeClock the test moves by hand) and the ledger's
`spent_since` is a small recording function; PrincipalConfig is the real config type.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pytest

from daemons.config import PrincipalConfig
from daemons.router.errors import APIError
from daemons.router.limits import MICRO, WINDOW_S, Grant, LimitExceeded, Limits, micro, period_bounds


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    """Unix time of a UTC calendar moment: ts(2024, 3, 13, 12)."""
    return datetime(year, month, day, hour, minute, second, tzinfo=timezone.utc).timestamp()


# Wednesday 13 March 2024, noon UTC.
NOW = ts(2024, 3, 13, 12)


class FakeClock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Ledger:
    """`spent_since` that returns a fixed amount and records every question."""

    def __init__(self, spent: float = 0.0) -> None:
        self.spent = spent
        self.calls: list[tuple[str, float]] = []

    def __call__(self, principal: str, since: float) -> float:
        self.calls.append((principal, since))
        return self.spent


def make(spent: float = 0.0, retry_after_s: float = 7.0, t: float = NOW) -> tuple[Limits, FakeClock, Ledger]:
    clock, ledger = FakeClock(t), Ledger(spent)
    return Limits(ledger, retry_after_s, clock=clock), clock, ledger


def refused(limits: Limits, name: str, conf: PrincipalConfig, cost: float, tokens: int) -> LimitExceeded:
    with pytest.raises(LimitExceeded) as info:
        limits.admit(name, conf, cost, tokens)
    return info.value


def retry_after(err: LimitExceeded) -> int:
    value = err.headers["Retry-After"]
    assert value.isdigit(), value
    return int(value)


# -- micro() and LimitExceeded ----------------------------------------------------------


def test_micro_is_exact_for_decimal_amounts_and_rounds_up() -> None:
    assert micro(0) == 0
    assert micro(0.001) == 1000  # 0.001 * 1e6 is 1000.0000000000001 in binary
    assert micro(0.07) == 70_000
    assert micro(0.1 + 0.2) == 300_000  # 0.30000000000000004
    assert micro(1.0) == MICRO
    assert micro(123.456789) == 123_456_789
    # Below a millionth: up, never down (a reservation must not fall short).
    assert micro(0.0000001) == 1
    assert micro(0.0000011) == 2
    assert micro(1.0000001) == 1_000_001


def test_limit_exceeded_is_a_429_with_an_integer_retry_after_of_at_least_one() -> None:
    for given, expected in ((0.0, 1), (0.2, 1), (1.0, 1), (2.1, 3), (59.0001, 60), (3600.0, 3600)):
        err = LimitExceeded("over", "some_code", given)
        assert isinstance(err, APIError)
        assert err.status == 429
        assert err.code == "some_code"
        assert err.message == "over"
        assert err.headers == {"Retry-After": str(expected)}
        assert err.retry_after == expected
        assert isinstance(err.retry_after, int)


# -- period_bounds --------------------------------------------------------------------


def test_period_bounds_day() -> None:
    assert period_bounds("day", NOW) == (ts(2024, 3, 13), ts(2024, 3, 14))
    assert period_bounds("day", ts(2024, 3, 13)) == (ts(2024, 3, 13), ts(2024, 3, 14))  # midnight starts it
    assert period_bounds("day", ts(2024, 3, 13) - 0.001) == (ts(2024, 3, 12), ts(2024, 3, 13))
    assert period_bounds("day", ts(2023, 12, 31, 23, 59, 59)) == (ts(2023, 12, 31), ts(2024, 1, 1))


def test_period_bounds_week_starts_on_monday() -> None:
    monday, next_monday = ts(2024, 3, 11), ts(2024, 3, 18)
    assert datetime.fromtimestamp(monday, timezone.utc).weekday() == 0
    assert period_bounds("week", NOW) == (monday, next_monday)  # a Wednesday
    assert period_bounds("week", monday) == (monday, next_monday)  # Monday 00:00 itself
    assert period_bounds("week", ts(2024, 3, 17, 23, 59)) == (monday, next_monday)  # Sunday night
    assert period_bounds("week", next_monday) == (next_monday, ts(2024, 3, 25))
    # A week across a new year.
    assert period_bounds("week", ts(2025, 1, 1, 8)) == (ts(2024, 12, 30), ts(2025, 1, 6))


def test_period_bounds_month() -> None:
    assert period_bounds("month", NOW) == (ts(2024, 3, 1), ts(2024, 4, 1))
    assert period_bounds("month", ts(2024, 4, 30, 23, 59, 59)) == (ts(2024, 4, 1), ts(2024, 5, 1))
    # December rolls into January of the next year.
    assert period_bounds("month", ts(2023, 12, 15)) == (ts(2023, 12, 1), ts(2024, 1, 1))
    assert period_bounds("month", ts(2023, 12, 31, 23, 59, 59)) == (ts(2023, 12, 1), ts(2024, 1, 1))
    assert period_bounds("month", ts(2024, 1, 1)) == (ts(2024, 1, 1), ts(2024, 2, 1))
    # February: 29 days in a leap year, 28 otherwise.
    start, end = period_bounds("month", ts(2024, 2, 29, 12))
    assert (start, end) == (ts(2024, 2, 1), ts(2024, 3, 1))
    assert end - start == 29 * 86400
    start, end = period_bounds("month", ts(2023, 2, 10))
    assert (start, end) == (ts(2023, 2, 1), ts(2023, 3, 1))
    assert end - start == 28 * 86400


# -- budget ---------------------------------------------------------------------------


def test_concurrent_reservations_never_exceed_the_budget() -> None:
    limits, _, _ = make()
    conf = PrincipalConfig(budget=1.0)
    grants: list[Grant] = []
    with pytest.raises(LimitExceeded) as info:
        for _ in range(100):
            grants.append(limits.admit("alice", conf, 0.07, 10))
    err = info.value
    assert len(grants) == 14  # 14 * 0.07 = 0.98; a 15th would make 1.05
    assert sum(g.cost for g in grants) == 980_000 <= micro(conf.budget)
    assert err.status == 429
    assert err.code == "budget_exceeded"
    assert "'alice'" in err.message
    assert "of its 1 monthly budget left" in err.message
    assert "has 0.02 of its" in err.message  # what is left
    assert "0.98 held by requests in flight" in err.message
    assert "may cost up to 0.07" in err.message
    # Reservations are still held: they come back, so a retry soon may fit.
    assert retry_after(err) == 7
    snap = limits.snapshot("alice")
    assert snap["reserved"] == 0.98
    assert snap["spent"] == 0.0
    assert snap["concurrent"] == 14
    # A request that fits what is left is still admitted, exactly up to the budget.
    grants.append(limits.admit("alice", conf, 0.02, 10))
    assert limits.snapshot("alice")["reserved"] == 1.0
    assert refused(limits, "alice", conf, 0.000001, 10).code == "budget_exceeded"


@pytest.mark.parametrize("period, word", [("day", "daily"), ("week", "weekly"), ("month", "monthly")])
def test_budget_message_names_the_period(period: str, word: str) -> None:
    limits, _, _ = make(spent=0.75)
    conf = PrincipalConfig(budget=1.0, budget_period=period)  # type: ignore[arg-type]
    err = refused(limits, "bob", conf, 0.5, 1)
    assert err.code == "budget_exceeded"
    assert f"has 0.25 of its 1 {word} budget left (spent 0.75, 0 held by requests in flight)" in err.message


def test_settle_gives_the_reservation_back_and_counts_the_actual_cost() -> None:
    limits, _, _ = make()
    conf = PrincipalConfig(budget=1.0)
    grants = [limits.admit("alice", conf, 0.3, 10) for _ in range(3)]
    assert refused(limits, "alice", conf, 0.3, 10).code == "budget_exceeded"
    limits.settle(grants[0], 0.1, 5)
    snap = limits.snapshot("alice")
    assert snap["spent"] == 0.1
    assert snap["reserved"] == 0.6
    assert snap["concurrent"] == 2
    # 0.1 spent + 0.6 held + 0.3 = exactly the budget: room has come back.
    grants.append(limits.admit("alice", conf, 0.3, 10))
    assert refused(limits, "alice", conf, 0.000001, 10).code == "budget_exceeded"
    # Settling again does nothing.
    limits.settle(grants[0], 0.1, 5)
    assert limits.snapshot("alice")["spent"] == 0.1
    assert limits.snapshot("alice")["reserved"] == 0.9
    for g in grants[1:]:
        limits.settle(g, 0.0, 0)
    snap = limits.snapshot("alice")
    assert (snap["spent"], snap["reserved"], snap["concurrent"]) == (0.1, 0.0, 0)


def test_budget_spent_with_nothing_held_retries_at_the_end_of_the_period() -> None:
    limits, clock, _ = make(spent=1.0)
    conf = PrincipalConfig(budget=1.0, budget_period="day")
    err = refused(limits, "alice", conf, 0.01, 1)
    assert err.code == "budget_exceeded"
    assert "has 0 of its 1" in err.message
    assert retry_after(err) == 12 * 3600  # noon: midnight is when anything comes back
    clock.advance(12 * 3600 - 0.5)
    assert retry_after(refused(limits, "alice", conf, 0.01, 1)) == 1


def test_spent_is_seeded_from_the_ledger_for_the_current_period_once() -> None:
    limits, clock, ledger = make(spent=0.4)
    conf = PrincipalConfig(budget=1.0, budget_period="month")
    g = limits.admit("alice", conf, 0.5, 1)
    assert ledger.calls == [("alice", ts(2024, 3, 1))]
    snap = limits.snapshot("alice")
    assert snap["spent"] == 0.4
    assert (snap["period_start"], snap["period_end"]) == (ts(2024, 3, 1), ts(2024, 4, 1))
    # 0.4 spent + 0.5 held: another 0.2 does not fit.
    assert refused(limits, "alice", conf, 0.2, 1).code == "budget_exceeded"
    limits.settle(g, 0.5, 1)
    limits.admit("alice", conf, 0.1, 1)
    assert ledger.calls == [("alice", ts(2024, 3, 1))]  # asked once, not per request
    # The next period starts from zero; the ledger is not asked again.
    clock.t = ts(2024, 4, 2)
    limits.admit("alice", conf, 0.9, 1)
    assert limits.snapshot("alice")["spent"] == 0.0
    assert ledger.calls == [("alice", ts(2024, 3, 1))]
    # Each principal is asked for its own.
    limits.admit("carol", conf, 0.1, 1)
    assert ledger.calls == [("alice", ts(2024, 3, 1)), ("carol", ts(2024, 4, 1))]


def test_no_budget_means_the_ledger_is_never_asked() -> None:
    limits, _, ledger = make(spent=1e9)
    conf = PrincipalConfig()
    for _ in range(50):
        limits.settle(limits.admit("alice", conf, 1000.0, 1), 1000.0, 1)
    assert ledger.calls == []


def test_period_rollover_resets_spent_and_an_old_grant_does_not_count_in_the_new_period() -> None:
    limits, clock, _ = make()
    conf = PrincipalConfig(budget=1.0, budget_period="day")
    early = limits.admit("alice", conf, 0.3, 1)
    limits.settle(early, 0.3, 1)
    old = limits.admit("alice", conf, 0.6, 1)  # still in flight at midnight
    assert refused(limits, "alice", conf, 0.2, 1).code == "budget_exceeded"
    clock.t = ts(2024, 3, 14, 0, 0, 1)
    new = limits.admit("alice", conf, 0.2, 1)  # the first admit of the new day rolls over
    snap = limits.snapshot("alice")
    assert snap["spent"] == 0.0
    assert (snap["period_start"], snap["period_end"]) == (ts(2024, 3, 14), ts(2024, 3, 15))
    limits.settle(old, 0.6, 1)
    snap = limits.snapshot("alice")
    assert snap["spent"] == 0.0  # yesterday's cost stays in yesterday
    assert snap["reserved"] == 0.2  # but its reservation is given back
    limits.settle(new, 0.2, 1)
    assert limits.snapshot("alice")["spent"] == 0.2
    # The new day's whole budget is there again.
    limits.admit("alice", conf, 0.8, 1)
    assert refused(limits, "alice", conf, 0.000001, 1).code == "budget_exceeded"


def test_money_arithmetic_is_exact_in_millionths() -> None:
    limits, _, _ = make()
    conf = PrincipalConfig(budget=1.0)
    grants = [limits.admit("alice", conf, 0.001, 1) for _ in range(1000)]
    assert sum(0.001 for _ in range(1000)) != 1.0  # what float addition would have made of it
    assert limits.snapshot("alice")["reserved"] == 1.0
    assert refused(limits, "alice", conf, 0.000001, 1).code == "budget_exceeded"
    for g in grants:
        limits.settle(g, 0.001, 1)
    snap = limits.snapshot("alice")
    assert snap["spent"] == 1.0
    assert snap["reserved"] == 0.0
    assert snap["concurrent"] == 0
    assert limits.states["alice"].spent == MICRO


def test_a_tiny_cost_is_reserved_as_at_least_one_millionth() -> None:
    limits, _, _ = make()
    conf = PrincipalConfig(budget=0.000002)
    a = limits.admit("alice", conf, 0.0000001, 1)
    b = limits.admit("alice", conf, 0.0000001, 1)
    assert (a.cost, b.cost) == (1, 1)
    assert refused(limits, "alice", conf, 0.0000001, 1).code == "budget_exceeded"


# -- requests, tokens, requests in flight ---------------------------------------------


def test_requests_per_min_retry_after_is_when_the_oldest_leaves_the_window() -> None:
    limits, clock, _ = make()
    conf = PrincipalConfig(requests_per_min=3)
    for _ in range(3):
        limits.settle(limits.admit("alice", conf, 0, 1), 0, 1)
        clock.advance(10)  # requests at +0, +10, +20
    clock.t = NOW + 30
    err = refused(limits, "alice", conf, 0, 1)
    assert err.code == "requests_per_min_exceeded"
    assert "'alice'" in err.message and "3 requests per minute" in err.message
    assert retry_after(err) == 30  # the one at +0 leaves at +60
    clock.t = NOW + 59.5
    assert retry_after(refused(limits, "alice", conf, 0, 1)) == 1
    clock.t = NOW + 60  # exactly a minute later the oldest has left
    limits.settle(limits.admit("alice", conf, 0, 1), 0, 1)
    assert limits.snapshot("alice")["requests_last_min"] == 3
    clock.t = NOW + 61
    assert retry_after(refused(limits, "alice", conf, 0, 1)) == 9  # now +10 is the oldest
    # Refusals do not count as requests.
    assert limits.snapshot("alice")["requests_last_min"] == 3
    # Principals are counted apart.
    limits.admit("bob", conf, 0, 1)


def test_a_request_larger_than_the_whole_token_limit_is_told_to_lower_max_tokens() -> None:
    limits, _, _ = make()
    conf = PrincipalConfig(tokens_per_min=1000)
    err = refused(limits, "alice", conf, 0, 1001)
    assert err.code == "tokens_per_min_exceeded"
    assert "up to 1001 tokens" in err.message
    assert "1000 tokens per minute" in err.message
    assert "lower max_tokens" in err.message
    assert retry_after(err) == 60
    limits.admit("alice", conf, 0, 1000)  # the whole limit is allowed


def test_tokens_per_min_settles_to_actual_usage_and_entries_leave_after_a_minute() -> None:
    limits, clock, _ = make()
    conf = PrincipalConfig(tokens_per_min=1000)
    first = limits.admit("alice", conf, 0, 600)
    clock.advance(1)
    err = refused(limits, "alice", conf, 0, 500)
    assert err.code == "tokens_per_min_exceeded"
    assert "over its limit of 1000 tokens per minute (this request may use up to 500)" in err.message
    assert retry_after(err) == 59  # when the 600 reserved at +0 leave
    limits.settle(first, 0, 300)  # it used less than its most
    assert limits.snapshot("alice")["tokens_last_min"] == 300
    clock.advance(1)
    second = limits.admit("alice", conf, 0, 500)  # +2: 300 + 500 fits
    assert limits.snapshot("alice")["tokens_last_min"] == 800
    limits.settle(second, 0, 700)  # or more (the prompt was counted short)
    assert limits.snapshot("alice")["tokens_last_min"] == 1000
    assert retry_after(refused(limits, "alice", conf, 0, 1)) == 58  # the +0 entry frees 300 at +60
    clock.t = NOW + 60
    limits.admit("alice", conf, 0, 300)
    assert limits.snapshot("alice")["tokens_last_min"] == 1000
    clock.t = NOW + 62  # the +2 entry leaves too
    limits.admit("alice", conf, 0, 0)
    assert limits.snapshot("alice")["tokens_last_min"] == 300


def test_a_grant_settled_after_its_tokens_left_the_window_changes_nothing() -> None:
    limits, clock, _ = make()
    conf = PrincipalConfig(tokens_per_min=1000)
    old = limits.admit("alice", conf, 0, 600)
    clock.advance(WINDOW_S + 1)
    new = limits.admit("alice", conf, 0, 400)  # evicts the old entry
    assert limits.snapshot("alice")["tokens_last_min"] == 400
    limits.settle(old, 0, 50)
    assert limits.snapshot("alice")["tokens_last_min"] == 400
    limits.settle(new, 0, 100)
    assert limits.snapshot("alice")["tokens_last_min"] == 100
    assert limits.states["alice"].token_sum == 100


def test_tokens_reserved_but_settled_before_eviction_leave_with_their_actual_count() -> None:
    limits, clock, _ = make()
    conf = PrincipalConfig(tokens_per_min=1000)
    g = limits.admit("alice", conf, 0, 900)
    clock.advance(WINDOW_S + 5)  # older than the window, but nothing has evicted it yet
    limits.settle(g, 0, 200)
    limits.admit("alice", conf, 0, 1000)  # evicts the 200 it became, not the 900 it was
    assert limits.states["alice"].token_sum == 1000
    assert limits.snapshot("alice")["tokens_last_min"] == 1000


def test_max_concurrent() -> None:
    limits, _, _ = make(retry_after_s=3)
    conf = PrincipalConfig(max_concurrent=2)
    a = limits.admit("alice", conf, 0, 1)
    limits.admit("alice", conf, 0, 1)
    err = refused(limits, "alice", conf, 0, 1)
    assert err.code == "concurrency_limit_exceeded"
    assert "already has 2 requests in flight (max_concurrent = 2)" in err.message
    assert retry_after(err) == 3
    limits.admit("bob", conf, 0, 1)  # another principal has its own
    limits.settle(a, 0, 1)
    limits.admit("alice", conf, 0, 1)
    assert limits.snapshot("alice")["concurrent"] == 2
    limits.settle(a, 0, 1)  # settling twice gives nothing more back
    assert refused(limits, "alice", conf, 0, 1).code == "concurrency_limit_exceeded"


def test_checks_run_concurrency_then_requests_then_tokens_then_budget() -> None:
    limits, _, _ = make()
    conf = PrincipalConfig(max_concurrent=2, requests_per_min=3, tokens_per_min=100, budget=1.0)
    g1 = limits.admit("alice", conf, 0.5, 60)
    g2 = limits.admit("alice", conf, 0.5, 40)
    # In flight, tokens and budget are all full (requests still have room).
    assert refused(limits, "alice", conf, 0.5, 40).code == "concurrency_limit_exceeded"
    limits.settle(g1, 0.5, 60)
    # Tokens and budget are both full.
    assert refused(limits, "alice", conf, 0.5, 40).code == "tokens_per_min_exceeded"
    assert refused(limits, "alice", conf, 0.5, 101).code == "tokens_per_min_exceeded"
    # Only the budget.
    assert refused(limits, "alice", conf, 0.5, 0).code == "budget_exceeded"
    limits.admit("alice", conf, 0.0, 0)  # the third request of the minute
    # Requests, tokens and budget full, two in flight: concurrency first.
    assert refused(limits, "alice", conf, 0.5, 40).code == "concurrency_limit_exceeded"
    limits.settle(g2, 0.5, 40)
    assert refused(limits, "alice", conf, 0.5, 40).code == "requests_per_min_exceeded"
    # Nothing refused took anything.
    snap = limits.snapshot("alice")
    assert snap["concurrent"] == 1
    assert snap["requests_last_min"] == 3
    assert snap["tokens_last_min"] == 100
    assert (snap["spent"], snap["reserved"]) == (1.0, 0.0)


def test_a_new_config_object_takes_effect_at_once() -> None:
    limits, _, _ = make()
    limits.admit("alice", PrincipalConfig(max_concurrent=1), 0, 1)
    assert refused(limits, "alice", PrincipalConfig(max_concurrent=1), 0, 1).code == "concurrency_limit_exceeded"
    limits.admit("alice", PrincipalConfig(max_concurrent=2), 0, 1)  # a reload raised it
    assert limits.snapshot("alice")["concurrent"] == 2


def test_snapshot_of_an_unknown_principal_is_empty() -> None:
    limits, _, _ = make()
    assert limits.snapshot("nobody") == {}


def test_retry_after_values_are_whole_seconds_rounded_up() -> None:
    limits, clock, _ = make()
    conf = PrincipalConfig(requests_per_min=1)
    limits.admit("alice", conf, 0, 1)
    clock.advance(0.25)
    err = refused(limits, "alice", conf, 0, 1)
    assert retry_after(err) == math.ceil(WINDOW_S - 0.25) == 60
