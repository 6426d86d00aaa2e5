"""Logging of dropped malformed messages, at most one line a second, with a count."""

from __future__ import annotations

import logging
import time


class DropLog:
    def __init__(self, log: logging.Logger, what: str, every_s: float = 1.0) -> None:
        self.log = log
        self.what = what
        self.every_s = every_s
        self.dropped = 0
        self._last = 0.0

    def drop(self, peer: str, reason: str) -> None:
        # A flood of junk must not flood the journal.
        self.dropped += 1
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self.log.warning("dropped malformed %s from %s: %s (%d dropped since last report)",
                             self.what, peer, reason, self.dropped)
            self.dropped = 0
            self._last = now
