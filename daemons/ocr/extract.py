"""One document to Markdown, page by page: what a pool process does with one job.

PDF pages whose text layer reads as text are taken from it (milliseconds a page);
the others, and images, are rendered or decoded and read by tesseract. Every refusal
is a RequestError whose message says what is wrong with the file, so the client can
tell a bad document from a broken daemon.
"""

from __future__ import annotations

import functools
import math
import os
import re
import tempfile
import time
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pypdfium2 as pdfium
import pytesseract
from PIL import Image, ImageOps, UnidentifiedImageError

from daemons.bus.errors import RequestError
from daemons.ocr import paths
from daemons.ocr.settings import OcrSettings

PDF_POINTS_PER_INCH = 72.0
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "webp": "WEBP"}
LANGUAGES_RE = re.compile(r"[A-Za-z0-9_]+(?:/[A-Za-z0-9_]+)?(?:\+[A-Za-z0-9_]+(?:/[A-Za-z0-9_]+)?)*")
# Punctuation a real word may carry at either end: quotes, brackets, sentence marks.
EDGE_PUNCT = "\"'()[]{}<>«»“”‘’„.,;:!?¡¿…-–—*/"
PIXELS_RE = re.compile(r"\((\d+) pixels\)")


@dataclass(frozen=True)
class Job:
    path: str  # already through paths.check_path
    languages: str
    dpi: int
    first_page: int = 1
    max_pages: int | None = None


@dataclass(frozen=True)
class Page:
    page: int  # 1-based, in the document
    pages: int  # the document's page count
    method: str  # "text" (from the PDF's text layer) or "ocr"
    confidence: float | None  # mean word confidence 0-100; None for the text layer
    words: int
    text: str

    def message(self) -> dict[str, Any]:
        return {"page": self.page, "pages": self.pages, "method": self.method,
                "confidence": None if self.confidence is None else round(self.confidence, 1),
                "chars": len(self.text), "markdown": f"<!-- page {self.page} -->\n{self.text}\n"}


def configure_process(settings: OcrSettings) -> None:
    """Process-wide settings for a pool process (the parent's are left alone)."""
    Image.MAX_IMAGE_PIXELS = settings.max_pixels
    # Pillow only warns between 1x and 2x its limit; here that is a refusal too.
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    # Tesseract's OpenMP threads fight each other across pool processes; the pool is
    # the parallelism.
    os.environ["OMP_THREAD_LIMIT"] = "1"
    pytesseract.pytesseract.tesseract_cmd = settings.tesseract_cmd


# -- languages ------------------------------------------------------------------------


@functools.cache
def installed_languages(tesseract_cmd: str) -> frozenset[str]:
    pytesseract.pytesseract.tesseract_cmd = tesseract_cmd
    try:
        return frozenset(pytesseract.get_languages(config=""))
    except pytesseract.TesseractNotFoundError:
        raise RequestError(f"OCR is unavailable: the tesseract program ({tesseract_cmd}) was not found", 500) from None


def check_languages(languages: str, tesseract_cmd: str = "tesseract") -> None:
    """RequestError naming the language packs in `languages` that are not installed."""
    if not LANGUAGES_RE.fullmatch(languages):
        raise RequestError(f'"languages" must be tesseract pack names joined by "+", e.g. "eng+deu", not '
                           f"{languages!r}", 400)
    have = installed_languages(tesseract_cmd)
    missing = [lang for lang in languages.split("+") if lang not in have]
    if missing:
        debian = " ".join("tesseract-ocr-" + m.lower().replace("_", "-") for m in missing if "/" not in m)
        hint = f"; on Debian: apt-get install {debian}" if debian else ""
        raise RequestError(f"tesseract language pack(s) not installed: {', '.join(missing)} (installed: "
                           f"{', '.join(sorted(have)) or 'none'}{hint})", 400)


# -- file type --------------------------------------------------------------------------


def sniff(head: bytes) -> str:
    """The document's type from its first bytes: "pdf", "png", "jpeg", "tiff" or "webp"."""
    if not head:
        raise RequestError("the file is empty (0 bytes)", 422)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    # A PDF header may follow some junk; readers (pdfium too) look in the first KiB.
    if b"%PDF-" in head[:1024]:
        return "pdf"
    raise RequestError("unsupported file type: not a PDF, PNG, JPEG, TIFF or WebP file", 415)


def page_range(total: int, job: Job, settings: OcrSettings) -> range:
    if total < 1:
        raise RequestError("the document has no pages (corrupt or truncated?)", 422)
    if job.first_page > total:
        raise RequestError(f"first_page {job.first_page} is past the last page ({total})", 400)
    last = total if job.max_pages is None else min(total, job.first_page + job.max_pages - 1)
    count = last - job.first_page + 1
    if count > settings.max_pages:
        raise RequestError(f"too many pages: {count} to read, over max_pages = {settings.max_pages} in [ocr] (a "
                           "request's first_page and max_pages select a part)", 413)
    return range(job.first_page, last + 1)


def read_document(job: Job, settings: OcrSettings, should_stop: Callable[[], bool]) -> Iterator[Page]:
    """The pages of `job` in order; stops early (without error) once `should_stop()`."""
    with paths.open_checked(Path(job.path), settings.allowed_dirs, settings.max_file_bytes) as f:
        kind = sniff(f.read(1024))
        f.seek(0)
        if kind == "pdf":
            yield from _pdf_pages(f, job, settings, should_stop)
        else:
            yield from _image_pages(f, kind, job, settings, should_stop)


# -- PDF ---------------------------------------------------------------------------------


def _open_pdf(f: BinaryIO) -> pdfium.PdfDocument:
    try:
        return pdfium.PdfDocument(f)
    except pdfium.PdfiumError as exc:
        if exc.err_code == pdfium.raw.FPDF_ERR_PASSWORD:
            raise RequestError("the PDF is encrypted (it needs a password to open)", 422) from None
        if exc.err_code == pdfium.raw.FPDF_ERR_SECURITY:
            raise RequestError("the PDF is encrypted with an unsupported security handler", 422) from None
        raise RequestError("the PDF is corrupt or truncated: it cannot be opened", 422) from None


def _pdf_pages(f: BinaryIO, job: Job, settings: OcrSettings, should_stop: Callable[[], bool]) -> Iterator[Page]:
    pdf = _open_pdf(f)
    try:
        total = len(pdf)
        for number in page_range(total, job, settings):
            if should_stop():
                return
            yield _pdf_page(pdf, number, total, job, settings)
    finally:
        pdf.close()


def _pdf_page(pdf: pdfium.PdfDocument, number: int, total: int, job: Job, settings: OcrSettings) -> Page:
    try:
        page = pdf[number - 1]
    except pdfium.PdfiumError:
        raise RequestError(f"page {number} cannot be read (the PDF is corrupt)", 422) from None
    try:
        textpage = page.get_textpage()
        try:
            # get_text_range() would drop characters beyond the BMP.
            text = normalize_text(textpage.get_text_bounded())
        finally:
            textpage.close()
        if text_layer_usable(text, settings.min_text_chars, settings.min_word_ratio):
            return Page(number, total, "text", None, len(text.split()), text)
        _check_images(page, number, settings)
        scan = _scan_image(page, job)
        if scan is not None:
            image, dpi = scan
        else:
            image, dpi = _render(page, number, job, settings), job.dpi
    finally:
        page.close()
    return ocr_page(image, number, total, job, settings, dpi)


def _render(page: pdfium.PdfPage, number: int, job: Job, settings: OcrSettings) -> Image.Image:
    width, height = page.get_size()
    scale = job.dpi / PDF_POINTS_PER_INCH
    w, h = math.ceil(width * scale), math.ceil(height * scale)
    if w <= 0 or h <= 0:
        raise RequestError(f"page {number} has no area ({width:g} x {height:g} points; corrupt?)", 422)
    if w * h > settings.max_pixels:
        raise RequestError(f"page {number} has too many pixels at {job.dpi} dpi: {w} x {h} = {w * h:,}, over "
                           f"max_pixels = {settings.max_pixels:,} in [ocr] (a lower dpi reads it)", 413)
    bitmap = page.render(scale=scale, grayscale=True, may_draw_forms=False)
    return grey(bitmap.to_pil())


def _check_images(page: pdfium.PdfPage, number: int, settings: OcrSettings) -> None:
    """Refuse a page with an image too big to decode: pdfium decodes an embedded image
    whole however small the rendering (a decompression bomb inside a PDF)."""
    for obj in page.get_objects(filter=[pdfium.raw.FPDF_PAGEOBJ_IMAGE]):
        pw, ph = obj.get_px_size()
        if pw * ph > settings.max_pixels:
            raise RequestError(f"page {number} has an image with too many pixels: {pw} x {ph} = {pw * ph:,}, over "
                               f"max_pixels = {settings.max_pixels:,} in [ocr] (a decompression bomb?)", 413)


def _scan_image(page: pdfium.PdfPage, job: Job) -> tuple[Image.Image, int] | None:
    """A scanned page's image at the scanner's resolution, with the dpi it has; None when
    the page is more than one upright image filling it (under an invisible text layer) or
    the image is far from the requested dpi. Rendering the page instead would resample
    the scanner's pixels: blurrier, and tesseract reads it slower and a little worse."""
    images = []
    for obj in page.get_objects(max_depth=0):
        if obj.type == pdfium.raw.FPDF_PAGEOBJ_IMAGE:
            images.append(obj)
        elif (obj.type != pdfium.raw.FPDF_PAGEOBJ_TEXT
              or pdfium.raw.FPDFTextObj_GetTextRenderMode(obj.raw) != pdfium.raw.FPDF_TEXTRENDERMODE_INVISIBLE):
            return None
    if len(images) != 1:
        return None
    image = images[0]
    a, b, c, d, e, f = image.get_matrix().get()
    left, bottom, right, top = page.get_cropbox()
    if b or c or a <= 0 or d <= 0 or not (0.95 <= a / (right - left) <= 1.05 and 0.95 <= d / (top - bottom) <= 1.05):
        return None
    pw, ph = image.get_px_size()
    xdpi, ydpi = pw * PDF_POINTS_PER_INCH / a, ph * PDF_POINTS_PER_INCH / d
    if abs(xdpi - ydpi) > 0.02 * xdpi or not 0.9 * job.dpi <= xdpi <= 2 * job.dpi:
        return None
    # render=True applies the image's masks and decode arrays as a page rendering would.
    bitmap = image.get_bitmap(render=True)
    pil = grey(bitmap.to_pil())
    turn = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}
    rotation = page.get_rotation() % 360
    return (pil.transpose(turn[rotation]) if rotation in turn else pil), round(xdpi)


# -- images -------------------------------------------------------------------------------


def _bomb(exc: Exception, settings: OcrSettings) -> RequestError:
    found = PIXELS_RE.search(str(exc))
    size = f"{int(found.group(1)):,} pixels, " if found else ""
    return RequestError(f"the image has too many pixels ({size}over max_pixels = {settings.max_pixels:,} in [ocr]; "
                        "a decompression bomb?)", 413)


def _image_pages(f: BinaryIO, kind: str, job: Job, settings: OcrSettings,
                 should_stop: Callable[[], bool]) -> Iterator[Page]:
    try:
        image = Image.open(f, formats=[IMAGE_FORMATS[kind]])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(exc, settings) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise RequestError(f"the {kind.upper()} image is corrupt or truncated", 422) from None
    with image:
        # Multi-page TIFFs are documents; the other formats read as one page.
        total = getattr(image, "n_frames", 1) if kind == "tiff" else 1
        for number in page_range(total, job, settings):
            if should_stop():
                return
            yield ocr_page(_frame(image, kind, number, settings), number, total, job, settings, _dpi(image))


def _frame(image: Image.Image, kind: str, number: int, settings: OcrSettings) -> Image.Image:
    try:
        image.seek(number - 1)
        w, h = image.size
        if w * h > settings.max_pixels:
            raise RequestError(f"page {number} has too many pixels: {w} x {h} = {w * h:,}, over max_pixels = "
                               f"{settings.max_pixels:,} in [ocr] (a decompression bomb?)", 413)
        image.load()
        return ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(exc, settings) from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise RequestError(f"the {kind.upper()} image is corrupt or truncated (page {number})", 422) from None


def _dpi(image: Image.Image) -> int | None:
    dpi = image.info.get("dpi")
    try:
        return round(float(dpi[0])) if dpi else None
    except (TypeError, ValueError, IndexError):
        return None


# -- OCR --------------------------------------------------------------------------------


def grey(image: Image.Image) -> Image.Image:
    """A new 8-bit grey image of `image`, transparency flattened onto white.

    Always a copy: a pdfium bitmap's to_pil() shares the bitmap's memory, which pdfium
    frees with the bitmap, so what OCR gets must be made while the bitmap is held."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        low, _ = rgba.getchannel("A").getextrema()
        if low != 255:
            # Text drawn on a transparent background would turn black on black.
            flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            flat.alpha_composite(rgba)
            rgba = flat
        image = rgba
    # convert() copies even when the mode is already L.
    return image.convert("L")


def ocr_page(image: Image.Image, number: int, total: int, job: Job, settings: OcrSettings,
             dpi: int | None) -> Page:
    check_languages(job.languages, settings.tesseract_cmd)
    config = f"--psm {settings.psm}" + (f" --dpi {dpi}" if dpi and dpi >= 70 else "")
    # An uncompressed BMP costs milliseconds to write (pytesseract's own PNG, 100+), and
    # leptonica reads it faster than PNG, JPEG or PGM (measured: 5% of a page's OCR).
    with tempfile.NamedTemporaryFile(prefix="onebox-ocr-", suffix=".bmp") as tmp:
        (image if image.mode == "L" else grey(image)).save(tmp, format="BMP")
        tmp.flush()
        began = time.monotonic()
        try:
            data = pytesseract.image_to_data(tmp.name, lang=job.languages, config=config,
                                             timeout=settings.page_timeout_s, output_type=pytesseract.Output.DICT)
        except RuntimeError as exc:
            if "timeout" not in str(exc).lower():
                raise
            raise RequestError(f"page {number}: OCR took longer than the page timeout ({settings.page_timeout_s:g} s;"
                               f" gave up after {time.monotonic() - began:.0f} s)", 422) from None
        except pytesseract.TesseractNotFoundError:
            raise RequestError(f"OCR is unavailable: the tesseract program ({settings.tesseract_cmd}) was not "
                               "found", 500) from None
        except pytesseract.TesseractError as exc:
            raise RequestError(f"page {number}: tesseract failed: {exc.message}"[:300], 422) from None
    text, confidence, words = words_to_text(data)
    return Page(number, total, "ocr", confidence, words, text)


def words_to_text(data: dict[str, list[Any]]) -> tuple[str, float | None, int]:
    """Tesseract's TSV (as a dict of columns) as text: words by line, lines by paragraph;
    with the mean confidence of the words and their count."""
    paragraphs: dict[tuple[int, int], dict[int, list[str]]] = {}
    confidences: list[float] = []
    for i, word in enumerate(data["text"]):
        word = str(word).strip()
        if int(data["level"][i]) != 5 or not word:
            continue
        key = (int(data["block_num"][i]), int(data["par_num"][i]))
        paragraphs.setdefault(key, {}).setdefault(int(data["line_num"][i]), []).append(word)
        conf = float(data["conf"][i])
        if conf >= 0:
            confidences.append(conf)
    text = "\n\n".join("\n".join(" ".join(words) for words in lines.values()) for lines in paragraphs.values())
    mean = sum(confidences) / len(confidences) if confidences else None
    return text, mean, len(confidences)


# -- text layer -----------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    # pdfium ends lines with \r\n and puts U+FFFE for a hyphen that ends a line.
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufffe", "-")
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _word_like(token: str) -> bool:
    core = token.strip(EDGE_PUNCT)
    if not core:
        return False
    core = core.replace("-", "").replace("'", "").replace("’", "").replace(".", "").replace(",", "")
    return core.isdigit() or (core.isalnum() and any(c.isalpha() for c in core))


def text_layer_usable(text: str, min_chars: int, min_word_ratio: float) -> bool:
    """Whether a PDF page's text layer is real text rather than nothing or junk (a
    scanner's invisible layer of misread glyphs, a font without a Unicode map)."""
    visible = [c for c in text if not c.isspace()]
    if len(visible) < min_chars:
        return False
    junk = sum(1 for c in visible if c == "\ufffd" or unicodedata.category(c)[0] == "C")
    if junk > 0.05 * len(visible):
        return False
    words = text.split()
    return sum(1 for w in words if _word_like(w)) >= min_word_ratio * len(words)
