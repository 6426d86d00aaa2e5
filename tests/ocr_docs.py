"""Documents the OCR tests read: scans rendered with Pillow's bundled font at about
300 dpi, PDFs with a text layer made with pdfium, a PNG that claims to be huge, and the
character error rate of what comes back."""

from __future__ import annotations

import ctypes
import struct
import zlib
from pathlib import Path
from typing import Any

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image, ImageDraw, ImageFont

PAGES = [
    "The quick brown fox jumps over the lazy dog.\nPack my box with five dozen liquor jugs.",
    "Sphinx of black quartz, judge my vow.\nHow vexingly quick daft zebras jump 1987.",
    "Amazingly few discotheques provide jukeboxes.\nThe five boxing wizards jump quickly.",
    "Jackdaws love my big sphinx of quartz.\nBright vixens jump; dozy fowl quack 2024.",
]
DPI = 300


def cer(got: str, want: str) -> float:
    """Character error rate: edit distance over the length of the truth, spaces normalized."""
    a, b = " ".join(got.split()), " ".join(want.split())
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[len(b)] / max(1, len(b))


def text_of(partials: list[dict[str, Any]]) -> str:
    return "\n".join(p["markdown"].split("\n", 1)[1] for p in partials)


def scan(text: str) -> Image.Image:
    """A page of text as a scanner at 300 dpi would see it (40 px letters)."""
    font = ImageFont.load_default(size=40)
    image = Image.new("L", (1900, 360), 255)
    ImageDraw.Draw(image).multiline_text((80, 80), text, font=font, fill=0, spacing=28)
    return image


def scanned_pdf(path: Path, texts: list[str]) -> Path:
    images = [scan(t) for t in texts]
    images[0].save(path, save_all=True, append_images=images[1:], resolution=DPI)
    return path


def set_text(obj: Any, text: str) -> None:
    buf = ctypes.create_string_buffer((text + "\0").encode("utf-16-le"))
    assert pdfium_c.FPDFText_SetText(obj, ctypes.cast(buf, ctypes.POINTER(pdfium_c.FPDF_WCHAR)))


def text_pdf(path: Path, texts: list[str], under: Image.Image | None = None) -> Path:
    """A PDF with a text layer (Helvetica); with `under`, that image behind invisible text."""
    pdf = pdfium.PdfDocument.new()
    for text in texts:
        page = pdf.new_page(612, 792)
        if under is not None:
            image = pdfium.PdfImage.new(pdf)
            image.set_bitmap(pdfium.PdfBitmap.from_pil(under.convert("RGB")))
            image.set_matrix(pdfium.PdfMatrix().scale(under.width * 72 / DPI, under.height * 72 / DPI)
                             .translate(0, 792 - under.height * 72 / DPI))
            page.insert_obj(image)
        y = 740.0
        for line in text.split("\n"):
            obj = pdfium_c.FPDFPageObj_NewTextObj(pdf.raw, b"Helvetica", ctypes.c_float(12))
            set_text(obj, line)
            if under is not None:
                pdfium_c.FPDFTextObj_SetTextRenderMode(obj, pdfium_c.FPDF_TEXTRENDERMODE_INVISIBLE)
            pdfium_c.FPDFPageObj_Transform(obj, 1, 0, 0, 1, 72, y)
            pdfium_c.FPDFPage_InsertObject(page.raw, obj)
            y -= 16
        page.gen_content()
        page.close()
    pdf.save(path)
    pdf.close()
    return path


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


