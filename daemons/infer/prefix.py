"""Which KV cells each sequence holds: a token-prefix (radix) tree over physical cells.

Every node is a run of KV cells (one per token) that a set of sequences holds together;
a sequence holds exactly the nodes on its path from the root, so the cells in use are
the sum of the node lengths, with a shared prefix counted once. `llama_memory_seq_cp`
over [0, n) is what makes another sequence a holder of existing cells (unified KV: the
cells are shared, not copied); `llama_memory_seq_rm` drops a holder.

The tree does no llama calls: `attach()` says which sequence to copy from and the engine
makes the call. Cached prefixes are simply sequences that finished and were kept; the
engine decides which to evict (LRU) and when.

Sliding-window attention (Gemma 2/3, Mistral, ...): in its SWA layers llama.cpp reuses a
cell that only one sequence holds once it has slid out of that sequence's window, and
then drops that sequence's older positions too. So a sequence of length L may lack any
position below L - n_swa + 1 there, and `seq_cp` from it copies the gaps. `match()`
only offers a prefix some holder still has in full over the window the next token
attends to (the n_swa - 1 positions before it), and `attach()` copies from that holder.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class Node:
    __slots__ = ("tokens", "parent", "children", "holders", "start")

    def __init__(self, tokens: list[int], parent: Node | None, start: int, holders: set[int]) -> None:
        self.tokens = tokens
        self.parent = parent
        self.children: list[Node] = []
        self.holders = holders
        self.start = start  # position of tokens[0]

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    def path(self) -> list[Node]:
        """Root-exclusive path from the top down to this node."""
        out: list[Node] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            out.append(node)
            node = node.parent
        out.reverse()
        return out


@dataclass(frozen=True)
class Match:
    """Where a token list leaves the tree: `node` is matched for its first `offset`
    tokens (offset == len(node.tokens) when matched whole); `length` is the position
    reached (the number of cells that could be shared)."""

    node: Node
    offset: int
    length: int


class PrefixTree:
    def __init__(self, n_swa: int = 0) -> None:
        self.root = Node([], None, 0, set())
        self.leaf: dict[int, Node] = {}
        self.used = 0  # cells held by at least one sequence
        self.n_swa = n_swa  # the model's attention window; 0: none, every cell is kept

    # -- queries ---------------------------------------------------------------------

    def length(self, seq: int) -> int:
        """Cells (positions) sequence `seq` holds."""
        node = self.leaf.get(seq)
        return node.end if node is not None else 0

    def match(self, seq: int | None, tokens: Sequence[int], limit: int) -> Match:
        """The longest run of existing cells that continues where `seq` ends (from the
        root when `seq` is None or new) and equals tokens[start:limit]."""
        node = self.leaf.get(seq, self.root) if seq is not None else self.root
        pos = node.end
        best = Match(node, len(node.tokens), pos)
        while pos < limit:
            step: Match | None = None
            for child in node.children:
                n = 0
                room = min(len(child.tokens), limit - pos)
                toks = child.tokens
                while n < room and toks[n] == tokens[pos + n]:
                    n += 1
                if n and (step is None or n > step.offset):
                    step = Match(child, n, pos + n)
            if step is None:
                break
            best = step
            if step.offset < len(step.node.tokens):
                break
            node, pos = step.node, step.length
        return self._intact(best) if self.n_swa else best

    def _source(self, node: Node, length: int, exclude: int | None = None) -> int | None:
        """A holder of `node` whose cells are whole over the window before `length`
        (with no window: any holder)."""
        best = min((h for h in node.holders if h != exclude), key=self.length, default=None)
        if best is None or not self.n_swa:
            return best
        # Its gaps lie below length(best) - n_swa + 1; the window starts at length - n_swa + 1.
        return best if self.length(best) <= max(length, self.n_swa - 1) else None

    def _intact(self, m: Match) -> Match:
        """`m`, or failing that the longest match ending at a node boundary above it,
        that some holder can copy without gaps in the window."""
        node, length = m.node, m.length
        while node is not self.root and self._source(node, length) is None:
            assert node.parent is not None
            node, length = node.parent, node.start
        return m if node is m.node else Match(node, len(node.tokens), length)

    def evictable(self, cached: set[int], keep: Node | None = None) -> int:
        """Cells freed if every sequence in `cached` were dropped (sparing `keep`'s path)."""
        spared = set(map(id, keep.path())) if keep is not None else set()
        total = 0
        stack = list(self.root.children)
        while stack:
            node = stack.pop()
            if node.holders <= cached and id(node) not in spared:
                total += len(node.tokens)
            stack.extend(node.children)
        return total

    def holds(self, seq: int, node: Node) -> bool:
        return node is self.root or seq in node.holders

    # -- changes ---------------------------------------------------------------------

    def attach(self, seq: int, m: Match) -> int | None:
        """Make `seq` (which must end where `m` starts matching) a holder of the matched
        cells. Returns a sequence to copy them from (seq_cp(src, seq, start, m.length)),
        or None when nothing new was matched."""
        start = self.length(seq)
        if m.length <= start:
            return None
        node = m.node
        if m.offset < len(node.tokens):
            node = self._split(node, m.offset)
        src = self._source(node, m.length, exclude=seq)
        assert src is not None, "attach() of a match no holder can give"
        for n in node.path():
            n.holders.add(seq)
        self.leaf[seq] = node
        return src

    def append(self, seq: int, tokens: Iterable[int]) -> None:
        """`seq` decoded `tokens` into new cells after its current end."""
        toks = list(tokens)
        if not toks:
            return
        node = self.leaf.get(seq, self.root)
        if node is not self.root and node.holders == {seq} and not node.children:
            node.tokens.extend(toks)
        else:
            child = Node(toks, node, node.end, {seq})
            node.children.append(child)
            self.leaf[seq] = child
        self.used += len(toks)

    def remove(self, seq: int) -> int:
        """Drop `seq` as a holder everywhere; returns the cells that became free."""
        node = self.leaf.pop(seq, None)
        freed = 0
        while node is not None and node.parent is not None:
            node.holders.discard(seq)
            if not node.holders:
                node.parent.children.remove(node)
                freed += len(node.tokens)
            node = node.parent
        self.used -= freed
        return freed

    def _split(self, node: Node, offset: int) -> Node:
        """Cut `node` after `offset` tokens; returns the upper part (same holders)."""
        assert node.parent is not None and 0 < offset < len(node.tokens)
        upper = Node(node.tokens[:offset], node.parent, node.start, set(node.holders))
        parent = node.parent
        parent.children[parent.children.index(node)] = upper
        node.tokens = node.tokens[offset:]
        node.start = upper.end
        node.parent = upper
        upper.children.append(node)
        # Sequences whose leaf is `node` hold all of it and keep it as their leaf.
        return upper

    def check(self) -> None:
        """Invariants, for tests: holders shrink downwards, lengths add up."""
        total = 0
        stack: list[tuple[Node, set[int] | None]] = [(self.root, None)]
        while stack:
            node, parent_holders = stack.pop()
            if node is not self.root:
                total += len(node.tokens)
                assert node.holders, "empty node left in the tree"
                assert parent_holders is None or node.holders <= parent_holders
                assert node.parent is not None and node.start == node.parent.end
            for child in node.children:
                stack.append((child, node.holders if node is not self.root else None))
        assert total == self.used, (total, self.used)
        for seq, leaf in self.leaf.items():
            assert all(seq in n.holders for n in leaf.path())
