"""The prefix tree's cell accounting, without a model: a random walk of engine-like
operations checked against a brute-force model of which cells each sequence holds."""

from __future__ import annotations

import random

import pytest

from daemons.infer.prefix import PrefixTree


def test_shared_prefix_counts_once_and_frees_with_its_last_holder() -> None:
    t = PrefixTree()
    t.append(1, [5, 6, 7, 8])
    m = t.match(None, [5, 6, 7, 9, 9], 4)
    assert m.length == 3
    assert t.attach(2, m) == 1  # copy positions [0, 3) from sequence 1
    t.append(2, [9, 9])
    t.check()
    assert t.used == 6  # 5 6 7 shared, 8 for seq 1, 9 9 for seq 2
    assert t.length(1) == 4 and t.length(2) == 5
    assert t.evictable({1}) == 1 and t.evictable({1, 2}) == 6
    assert t.remove(1) == 1
    assert t.remove(2) == 5
    assert t.used == 0
    t.check()


def test_match_continues_from_a_sequence_and_respects_the_limit() -> None:
    t = PrefixTree()
    t.append(1, [1, 2, 3])
    t.append(1, [4, 5])  # extends its own node
    assert t.match(None, [1, 2, 3, 4, 5], 5).length == 5
    assert t.match(None, [1, 2, 3, 4, 5], 4).length == 4
    t.attach(2, t.match(None, [1, 2], 2))
    assert t.length(2) == 2
    assert t.match(2, [1, 2, 3, 4, 7], 5).length == 4
    t.check()


def test_sliding_window_offers_only_prefixes_a_holder_has_whole() -> None:
    # Window 4: a sequence of length L may have lost positions below L - 3 (llama.cpp
    # reuses cells that slid out of its window), so it can give a prefix of length p
    # only when L <= max(p, 3).
    t = PrefixTree(n_swa=4)
    t.append(1, [1, 2, 3])
    assert t.match(None, [1, 2, 9], 3).length == 2  # length 3: nothing slid out yet
    t.append(1, [4, 5, 6, 7, 8])  # length 8: positions 0..4 may be gone
    assert t.match(None, [1, 2, 3, 4, 5, 9], 6).length == 0
    assert t.match(None, [1, 2, 3, 4, 5, 6, 7, 8, 9], 9).length == 8  # all of it: window 5..7 is whole
    t.check()
    # Of several holders, the shortest gives the prefix.
    t2 = PrefixTree(n_swa=4)
    t2.append(1, [1, 2, 3, 4, 5, 6, 7, 8])
    t2.attach(2, t2.match(None, [1, 2, 3, 4, 5, 6, 7, 8], 8))  # seq 2 holds all 8, as long as seq 1
    t2.append(2, [9])
    follower = t2.match(None, [1, 2, 3, 4, 5, 6, 7, 8], 8)
    assert follower.length == 8 and t2.attach(3, follower) == 1  # seq 1 (length 8), not seq 2 (9)
    assert t2.match(None, [1, 2, 3, 4, 5, 0], 6).length == 0  # every holder is longer than 6
    t2.check()
    # Without a window every holder is whole.
    t3 = PrefixTree()
    t3.append(1, [1, 2, 3, 4, 5, 6, 7, 8])
    assert t3.match(None, [1, 2, 3, 4, 5, 0], 6).length == 5


@pytest.mark.parametrize("n_swa", [0, 4])
def test_random_operations_keep_the_books_exact(n_swa: int) -> None:
    rng = random.Random(7)
    t = PrefixTree(n_swa=n_swa)
    seqs: dict[int, list[int]] = {}  # what each sequence holds, as tokens
    cells: dict[int, list[int]] = {}  # the physical cell ids it holds
    next_cell = 0

    def whole_window(src: int, length: int) -> bool:
        """A source of length L may lack positions below L - n_swa + 1; the next token
        after `length` attends to positions from length - n_swa + 1."""
        return not n_swa or max(0, len(seqs[src]) - n_swa + 1) <= max(0, length - n_swa + 1)
    for _ in range(3000):
        op = rng.random()
        if op < 0.3 and len(seqs) < 12:
            sid = next(i for i in range(100) if i not in seqs)
            prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 12))]
            m = t.match(None, prompt, len(prompt))
            src = t.attach(sid, m)
            assert src is None or whole_window(src, m.length)
            seqs[sid] = prompt[: m.length]
            cells[sid] = list(cells[src][: m.length]) if src is not None else []
        elif op < 0.7 and seqs:
            sid = rng.choice(list(seqs))
            toks = [rng.randrange(3) for _ in range(rng.randrange(1, 4))]
            t.append(sid, toks)
            seqs[sid] += toks
            cells[sid] += list(range(next_cell, next_cell + len(toks)))
            next_cell += len(toks)
        elif op < 0.85 and seqs:
            sid = rng.choice(list(seqs))
            target = [rng.randrange(3) for _ in range(20)]
            target[: len(seqs[sid])] = seqs[sid]
            m = t.match(sid, target, len(target))
            start = t.length(sid)
            src = t.attach(sid, m)
            if src is not None:
                assert cells[src][:start] == cells[sid], "copied from a sequence on another path"
                assert whole_window(src, m.length)
                seqs[sid] = target[: m.length]
                cells[sid] = list(cells[src][: m.length])
        elif seqs:
            sid = rng.choice(list(seqs))
            held = set(cells.pop(sid))
            del seqs[sid]
            others = set(c for v in cells.values() for c in v)
            assert t.remove(sid) == len(held - others)
        t.check()
        assert t.used == len(set(c for v in cells.values() for c in v))
        for sid in seqs:
            assert t.length(sid) == len(seqs[sid])
            leaf = t.leaf.get(sid)
            assert [tok for n in (leaf.path() if leaf else []) for tok in n.tokens] == seqs[sid]
