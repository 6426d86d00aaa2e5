"""daemons/ingest/chunk.py and tokens.py with the real tokenizer: the default embedding
model's GGUF (all-MiniLM-L6-v2, WordPiece), loaded vocabulary-only, checked against the
embedding daemon's own tokenizing (daemons/embed/native.py)."""

from __future__ import annotations

import random
import re
import string
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from daemons import models
from daemons.embed.native import EmbedModel
from daemons.ingest.chunk import Chunk, chunk_markdown
from daemons.ingest.tokens import Tokenizer

GGUF = "all_minilm_l6_v2/all-MiniLM-L6-v2.f16.gguf"
SAMPLES = ["Hello world, it's unbelievable! Don't (stop) me-now.", "", "   ", "naïve café 日本語 👍",
           "[CLS] looks special [SEP] but is text", "x" * 300, "Install > From source\n\n- one\n- two"]


@pytest.fixture(scope="module")
def gguf() -> Path:
    return models.resolve(GGUF, Path("var/lib/models"))


@pytest.fixture(scope="module")
def tok(gguf: Path) -> Iterator[Tokenizer]:
    tokenizer = Tokenizer(gguf)
    yield tokenizer
    tokenizer.close()


# --- the tokenizer ----------------------------------------------------------------


def test_tokenizer_counts_as_the_embedding_daemon_does(tok: Tokenizer, gguf: Path) -> None:
    model = EmbedModel(gguf)
    assert tok.n_ctx_train == model.n_ctx_train == 512
    assert tok.specials == len(model.prefix) + len(model.suffix) == 2
    for text in SAMPLES:
        ids = model.tokenize(text)
        assert tok.count(text) == len(ids) - tok.specials
        assert tok.encode(text) == ids[1:-1]


def test_decode_is_readable(tok: Tokenizer) -> None:
    # WordPiece pieces come back from llama.cpp as " hello", "xx" (no "##"), " ,":
    # decode joins them into plain text, lower-cased as the model's vocabulary is.
    assert tok.decode(tok.encode("Hello world, it's unbelievable! Don't stop.")) == \
        "hello world, it's unbelievable! don't stop."
    assert tok.decode(tok.encode("tokenization")) == "tokenization"
    assert tok.decode(tok.encode("naïve café")) == "naive cafe"
    assert tok.decode([]) == ""
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([10**6])


def test_tokenizer_is_shared_by_threads(tok: Tokenizer) -> None:
    texts = [f"Sentence number {i} with words {' '.join(string.ascii_lowercase[: i % 26])}." * (i % 7 + 1)
             for i in range(200)]
    serial = [(tok.count(t), tok.encode(t), tok.decode(tok.encode(t))) for t in texts]
    with ThreadPoolExecutor(8) as ex:
        threaded = list(ex.map(lambda t: (tok.count(t), tok.encode(t), tok.decode(tok.encode(t))), texts))
    assert threaded == serial


# --- chunking ---------------------------------------------------------------------


def bodies(chunks: list[Chunk]) -> list[str]:
    """Chunk texts without their heading trail line."""
    return [c.text[len(c.heading) + 2:] if c.heading else c.text for c in chunks]


def squeeze(text: str) -> str:
    return "".join(text.split())


def check(chunks: list[Chunk], tok: Tokenizer, size: int) -> None:
    for i, c in enumerate(chunks):
        assert c.seq == i
        assert c.text.strip() == c.text and c.text
        assert c.tokens == tok.count(c.text) <= size
        if c.heading:
            assert c.text.startswith(c.heading + "\n\n")
        assert "<!-- page" not in c.text


def random_markdown(seed: int, pages: bool) -> str:
    rng = random.Random(seed)
    words = ["onebox", "daemon", "token", "chunk", "the", "of", "install", "build", "page", "index",
             "vector", "search", "quick", "brown", "fox", "naïve", "café", "日本語", "über", "straße",
             "e-mail", "x86_64", "3.14", "(parens)", "[brackets]", "👍"]

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) + rng.choice(".!?;,")

    parts: list[str] = []
    for i in range(rng.randint(30, 80)):
        r = rng.random()
        if r < 0.12:
            parts.append("#" * rng.randint(1, 5) + f" Heading {i}")
        elif r < 0.17 and pages:
            parts.append(f"<!-- page {i} -->")
        elif r < 0.22:
            parts.append("```python\n" + "\n".join("x = " + sentence() for _ in range(rng.randint(1, 40))) + "\n```")
        elif r < 0.32:
            parts.append("\n".join("- " + sentence() for _ in range(rng.randint(1, 8))))
        elif r < 0.35:
            parts.append("".join(rng.choice(string.ascii_letters + "+/") for _ in range(rng.randint(100, 3000))))
        else:
            parts.append(" ".join(sentence() for _ in range(rng.randint(1, 40))))
    return "\n\n".join(parts)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("size, overlap", [(16, 0), (64, 8), (256, 32), (500, 100)])
def test_no_chunk_exceeds_size(tok: Tokenizer, seed: int, size: int, overlap: int) -> None:
    markdown = random_markdown(seed, pages=seed % 2 == 0)
    chunks = chunk_markdown(markdown, tok.count, size, overlap)
    check(chunks, tok, size)
    if overlap == 0:
        # Nothing lost, nothing added: every non-space character of the input, but for
        # the heading lines and page markers, is in the chunks' bodies, in order.
        kept = [line for line in markdown.split("\n")
                if not re.match(r"#{1,6} |<!-- page \d+ -->$", line)]
        got = [line for body in bodies(chunks) for line in body.split("\n") if not re.match(r"#{1,6} ", line)]
        assert squeeze("\n".join(got)) == squeeze("\n".join(kept))


def test_a_long_word_is_cut_into_token_slices(tok: Tokenizer) -> None:
    rng = random.Random(5)
    blob = "".join(rng.choice(string.ascii_letters + string.digits + "+/") for _ in range(5000))
    markdown = f"# Attachment\n\nThe data follows.\n\n{blob}\n\nThe end."
    check(chunk_markdown(markdown, tok.count, 64, 8), tok, 64)
    chunks = chunk_markdown(markdown, tok.count, 64, 0)
    check(chunks, tok, 64)
    assert all(c.heading == "Attachment" for c in chunks)
    assert "".join(squeeze(b) for b in bodies(chunks)) == squeeze(f"The data follows.{blob}The end.")
    assert len(chunks) > 5000 / (64 * 2)  # slices are cut near the limit, not in tiny bits
    assert sum(c.tokens for c in chunks) < 1.3 * tok.count(blob)


def test_heading_trails(tok: Tokenizer) -> None:
    markdown = """Preamble before any heading.

# Install

## From source

Clone the repository.

### Linux

Use apt.

### macOS

Use brew.

## Binary

Download it.

Setext heading
==============

Under the setext one.
"""
    chunks = chunk_markdown(markdown, tok.count, 256, 0)
    check(chunks, tok, 256)
    assert [(c.heading, c.text) for c in chunks] == [
        ("", "Preamble before any heading."),
        # "# Install" has no body: it lives on in the trail of its subsection.
        # ### subsections are packed with their section, their headings inline.
        ("Install > From source",
         "Install > From source\n\nClone the repository.\n\n### Linux\n\nUse apt.\n\n### macOS\n\nUse brew."),
        ("Install > Binary", "Install > Binary\n\nDownload it."),
        ("Setext heading", "Setext heading\n\nUnder the setext one."),
    ]


def test_chunks_never_cross_a_top_level_section(tok: Tokenizer) -> None:
    markdown = "\n\n".join(f"## Part {i}\n\nShort text {i}." for i in range(5))
    chunks = chunk_markdown(markdown, tok.count, 256, 16)
    assert [c.text for c in chunks] == [f"Part {i}\n\nShort text {i}." for i in range(5)]


def test_a_chunk_starting_in_a_subsection_has_its_trail(tok: Tokenizer) -> None:
    sentences = " ".join(f"Linux step {i} is described here." for i in range(30))
    markdown = f"# Guide\n\nIntro.\n\n### Linux\n\n{sentences}\n\n### macOS\n\nUse brew."
    chunks = chunk_markdown(markdown, tok.count, 48, 0)
    check(chunks, tok, 48)
    # A chunk's heading is the section it starts in; later subsections are inline.
    assert chunks[0].heading == "Guide"
    assert chunks[0].text.startswith("Guide\n\nIntro.\n\n### Linux\n\nLinux step 0 is described here.")
    assert [c.heading for c in chunks[1:]] == ["Guide > Linux"] * (len(chunks) - 1)
    assert chunks[1].text.startswith("Guide > Linux\n\nLinux step 5 is described here.")
    assert chunks[-1].text.endswith("Linux step 29 is described here.\n\n### macOS\n\nUse brew.")
    # an inline heading is never the end of a chunk
    assert not any(re.search(r"(^|\n)#{1,6} [^\n]*$", c.text) for c in chunks)


def test_overlong_heading_trail_is_cut_in_text_not_in_heading(tok: Tokenizer) -> None:
    title = " ".join(f"word{i}" for i in range(100))
    chunks = chunk_markdown(f"# {title}\n\nBody text.", tok.count, 32, 0)
    assert [c.heading for c in chunks] == [title]
    trail, body = chunks[0].text.split("\n\n")
    assert title.startswith(trail) and tok.count(trail) <= 16
    assert body == "Body text." and chunks[0].tokens == tok.count(chunks[0].text) <= 32


def test_pages_from_markers(tok: Tokenizer) -> None:
    markdown = ("Cover text.\n\n<!-- page 2 -->\n\nSecond page starts. It goes on.\n\n<!-- page 3 -->\n\n"
                "Third page.\n\n<!-- page 4 -->\n\n```\ncode on page 4\n<!-- page 5 -->\ncode on page 5\n```\n")
    chunks = chunk_markdown(markdown, tok.count, 256, 0)
    assert len(chunks) == 1
    assert (chunks[0].page, chunks[0].page_end) == (1, 5)
    assert chunks[0].text == ("Cover text.\n\nSecond page starts. It goes on.\n\nThird page.\n\n"
                              "```\ncode on page 4\n```\n\n```\ncode on page 5\n```")
    small = chunk_markdown(markdown, tok.count, 12, 0)
    check(small, tok, 12)
    where = {"Cover": 1, "Second": 2, "goes": 2, "Third": 3, "page 4": 4, "page 5": 5}
    for c in small:
        pages = [page for word, page in where.items() if word in c.text]
        assert (c.page, c.page_end) == (min(pages), max(pages)), c
    unpaged = chunk_markdown("No markers at all.\n\nAnother paragraph.", tok.count, 8, 0)
    assert {(c.page, c.page_end) for c in unpaged} == {(None, None)}


def test_overlap_repeats_whole_sentences_of_the_same_section(tok: Tokenizer) -> None:
    text = " ".join(f"Sentence {i} says something about topic {i % 7}." for i in range(60))
    markdown = f"# Notes\n\n{text}\n\n# Other\n\nA different section entirely."
    chunks = chunk_markdown(markdown, tok.count, 64, 16)
    check(chunks, tok, 64)
    notes = [c for c in chunks if c.heading == "Notes"]
    assert len(notes) > 3
    for prev, nxt in zip(bodies(notes), bodies(notes)[1:], strict=False):
        shared = max((k for k in range(1, len(nxt)) if prev.endswith(nxt[:k])), default=0)
        repeated = nxt[:shared]
        assert repeated, (prev, nxt)
        assert 0 < tok.count(repeated) <= 16
        assert re.match(r"Sentence \d+ says", repeated)  # whole sentences here
    other = [c for c in chunks if c.heading == "Other"]
    assert bodies(other) == ["A different section entirely."]


def test_paragraphs_are_packed_whole_and_code_fences_kept(tok: Tokenizer) -> None:
    paragraphs = [" ".join(f"Paragraph {p} sentence {s}." for s in range(4)) for p in range(6)]
    code = "```sh\n" + "\n".join(f"echo line {i}" for i in range(5)) + "\n```"
    markdown = "\n\n".join(paragraphs[:3] + [code] + paragraphs[3:])
    size = 3 * tok.count(paragraphs[0]) + 4
    chunks = chunk_markdown(markdown, tok.count, size, 0)
    check(chunks, tok, size)
    for body in bodies(chunks):
        for part in body.split("\n\n"):
            assert part in paragraphs or part == code
    assert any(code in b for b in bodies(chunks))


def test_list_items_are_blocks(tok: Tokenizer) -> None:
    items = [f"{i}. item number {i} has a few words" for i in range(1, 13)]
    markdown = "Steps to take:\n" + "\n".join(items) + "\n\nA paragraph that mentions\n2024. It was a year."
    chunks = chunk_markdown(markdown, tok.count, 40, 0)
    check(chunks, tok, 40)
    lines = [line for body in bodies(chunks) for line in body.split("\n") if line]
    assert lines == ["Steps to take:", *items, "A paragraph that mentions", "2024. It was a year."]
    assert all(re.fullmatch(r"(\d+\. item number \d+ has a few words\n?)+", b) for b in bodies(chunks)[1:-1])


def test_inline_code_fence_like_text_is_not_a_fence(tok: Tokenizer) -> None:
    markdown = "Use ```x``` here.\n\n## Next\n\nMore."
    assert [c.heading for c in chunk_markdown(markdown, tok.count, 64, 0)] == ["", "Next"]


def test_heading_only_document_and_empty_input(tok: Tokenizer) -> None:
    assert chunk_markdown("", tok.count, 64, 8) == []
    assert chunk_markdown(" \n\n\t\n", tok.count, 64, 8) == []
    assert chunk_markdown("<!-- page 1 -->\n\n<!-- page 2 -->\n", tok.count, 64, 8) == []
    only = chunk_markdown("# Title\n\n## Chapter", tok.count, 64, 8)
    assert [c.text for c in only] == ["# Title\n\n## Chapter"]


def test_chunking_is_deterministic(tok: Tokenizer) -> None:
    markdown = random_markdown(42, pages=True)
    assert chunk_markdown(markdown, tok.count, 100, 20) == chunk_markdown(markdown, tok.count, 100, 20)


def test_bad_arguments(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="size"):
        chunk_markdown("text", tok.count, 4, 0)
    with pytest.raises(ValueError, match="overlap"):
        chunk_markdown("text", tok.count, 64, -1)


@pytest.mark.timeout(60)  # a guard against quadratic time, not a benchmark
def test_a_megabyte_of_markdown(tok: Tokenizer) -> None:
    markdown = "\n\n".join(random_markdown(seed, pages=True) for seed in range(100, 160))
    while len(markdown) < 1_000_000:
        markdown += "\n\n" + markdown
    chunks = chunk_markdown(markdown, tok.count, 256, 32)
    check(chunks, tok, 256)
    rng = random.Random(1)
    base64ish = "".join(rng.choice(string.ascii_letters + "+/") for _ in range(200_000))
    check(chunk_markdown(base64ish, tok.count, 256, 32), tok, 256)
