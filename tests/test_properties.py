"""Hypothesis properties of three pieces of pure bookkeeping, each run against many
random inputs rather than a few hand-picked ones:

- the chunker (daemons/ingest/chunk.py) with the real embedding tokenizer (the default
  embedding model's GGUF, vocabulary only): on random markdown-ish documents every chunk
  fits `size`, no text is lost or reordered, overlap is what was asked, pages and heading
  trails follow the text; on any string at all it never raises; same input, same chunks;
- the inference engine's KV-cell ledger (daemons/infer/kv.py and prefix.py), driven the
  way daemons/infer/engine.py drives it (admission, prefill chunks, decode steps,
  preemption, finish, cancel, a full KV pool) against a fake llama memory that keeps
  cells, their holders and sliding-window gaps, and checked after every step;
- the router's budget and rate arithmetic (daemons/router/limits.py) against an exact
  integer model over random admits, settles, clock moves and period rollovers.

Deterministic in CI (profile "onebox": derandomized, no example database, no deadline);
ONEBOX_HYPOTHESIS=deep runs ten times the examples with fresh randomness.
"""

from __future__ import annotations

import dataclasses
import math
import os
import string
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from daemons import models
from daemons.config import PrincipalConfig
from daemons.infer import scheduler
from daemons.infer.kv import KvLedger
from daemons.infer.seq import Seq
from daemons.ingest.chunk import MIN_SIZE, Chunk, chunk_markdown
from daemons.ingest.tokens import Tokenizer
from daemons.llama import KvFull
from daemons.router.limits import MICRO, WINDOW_S, Grant, LimitExceeded, Limits, micro

DEEP = os.environ.get("ONEBOX_HYPOTHESIS") == "deep"
settings.register_profile("onebox", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("onebox-deep", settings.get_profile("onebox"), derandomize=False)
PROFILE = settings.get_profile("onebox-deep" if DEEP else "onebox")


def examples(n: int) -> settings:
    return settings(PROFILE, max_examples=n * 10 if DEEP else n)


# == the chunker ========================================================================

GGUF = "all_minilm_l6_v2/all-MiniLM-L6-v2.f16.gguf"


@pytest.fixture(scope="module")
def tok() -> Iterator[Tokenizer]:
    tokenizer = Tokenizer(models.resolve(GGUF, Path("var/lib/models")))
    yield tokenizer
    tokenizer.close()


# One token each in MiniLM's vocabulary, letters only (a line that starts with one is
# plain paragraph text, never markdown syntax).
WORDS = ["the", "of", "and", "install", "index", "vector", "search", "quick", "brown", "fox", "daemon", "token",
         "chunk", "page", "build", "model", "file", "data", "server", "cache", "naïve", "über"]
ODD_WORDS = ["日本語", "👍", "straße", "Ελληνικά", "café", "e.g.", "3.14", "…", "(parens)", "[x]", "x86_64", "don't",
             '"quoted"', "end.", "so!", "why?", "a.b", "—", "½", "\u0301a"]
# What a body word after a line's first may be made of: anything printable but "§" (it
# marks the generated headings), "<" (page markers) and the code fence characters.
WORD_CHARS = st.characters(categories=["L", "N", "P", "S", "M"], exclude_characters="§<`~")
SEPS = [" ", " ", " ", " ", "  ", "\t", " \u00a0", "\u3000"]


@st.composite
def line(draw: st.DrawFn) -> str:
    words = [draw(st.sampled_from(WORDS))]
    for _ in range(draw(st.integers(0, 14))):
        kind = draw(st.integers(0, 9))
        if kind < 5:
            word = draw(st.sampled_from(WORDS))
        elif kind < 7:
            word = draw(st.sampled_from(ODD_WORDS))
        elif kind < 9:
            word = draw(st.text(WORD_CHARS, min_size=1, max_size=10))
        else:  # one long "word" (base64 and the like) that must be cut at token boundaries
            word = draw(st.text(string.ascii_letters + string.digits + "+/=", min_size=40, max_size=500))
        words.append(draw(st.sampled_from(SEPS)) + word)
    return "".join(words) + draw(st.sampled_from(["", "", " ", "."]))


@dataclass
class Doc:
    """A generated document and what its chunks must hold: its body text without spaces,
    and for each of those characters its page and section."""

    markdown: str
    text: str
    page: list[int | None]
    sec: list[int]
    sections: list[tuple[str, str, int]]  # trail, inline heading line, top-level group
    heading_only: bool


@st.composite
def documents(draw: st.DrawFn) -> Doc:
    paged = draw(st.booleans())
    page: int | None = 1 if paged else None
    parts: list[str] = []
    chars: list[tuple[str, int | None, int]] = []
    sections: list[tuple[str, str, int]] = [("", "", 0)]
    stack: list[tuple[int, str]] = []
    headings: list[tuple[str, int | None]] = []
    markers = 0

    def body(block: str) -> None:
        chars.extend((ch, page, len(sections) - 1) for ch in block if not ch.isspace())

    def heading(level: int, text: str) -> None:
        # The heading model of chunk.py's docstring: a trail of the headings above.
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, text))
        trail = " > ".join(t for _, t in stack if t)
        inline = "#" * level + " " + text if text else ""
        sections.append((trail, inline, sections[-1][2] + (1 if level <= 2 else 0)))
        if text:
            headings.append((inline, page))

    if draw(st.integers(0, 7)) == 0:  # YAML front matter: kept for its words
        fm = "\n".join(f"{draw(st.sampled_from(WORDS))}: {draw(line())}" for _ in range(draw(st.integers(1, 3))))
        parts.append(f"---\n{fm}\n---")
        body(fm)
    kinds = ["para"] * 6 + ["list", "code", "atx", "atx", "sub", "sub", "setext", "empty", "break"]
    kinds += ["page"] * 2 * paged
    for i in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(kinds))
        if kind == "para":
            block = "\n".join(draw(line()) for _ in range(draw(st.integers(1, 3))))
            parts.append(block)
            body(block)
        elif kind == "list":
            block = "\n".join(draw(st.sampled_from(["- ", "* ", "+ ", "1. ", "2) "])) + draw(line())
                              for _ in range(draw(st.integers(1, 4))))
            parts.append(block)
            body(block)
        elif kind == "code":
            fence = draw(st.sampled_from(["```", "~~~", "````"]))
            lines = [draw(line()) if draw(st.integers(0, 3)) else draw(st.sampled_from(["# a comment", "", "  x = 1"]))
                     for _ in range(draw(st.integers(1, 6)))]
            block = fence + draw(st.sampled_from(["", "python", "sh"])) + "\n" + "\n".join([draw(line()), *lines]) \
                + "\n" + fence
            parts.append(block)
            body(block)
        elif kind == "atx":
            level = draw(st.integers(1, 6))
            text = f"§{i}" + draw(st.sampled_from(["", " intro", " setup notes"]))
            parts.append(" " * draw(st.integers(0, 3)) + "#" * level + draw(st.sampled_from([" ", "  ", "\t"])) + text
                         + draw(st.sampled_from(["", " ", "\t"])))
            heading(level, text)
        elif kind == "sub":  # a short subsection, packed with its neighbours, its heading inline
            level = draw(st.integers(3, 6))
            text = f"§{i} sub"
            parts.append("#" * level + " " + text)
            heading(level, text)
            block = " ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6)))
            parts.append(block)
            body(block)
        elif kind == "setext":
            level = draw(st.integers(1, 2))
            text = f"§{i} setext"
            parts.append(text + "\n" + ("=" if level == 1 else "-") * draw(st.integers(1, 5)))
            heading(level, text)
        elif kind == "empty":
            level = draw(st.integers(1, 6))
            parts.append("#" * level)
            heading(level, "")
        elif kind == "break":
            parts.append(draw(st.sampled_from(["***", "* * *", "___", "---", "- - -"])))
        else:
            assert page is not None
            page += draw(st.integers(1, 3))
            markers += 1
            parts.append(draw(st.sampled_from(["", " "])) + f"<!-- page {page} -->" + draw(st.sampled_from(["", "  "])))
    if paged and not markers:
        parts.append("<!-- page 2 -->")
    markdown = parts[0] if parts else ""
    for part in parts[1:]:
        markdown += draw(st.sampled_from(["\n\n", "\n\n\n", "\n \n", "\n\t\n"])) + part
    if draw(st.integers(0, 5)) == 0:
        markdown = markdown.replace("\n", "\r\n")
    heading_only = not chars
    if heading_only:
        # Nothing but headings: they are the document's text, in the first section.
        chars = [(ch, p, 0) for text, p in headings for ch in text if not ch.isspace()]
    return Doc(markdown, "".join(c for c, _, _ in chars), [p for _, p, _ in chars], [s for _, _, s in chars],
               sections, heading_only)


def squeeze(text: str) -> str:
    return "".join(text.split())


def check_chunk(c: Chunk, seq: int, tok: Tokenizer, size: int) -> str:
    """What holds for any chunk; returns its body (the text after its trail line)."""
    assert c.seq == seq
    assert c.text and c.text == c.text.strip()
    assert c.tokens == tok.count(c.text) <= size, c
    assert (c.page is None) == (c.page_end is None)
    if not c.heading:
        return c.text
    full = c.heading + "\n\n"
    if tok.count(full) <= size // 2:
        assert c.text.startswith(full), c
        return c.text[len(full):]
    # A trail longer than half a chunk is cut in the text; `heading` keeps it whole.
    head, rest = c.text.split("\n\n", 1)
    assert head and c.heading.startswith(head) and tok.count(head + "\n\n") <= size // 2, c
    return rest


def nth_nonspace_end(text: str, n: int) -> int:
    """The length of the shortest prefix of `text` with `n` non-space characters."""
    seen = 0
    for i, ch in enumerate(text):
        if not ch.isspace():
            seen += 1
            if seen == n:
                return i + 1
    raise AssertionError((text, n))


def check_document(doc: Doc, chunks: list[Chunk], tok: Tokenizer, size: int, overlap: int) -> None:
    """Every chunk is the document's body text from some point a on (its first `ov`
    characters repeating the previous chunk's end, at most `overlap` tokens), the chunks
    cover it all in order, and each chunk's pages, heading and inline subsection
    headings are those of the characters it holds. Ambiguity (repeated text) is resolved
    by keeping every reading that fits; one must reach the end."""
    text = doc.text
    states = {0}
    for i, c in enumerate(chunks):
        body = check_chunk(c, i, tok, size)
        lines = body.split("\n")
        inline = [x for x in lines if not doc.heading_only and x.startswith("#") and "§" in x]
        kept = "\n".join(x for x in lines if doc.heading_only or not (x.startswith("#") and "§" in x))
        b = squeeze(kept)
        n = len(b)
        reached = set()
        for pos in states:
            lo = max(0, pos - n + 1) if overlap and i else pos
            a = text.find(b, lo, pos + n)
            while a != -1 and a <= pos:
                ov = pos - a
                ok = (doc.sections[doc.sec[pos]][0] == c.heading  # the section it starts in
                      and doc.sections[doc.sec[a]][2] == doc.sections[doc.sec[a + n - 1]][2]  # one group
                      and (c.page, c.page_end) == (doc.page[a], doc.page[a + n - 1])
                      and inline == [doc.sections[doc.sec[j]][1] for j in range(a + 1, a + n)
                                     if doc.sec[j] != doc.sec[j - 1] and doc.sections[doc.sec[j]][1]]
                      and (not ov or tok.count(kept[:nth_nonspace_end(kept, ov)]) <= overlap))
                if ok:
                    reached.add(a + n)
                a = text.find(b, a + 1, pos + n)
        assert reached, f"chunk {i} does not continue the text at {sorted(states)}: {c!r}"
        states = reached
    assert len(text) in states, f"text lost after {sorted(states)} of {len(text)} characters"


SIZES = st.one_of(st.integers(MIN_SIZE, 24), st.integers(MIN_SIZE, 200))


@examples(300)
@given(doc=documents(), size=SIZES, overlap=st.one_of(st.just(0), st.integers(0, 40)))
@example(doc=Doc("# §0\n\nthe fox", "thefox", [None] * 6, [1] * 6, [("", "", 0), ("§0", "# §0", 1)], False),
         size=8, overlap=0)
def test_chunks_hold_the_whole_document_in_order(tok: Tokenizer, doc: Doc, size: int, overlap: int) -> None:
    chunks = chunk_markdown(doc.markdown, tok.count, size, overlap)
    check_document(doc, chunks, tok, size, overlap)
    if doc.page[:1] != [None] and chunks:
        assert [c.page for c in chunks] == sorted(c.page for c in chunks if c.page is not None)
    assert chunk_markdown(doc.markdown, tok.count, size, overlap) == chunks  # deterministic


@examples(200)
@given(words=st.lists(st.sampled_from(WORDS), min_size=30, max_size=300), size=SIZES,
       overlap=st.integers(1, 30))
def test_overlap_is_as_much_as_configured(tok: Tokenizer, words: list[str], size: int, overlap: int) -> None:
    """One long paragraph of one-token words: each chunk after the first repeats the
    longest run of the previous one's last words within min(overlap, size / 2) tokens
    (a chunk that takes the paragraph's rest may have less room)."""
    assert {tok.count(w) for w in set(words)} == {1}
    chunks = chunk_markdown(" ".join(words), tok.count, size, overlap)
    room = min(overlap, size // 2)
    states: set[tuple[int, int]] = {(0, 0)}  # (start, end) of the previous chunk in `words`
    for i, c in enumerate(chunks):
        check_chunk(c, i, tok, size)
        cw = c.text.split()
        reached = set()
        for start, end in states:
            for ov in range(min(len(cw) - 1, end - start) + 1) if i else [0]:
                a = end - ov
                if words[a:a + len(cw)] != cw:
                    continue
                repeated = tok.count(" ".join(words[a:end]))
                if repeated > room:
                    continue
                if 0 < i < len(chunks) - 1:  # the rest did not fit: all the room is used
                    if ov == 0 or (a > start and tok.count(" ".join(words[a - 1:end])) <= room):
                        continue
                reached.add((a, a + len(cw)))
        assert reached, f"chunk {i}: overlap not as configured (room {room}): {c.text!r}"
        states = reached
    assert any(end == len(words) for _, end in states)


MARKDOWNISH = st.lists(st.one_of(
    st.sampled_from(list("#=-*_`~<>!.?()[] \t\n\r0123456789abcXYZ§|:")),
    st.sampled_from(["<!-- page 3 -->", "<!-- page 1 -->", "\n# ", "\n### ", "\n```\n", "\n~~~py\n", "\n---\n",
                     "\n- ", "\n1. ", "\n\n", "===", "\r\n", "naïve", "日本語", "👍", "\u3000", "\x00", "\ufeff"]),
    st.characters(),
    st.text(string.ascii_letters + "+/", min_size=50, max_size=400),
), max_size=300).map("".join)


@examples(300)
@given(text=st.one_of(MARKDOWNISH, st.text(max_size=500)), size=SIZES, overlap=st.integers(0, 300))
@example(text="", size=8, overlap=0)
@example(text="a" * 90 + "😀" + "a" * 300, size=8, overlap=4)  # a word whose prefixes count more than it
def test_any_string_chunks_without_error(tok: Tokenizer, text: str, size: int, overlap: int) -> None:
    chunks = chunk_markdown(text, tok.count, size, overlap)
    for i, c in enumerate(chunks):
        check_chunk(c, i, tok, size)
    if "<!-- page" not in text:
        assert all(c.page is None for c in chunks)
    assert chunk_markdown(text, tok.count, size, overlap) == chunks


# == the KV-cell ledger ==================================================================

STEP_TOKENS = 8  # the most prompt tokens one step prefills (the engine's step_tokens)


class FakeMemory:
    """llama's unified KV pool as far as the ledger drives it: cells with a position, a
    token and the sequences that hold them. With a sliding window, each sequence also
    has its view of the SWA layers, which loses (worst case: all of) the positions that
    slid out of its window; every decoded token must still see its whole window."""

    def __init__(self, n_cells: int, n_swa: int, live: set[int]) -> None:
        self.n_cells, self.n_swa, self.live = n_cells, n_swa, live
        self.cells: list[tuple[int, int, set[int]]] = []  # (position, token, holders)
        self.swa: dict[int, set[int]] = {}
        self.fail_next = 0
        self.calls: list[tuple[str, int, int]] = []

    def held(self, seq: int) -> dict[int, int]:
        out: dict[int, int] = {}
        for pos, token, holders in self.cells:
            if seq in holders:
                assert pos not in out, f"sequence {seq} holds position {pos} twice"
                out[pos] = token
        return out

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self.calls.append(("cp", src, dst))
        assert src != dst and src in self.live and dst in self.live, (src, dst, self.live)
        assert sorted(self.held(dst)) == list(range(p0)), "seq_cp must continue where dst ends"
        have = self.held(src)
        assert all(p in have for p in range(p0, p1)), f"seq_cp({src}, {dst}, {p0}, {p1}): {src} lacks cells"
        for pos, _, holders in self.cells:
            if src in holders and p0 <= pos < p1:
                holders.add(dst)
        if self.n_swa:
            self.swa.setdefault(dst, set()).update(p for p in self.swa.get(src, ()) if p0 <= p < p1)

    def seq_rm(self, seq: int) -> None:
        self.calls.append(("rm", seq, -1))
        assert seq in self.live, f"sequence {seq} freed twice (or never taken)"
        self.live.discard(seq)
        for _, _, holders in self.cells:
            holders.discard(seq)
        self.cells = [c for c in self.cells if c[2]]
        self.swa.pop(seq, None)

    def decode(self, batch: list[tuple[int, list[int], int]]) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise KvFull("llama_decode returned 1 (injected)")
        need = sum(len(t) for _, t, _ in batch)
        assert len(self.cells) + need <= self.n_cells, "the books promised cells llama lacks"
        for seq, toks, pos in batch:
            assert seq in self.live
            assert sorted(self.held(seq)) == list(range(pos)), f"sequence {seq} decodes at {pos} with a gap"
            if self.n_swa:
                window = set(range(max(0, pos - self.n_swa + 1), pos))
                assert window <= self.swa.get(seq, set()), f"sequence {seq} at {pos} lacks {window - self.swa.get(seq, set())}"
        for seq, toks, pos in batch:
            self.cells += [(pos + k, t, {seq}) for k, t in enumerate(toks)]
            if self.n_swa:
                end = pos + len(toks)
                view = self.swa.setdefault(seq, set()) | set(range(pos, end))
                self.swa[seq] = {p for p in view if p >= end - self.n_swa + 1}


@dataclass
class Waiting:
    prompt: list[int]
    max_new: int
    resume: Seq | None = None


PROMPTS = st.builds(lambda base, tail: (base + tail) or [0], st.sampled_from([[], [0, 1, 2, 0], [1] * 6, [2, 0] * 3]),
                    st.lists(st.integers(0, 2), max_size=8))


class KvMachine(RuleBasedStateMachine):
    """The engine's calls on its KvLedger, in the engine's order (BatchEngine._admit,
    _step with _decoders / _room_beyond_reservation / _prefill_plan / _decode,
    _preempt, _finish, _apply_cancels), with the scheduling choices the engine leaves
    to its policies (chunk sizes, sampled tokens, stops) drawn at random."""

    @initialize(n_cells=st.integers(8, 28), slots=st.sampled_from([1, 2, 3, 4, 4]), cached_max=st.integers(0, 3),
                n_swa=st.sampled_from([0, 0, 2, 3, 5]), output_reserve=st.sampled_from([0, 1, 1, 3]),
                forget=st.sampled_from([0, 0, 6, 30]))
    def start(self, n_cells: int, slots: int, cached_max: int, n_swa: int, output_reserve: int, forget: int) -> None:
        self.n_cells, self.slots, self.n_seq_max = n_cells, slots, slots + cached_max
        self.output_reserve, self.forget = output_reserve, forget
        self.live: set[int] = set()
        self.mem = FakeMemory(n_cells, n_swa, self.live)
        self.kv = KvLedger(self.mem, n_cells, self.n_seq_max, cached_max, n_swa=n_swa)
        self.active: dict[int, Seq] = {}
        self.waiting: deque[Waiting] = deque()
        self.content: dict[int, list[int]] = {}  # the tokens in each cached prefix's cells
        self.order = 0
        self.decoded = 0

    # -- the engine's helpers, as it has them ---------------------------------------------

    def reserve_out(self, max_new: int) -> int:
        return max_new if self.output_reserve == 0 else min(max_new, self.output_reserve)

    def release(self, s: Seq, keep: bool) -> None:
        self.active.pop(s.id, None)
        held = (s.prompt + s.generated)[:self.kv.length(s.id)]
        before = self.kv.used
        freed = self.kv.release(s.id, keep, self.decoded)
        assert freed == before - self.kv.used
        if s.id in self.kv.cached:
            self.content[s.id] = held

    def finish(self, s: Seq) -> None:
        self.release(s, keep=True)

    def preempt(self, v: Seq) -> None:
        self.release(v, keep=True)
        v.preempted += 1
        v.requeue_tokens()
        v.pending = None
        self.waiting.appendleft(Waiting(v.prompt, v.max_new, resume=v))

    def room_beyond_reservation(self, s: Seq, taken: int) -> bool:
        while self.kv.free_for_admission(self.active.values()) - taken < 1:
            if self.kv.cached:
                before = self.kv.used
                assert self.kv.evict_one() == before - self.kv.used
                continue
            v = scheduler.victim(self.active.values())
            if v is None or len(self.active) == 1:
                event("kv: a lone sequence ends early")
                self.finish(s)
                return False
            event("kv: preemption")
            self.preempt(v)
            if v is s:
                return False
        return True

    def decode(self, entries: list[tuple[Seq, list[int], int, bool]]) -> bool:
        batch = [(s.id, toks, pos) for s, toks, pos, _ in entries]
        try:
            self.mem.decode(batch)
            return True
        except KvFull:
            event("kv: decode found the pool full")
            self.kv.evict_all()
            assert not self.kv.cached
            try:
                self.mem.decode(batch)
                return True
            except KvFull:
                pass
        for s, _, _, _ in entries:
            if s.id in self.active:
                self.release(s, keep=False)
        return False

    # -- rules ------------------------------------------------------------------------------

    @rule(data=st.data())
    def turn(self, data: st.DataObject) -> None:
        """One turn of the feeder thread (BatchEngine._turn): requests arrive, some are
        cancelled, the queue's head is admitted while it fits, and a step runs; now and
        then llama_decode finds the pool full, once (the cache is evicted and the decode
        retried) or twice (the step's requests fail)."""
        for _ in range(data.draw(st.integers(0, 2), label="arrivals")):
            if len(self.waiting) < 4:
                self.waiting.append(Waiting(data.draw(PROMPTS, label="prompt"),
                                            data.draw(st.integers(1, 8), label="max_new")))
        if data.draw(st.integers(0, 7), label="cancel") == 0:
            self.cancel(data)
        self.admit()
        if self.active:
            if data.draw(st.integers(0, 29), label="fault") == 0:
                self.mem.fail_next = data.draw(st.integers(1, 2), label="failures")
            self.step(data)

    def admit(self) -> None:
        kv = self.kv
        while self.waiting and len(self.active) < self.slots:
            p = self.waiting[0]
            back = p.resume
            tokens = back.tokens if back is not None else p.prompt
            produced = back.produced if back is not None else 0
            target = len(p.prompt) + produced + self.reserve_out(p.max_new - produced) - 1
            limit = len(tokens) - (0 if back is not None and back.generated else 1)
            m = kv.match(None, tokens, limit)
            shared = m.length if m is not None else 0
            need = max(1, target - shared)
            free = kv.free_for_admission(self.active.values())
            if need > free and need > free + kv.evictable(m.node if m else None):
                return
            self.waiting.popleft()
            assert kv.free_ids, "a slot is free but no sequence id"
            sid = kv.take_id()
            assert sid not in self.live and 0 <= sid < self.n_seq_max
            self.live.add(sid)
            self.order += 1
            if back is None:
                s = Seq(id=sid, order=self.order, rank=self.order, req=cast(Any, None), gen=cast(Any, None),
                        prompt=p.prompt, max_new=p.max_new, reserve_target=target, sampler=cast(Any, None),
                        reply=cast(Any, None))
            else:
                s = back
                s.id, s.order, s.reserve_target, s.lcp, s.pending = sid, self.order, target, {}, None
            self.active[sid] = s
            if back is not None:
                event("kv: a preempted sequence comes back")
            if m is not None and shared:
                event("kv: admitted onto a cached prefix")
                assert kv.attach(sid, m, self.decoded) == shared
            # What admission promised, eviction delivers.
            assert kv.make_room(self.active.values(), 0)

    def step(self, data: st.DataObject) -> None:
        kv = self.kv
        extra, out = 0, []
        for s in sorted((s for s in self.active.values() if s.pending is not None), key=lambda s: s.rank):
            if self.active.get(s.id) is not s:
                continue
            if kv.length(s.id) >= s.reserve_target:
                if not self.room_beyond_reservation(s, extra):
                    continue
                extra += 1
            out.append(s)
        entries = [(s, [cast(int, s.pending)], kv.length(s.id), True) for s in out if self.active.get(s.id) is s]
        budget = STEP_TOKENS - len(entries)
        for s in [s for s in self.active.values() if s.prefilling]:
            pos = kv.length(s.id)
            tokens = s.tokens
            if kv.cache_on:
                m = kv.match(s.id, tokens, len(tokens) - (0 if s.generated else 1))
                if m is not None and m.length > pos:
                    event("kv: prefill takes cells another sequence made")
                    kv.attach(s.id, m, self.decoded)
                    pos = m.length
            if pos == len(tokens):
                s.pending = s.generated[-1]
                continue
            take = data.draw(st.integers(0, max(0, min(len(tokens) - pos, budget))), label="prefill")
            if take:
                entries.append((s, tokens[pos:pos + take], pos, pos + take == len(tokens) and not s.generated))
                budget -= take
        if not entries or not self.decode(entries):
            return
        for s, toks, _, _ in entries:
            kv.append(s.id, toks)
        self.decoded += sum(len(toks) for _, toks, _, _ in entries)
        kv.forget_stale(self.decoded, self.forget)
        for s, _, _, logits in entries:
            if self.active.get(s.id) is not s:
                continue
            if not logits:
                if s.generated and s.prefilling and kv.length(s.id) == len(s.tokens):
                    s.pending = s.generated[-1]
                continue
            token = data.draw(st.integers(0, 2), label="token")
            s.produced += 1
            s.generated.append(token)
            s.pending = token
            if s.produced >= s.max_new or data.draw(st.integers(0, 9), label="stop") == 0:
                self.finish(s)

    def cancel(self, data: st.DataObject) -> None:
        """A cancel, a deadline or a failed request: waiting ones leave, running ones free."""
        running = list(self.active.values())
        if not running and not self.waiting:
            return
        i = data.draw(st.integers(0, len(running) + len(self.waiting) - 1), label="which")
        if i < len(running):
            self.release(running[i], keep=False)
        else:
            del self.waiting[i - len(running)]

    # -- after every step -------------------------------------------------------------------

    @invariant()
    def books_balance(self) -> None:
        if not hasattr(self, "kv"):
            return
        kv, mem = self.kv, self.mem
        kv.tree.check()
        for sid in list(self.content):
            if sid not in kv.cached:
                del self.content[sid]
        cached = set(kv.cached)
        assert len(cached) <= kv.cached_max
        assert not cached & set(self.active)
        # Sequence ids: each free, running or cached, exactly once.
        assert len(kv.free_ids) == len(set(kv.free_ids)), f"an id freed twice: {kv.free_ids}"
        assert set(kv.free_ids).isdisjoint(self.live)
        assert set(kv.free_ids) | self.live == set(range(self.n_seq_max))
        assert self.live == set(self.active) | cached
        assert all(s.id == sid for sid, s in self.active.items())
        # Cells: what llama holds is what the books count, shared prefixes once.
        assert kv.used == len(mem.cells) <= self.n_cells
        assert all(holders <= self.live for _, _, holders in mem.cells)
        assert kv.evictable() == sum(1 for _, _, holders in mem.cells if holders <= cached)
        for sid in self.live:
            s = self.active.get(sid)
            want = (s.prompt + s.generated)[:kv.length(sid)] if s is not None else self.content[sid]
            held = mem.held(sid)
            assert [held[p] for p in sorted(held)] == want and sorted(held) == list(range(len(want))), sid
            leaf = kv.tree.leaf.get(sid)
            assert [t for n in (leaf.path() if leaf else []) for t in n.tokens] == want
            if s is not None:
                assert kv.length(sid) <= (len(s.tokens) if s.prefilling else len(s.prompt) + len(s.generated) - 1)
        assert set(kv.tree.leaf) <= self.live
        # Reservations never promise more than the pool has.
        assert kv.free_for_admission(self.active.values()) >= 0
        snap = kv.snapshot(self.active.values())
        assert snap["used"] + snap["free"] == self.n_cells and snap["reserved"] == kv.future(self.active.values())


KvMachine.TestCase.settings = settings(PROFILE, max_examples=3000 if DEEP else 300, stateful_step_count=50)
TestKvLedger = KvMachine.TestCase


# == budgets and rates ===================================================================


@examples(500)
@given(k=st.integers(0, 10**15))
@example(k=8_369_594_085)  # 8369.594085 * 1e6 is 8369594085.000001 in binary: was 8369594086
def test_millionths_are_exact(k: int) -> None:
    assert micro(k / MICRO) == k
    if k <= 10**11:
        # Anything between two millionths is rounded up, never down.
        assert micro((k + 0.25) / MICRO) == micro((k + 0.75) / MICRO) == k + 1


def period_of(period: str, now: float) -> tuple[float, float]:
    """An independent model of limits.period_bounds: unix days are 86400 s in UTC."""
    day = now - now % 86400
    if period == "day":
        return day, day + 86400
    if period == "week":
        monday = day - (int(day // 86400) + 3) % 7 * 86400  # 1970-01-01 was a Thursday
        return monday, monday + 7 * 86400
    t = datetime.fromtimestamp(now, timezone.utc)
    start = datetime(t.year, t.month, 1, tzinfo=timezone.utc)
    end = datetime(t.year + t.month // 12, t.month % 12 + 1, 1, tzinfo=timezone.utc)
    return start.timestamp(), end.timestamp()


@dataclass
class Book:
    """The model of one principal: exact integers, in the order limits.py promises."""

    conf: PrincipalConfig
    seed: int  # what the ledger holds for the first period, millionths
    period: tuple[float, float] | None = None
    spent: int = 0
    open: list[Grant] = field(default_factory=list)
    requests: list[float] = field(default_factory=list)
    tokens: list[list[Any]] = field(default_factory=list)  # [time, tokens, grant]


# Just before the end of a leap February, a year, a month (on a Monday), and mid-month.
START_TIMES = [datetime(2024, 2, 29, 23, 59, 30, tzinfo=timezone.utc).timestamp(),
               datetime(2024, 12, 29, 23, 58, tzinfo=timezone.utc).timestamp(),
               datetime(2025, 3, 31, 23, 0, tzinfo=timezone.utc).timestamp(),
               datetime(2025, 6, 15, 12, tzinfo=timezone.utc).timestamp()]
CONFIGS = st.builds(
    lambda budget, period, rpm, tpm, mc: PrincipalConfig(budget=budget / MICRO, budget_period=period,
                                                         requests_per_min=rpm, tokens_per_min=tpm, max_concurrent=mc),
    st.one_of(st.just(0), st.integers(1, 3_000_000)), st.sampled_from(["day", "week", "month"]),
    st.sampled_from([0, 0, 1, 3, 8]), st.sampled_from([0, 0, 40, 500, 2000]), st.sampled_from([0, 0, 1, 3]))


class LimitsMachine(RuleBasedStateMachine):
    @initialize(confs=st.lists(CONFIGS, min_size=1, max_size=3), seeds=st.lists(st.integers(0, 4_000_000),
                min_size=3, max_size=3), t0=st.sampled_from(START_TIMES), dt=st.floats(0, 120))
    def start(self, confs: list[PrincipalConfig], seeds: list[int], t0: float, dt: float) -> None:
        self.now = t0 + dt
        self.asked: list[tuple[str, float]] = []
        self.names = [f"p{i}" for i in range(len(confs))]
        self.books = {n: Book(c, seeds[i]) for i, (n, c) in enumerate(zip(self.names, confs, strict=True))}
        self.settled: list[Grant] = []

        def spent_since(name: str, since: float) -> float:
            self.asked.append((name, since))
            return self.books[name].seed / MICRO

        self.limits = Limits(spent_since, 7.0, clock=lambda: self.now)

    @rule(who=st.integers(0, 2), cost=st.one_of(st.integers(0, 50_000), st.integers(0, 2_000_000)),
          max_tokens=st.one_of(st.integers(0, 60), st.integers(0, 600), st.integers(0, 2500)))
    def admit(self, who: int, cost: int, max_tokens: int) -> None:
        name = self.names[who % len(self.names)]
        b, now = self.books[name], self.now
        budget = micro(b.conf.budget)
        assert budget == round(b.conf.budget * MICRO)
        expect_ask = None  # the ledger is asked once: at a principal's first admit, if it has a budget
        if b.period is None or now >= b.period[1]:
            first = b.period is None
            b.period = period_of(b.conf.budget_period, now)
            b.spent = b.seed if first and budget else 0
            if first and budget:
                expect_ask = (name, b.period[0])
            if not first:
                event("limits: period rollover")
        b.requests = [t for t in b.requests if t > now - WINDOW_S]
        b.tokens = [e for e in b.tokens if e[0] > now - WINDOW_S]
        reserved = sum(g.cost for g in b.open)
        token_sum = sum(e[1] for e in b.tokens)
        c = b.conf
        code = ("concurrency_limit_exceeded" if c.max_concurrent and len(b.open) >= c.max_concurrent else
                "requests_per_min_exceeded" if c.requests_per_min and len(b.requests) >= c.requests_per_min else
                "tokens_per_min_exceeded" if c.tokens_per_min and token_sum + max_tokens > c.tokens_per_min else
                "budget_exceeded" if budget and b.spent + reserved + cost > budget else None)
        asked = len(self.asked)
        try:
            grant = self.limits.admit(name, b.conf, cost / MICRO, max_tokens)
        except LimitExceeded as exc:
            event(f"limits: {exc.code}")
            assert exc.code == code, (exc.code, code, exc.message)
            assert exc.status == 429 and exc.retry_after >= 1
            if code == "requests_per_min_exceeded":
                assert exc.retry_after == max(1, math.ceil(b.requests[0] + WINDOW_S - now)) <= 60
            if code == "tokens_per_min_exceeded":
                assert exc.retry_after <= 60
        else:
            assert code is None, (code, self.limits.snapshot(name))
            assert (grant.principal, grant.cost, grant.tokens, grant.period_start) == (name, cost, max_tokens,
                                                                                        b.period[0])
            b.open.append(grant)
            b.requests.append(now)
            b.tokens.append([now, max_tokens, grant])
            st_ = self.limits.states[name]
            if budget:  # spent + held never exceeds the budget at admission
                assert st_.spent + st_.reserved <= budget
        assert self.asked[asked:] == ([expect_ask] if expect_ask else [])

    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        grants = [g for b in self.books.values() for g in b.open] + self.settled
        if not grants:
            return
        g = grants[data.draw(st.integers(0, len(grants) - 1), label="grant")]
        used = data.draw(st.one_of(st.integers(0, g.cost), st.integers(g.cost, 2 * g.cost + 10)), label="cost")
        tokens = data.draw(st.integers(0, 2 * g.tokens + 5), label="tokens")
        b = self.books[g.principal]
        st_ = self.limits.states[g.principal]
        before = (st_.spent, st_.reserved, st_.concurrent, st_.token_sum)
        self.limits.settle(g, used / MICRO, tokens)
        if g in self.settled:
            event("limits: settled again")
            assert (st_.spent, st_.reserved, st_.concurrent, st_.token_sum) == before, "settled twice"
            return
        assert g.settled
        assert st_.reserved == before[1] - g.cost  # exactly its reservation back
        b.open.remove(g)
        self.settled.append(g)
        event("limits: cost over the reservation" if used > g.cost else "limits: cost within the reservation")
        if b.period is not None and g.period_start == b.period[0]:
            b.spent += used
        else:
            event("limits: settled after its period rolled over")
        for e in b.tokens:
            if e[2] is g:
                e[1] = tokens

    @rule(dt=st.one_of(st.sampled_from([0.0, 0.5, 1.0, 59.0, 60.0, 61.0, 3600.0, 86400.0, 7 * 86400.0]),
                       st.floats(0, 40 * 86400, allow_nan=False)))
    def wait(self, dt: float) -> None:
        self.now += dt

    @rule(who=st.integers(0, 2))
    def reload(self, who: int) -> None:
        """A config reload: a new, equal PrincipalConfig object changes nothing."""
        b = self.books[self.names[who % len(self.names)]]
        b.conf = dataclasses.replace(b.conf)

    @invariant()
    def exact(self) -> None:
        if not hasattr(self, "limits"):
            return
        for name, b in self.books.items():
            st_ = self.limits.states.get(name)
            if st_ is None:
                assert b.period is None
                continue
            assert (st_.period_start, st_.period_end) == b.period
            assert st_.spent == b.spent
            assert st_.reserved == sum(g.cost for g in b.open) >= 0
            assert st_.concurrent == len(b.open) >= 0
            assert len(st_.requests) == len(b.requests)
            assert st_.token_sum == sum(e[1] for e in b.tokens) >= 0
            snap = self.limits.snapshot(name)
            assert snap["reserved"] == st_.reserved / MICRO and snap["spent"] == st_.spent / MICRO
        assert len(self.asked) == len(set(self.asked)) <= len(self.names)


LimitsMachine.TestCase.settings = settings(PROFILE, max_examples=3000 if DEEP else 300, stateful_step_count=80)
TestLimits = LimitsMachine.TestCase
