"""The KV-cell ledger of the batch engine: which cells each sequence holds, which
finished sequences are kept as cached prefixes, which sequence ids are free, and what
running sequences have reserved. It makes the matching llama_memory calls (`seq_cp`,
`seq_rm`) itself, so the books and llama.cpp's pool never disagree.

Cells are accounted in a `PrefixTree` (daemons/infer/prefix.py): a prefix held by
several sequences counts once. A running sequence reserves cells up to its
`reserve_target` (prompt + output reservation); the cells it has not taken yet are
`future()`, and admission only promises what is left (`free_for_admission`).
Cached prefixes are evicted least recently used first, or when unused for
`cache_forget_tokens` decoded tokens.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Protocol

from daemons.infer.prefix import Match, Node, PrefixTree

log = logging.getLogger(__name__)


class Memory(Protocol):
    """What the ledger needs of a llama context (daemons/infer/native.Context)."""

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None: ...

    def seq_rm(self, seq: int) -> None: ...


class Holder(Protocol):
    """A running sequence, as the ledger sees it."""

    id: int
    reserve_target: int


class KvLedger:
    def __init__(self, mem: Memory, n_cells: int, n_seq_max: int, cached_max: int, n_swa: int = 0) -> None:
        self.mem = mem
        self.n_cells = n_cells
        self.cached_max = cached_max
        self.tree = PrefixTree(n_swa=n_swa)
        # Cached prefixes, least recently used first, each with the decoded-token count
        # at its last use.
        self.cached: OrderedDict[int, int] = OrderedDict()
        self.free_ids = list(range(n_seq_max - 1, -1, -1))

    @property
    def cache_on(self) -> bool:
        return self.cached_max > 0

    @property
    def used(self) -> int:
        return self.tree.used

    def length(self, seq: int) -> int:
        return self.tree.length(seq)

    # -- reservations ----------------------------------------------------------------

    def future(self, running: Iterable[Holder]) -> int:
        """Cells running sequences may still take within their reservations."""
        return sum(max(0, s.reserve_target - self.tree.length(s.id)) for s in running)

    def free_for_admission(self, running: Iterable[Holder]) -> int:
        return self.n_cells - self.tree.used - self.future(running)

    def evictable(self, keep: Node | None = None) -> int:
        """Cells that evicting every cached prefix would free (sparing `keep`'s path)."""
        return self.tree.evictable(set(self.cached), keep)

    # -- sequence ids --------------------------------------------------------------------

    def take_id(self) -> int:
        assert self.free_ids, "no free sequence id"
        return self.free_ids.pop()

    # -- sharing -----------------------------------------------------------------------

    def match(self, seq: int | None, tokens: list[int], limit: int) -> Match | None:
        return self.tree.match(seq, tokens, limit) if self.cache_on else None

    def attach(self, seq: int, m: Match, decoded: int) -> int:
        """Make `seq` hold the matched cells (seq_cp); returns how many it gained."""
        start = self.tree.length(seq)
        src = self.tree.attach(seq, m)
        if src is None:
            return 0
        self.mem.seq_cp(src, seq, start, m.length)
        for holder in m.node.holders:
            if holder in self.cached:
                self.cached.move_to_end(holder)
                self.cached[holder] = decoded
        return m.length - start

    def append(self, seq: int, tokens: list[int]) -> None:
        self.tree.append(seq, tokens)

    # -- freeing -------------------------------------------------------------------------

    def evict_one(self) -> int:
        """Drop the least recently used cached prefix; returns the cells freed."""
        sid, _ = self.cached.popitem(last=False)
        return self._drop(sid)

    def evict_all(self) -> None:
        while self.cached:
            self.evict_one()

    def release(self, seq: int, keep: bool, decoded: int) -> int:
        """A sequence stops running: keep its cells as a cached prefix, or free them.
        Returns the cells freed now."""
        if keep and self.cache_on and self.tree.length(seq):
            self.cached[seq] = decoded
            freed = 0  # keeping it may push the least recently used prefix out
            while len(self.cached) > self.cached_max:
                freed += self.evict_one()
            return freed
        return self._drop(seq)

    def _drop(self, seq: int) -> int:
        freed = self.tree.remove(seq)
        self.mem.seq_rm(seq)
        self.free_ids.append(seq)
        return freed

    def make_room(self, running: Iterable[Holder], need: int) -> bool:
        """Evict cached prefixes until `need` cells beyond every reservation are free;
        False if even an empty cache leaves too few."""
        holders = list(running)
        while self.free_for_admission(holders) < need:
            if not self.cached:
                return False
            self.evict_one()
        return True

    def forget_stale(self, decoded: int, limit: int) -> None:
        """Drop cached prefixes unused for `limit` decoded tokens: each step's attention
        runs over every cell up to the highest in use, theirs too, and a reuse grows
        less likely with time."""
        while limit and self.cached:
            sid, last_used = next(iter(self.cached.items()))  # the least recently used
            if decoded - last_used <= limit:
                return
            log.debug("forgetting cached sequence %d (%d cells; unused for %d decoded tokens)",
                      sid, self.tree.length(sid), decoded - last_used)
            self.evict_one()

    def snapshot(self, running: Iterable[Holder]) -> dict[str, Any]:
        used = self.tree.used
        return {"total": self.n_cells, "used": used, "free": self.n_cells - used,
                "cached": self.evictable(), "reserved": self.future(running)}
