"""The document tools of the `onebox` command: ingest (copying into an inbox, then waiting
for the ingestion daemon), search, documents, and mcp (a Model Context Protocol server
on stdio, spoken to with the official SDK's own client). Real processes throughout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.types import CallToolResult, TextContent
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from tests.harness import Suite, clean_env, write_config

ONEBOX = [sys.executable, "-m", "daemons.ctl.main"]
ROOT = Path(__file__).resolve().parents[1]
GGUF = "all_minilm_l6_v2/all-MiniLM-L6-v2.f16.gguf"


def docs_config(directory: Path, extra: str = "") -> Path:
    return write_config(directory, extra=f'[collections.docs]\nfolder = "{directory / "inbox"}"\n' + extra)


def onebox(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ONEBOX + list(args), capture_output=True, text=True, env=clean_env(), cwd=ROOT,
                          timeout=timeout, check=False)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class Recorder(FileSystemEventHandler):
    """Every inotify event under a folder, as the ingestion daemon's watcher gets them."""

    def __init__(self) -> None:
        self.events: list[FileSystemEvent] = []
        self.lock = threading.Lock()

    def on_any_event(self, event: FileSystemEvent) -> None:
        with self.lock:
            self.events.append(event)


@contextmanager
def watching(folder: Path) -> Iterator[Recorder]:
    recorder = Recorder()
    observer = Observer()
    observer.schedule(recorder, str(folder), recursive=True)
    observer.start()
    try:
        yield recorder
    finally:
        time.sleep(0.3)  # let the last events arrive
        observer.stop()
        observer.join(5)


def test_every_new_command_has_help() -> None:
    for name in ("ingest", "search", "documents", "mcp"):
        r = onebox(name, "--help")
        assert r.returncode == 0, r.stderr
        assert f"usage: onebox {name}" in r.stdout
    top = onebox("--help")
    for name in ("ingest", "ingest-daemon", "search", "documents", "mcp"):
        assert name in top.stdout


def test_ingest_copies_keeping_structure_and_never_shows_half_a_file(fresh_dir: Path) -> None:
    config = docs_config(fresh_dir)
    src = fresh_dir / "papers"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / ".git").mkdir()
    (src / "a.md").write_text("# A\n\nalpha\n")
    (src / "sub" / "b.txt").write_bytes(os.urandom(3 << 20))  # big enough to be seen mid-write
    (src / "sub" / "deeper" / "c.txt").write_text("gamma\n")
    (src / ".hidden.txt").write_text("never copied\n")
    (src / ".git" / "config").write_text("never copied\n")
    single = fresh_dir / "single.txt"
    single.write_text("one file, named directly\n")

    r = onebox("ingest", str(src), str(single), "--no-wait", "--config", str(config))
    assert r.returncode == 0, r.stderr
    assert "copied 4 file(s)" in r.stdout
    inbox = fresh_dir / "inbox"
    assert tree(inbox) == {"papers/a.md": b"# A\n\nalpha\n", "papers/sub/b.txt": (src / "sub" / "b.txt").read_bytes(),
                           "papers/sub/deeper/c.txt": b"gamma\n", "single.txt": b"one file, named directly\n"}

    # Again, with one file changed and one added, while watching the inbox as the ingestion
    # daemon does: a name without a dot is only ever renamed into place, never written.
    before = {p: (inbox / p).stat().st_ino for p in tree(inbox)}
    (src / "sub" / "b.txt").write_bytes(os.urandom(3 << 20))
    (src / "sub" / "new.txt").write_text("added\n")
    with watching(inbox) as rec:
        r = onebox("ingest", str(src), str(single), "--no-wait", "--config", str(config))
    assert r.returncode == 0, r.stderr
    assert "copied 2 file(s)" in r.stdout and "(3 already there)" in r.stdout
    assert (inbox / "papers/sub/b.txt").read_bytes() == (src / "sub" / "b.txt").read_bytes()
    assert (inbox / "papers/sub/new.txt").read_text() == "added\n"
    after = {p: (inbox / p).stat().st_ino for p in tree(inbox)}
    for unchanged in ("papers/a.md", "papers/sub/deeper/c.txt", "single.txt"):
        assert after[unchanged] == before[unchanged], f"{unchanged} was copied again"
    assert not [p for p in inbox.rglob(".*")], "a temporary file was left behind"
    moved = set()
    for event in rec.events:
        if event.is_directory:
            continue
        name = Path(str(event.src_path)).name
        if event.event_type == "moved":
            assert name.startswith("."), event
            moved.add(Path(str(event.dest_path)).relative_to(inbox).as_posix())
        elif not name.startswith("."):
            # Reading a file to compare it is fine; writing under its real name is not.
            assert event.event_type in ("opened", "closed_no_write"), event
    assert moved == {"papers/sub/b.txt", "papers/sub/new.txt"}


def test_ingest_errors_say_what_is_wrong(fresh_dir: Path) -> None:
    config = docs_config(fresh_dir)
    (fresh_dir / "x.txt").write_text("x")
    r = onebox("ingest", str(fresh_dir / "x.txt"), "--collection", "nope", "--no-wait", "--config", str(config))
    assert r.returncode == 2
    assert "no collection 'nope' (configured: docs)" in r.stderr
    r = onebox("ingest", str(fresh_dir / "missing.txt"), "--no-wait", "--config", str(config))
    assert r.returncode == 2
    assert "missing.txt: no such file or folder" in r.stderr
    assert not (fresh_dir / "inbox").exists()
    (fresh_dir / "bare").mkdir()
    bare = write_config(fresh_dir / "bare")
    r = onebox("ingest", str(fresh_dir / "x.txt"), "--config", str(bare))
    assert r.returncode == 78
    assert "no [collections.NAME] configured" in r.stderr
    (fresh_dir / "bad.toml").write_text("[collections.docs]\nfolder = 5\n")
    r = onebox("ingest", str(fresh_dir / "x.txt"), "--config", str(fresh_dir / "bad.toml"))
    assert r.returncode == 78
    assert "collections.docs.folder" in r.stderr


def test_search_and_documents_without_a_router_name_the_socket(fresh_dir: Path) -> None:
    config = docs_config(fresh_dir)
    sock = fresh_dir / "run" / "api.sock"
    for args in (["search", "hello"], ["documents"]):
        r = onebox(*args, "--config", str(config))
        assert r.returncode == 69
        assert f"cannot reach the router at {sock}: is onebox-router running?" in r.stderr
    (fresh_dir / "x.txt").write_text("x")
    r = onebox("ingest", str(fresh_dir / "x.txt"), "--config", str(config))
    assert r.returncode == 69
    assert "copied 1 file(s)" in r.stdout
    assert f"cannot reach the router at {sock}" in r.stderr


# -- MCP ---------------------------------------------------------------------------------


def text_of(result: CallToolResult) -> str:
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


async def mcp_session(config: Path, errlog: Any, work: Any) -> Any:
    params = StdioServerParameters(command=sys.executable, args=["-m", "daemons.ctl.main", "mcp", "--config",
                                                                 str(config)], env=clean_env(), cwd=ROOT)
    with anyio.fail_after(60):
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            return await work(session)


def run_mcp(config: Path, directory: Path, work: Any) -> Any:
    """`work(session)` against `onebox mcp` run as a subprocess; its stderr in DIR/mcp.err."""
    with open(directory / "mcp.err", "w") as errlog:
        return anyio.run(mcp_session, config, errlog, work)


def test_mcp_lists_its_tools_and_a_missing_router_is_a_tool_error(fresh_dir: Path) -> None:
    config = docs_config(fresh_dir)

    async def work(session: ClientSession) -> dict[str, Any]:
        tools = {t.name: t for t in (await session.list_tools()).tools}
        searched = await session.call_tool("search", {"query": "hello"})
        fetched = await session.call_tool("fetch_document", {"document_id": 1})
        listed = await session.call_tool("list_collections", {})
        again = await session.list_tools()  # still serving after the failures
        return {"tools": tools, "search": searched, "fetch": fetched, "list": listed, "again": again}

    out = run_mcp(config, fresh_dir, work)
    tools = out["tools"]
    assert set(tools) == {"search", "fetch_document", "list_collections"}
    search = tools["search"].input_schema
    assert search["required"] == ["query"]
    assert search["properties"]["query"]["type"] == "string"
    assert search["properties"]["k"]["type"] == "integer" and search["properties"]["k"]["default"] == 5
    assert {"type": "string"} in search["properties"]["collection"]["anyOf"]
    fetch = tools["fetch_document"].input_schema
    assert fetch["required"] == ["document_id"] and fetch["properties"]["document_id"]["type"] == "integer"
    assert all(t.description for t in tools.values())

    sock = fresh_dir / "run" / "api.sock"
    for key in ("search", "fetch"):
        result: CallToolResult = out[key]
        assert result.is_error, result
        assert f"cannot reach the router at {sock}: is onebox-router running?" in text_of(result)
    listed: CallToolResult = out["list"]
    assert not listed.is_error
    assert f"docs: {fresh_dir / 'inbox'} (counts unavailable" in text_of(listed)
    assert len(out["again"].tools) == 3


# -- against a running suite --------------------------------------------------------------

DOC = """# Lighthouse keeping

## Lamps

The keeper trimmed the wick of the paraffin lamp every evening at dusk, so the light
would burn steadily through the night and ships could find the harbour entrance.

## Fog signals

When fog rolled in from the sea the keeper sounded the foghorn every thirty seconds.
"""


def test_search_and_documents_against_a_running_suite(fresh_dir: Path) -> None:
    """End to end: router + embed@minilm + the ingestion daemon; `onebox ingest` waits for
    the file to be indexed, then `onebox documents`, `onebox search` and the MCP tools
    find it."""
    extra = (f'[embeddings.minilm]\npath = "{GGUF}"\nthreads = 1\n'
             "[ingest]\nsettle_s = 0.2\nchunk_tokens = 64\nchunk_overlap = 8\n")
    config = docs_config(fresh_dir, extra)
    suite = Suite(fresh_dir, config)
    try:
        suite.start_router()
        suite.start_daemon("embed", "minilm")
        suite.start_daemon("ingest")
        source = fresh_dir / "lighthouse.md"
        source.write_text(DOC)
        dest = os.path.realpath(fresh_dir / "inbox" / "lighthouse.md")

        r = onebox("ingest", str(source), "--config", str(config), "--timeout", "120", timeout=180)
        assert r.returncode == 0, (r.stdout, r.stderr, suite.log_text("ingest"))
        assert "1 indexed, 0 quarantined" in r.stdout

        r = onebox("documents", "--json", "--config", str(config))
        assert r.returncode == 0, r.stderr
        listing = json.loads(r.stdout)
        (doc,) = [d for d in listing["data"] if os.path.realpath(d["path"]) == dest]
        assert doc["status"] == "indexed" and doc["collection"] == "docs" and doc["chunks"] >= 1
        r = onebox("documents", "--config", str(config))
        assert r.returncode == 0 and "lighthouse.md" in r.stdout and "counts:" in r.stdout

        r = onebox("search", "how did the keeper keep the lamp burning", "--json", "-k", "3",
                   "--collection", "docs", "--config", str(config))
        assert r.returncode == 0, r.stderr
        hits = json.loads(r.stdout)["data"]
        assert hits and os.path.realpath(hits[0]["path"]) == dest
        assert "paraffin" in hits[0]["text"]
        r = onebox("search", "foghorn", "--mode", "text", "--config", str(config))
        assert r.returncode == 0 and "1. [" in r.stdout and "foghorn" in r.stdout

        async def work(session: ClientSession) -> tuple[CallToolResult, CallToolResult]:
            found = await session.call_tool("search", {"query": "paraffin lamp", "k": 2})
            fetched = await session.call_tool("fetch_document", {"document_id": hits[0]["document_id"]})
            return found, fetched

        found, fetched = run_mcp(config, fresh_dir, work)
        assert not found.is_error, text_of(found)
        assert "lighthouse.md" in text_of(found) and "paraffin" in text_of(found)
        assert not fetched.is_error, text_of(fetched)
        assert "Fog signals" in text_of(fetched)
    finally:
        suite.stop()
