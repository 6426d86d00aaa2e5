"""The router's read-only view of index.db (written by the ingestion daemon)."""

from __future__ import annotations

from pathlib import Path

from daemons.index.schema import MIGRATIONS
from daemons.router.errors import APIError
from daemons.store import Database, StoreError, ThreadLocal


class Index:
    """The router's read-only view of index.db, opened on first use (the ingestion daemon
    creates it, possibly after the router started)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conns: ThreadLocal | None = None

    def db(self) -> Database:
        if self._conns is None:
            if not self.path.exists():
                raise APIError(503, "the document index does not exist yet (is onebox-ingest running?)",
                               "index_unavailable")
            self._conns = ThreadLocal(self.path, MIGRATIONS)
        try:
            return self._conns.get()
        except StoreError as exc:
            raise APIError(503, f"the document index cannot be read: {exc}", "index_unavailable") from None

    def close(self) -> None:
        if self._conns is not None:
            self._conns.close()

