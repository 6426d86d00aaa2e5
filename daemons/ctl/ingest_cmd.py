"""`onebox ingest PATH...`: copy files into a collection's inbox folder, then wait until
the ingestion daemon (`onebox ingest-daemon`) has indexed or quarantined each one."""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from daemons.config import Config, ConfigError
from daemons.ctl import api
from daemons.ctl.api import API, APIError, Endpoint

EX_USAGE = 2
POLL_S = 0.5
# A record of a path from before this copy counts only if no older than this (clock skew).
SLACK_S = 1.0


class UsageError(Exception):
    pass


@dataclass(frozen=True)
class Copied:
    source: Path
    dest: Path  # resolved, as the API's `path` is compared
    sha256: str
    at: float  # wall clock, as the API's updated_at


def pick_collection(config: Config, name: str | None) -> tuple[str, Path]:
    dirs = config.collection_dirs()
    if not dirs:
        raise ConfigError(f"{config.source}: no [collections.NAME] configured: add one with a folder to copy into")
    if name is None:
        name = next(iter(dirs))
    if name not in dirs:
        raise UsageError(f"no collection {name!r} (configured: {', '.join(dirs)})")
    return name, dirs[name]


def walk(top: Path, skip: Path) -> Iterator[Path]:
    """Files under `top`, sorted, leaving out dot-files, dot-folders and the inbox itself."""
    for folder, dirnames, filenames in os.walk(top):
        here = Path(folder)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() != skip)
        for name in sorted(filenames):
            if not name.startswith("."):
                yield here / name


def plan(paths: list[Path], inbox: Path) -> list[tuple[Path, Path]]:
    """(source, destination) for every file named or under a folder named; a folder keeps
    its own name and its structure under the inbox, as `cp -r` would."""
    inbox_real = inbox.resolve()
    pairs: list[tuple[Path, Path]] = []
    for path in paths:
        if path.is_dir():
            base = inbox / path.resolve().name
            pairs += [(f, base / f.relative_to(path)) for f in walk(path, inbox_real)]
        elif path.is_file():
            pairs.append((path, inbox / path.name))
        elif path.exists():
            raise UsageError(f"{path}: not a regular file or a folder")
        else:
            raise UsageError(f"{path}: no such file or folder")
    seen: dict[Path, Path] = {}
    for source, dest in pairs:
        if dest in seen:
            raise UsageError(f"{seen[dest]} and {source} would both be copied to {dest}")
        seen[dest] = source
    return pairs


def copy_atomic(source: Path, dest: Path) -> str:
    """Copy under a dot-name in the target folder, then rename into place: the watcher
    ignores dot-files, so it never sees half a file. Returns the copy's sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(4)}.part"
    try:
        shutil.copyfile(source, tmp)
        with open(tmp, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            os.fsync(f.fileno())  # the rename must not reach the disk before the bytes
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


def copy_all(pairs: list[tuple[Path, Path]]) -> tuple[list[Copied], int]:
    """The files copied, and how many were already there with the same bytes."""
    copied: list[Copied] = []
    same = 0
    for source, dest in pairs:
        if dest.is_dir():
            raise UsageError(f"{dest}: is a folder in the inbox, cannot copy {source} over it")
        if dest.is_file() and filecmp.cmp(source, dest, shallow=False):
            same += 1
            continue
        at = time.time()
        digest = copy_atomic(source, dest)
        copied.append(Copied(source, Path(os.path.realpath(dest)), digest, at))
    return copied, same


def settled(doc: dict[str, Any], copy: Copied) -> bool:
    """Whether the API's record of the copy's path is final and about this copy, not a
    file that was at that path before."""
    if doc.get("status") not in ("indexed", "quarantined"):
        return False
    if doc.get("sha256"):
        return bool(doc["sha256"] == copy.sha256)
    return float(doc.get("updated_at") or 0) >= copy.at - SLACK_S


def wait(client: API, collection: str, copied: list[Copied], timeout: float) -> int:
    pending = {c.dest: c for c in copied}
    results: dict[Path, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    last_error = ""
    with tqdm(total=len(copied), unit="file", desc="indexing", file=sys.stderr,
              disable=not sys.stderr.isatty()) as bar:
        while pending:
            try:
                docs, _ = client.documents(collection=collection)
                last_error = ""
            except APIError as exc:
                if not exc.reachable or exc.status != 503:
                    raise
                last_error = exc.message  # e.g. the index not created yet: the daemon is starting
                docs = []
            for doc in docs:
                path = Path(os.path.realpath(str(doc.get("path", ""))))
                copy = pending.get(path)
                if copy is not None and settled(doc, copy):
                    del pending[path]
                    results[path] = doc
                    bar.update(1)
                    if doc["status"] == "quarantined":
                        tqdm.write(f"quarantined: {path}: {doc.get('reason') or 'no reason given'}")
            remaining = deadline - time.monotonic()
            if not pending or remaining <= 0:
                break
            time.sleep(min(POLL_S, remaining))
    indexed = sum(1 for d in results.values() if d["status"] == "indexed")
    quarantined = len(results) - indexed
    print(f"{indexed} indexed, {quarantined} quarantined" + (f", {len(pending)} not done" if pending else ""))
    if pending:
        print(f"onebox ingest: timed out after {timeout:g} s; still waiting for:", file=sys.stderr)
        for path in pending:
            print(f"  {path}", file=sys.stderr)
        if last_error:
            print(f"  (last answer: {last_error})", file=sys.stderr)
        return EX_USAGE
    return 1 if quarantined else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="onebox ingest",
        description=("Copy files into a collection's inbox folder (folders recursively, keeping their structure, "
                     "leaving out dot-files; a file already there with the same bytes is not copied again), then "
                     "wait until the ingestion daemon has indexed or quarantined each one, showing progress."),
        epilog=("Exit status: 0 all indexed, 1 some quarantined (or the router refused), 2 timed out or bad "
                "arguments, 69 the router cannot be reached, 78 config error."),
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders to copy in")
    p.add_argument("--collection", help="the [collections.NAME] to copy into (default: the first configured)")
    p.add_argument("--no-wait", action="store_true", help="copy and return; do not wait for indexing")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="give up waiting after this long (default: 3600)")
    api.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = api.load_config(args.config)
        collection, inbox = pick_collection(config, args.collection)
        pairs = plan(args.paths, inbox)
        copied, same = copy_all(pairs)
    except ConfigError as exc:
        return api.failure("onebox ingest", exc)
    except UsageError as exc:
        print(f"onebox ingest: {exc}", file=sys.stderr)
        return EX_USAGE
    except OSError as exc:
        print(f"onebox ingest: {exc}", file=sys.stderr)
        return 1
    unchanged = f" ({same} already there)" if same else ""
    print(f"copied {len(copied)} file(s) into {inbox} (collection {collection}){unchanged}")
    if args.no_wait or not copied:
        return 0
    try:
        with API(Endpoint.of(config, args.url)) as client:
            return wait(client, collection, copied, args.timeout)
    except APIError as exc:
        return api.failure("onebox ingest", exc)


if __name__ == "__main__":
    sys.exit(main())
