"""`onebox usage`: what the ledger says each principal, model, provider or day used and
cost. From the router's /v1/usage (admins), else from ledger.db directly."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from daemons.config import ConfigError
from daemons.ctl import api
from daemons.ctl.api import APIError
from daemons.ledger import parse_since, report
from daemons.ledger.files import ledger_path
from daemons.store import StoreError

SECTIONS = ("paths", "collections", "costs")
NUMBERS = ("calls", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "cost", "avg_ttft_s",
           "avg_duration_s")


def fmt(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if column == "cost":
        return f"{float(value):.6f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def table(rows: list[dict[str, Any]], total: dict[str, Any], by: str) -> str:
    columns = (by, *NUMBERS)
    lines = [list(columns)] + [[fmt(r.get(c), c) for c in columns] for r in rows]
    lines.append(["total", *[fmt(total.get(c), c) for c in NUMBERS]])
    widths = [max(len(r[i]) for r in lines) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()
                     for r in lines)


def fetch(args: argparse.Namespace) -> dict[str, Any]:
    now = time.time()
    since, until = parse_since(args.since, now), (parse_since(args.until, now) if args.until else None)
    config = api.load_config(args.config, SECTIONS) if not args.url else None
    params = {"since": args.since, "by": args.by, **({"until": args.until} if args.until else {})}
    try:
        with api.API(api.Endpoint.of(config, args.url)) as client:
            result: dict[str, Any] = client.json("GET", "/v1/usage", params=params)
            return result
    except APIError as exc:
        if exc.reachable or config is None:
            raise
    path = ledger_path(config)
    if not path.exists():
        raise APIError(f"the router is not answering and there is no ledger at {path}")
    return report(path, since, until, args.by, config.costs.currency)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="onebox usage",
        description="What the ledger (ledger.db: one row per call) says was used and what it cost, grouped by "
                    "principal, model, provider or day (UTC).")
    p.add_argument("--since", default="today", help='from when: today (default), yesterday, 30m, 24h, 7d, '
                                                    '2026-11-01 or an ISO time (UTC unless it has an offset)')
    p.add_argument("--until", help="up to when (same forms; default: now)")
    p.add_argument("--by", choices=("principal", "model", "provider", "day"), default="principal",
                   help="group by (default: principal)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    api.add_arguments(p)
    args = p.parse_args(argv)
    try:
        report = fetch(args)
    except ValueError as exc:
        p.error(str(exc))
    except (ConfigError, APIError) as exc:
        return api.failure("onebox usage", exc)
    except StoreError as exc:
        print(f"onebox usage: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"usage since {time.strftime('%Y-%m-%d %H:%M', time.gmtime(report['since']))}Z, "
              f"cost in {report.get('currency', '')}")
        print(table(report["data"], report["total"], args.by))
    return 0


if __name__ == "__main__":
    sys.exit(main())
