"""Files to markdown: what kind a file really is, and the text of the kinds read here
(plain text, markdown, HTML, .docx). PDFs and images go to the OCR daemon instead.

Inbox files come from anyone, so nothing is trusted: the kind is sniffed from the
bytes as well as the name (a PDF named .txt is a PDF, random bytes named .txt are not
text), a .docx's declared sizes are checked before any part is inflated (a zip bomb
costs nothing), and every failure a file can never recover from is a ParseError whose
message says why, for the quarantine.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import struct
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import charset_normalizer
import docx
import markdownify
from bs4 import BeautifulSoup, Comment, Tag
from docx.table import Table
from docx.text.paragraph import Paragraph

HEAD_BYTES = 8192  # what kind_of needs to see of a file
MIB = 1024 * 1024
DOCX_MAX_EXPANSION = 20  # times max_bytes, and never more than DOCX_MAX_INFLATED
DOCX_MAX_INFLATED = 512 * MIB
DOCX_MAX_MEMBERS = 10_000
DOCX_MAX_XML = 32 * MIB  # [ingest] max_docx_xml_bytes
DOCX_MAX_RATIO = 100  # [ingest] max_zip_ratio
RATIO_FROM = MIB  # smaller parts may compress as well as they like
OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # encrypted Office files, and old .doc

TEXT_EXTS = {".txt": "text", ".text": "text", ".log": "text", ".csv": "text",
             ".md": "markdown", ".markdown": "markdown",
             ".html": "html", ".htm": "html", ".xhtml": "html"}
READ_HERE = ("text", "markdown", "html", "docx")

_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_CONTROL_OK = set("\t\n\r\f\v\x1b")
# Legacy Western text, which charset-normalizer often takes for a Baltic or Central
# European code page on short samples ("crème" read as cp1257 is "crčme").
_WESTERN = re.compile(r"[\x00-\x7f\u00a0-\u00ff\u2013\u2014\u2018\u2019\u201a\u201c\u201d\u201e\u2020\u2021"
                      r"\u2022\u2026\u2030\u2039\u203a\u20ac\u2122\u0152\u0153\u0160\u0161\u017d\u017e\u0178]*")
_ATX = re.compile(r" {0,3}(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*")
_FENCE = re.compile(r" {0,3}(```|~~~)")
_HEADING_STYLE = re.compile(r"heading\s*([1-6])", re.IGNORECASE)
_BLANK_RUNS = re.compile(r"\n[ \t]*(?:\n[ \t]*)+\n")
_DROP_TAGS = ("script", "style", "noscript", "template", "nav", "iframe", "object", "embed", "svg", "canvas")


class ParseError(Exception):
    """A file that can never be read here: its message (str(exc)) is the reason kept
    with the quarantined file."""


@dataclass(frozen=True)
class DocxLimits:
    """What a .docx may unzip to ([ingest] max_docx_xml_bytes, max_zip_ratio)."""

    max_xml_bytes: int = DOCX_MAX_XML
    max_ratio: int = DOCX_MAX_RATIO


@dataclass(frozen=True)
class Parsed:
    markdown: str
    title: str
    pages: int  # 1 for formats without pages


def kind_of(path: Path, head: bytes) -> str | None:
    """"text", "markdown", "html", "docx", "pdf", "image", or None if unsupported.
    `head` is the file's first bytes (HEAD_BYTES of them is enough): magic bytes
    decide first, then the extension, and text kinds must not look binary."""
    ext = path.suffix.lower()
    if head.startswith(b"%PDF-") or (ext == ".pdf" and b"%PDF-" in head[:1024]):
        return "pdf"
    if _is_image(head):
        return "image"
    if head.startswith(b"PK\x03\x04"):
        # The first members of a .docx are [Content_Types].xml, _rels/ and word/.
        return "docx" if ext == ".docx" or b"word/" in head else None
    if ext == ".docx":
        return "docx"  # not a zip: to_markdown says so
    kind = TEXT_EXTS.get(ext)
    if kind is None and ext == "" and _looks_like_text(head):
        kind = "text"  # README, LICENSE, ...
    if kind is not None and b"\x00" in head and not any(head.startswith(bom) for bom, _ in _BOMS):
        return None  # binary data with a text name
    return kind


def unsupported(path: Path, head: bytes) -> ParseError:
    """The error for a file kind_of returned None for, naming what it starts with."""
    ext = path.suffix.lower() or "no extension"
    start = head[:8]
    if path.suffix.lower() in TEXT_EXTS or path.suffix == "":
        return ParseError(f"not UTF-8 or any text encoding (binary data?): {ext}, starts with {start!r}")
    return ParseError(f"unsupported file type ({ext}, starts with {start!r})")


def to_markdown(path: Path, kind: str, max_bytes: int, opened: BinaryIO | None = None,
                docx_limits: DocxLimits = DocxLimits()) -> Parsed:
    """The file's text as markdown, for the kinds read here (READ_HERE); ParseError for a
    file that cannot be read, ValueError for a kind that belongs to the OCR daemon.
    `opened`: the file already open (daemons/ingest/inbox.py checked that descriptor),
    read instead of `path`, which then only names it."""
    if kind not in READ_HERE:
        raise ValueError(f"to_markdown reads {', '.join(READ_HERE)}, not {kind!r} (that is the OCR daemon's)")
    size = os.fstat(opened.fileno()).st_size if opened is not None else path.stat().st_size
    if size == 0:
        raise ParseError("empty file")
    if size > max_bytes:
        raise ParseError(too_big(size, max_bytes))
    if kind == "docx":
        parsed = _docx(path, max_bytes, opened, docx_limits)
    else:
        with contextlib.nullcontext(opened) if opened is not None else path.open("rb") as f:
            f.seek(0)
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ParseError(f"file grew past the limit of {_human(max_bytes)} while being read")
        if kind == "html":
            parsed = _html(data, path)
        else:
            text = decode_text(data)
            title = _first_heading(text) if kind == "markdown" else None
            parsed = Parsed(text, title or path.stem, 1)
    if not parsed.markdown.strip():
        raise ParseError(f"no text in this {kind} file")
    return parsed


def decode_text(data: bytes) -> str:
    """Bytes of a text file to str with "\\n" line ends: UTF-8 (with or without BOM),
    UTF-16/32 with a BOM, else the encoding charset-normalizer finds; ParseError for
    data that is not text."""
    text = None
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError as exc:
                raise ParseError(f"not valid {encoding} despite its byte-order mark: {exc}") from None
            break
    else:
        if b"\x00" in data:
            raise ParseError("not UTF-8 or any text encoding (binary data?): NUL bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = _legacy(data)
    if _control_ratio(text) > 0.01:
        raise ParseError("not UTF-8 or any text encoding (binary data?): control characters")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _legacy(data: bytes) -> str:
    matches = charset_normalizer.from_bytes(data)
    best = matches.best()
    if best is None:
        raise ParseError("not UTF-8 or any text encoding (binary data?)")
    western = next((m for m in matches if m.encoding == "cp1252"), None)
    if western is not None and western.chaos <= best.chaos + 0.2:
        text = data.decode("cp1252", "replace")
        if _WESTERN.fullmatch(text):
            return text
    return str(best)


def _control_ratio(text: str) -> float:
    sample = text[:65536]
    if not sample:
        return 0.0
    bad = sum(1 for ch in sample if ch not in _CONTROL_OK and unicodedata.category(ch) == "Cc")
    return bad / len(sample)


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return _control_ratio(text) <= 0.01


def _is_image(head: bytes) -> bool:
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a",
                        b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    # "BM" alone starts plenty of text; a BMP's DIB header has one of a few sizes.
    return head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in {
        12, 16, 40, 52, 56, 64, 108, 124}


def _first_heading(markdown: str) -> str | None:
    fenced = False
    for line in markdown.split("\n"):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := _ATX.fullmatch(line)):
            return m.group(2).strip()
    return None


def _tidy(markdown: str) -> str:
    lines = [line.rstrip() for line in markdown.split("\n")]
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip() + "\n"


def too_big(size: int, max_bytes: int) -> str:
    """The quarantine reason for a file over [ingest] max_file_bytes."""
    return (f"file is {_human(size)} ({size} bytes), over the limit of {_human(max_bytes)} ({max_bytes} bytes): "
            "max_file_bytes in [ingest]")


def _human(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


# --- HTML -------------------------------------------------------------------------


def _html(data: bytes, path: Path) -> Parsed:
    if b"\x00" in data and not any(data.startswith(bom) for bom, _ in _BOMS):
        raise ParseError("not HTML (binary data: NUL bytes)")
    # From bytes, so Beautiful Soup honours a BOM or <meta charset> before guessing.
    soup = BeautifulSoup(data, "lxml")
    for comment in soup.find_all(string=lambda s: isinstance(s, Comment)):
        comment.extract()  # "<!-- page 3 -->" in a web page is not a page marker
    for tag in soup.find_all(_DROP_TAGS):
        tag.decompose()
    for img in soup.find_all("img"):
        # Inline images are often data: URIs of many kilobytes; their alt text is the text.
        img.replace_with(str(img.get("alt") or "") if isinstance(img, Tag) else "")
    for a in soup.find_all("a"):
        href = str(a.get("href") or "") if isinstance(a, Tag) else ""
        if href.lower().startswith(("data:", "javascript:")):
            a.unwrap()
    title_tag = soup.find("title")
    title = title_tag.get_text(" ", strip=True) if title_tag else ""
    if not title and (h1 := soup.find("h1")):
        title = h1.get_text(" ", strip=True)
    if head := soup.find("head"):
        head.decompose()
    converter = markdownify.MarkdownConverter(heading_style="ATX", bullets="-", escape_asterisks=False,
                                              escape_underscores=False, escape_misc=False)
    markdown = _tidy(str(converter.convert_soup(soup)))
    return Parsed(markdown, title or _first_heading(markdown) or path.stem, 1)


# --- .docx ------------------------------------------------------------------------


def _docx(path: Path, max_bytes: int, opened: BinaryIO | None = None,
          limits: DocxLimits = DocxLimits()) -> Parsed:
    if opened is not None:
        _check_zip(opened, max_bytes, limits)
    else:
        with path.open("rb") as f:
            _check_zip(f, max_bytes, limits)
    try:
        if opened is not None:
            opened.seek(0)
        document = docx.Document(opened if opened is not None else str(path))
        lines, title = _docx_lines(document)
    # python-docx reads hostile XML and zip structures: whatever it raises means the
    # file is not a .docx it can read, which is a reason to quarantine, not to crash.
    except Exception as exc:  # noqa: BLE001
        raise ParseError(f"corrupt .docx: {type(exc).__name__}: {exc}") from None
    return Parsed(_tidy("\n".join(lines)), title or path.stem, 1)


def _check_zip(f: BinaryIO, max_bytes: int, limits: DocxLimits) -> None:
    """Refuse a zip bomb before python-docx opens any part. python-docx reads every part
    whole into memory (zipfile stops at a part's declared size, but inflates all of its
    compressed bytes first) and builds an XML tree 20-40 times the size of the XML: so
    the declared sizes are summed, a part that declares too high a compression ratio is
    refused, and each compressed part is inflated here once, a bounded piece at a time,
    to check that it holds what it declares and no more."""
    try:
        f.seek(0)
        with zipfile.ZipFile(f) as zf:
            members = zf.infolist()
    except zipfile.BadZipFile as exc:
        f.seek(0)
        start = f.read(len(OLE_MAGIC))
        if start == OLE_MAGIC:
            raise ParseError("a password-protected (encrypted) Office document, or an old .doc: not a .docx "
                             "that can be read") from None
        if start[:4] == b"PK\x03\x04":  # a zip's directory is at its end: a truncated copy has none
            raise ParseError(f"corrupt .docx: truncated or damaged zip ({exc})") from None
        raise ParseError("not a .docx (not a zip file)") from None
    except (OSError, ValueError, EOFError) as exc:
        raise ParseError(f"corrupt .docx: {exc}") from None
    if len(members) > DOCX_MAX_MEMBERS:
        raise ParseError(f"docx has {len(members)} members, more than {DOCX_MAX_MEMBERS} (zip bomb?)")
    inflated = sum(m.file_size for m in members)
    limit = min(DOCX_MAX_EXPANSION * max_bytes, DOCX_MAX_INFLATED)
    if inflated > limit:
        raise ParseError(f"docx expands to {_human(inflated)}, over the limit of {_human(limit)} (zip bomb?)")
    xml = sum(m.file_size for m in members if m.filename.endswith((".xml", ".rels")))
    if xml > limits.max_xml_bytes:
        raise ParseError(f"docx holds {_human(xml)} of XML, larger than max_docx_xml_bytes = {limits.max_xml_bytes} "
                         f"({_human(limits.max_xml_bytes)}) in [ingest]")
    for m in members:
        if m.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ParseError(f"corrupt .docx: {m.filename} is compressed with method {m.compress_type}, which "
                             "Word does not use")
        if m.file_size > RATIO_FROM and m.file_size > limits.max_ratio * max(1, m.compress_size):
            raise ParseError(f"docx part {m.filename} unzips to {m.file_size // max(1, m.compress_size):,} times "
                             f"its size, over max_zip_ratio = {limits.max_ratio} in [ingest] (zip bomb?)")
        if m.compress_type == zipfile.ZIP_DEFLATED:
            _check_inflated(f, m)


def _check_inflated(f: BinaryIO, m: zipfile.ZipInfo) -> None:
    """ParseError unless the part's compressed bytes inflate to its declared size
    exactly; never holds more than a MiB of it."""
    f.seek(m.header_offset)
    header = f.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise ParseError(f"corrupt .docx: no local header for {m.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    f.seek(m.header_offset + 30 + name_len + extra_len)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    left, out = m.compress_size, 0
    try:
        while left > 0 and not inflater.eof:
            data = f.read(min(left, 64 * 1024))
            if not data:
                break
            left -= len(data)
            while data and not inflater.eof:
                out += len(inflater.decompress(data, MIB))
                if out > m.file_size:
                    raise ParseError(f"docx part {m.filename} unzips to more than the {m.file_size:,} bytes it "
                                     "declares (zip bomb?)")
                data = inflater.unconsumed_tail
    except zlib.error as exc:
        raise ParseError(f"corrupt .docx: {m.filename}: {exc}") from None
    if out != m.file_size:
        raise ParseError(f"corrupt .docx: {m.filename} unzips to {out:,} bytes, not the {m.file_size:,} it declares")


def _docx_lines(document: Any) -> tuple[list[str], str | None]:
    """Markdown lines of the body in order (paragraphs and tables; headers, footers,
    footnotes and text boxes are not read), and the first heading."""
    lines: list[str] = []
    title: str | None = None
    for item in document.iter_inner_content():
        if isinstance(item, Table):
            lines += ["", *_table(item), ""]
            continue
        if not isinstance(item, Paragraph):
            continue
        text = item.text.strip()
        if not text:
            continue
        level = _heading_level(item)
        if level:
            title = title or text
            lines += ["", "#" * level + " " + " ".join(text.split()), ""]
        elif (depth := _list_depth(item)) is not None:
            lines.append("  " * depth + "- " + text)
        else:
            lines += ["", text, ""]
    return lines, title


def _heading_level(paragraph: Paragraph) -> int:
    style: Any = paragraph.style
    for _ in range(4):  # a custom style based on "Heading 2" is a heading too
        if style is None:
            break
        name = str(style.name or "")
        if name.lower() == "title":
            return 1
        if m := _HEADING_STYLE.fullmatch(name.strip()):
            return int(m.group(1))
        style = style.base_style
    return 0


def _list_depth(paragraph: Paragraph) -> int | None:
    """Nesting depth of a list paragraph (numbered or bulleted), None if not one."""
    numpr: list[Any] = paragraph._p.xpath("./w:pPr/w:numPr")
    if numpr:
        levels: list[str] = numpr[0].xpath("./w:ilvl/@w:val")
        return int(levels[0]) if levels and levels[0].isdigit() else 0
    style_name = str(paragraph.style.name or "") if paragraph.style is not None else ""
    return 0 if style_name.lower().startswith("list") else None


def _table(table: Table) -> list[str]:
    rows = []
    for row in table.rows:
        cells = [" ".join(cell.text.split()).replace("|", "\\|") for cell in row.cells]
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    width = len(table.rows[0].cells)
    return [rows[0], "|" + " --- |" * width, *rows[1:]]
