"""`onebox search "QUERY"`: ask POST /v1/search and print the ranked chunks."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Any

from daemons.config import ConfigError
from daemons.ctl import api
from daemons.ctl.api import APIError

SNIPPET_CHARS = 300


def pages(hit: dict[str, Any]) -> str:
    first, last = hit.get("page"), hit.get("page_end")
    if first is None:
        return ""
    return f"p. {first}" if last in (None, first) else f"pp. {first}-{last}"


def cite(hit: dict[str, Any]) -> str:
    """Where a chunk comes from: title, path, pages, heading."""
    parts = [str(hit.get("title") or hit.get("path") or f"document {hit.get('document_id')}")]
    if hit.get("path") and hit.get("path") != hit.get("title"):
        parts.append(str(hit["path"]))
    if pages(hit):
        parts.append(pages(hit))
    if hit.get("heading"):
        parts.append(f"section {hit['heading']!r}")
    return ", ".join(parts)


def snippet(text: str, width: int = SNIPPET_CHARS) -> str:
    return textwrap.shorten(" ".join(text.split()), width=width, placeholder=" ...")


def render(hits: list[dict[str, Any]]) -> str:
    if not hits:
        return "no results"
    lines = []
    for hit in hits:
        lines.append(f"{hit.get('rank')}. [{float(hit.get('score') or 0):.4f}] {cite(hit)}")
        lines.append(textwrap.indent(textwrap.fill(snippet(str(hit.get("text") or "")), 88), "   "))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="onebox search",
        description="Search the indexed documents (POST /v1/search) and print the best chunks with where they come from.",
    )
    p.add_argument("query", metavar="QUERY")
    p.add_argument("--collection", help="search this [collections.NAME] only (default: all)")
    p.add_argument("-k", type=int, metavar="N", help="how many chunks (default: the router's)")
    p.add_argument("--mode", choices=["hybrid", "vector", "text"],
                   help="vectors and full text fused (hybrid), or either alone (default: [search] mode)")
    p.add_argument("--json", action="store_true", help="print the API's JSON answer as it is")
    api.add_arguments(p)
    args = p.parse_args(argv)
    try:
        with api.connect(args.config, args.url) as client:
            body = client.search(args.query, args.collection, args.k, args.mode)
    except (ConfigError, APIError) as exc:
        return api.failure("onebox search", exc)
    print(json.dumps(body, indent=2, ensure_ascii=False) if args.json else render(list(body.get("data") or [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
