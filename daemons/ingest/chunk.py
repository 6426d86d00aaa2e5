"""Markdown to chunks that fit the embedding model: cut at the document's own seams
(sections, then paragraphs, list items and code fences, then sentences, then words, and
only for one over-long "word" such as base64 at token boundaries), each chunk headed by
its heading trail so that both its vector and full-text search know where it is.

What holds for every chunk:
- `tokens` counts its whole `text`, heading trail included, and is at most `size`: the
  final text is counted once more, because the counts of two pieces need not add up to
  the count of the pieces joined (it does for WordPiece; byte-level BPE may differ).
- `text` starts with the heading trail ("Install > From source") when it has one (cut
  to half a chunk if longer; `heading` keeps it whole), and a heading is never apart
  from its body: a heading with nothing under it before the next one only lives on in
  the trails of its subsections (a document of nothing but headings is their text).
- chunks never span a top-level section (a # or ## heading); smaller subsections
  (### and deeper) are packed together, their headings kept inline as written, and
  `heading` is the trail of the section a chunk starts in.
- `page`/`page_end` are the first and last pages its text comes from, read from the
  OCR daemon's `<!-- page N -->` lines (which are not chunk text); None when the
  document has none.
- a chunk that continues the section of the one before it starts with up to `overlap`
  tokens of that one's end, whole sentences or words only.

Tokenizing is the cost, so each block is counted once and sums decide the packing;
where a piece must be cut, the cut is found by galloping over its sentence (or word)
boundaries, counting prefixes no longer than about twice the answer.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

Count = Callable[[str], int]  # tokens of a text, without the model's special tokens

MIN_SIZE = 8

_PAGE = re.compile(r"<!-- page (\d+) -->")
_ATX = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*")
_SETEXT = re.compile(r" {0,3}(=+|-+)[ \t]*")
_BREAK = re.compile(r" {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*")
_FENCE = re.compile(r" {0,3}(`{3,}(?=[^`]*$)|~{3,})")  # "```code```" on one line is no fence
_ITEM = re.compile(r"[ \t]*(?:[-*+]|(\d{1,9})[.)])(?:[ \t]|$)")
_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+|\n\s*")
_LINE_END = re.compile(r"\n")
_WORD_END = re.compile(r"\s+")


@dataclass(frozen=True)
class Chunk:
    seq: int
    text: str
    heading: str  # "Install > From source"; "" before the first heading
    page: int | None
    page_end: int | None
    tokens: int


def chunk_markdown(markdown: str, count: Count, size: int, overlap: int) -> list[Chunk]:
    """Chunks of at most `size` tokens (as `count` counts them, e.g. Tokenizer.count).
    `overlap` is capped at half of what a chunk has room for after its heading trail."""
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} tokens, not {size}")
    if overlap < 0:
        raise ValueError(f"overlap must not be negative, not {overlap}")
    blocks, sections = _Parser(markdown).parse()
    pieces = [_Piece(text, count(text), page, section, sep, code) for text, page, section, sep, code in blocks]
    packer = _Packer(count, size, overlap, sections)
    chunks: list[Chunk] = []
    group: list[_Piece] = []
    for piece in pieces:
        if group and sections[piece.section].group != sections[group[-1].section].group:
            chunks += packer.pack(group, len(chunks))
            group = []
        group.append(piece)
    if group:
        chunks += packer.pack(group, len(chunks))
    return chunks


@dataclass(frozen=True)
class _Section:
    trail: str  # the headings above and of this section, " > "-joined
    line: str  # its heading as it reads inline in a chunk ("### Linux")
    group: int  # a # or ## heading starts a new group; chunks stay inside one
    page: int | None


# A block: its text, page, section index, what joins it to the block before, whether code.
_Block = tuple[str, int | None, int, str, bool]


class _Parser:
    """Blocks (paragraphs, list items, code fences, tables) and the sections they are in."""

    def __init__(self, markdown: str) -> None:
        self.lines = markdown.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self.page: int | None = 1 if any(_PAGE.fullmatch(line.strip()) for line in self.lines) else None
        self.sections = [_Section("", "", 0, self.page)]
        self.stack: list[tuple[int, str]] = []
        self.blocks: list[_Block] = []
        self.open: list[str] = []  # lines of the paragraph or list item being read
        self.open_item = False
        self.open_after_blank = True
        self.blank = True  # nothing but blank lines since the last block

    def parse(self) -> tuple[list[_Block], list[_Section]]:
        lines = iter(self.lines)
        self.front_matter(lines)
        for line in lines:
            if fence := _FENCE.match(line):
                self.flush()
                self.fence(line, fence.group(1), lines)
            elif marker := _PAGE.fullmatch(line.strip()):
                self.flush()
                self.page = int(marker.group(1))
            elif atx := _ATX.fullmatch(line):
                self.flush()
                self.heading(len(atx.group(1)), (atx.group(2) or "").strip())
            elif (setext := _SETEXT.fullmatch(line)) and len(self.open) == 1 and not self.open_item:
                text = self.open.pop().strip()
                self.heading(1 if setext.group(1)[0] == "=" else 2, text)
            elif _BREAK.fullmatch(line) or not line.strip():
                self.flush()
                self.blank = True
            elif (item := _ITEM.match(line)) and not (self.open and not self.open_item
                                                      and item.group(1) not in (None, "1")):
                # As in CommonMark, only "1." starts a numbered list inside a paragraph
                # (else "2024. It was..." wrapped onto a new line would be a list item).
                self.flush()
                self.start([line], item=True)
            elif self.open:
                self.open.append(line)
            else:
                self.start([line], item=False)
        self.flush()
        if not self.blocks:
            # Only headings: they are the document's text, rather than no chunk at all.
            self.blocks = [(s.line, s.page, 0, "\n\n", False) for s in self.sections[1:] if s.line]
        return self.blocks, self.sections

    def start(self, lines: list[str], item: bool) -> None:
        self.open, self.open_item, self.open_after_blank = lines, item, self.blank
        self.blank = False

    def flush(self) -> None:
        text = "\n".join(self.open).strip()
        if text:
            section = len(self.sections) - 1
            last = self.blocks[-1] if self.blocks else None
            tight = (self.open_item and not self.open_after_blank and last is not None and last[2] == section
                     and _ITEM.match(last[0]) is not None)
            self.blocks.append((text, self.page, section, "\n" if tight else "\n\n", False))
        self.open = []

    def heading(self, level: int, text: str) -> None:
        while self.stack and self.stack[-1][0] >= level:
            self.stack.pop()
        self.stack.append((level, text))
        trail = " > ".join(t for _, t in self.stack if t)
        group = self.sections[-1].group + (1 if level <= 2 else 0)
        self.sections.append(_Section(trail, "#" * level + " " + text if text else "", group, self.page))
        self.blank = True

    def front_matter(self, lines: Iterator[str]) -> None:
        """YAML front matter ("---" lines around "key: value" lines) is a block of its
        own, kept for its words, never taken for a heading underline."""
        if not self.lines or self.lines[0].strip() != "---":
            return
        end = next((i for i, line in enumerate(self.lines[1:200], 1) if line.strip() in ("---", "...")), None)
        if end is None:
            return
        for _ in range(end + 1):
            next(lines)
        body = "\n".join(self.lines[1:end]).strip()
        if body:
            self.blocks.append((body, self.page, 0, "\n\n", True))

    def fence(self, opener: str, mark: str, lines: Iterator[str]) -> None:
        """A code fence is one block; a page marker inside it closes the block there and
        opens the same fence again, so every block lies on one page."""
        closer = re.compile(" {0,3}" + re.escape(mark[0]) + "{" + str(len(mark)) + ",}[ \t]*")
        body: list[str] = []

        def emit(closed: bool) -> None:
            if any(line.strip() for line in body):
                text = "\n".join([opener, *body] + ([mark] if closed else [])).rstrip()
                self.blocks.append((text, self.page, len(self.sections) - 1, "\n\n", True))

        for line in lines:
            if closer.fullmatch(line):
                emit(True)
                break
            if marker := _PAGE.fullmatch(line.strip()):
                emit(True)
                body = []
                self.page = int(marker.group(1))
            else:
                body.append(line)
        else:
            emit(False)  # unclosed at the end of the document
        self.blank = True


@dataclass(frozen=True)
class _Piece:
    text: str
    tokens: int
    page: int | None
    section: int
    sep: str  # joins it to the piece before it in a chunk ("" for the rest of a cut piece)
    code: bool
    line: bool = False  # an inline heading, never the last piece of a chunk
    exact: bool = True  # False: `tokens` is the count of the piece it was cut from, less the cut part's


class _Packer:
    def __init__(self, count: Count, size: int, overlap: int, sections: list[_Section]) -> None:
        self.count, self.size, self.overlap, self.sections = count, size, overlap, sections
        self._heads: dict[int, tuple[str, int]] = {}
        self._lines: dict[int, int] = {}

    def pack(self, pieces: list[_Piece], seq: int) -> list[Chunk]:
        """Chunks of one group (a top-level section) of pieces."""
        queue = deque(pieces)
        chunks: list[Chunk] = []
        tail: list[_Piece] = []  # the previous chunk's pieces of its last section
        while queue:
            section = queue[0].section
            head, head_tokens = self.head(section)
            budget = self.size - head_tokens
            margin = 0
            while True:
                body, taken = self.fill(queue, tail, budget - margin)
                text = _join(head, body)
                single = not head and len(body) == 1 and body[0].exact and body[0].text == text
                tokens = body[0].tokens if single else self.count(text)
                if tokens <= self.size:
                    break
                # Joined text counts more than its parts: give the pieces back, try with less room.
                queue.extendleft(reversed(taken))
                margin += tokens - self.size
                if budget - margin < 1:
                    if not head:
                        raise RuntimeError(f"cannot fit text into {self.size} tokens: {text[:80]!r}")
                    # Not one character fits beside the trail (a tiny size, a byte-level
                    # vocabulary): this chunk goes without its trail line.
                    head, budget, margin = "", self.size, 0
            chunks.append(Chunk(seq + len(chunks), text, self.sections[section].trail, body[0].page, body[-1].page,
                                tokens))
            last_line = max((i for i, p in enumerate(body) if p.line), default=-1)
            tail = body[last_line + 1:]
        return chunks

    def fill(self, queue: deque[_Piece], tail: list[_Piece], budget: int) -> tuple[list[_Piece], list[_Piece]]:
        """The body of one chunk: overlap, then pieces from the queue while they fit.
        Returns the body and the pieces it took from the queue."""
        first = self.exact(queue, budget)
        body: list[_Piece] = []
        used = 0
        if self.overlap and tail and tail[-1].section == first.section:
            # A paragraph that fits whole is not cut to make room for overlap.
            room = min(self.overlap, budget // 2, budget - first.tokens if first.tokens <= budget else budget)
            if room > 0:
                body = self.tail(tail, room)
                used = sum(p.tokens for p in body)
        if first.tokens > budget - used:
            self.cut(queue, budget - used, fine=True)
        taken: list[_Piece] = []
        current = first.section
        while queue:
            line = self.inline(queue[0]) if queue[0].section != current else None
            extra = line.tokens if line else 0
            piece = self.exact(queue, budget - used - extra)
            if used + extra + piece.tokens <= budget or not taken:
                if line and line.text:
                    body.append(line)
                current = piece.section
                body.append(queue.popleft())
                taken.append(piece)
                used += extra + piece.tokens
            elif not (piece.tokens > self.size - self.head(piece.section)[1]
                      and self.cut(queue, budget - used - extra, fine=False)):
                break  # it fits a chunk of its own: not cut to fill this one
        return body, taken

    def cut(self, queue: deque[_Piece], target: int, fine: bool) -> bool:
        """Replace the first piece by a head of at most `target` tokens and the rest.
        Cuts at sentence ends (line ends in code); `fine` also allows word boundaries
        and, for one long word, any character. False if no such head exists."""
        piece = queue[0]
        if target < 1:
            return False
        text = piece.text
        counted: dict[int, int] = {}  # prefix length -> tokens, as the searches share prefixes

        def tokens(end: int) -> int:
            n = counted.get(end)
            if n is None:
                n = counted[end] = self.count(text[:end])
            return n

        def fits(end: int) -> bool:
            return tokens(end) <= target

        k = 0
        # Characters to look for boundaries in first: a little more than the answer, at
        # this piece's own characters per token (about 4 in prose, 1.4 in base64).
        window = max(64, int(1.25 * target * len(text) / max(1, piece.tokens)))
        for pattern in [_LINE_END if piece.code else _SENTENCE_END] + ([_WORD_END] if fine else []):
            k = _gallop(_boundaries(text, pattern, fits, window), fits) or 0
            if k:
                break
        else:
            if fine:
                k = _slice(len(text), target, tokens, counted) or 1
        if not k:
            return False
        if k >= len(text) or not text[k:].strip():  # an estimate said it did not fit, but it does
            k = len(text)
            queue[0] = replace(piece, tokens=tokens(k), exact=True)
            return True
        head_tokens = tokens(k)
        rest = text[k:].lstrip()  # a cut at a character may land before a space
        queue[0] = replace(piece, text=rest, tokens=max(1, piece.tokens - head_tokens), exact=False,
                           sep=text[k:len(text) - len(rest)])
        queue.appendleft(replace(piece, text=text[:k], tokens=head_tokens, exact=True))
        return True

    def exact(self, queue: deque[_Piece], room: int) -> _Piece:
        """The first piece, counted if its estimate says it fits in `room`: a cut
        inside a word can split a token in two, so over the thousands of cuts of a 1 MB
        base64 string the estimate drifts by hundreds of tokens."""
        piece = queue[0]
        if not piece.exact and piece.tokens <= room:
            piece = queue[0] = replace(piece, tokens=self.count(piece.text), exact=True)
        return piece

    def tail(self, pieces: list[_Piece], room: int) -> list[_Piece]:
        """The end of `pieces` in at most `room` tokens: whole pieces, then whole
        sentences (lines of code) of the next one back, else its last whole words."""
        out: list[_Piece] = []
        used = 0
        for piece in reversed(pieces):
            if used + piece.tokens <= room:
                out.append(piece)
                used += piece.tokens
                continue
            last = self.last(piece, room - used)
            if last is not None:
                out.append(last)
            break
        out.reverse()
        return out

    def last(self, piece: _Piece, room: int) -> _Piece | None:
        """The longest run of whole sentences (lines of code), else of whole words, that
        ends `piece` and fits in `room` tokens."""
        text = piece.text
        for pattern in (_LINE_END if piece.code else _SENTENCE_END, _WORD_END):
            starts = [m.end() for m in pattern.finditer(text) if m.end() < len(text)]
            k = _gallop(reversed(starts), lambda s: self.count(text[s:]) <= room)
            if k is not None:
                return replace(piece, text=text[k:], tokens=self.count(text[k:]))
        return None

    def head(self, section: int) -> tuple[str, int]:
        """The trail line a chunk of `section` starts with, and its tokens; a trail
        longer than half a chunk is cut there."""
        cached = self._heads.get(section)
        if cached is None:
            # Counted with the blank line after it, which is a token in some vocabularies.
            trail = self.sections[section].trail
            tokens = self.count(trail + "\n\n") if trail else 0
            if tokens > self.size // 2:
                k = _gallop(range(1, len(trail) + 1), lambda e: self.count(trail[:e] + "\n\n") <= self.size // 2)
                trail = trail[:k or 1].rstrip()
                tokens = self.count(trail + "\n\n")
            cached = self._heads[section] = (trail, tokens)
        return cached

    def inline(self, piece: _Piece) -> _Piece:
        """The heading line put before the first piece of a subsection inside a chunk."""
        text = self.sections[piece.section].line
        tokens = self._lines.get(piece.section)
        if tokens is None:
            tokens = self._lines[piece.section] = self.count(text)
        return _Piece(text, tokens, piece.page, piece.section, "\n\n", False, line=True)


def _boundaries(text: str, pattern: re.Pattern[str], fits: Callable[[int], bool], window: int) -> Iterator[int]:
    """Cut positions in `text` (ends of `pattern`'s matches), found lazily in windows of
    doubling size, and not past the first window whose end no longer fits: a 1 MB
    base64 string has no boundary at all, and must not be scanned (or counted) whole
    for each chunk cut from it."""
    start, width = 0, window
    while start < len(text):
        end = min(len(text), start + width)
        for m in pattern.finditer(text, start, end):
            if 0 < m.start() and m.end() < len(text):  # a head of only indentation is no head
                yield m.end()
        if end >= len(text) or not fits(end):
            return
        start, width = end, width * 2


def _gallop(candidates: Iterable[int], fits: Callable[[int], bool]) -> int | None:
    """The last of `candidates` (in order) that fits, given that fitting is monotone
    (every candidate before one that fits fits too); None if the first does not.
    Probes the 1st, 2nd, 4th, 8th... candidate, then bisects, so it asks about
    candidates up to about twice as far in as the answer."""
    it = iter(candidates)
    seen: list[int] = []

    def have(i: int) -> bool:
        while len(seen) <= i:
            nxt = next(it, None)
            if nxt is None:
                return False
            seen.append(nxt)
        return True

    lo, hi, i = -1, -1, 0
    while hi < 0:
        if not have(i):
            if len(seen) - 1 == lo:
                return seen[lo] if lo >= 0 else None
            i = len(seen) - 1
        if fits(seen[i]):
            lo, i = i, 2 * i + 1
        else:
            hi = i
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(seen[mid]):
            lo = mid
        else:
            hi = mid
    return seen[lo] if lo >= 0 else None


def _slice(length: int, target: int, tokens: Callable[[int], int], counted: dict[int, int]) -> int:
    """The longest prefix (in characters, at most `length`) of a text without
    boundaries that fits `target` tokens, or 0. Prefixes already counted bracket the
    answer; interpolating on token density finds it in a few counts, and a prefix
    within 1/16 of the target is taken (each count of a long word is costly)."""
    lo = max((e for e, n in counted.items() if n <= target), default=0)
    hi = min((e for e, n in counted.items() if n > target), default=0)
    if not hi:
        hi = max(2 * lo, target)
        while hi < length and tokens(hi) <= target:
            lo, hi = hi, 2 * hi
        if hi >= length:
            if tokens(length) <= target:
                return length
            hi = length
    slack = target // 16
    aim = target - slack // 2  # just under: one probe usually lands within the slack
    while hi - lo > 1:
        n_lo = tokens(lo) if lo else 0
        if n_lo >= target - slack:
            break
        step = (aim - n_lo) * (hi - lo) // max(1, tokens(hi) - n_lo)
        quarter = (hi - lo) // 4
        e = lo + min(max(step, quarter, 1), hi - lo - 1)  # at least a quarter: no crawl
        if tokens(e) <= target:
            lo = e
        else:
            hi = e
    return lo


def _join(head: str, body: list[_Piece]) -> str:
    text = "".join([body[0].text] + [p.sep + p.text for p in body[1:]]).strip()
    return f"{head}\n\n{text}" if head else text
