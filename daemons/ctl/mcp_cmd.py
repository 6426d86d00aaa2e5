"""`onebox mcp`: a Model Context Protocol server on stdio, so an MCP client (an editor, a
desktop assistant) can search the box's documents and read them with citations.

stdout is the protocol: everything else, logs included, goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from daemons import __version__
from daemons.config import Config, ConfigError
from daemons.ctl import api
from daemons.ctl.api import API, APIError, Endpoint
from daemons.ctl.search_cmd import cite

log = logging.getLogger(__name__)

INSTRUCTIONS = ("Documents indexed on this box by onebox. Use `search` to find passages (each comes with its "
                "citation and document id), `fetch_document` to read a whole document, `list_collections` to "
                "see which collections exist. Cite the title and path of what you use.")
READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)


def render_hits(hits: list[dict[str, Any]]) -> str:
    if not hits:
        return "No matching passages."
    return "\n\n".join(f"[{h.get('rank')}] {cite(h)} (document_id {h.get('document_id')}, score "
                       f"{float(h.get('score') or 0):.4f})\n{h.get('text') or ''}" for h in hits)


def build(client: API, config: Config | None) -> MCPServer[Any]:
    server: MCPServer[Any] = MCPServer("onebox", version=__version__, instructions=INSTRUCTIONS)

    def call(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except APIError as exc:
            raise ToolError(exc.message) from None  # the SDK names the tool

    @server.tool(annotations=READ_ONLY, structured_output=False)
    def search(query: Annotated[str, Field(description="what to look for, in words")],
               collection: Annotated[str | None, Field(description="one collection only (default: all)")] = None,
               k: Annotated[int, Field(description="how many passages", ge=1)] = 5) -> str:
        """Search the documents indexed on this box (vector and full-text, fused). Returns the
        best passages, each with its citation (title, path, pages, section) and document_id."""
        body = call(client.search, query, collection, k)
        return render_hits(list(body.get("data") or []))

    @server.tool(annotations=READ_ONLY, structured_output=False)
    def fetch_document(document_id: Annotated[int, Field(description="a document_id from search")]) -> str:
        """A whole document as markdown (pages marked with <!-- page N --> where it has pages)."""
        text: str = call(client.content, document_id)
        return text

    @server.tool(annotations=READ_ONLY, structured_output=False)
    def list_collections() -> str:
        """The collections (inbox folders) on this box and how many documents each holds, by status."""
        if config is None:
            raise ToolError("no config was read (onebox mcp was started with --url only); "
                            "start it with --config to list collections")
        lines = []
        for name, folder in config.collection_dirs().items():
            try:
                counts = client.documents_page(collection=name, limit=1).get("counts") or {}
                summary = ", ".join(f"{k} {v}" for k, v in counts.items()) or "empty"
            except APIError as exc:
                summary = f"counts unavailable: {exc.message}"
            lines.append(f"{name}: {folder} ({summary})")
        return "\n".join(lines) or "No collections are configured."

    return server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="onebox mcp",
        description=("Serve the Model Context Protocol on stdin/stdout for an MCP client: tools search, "
                     "fetch_document and list_collections over the router's API. Logs go to stderr."),
    )
    api.add_arguments(p)
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="stderr logging (default: warning)")
    args = p.parse_args(argv)
    # Before the server is built: it would otherwise install its own handler.
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="onebox mcp: %(levelname)s %(name)s: %(message)s")
    try:
        # With --url alone the router may be on another box: the config is optional then.
        config = api.load_config(args.config) if (args.config or not args.url) else None
    except ConfigError as exc:
        return api.failure("onebox mcp", exc)
    with API(Endpoint.of(config, args.url)) as client:
        log.info("serving MCP on stdio for the router at %s", client.endpoint)
        build(client, config).run("stdio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
