"""daemons/ingest/parse.py on real files made here: text in several encodings, markdown,
HTML, a .docx written by python-docx, and the hostile ones (binary junk, zip bombs, a
PDF under a text name, empty files)."""

from __future__ import annotations

import io
import os
import struct
import zipfile
from pathlib import Path

import docx
import pytest

from daemons.ingest.parse import (
    HEAD_BYTES,
    ParseError,
    kind_of,
    to_markdown,
    unsupported,
)

MB = 10**6
MIB = 1024 * 1024


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def kind(path: Path) -> str | None:
    with path.open("rb") as f:
        return kind_of(path, f.read(HEAD_BYTES))


@pytest.mark.parametrize("encoding, data", [
    ("utf-8", "Grüße, naïve café — 日本語 ✓\n".encode()),
    ("utf-8 with BOM", b"\xef\xbb\xbf" + "Grüße, naïve café — 日本語 ✓\n".encode()),
    ("utf-16 with BOM", "Grüße, naïve café — 日本語 ✓\n".encode("utf-16")),
    ("utf-16-be with BOM", b"\xfe\xff" + "Grüße, naïve café — 日本語 ✓\n".encode("utf-16-be")),
])
def test_text_in_unicode_encodings(tmp_path: Path, encoding: str, data: bytes) -> None:
    path = write(tmp_path / "notes.txt", data)
    assert kind(path) == "text"
    parsed = to_markdown(path, "text", MB)
    assert parsed.markdown == "Grüße, naïve café — 日本語 ✓\n"
    assert (parsed.title, parsed.pages) == ("notes", 1)


def test_legacy_western_text_is_read_as_such(tmp_path: Path) -> None:
    # Short latin-1 French, which charset-normalizer alone takes for Baltic cp1257 ("crčme").
    text = "Café crème, naïve façade - déjà vu. " * 3
    path = write(tmp_path / "menu.txt", text.encode("latin-1"))
    assert kind(path) == "text"
    assert to_markdown(path, "text", MB).markdown == text


def test_cyrillic_legacy_text(tmp_path: Path) -> None:
    text = "Привет, мир! Это простой текст в старой кодировке Windows. " * 4
    path = write(tmp_path / "ru.txt", text.encode("cp1251"))
    assert to_markdown(path, "text", MB).markdown == text


def test_line_ends_are_normalised_and_plain_text_is_kept_as_is(tmp_path: Path) -> None:
    path = write(tmp_path / "log.log", b"a *b* _c_\r\n# not escaped\rlast\n")
    assert to_markdown(path, "text", MB).markdown == "a *b* _c_\n# not escaped\nlast\n"


def test_markdown_title_is_the_first_heading(tmp_path: Path) -> None:
    path = write(tmp_path / "guide.md", b"```\n# not a heading\n```\n\nIntro.\n\n## Install ##\n\nSteps.\n")
    assert kind(path) == "markdown"
    parsed = to_markdown(path, "markdown", MB)
    assert parsed.title == "Install"
    assert parsed.markdown.endswith("Steps.\n")
    untitled = write(tmp_path / "plain.markdown", b"no headings here\n")
    assert to_markdown(untitled, "markdown", MB).title == "plain"


HTML = b"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>The Manual</title>
<style>body { color: red }</style><script>var secret = "do not index";</script></head>
<body><nav><a href="/">Home</a> | <a href="/about">About</a></nav>
<h1>Getting started</h1>
<p>Some <b>bold</b> text with snake_case and a <a href="https://example.org/x">link</a>.</p>
<!-- page 7 -->
<ul><li>first step</li><li>second step</li></ul>
<h2>Options</h2>
<table><tr><th>key</th><th>value</th></tr><tr><td>size</td><td>256</td></tr></table>
<p><img src="data:image/png;base64,iVBORw0KGgo=" alt="a diagram"></p>
<script>document.write("nope")</script>
</body></html>
"""


def test_html_to_markdown(tmp_path: Path) -> None:
    path = write(tmp_path / "manual.html", HTML)
    assert kind(path) == "html"
    parsed = to_markdown(path, "html", MB)
    md = parsed.markdown
    assert parsed.title == "The Manual"
    assert "# Getting started\n" in md and "## Options\n" in md
    assert "snake_case" in md and "**bold**" in md and "[link](https://example.org/x)" in md
    assert "- first step\n- second step" in md
    assert "| key | value |" in md and "| size | 256 |" in md
    assert "a diagram" in md and "base64" not in md
    for gone in ("secret", "do not index", "nope", "color: red", "Home", "page 7"):
        assert gone not in md


def test_html_title_falls_back_to_h1_and_honours_its_charset(tmp_path: Path) -> None:
    html = '<html><head><meta charset="windows-1252"></head><body><h1>Café</h1><p>Crème brûlée</p></body></html>'
    path = write(tmp_path / "page.htm", html.encode("cp1252"))
    parsed = to_markdown(path, "html", MB)
    assert parsed.title == "Café"
    assert "Crème brûlée" in parsed.markdown


def make_docx(path: Path) -> Path:
    document = docx.Document()
    document.add_heading("Quarterly Report", 0)  # the "Title" style
    document.add_paragraph("An introduction paragraph.")
    document.add_heading("Results", 1)
    document.add_paragraph("Revenue went up.", style="List Bullet")
    document.add_paragraph("Costs went down.", style="List Number")
    document.add_heading("By region", 2)
    table = document.add_table(rows=3, cols=2)
    for r, (a, b) in enumerate([("Region", "Sales"), ("North", "10"), ("South | East", "20")]):
        table.cell(r, 0).text, table.cell(r, 1).text = a, b
    document.add_paragraph("Closing words.")
    document.save(str(path))
    return path


def test_docx_to_markdown(tmp_path: Path) -> None:
    path = make_docx(tmp_path / "report.docx")
    assert kind(path) == "docx"
    parsed = to_markdown(path, "docx", MB)
    assert parsed.title == "Quarterly Report"
    assert parsed.markdown == (
        "# Quarterly Report\n\nAn introduction paragraph.\n\n# Results\n\n"
        "- Revenue went up.\n- Costs went down.\n\n## By region\n\n"
        "| Region | Sales |\n| --- | --- |\n| North | 10 |\n| South \\| East | 20 |\n\n"
        "Closing words.\n")


def test_docx_under_another_name_is_found_by_its_content(tmp_path: Path) -> None:
    path = make_docx(tmp_path / "report.docx")
    renamed = path.rename(tmp_path / "report")
    assert kind(renamed) == "docx"


def test_not_a_zip_named_docx(tmp_path: Path) -> None:
    path = write(tmp_path / "fake.docx", b"just some text, not a zip\n")
    assert kind(path) == "docx"
    with pytest.raises(ParseError, match=r"not a \.docx \(not a zip file\)"):
        to_markdown(path, "docx", MB)


def test_zip_that_is_not_a_docx(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("hello.txt", "hello")
    path = write(tmp_path / "other.docx", buf.getvalue())
    with pytest.raises(ParseError, match=r"corrupt \.docx"):
        to_markdown(path, "docx", MB)


def test_truncated_docx(tmp_path: Path) -> None:
    data = make_docx(tmp_path / "whole.docx").read_bytes()
    path = write(tmp_path / "cut.docx", data[: len(data) // 2])
    with pytest.raises(ParseError, match=r"corrupt \.docx: truncated or damaged zip"):
        to_markdown(path, "docx", MB)


def test_zip_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    # A real one: 50 MB of zeros deflate to ~50 KB; limit 20 x 1 MB.
    path = tmp_path / "bomb.docx"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("[Content_Types].xml", "<Types/>")
        with zf.open("word/document.xml", "w") as member:
            block = b"\0" * MIB
            for _ in range(50):
                member.write(block)
    assert path.stat().st_size < MB
    with pytest.raises(ParseError, match=r"docx expands to 52\.4 MB.*\(zip bomb\?\)"):
        to_markdown(path, "docx", MB)


def test_declared_sizes_are_what_is_checked(tmp_path: Path) -> None:
    # A member that claims 4 GB uncompressed but holds a few bytes: were it inflated, the
    # error would be a CRC or size mismatch ("corrupt"), not the bomb check's; and the
    # 512 MiB ceiling holds however large max_bytes is.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("word/document.xml", b"<w:document/>")
    data = bytearray(buf.getvalue())
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 0xF0000000)
    path = write(tmp_path / "liar.docx", bytes(data))
    with pytest.raises(ParseError, match=r"expands to 4\.0 GB, over the limit of 536\.9 MB \(zip bomb\?\)"):
        to_markdown(path, "docx", 1000 * MB)


def test_pdf_and_image_under_text_names(tmp_path: Path) -> None:
    pdf = write(tmp_path / "scan.txt", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n")
    png = write(tmp_path / "photo.txt", b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    jpeg = write(tmp_path / "photo.docx", b"\xff\xd8\xff\xe0" + os.urandom(64))
    tiff = write(tmp_path / "fax", b"II*\x00" + os.urandom(64))
    webp = write(tmp_path / "pic.html", b"RIFF\x10\x00\x00\x00WEBPVP8 " + os.urandom(32))
    assert [kind(p) for p in (pdf, png, jpeg, tiff, webp)] == ["pdf", "image", "image", "image", "image"]
    assert kind(write(tmp_path / "real.pdf", b"%PDF-1.4\n")) == "pdf"
    with pytest.raises(ValueError, match="OCR"):
        to_markdown(pdf, "pdf", MB)
    with pytest.raises(ValueError, match="OCR"):
        to_markdown(png, "image", MB)


def test_text_that_starts_like_a_bmp_is_text(tmp_path: Path) -> None:
    path = write(tmp_path / "cars.txt", b"BMW and Audi are car makers, and so on, and so forth.\n")
    assert kind(path) == "text"


def test_binary_junk_named_txt(tmp_path: Path) -> None:
    junk = bytes(range(256)) * 16 + os.urandom(4096)
    path = write(tmp_path / "junk.txt", junk)
    assert kind(path) is None
    assert "binary data" in str(unsupported(path, junk[:HEAD_BYTES]))
    with pytest.raises(ParseError, match="not UTF-8 or any text encoding"):
        to_markdown(path, "text", MB)


def test_binary_junk_without_nul_bytes(tmp_path: Path) -> None:
    junk = bytes(b for b in os.urandom(20000) if b not in (0, 9, 10, 13))
    path = write(tmp_path / "junk.txt", junk)
    with pytest.raises(ParseError, match="not UTF-8 or any text encoding"):
        to_markdown(path, "text", MB)


def test_control_characters_are_not_text(tmp_path: Path) -> None:
    path = write(tmp_path / "ctl.txt", bytes(range(1, 32)) * 100)
    with pytest.raises(ParseError, match="binary data"):
        to_markdown(path, "text", MB)


def test_unsupported_types(tmp_path: Path) -> None:
    elf = write(tmp_path / "tool.xyz", b"\x7fELF\x02\x01\x01\x00" + bytes(64))
    assert kind(elf) is None
    message = str(unsupported(elf, elf.read_bytes()))
    assert message.startswith("unsupported file type (.xyz, starts with b'\\x7fELF")
    assert kind(write(tmp_path / "sheet.xlsx", b"PK\x03\x04" + bytes(60))) is None
    assert kind(write(tmp_path / "notes.rst", b"Title\n=====\n")) is None
    assert kind(write(tmp_path / "README", b"Plain words in a file without an extension.\n")) == "text"


def test_empty_and_blank_files(tmp_path: Path) -> None:
    for name, kind_ in (("empty.txt", "text"), ("empty.md", "markdown"), ("empty.html", "html"),
                        ("empty.docx", "docx")):
        with pytest.raises(ParseError, match="^empty file$"):
            to_markdown(write(tmp_path / name, b""), kind_, MB)
    with pytest.raises(ParseError, match="no text"):
        to_markdown(write(tmp_path / "blank.txt", b" \n\t\n"), "text", MB)
    with pytest.raises(ParseError, match="no text"):
        to_markdown(write(tmp_path / "blank.html", b"<html><script>x()</script></html>"), "html", MB)


def test_file_over_the_limit_names_both_sizes(tmp_path: Path) -> None:
    path = write(tmp_path / "big.txt", b"word " * 300_000)
    with pytest.raises(ParseError, match=r"1\.5 MB \(1500000 bytes\), over the limit of 1\.0 MB \(1000000 bytes\)"):
        to_markdown(path, "text", MB)
