"""Reading ledger.db: usage reports (`onebox usage`, GET /v1/usage) and the times they take.

A report is one SQL aggregate over `calls` between two times: `since` inclusive, `until`
exclusive, so consecutive periods ("yesterday" up to "today") never count a call twice.
Days are UTC days, like the budget periods: a report and a budget always agree on what
"today" holds, whatever the box's time zone.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from daemons.ledger.schema import open_ledger
from daemons.store import Database

By = Literal["principal", "model", "day", "provider"]

# What each grouping groups on. `model` is the name the client asked for (the one it
# knows); `served_by` differs only after a fallback and stays in the rows themselves.
_GROUP_SQL: dict[str, str] = {
    "principal": "principal",
    "model": "model",
    "provider": "provider",
    "day": "strftime('%Y-%m-%d', at, 'unixepoch')",
}

# NULL tokens (a call that failed before the answer said) count as none; averages skip
# NULLs, so avg_ttft_s is over the calls that had a first token.
_AGGREGATES = """count(*) AS calls,
  coalesce(sum(status >= 400), 0) AS errors,
  coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
  coalesce(sum(completion_tokens), 0) AS completion_tokens,
  coalesce(sum(cached_tokens), 0) AS cached_tokens,
  coalesce(sum(cost), 0.0) AS cost,
  avg(ttft_s) AS avg_ttft_s,
  avg(duration_s) AS avg_duration_s"""

_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _where(since: float | None, until: float | None) -> tuple[str, list[float]]:
    clauses: list[str] = []
    args: list[float] = []
    if since is not None:
        clauses.append("at >= ?")
        args.append(since)
    if until is not None:
        clauses.append("at < ?")
        args.append(until)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


def _typed(row: dict[str, Any]) -> dict[str, Any]:
    """SQLite's loose types made exact: counts int, money and times float (or None)."""
    for k in ("calls", "errors", "prompt_tokens", "completion_tokens", "cached_tokens"):
        row[k] = int(row[k])
    row["cost"] = float(row["cost"])
    for k in ("avg_ttft_s", "avg_duration_s"):
        row[k] = None if row[k] is None else float(row[k])
    return row


def usage(db: Database, since: float | None, until: float | None, by: By) -> list[dict[str, Any]]:
    """One row per group (the group under the key `by`; a day as YYYY-MM-DD, UTC) with
    calls, errors (status >= 400), the token sums, cost, avg_ttft_s and avg_duration_s;
    the costliest first, or by day in order."""
    group = _GROUP_SQL.get(by)
    if group is None:
        raise ValueError(f"usage by {by!r}: expected one of {', '.join(_GROUP_SQL)}")
    where, args = _where(since, until)
    order = f"{by} ASC" if by == "day" else f"cost DESC, {by} ASC"
    sql = f"SELECT {group} AS {by}, {_AGGREGATES} FROM calls{where} GROUP BY 1 ORDER BY {order}"
    return [_typed(r) for r in db.rows(sql, args)]


def totals(db: Database, since: float | None, until: float | None) -> dict[str, Any]:
    """The same sums over every call in the period (calls 0 and averages None if none)."""
    where, args = _where(since, until)
    rows = db.rows(f"SELECT {_AGGREGATES} FROM calls{where}", args)
    return _typed(rows[0])


def report(path: Path, since: float, until: float | None, by: By, currency: str) -> dict[str, Any]:
    """The usage answer (GET /v1/usage and `onebox usage` give the same): the rows by
    `by` and the totals, read from the ledger at `path` in one read-only connection."""
    db = open_ledger(path, readonly=True)
    try:
        return {"object": "usage", "since": since, "until": until, "by": by, "currency": currency,
                "data": usage(db, since, until, by), "total": totals(db, since, until)}
    finally:
        db.close()


def parse_since(text: str, now: float) -> float:
    """A time as people type it, as unix time: "today" and "yesterday" (their start, UTC),
    a duration back from `now` ("90s", "30m", "24h", "7d", "2w"), a date ("2026-11-01",
    its start in UTC) or an ISO datetime ("2026-11-01T09:30", UTC unless it carries an
    offset such as "+02:00" or "Z")."""
    s = text.strip().lower()
    day_start = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if s == "today":
        return day_start.timestamp()
    if s == "yesterday":
        return (day_start - timedelta(days=1)).timestamp()
    m = _DURATION.fullmatch(s)
    if m:
        return now - int(m.group(1)) * _UNIT_S[m.group(2)]
    # Only things that start like a date go to fromisoformat, which also reads forms
    # ("20261101", week dates) nobody types for this; a clear error beats a surprise.
    if re.match(r"\d{4}-\d{2}-\d{2}", s):
        try:
            when = datetime.fromisoformat(text.strip())
        except ValueError as exc:
            raise ValueError(f"cannot read {text!r} as a date or time: {exc}") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    raise ValueError(f"cannot read {text!r} as a time: expected today, yesterday, a duration back from now "
                     "(30m, 24h, 7d, 2w), a date (2026-11-01) or an ISO datetime (2026-11-01T09:30, "
                     "UTC unless it ends with an offset such as +02:00)")
