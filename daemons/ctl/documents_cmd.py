"""`onebox documents`: list the files the ingestion daemon knows (GET /v1/documents, every
page) with their status, and the counts per status."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from daemons.config import ConfigError
from daemons.ctl import api
from daemons.ctl.api import APIError
from daemons.index.schema import STATES

COLUMNS = ("id", "status", "chunks", "collection", "path", "reason")
REASON_CHARS = 80


def cell(doc: dict[str, Any], column: str) -> str:
    value = doc.get(column)
    text = "" if value is None else " ".join(str(value).split())
    return text[:REASON_CHARS - 3] + "..." if column == "reason" and len(text) > REASON_CHARS else text


def table(docs: list[dict[str, Any]]) -> str:
    rows = [list(COLUMNS)] + [[cell(d, c) for c in COLUMNS] for d in docs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def counts_line(counts: dict[str, Any]) -> str:
    if not counts:
        return "counts: none"
    return "counts: " + ", ".join(f"{k} {v if isinstance(v, (int, float, str)) else json.dumps(v)}"
                                  for k, v in counts.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="onebox documents",
        description=("List the documents in the index and the inbox files waiting for it: id, status (queued, "
                     "processing, indexed, quarantined), chunks, collection, path and why a file was quarantined."),
    )
    p.add_argument("--collection", help="this [collections.NAME] only")
    p.add_argument("--status", choices=STATES, help="this status only")
    p.add_argument("--limit", type=int, metavar="N", help="list at most N (default: all)")
    p.add_argument("--json", action="store_true", help='print {"object", "data": [every document], "counts"} as JSON')
    api.add_arguments(p)
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit: must be at least 1")
    try:
        with api.connect(args.config, args.url) as client:
            docs, counts = client.documents(args.collection, args.status, args.limit)
    except (ConfigError, APIError) as exc:
        return api.failure("onebox documents", exc)
    if args.json:
        print(json.dumps({"object": "list", "data": docs, "counts": counts}, indent=2, ensure_ascii=False))
    else:
        if docs:
            print(table(docs))
        print(counts_line(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
