"""The [ocr] section: the OCR daemon's pool, its limits and how it reads pages."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from daemons.config.schema import setting

MIB = 1024 * 1024
_LANGUAGES = re.compile(r"[A-Za-z0-9_]+(\+[A-Za-z0-9_]+)*")


def _languages(value: str) -> str | None:
    return None if _LANGUAGES.fullmatch(value) else f'tesseract pack names joined by "+", e.g. "eng+deu", not {value!r}'


@dataclass(frozen=True)
class OcrConfig:
    enabled: bool = setting(True, "Run the OCR daemon (onebox-ocr.service, bus service 'ocr', POST /v1/ocr).")
    workers: int = setting(
        1, "Worker processes, each reading one document at a time, page by page (tesseract runs\n"
           "single-threaded in each: this is also how many cores OCR may use).", ge=1, le=256)
    dpi: int = setting(300, "Resolution PDF pages without a text layer are rendered at; a request may ask for\n"
                            "min_dpi..max_dpi.", ge=72, le=1200)
    min_dpi: int = setting(72, "", ge=36, le=1200)
    max_dpi: int = setting(600, "", ge=72, le=1200)
    languages: str = setting("eng", 'Tesseract language packs, "+"-joined, when a request names none (checked at start:\n'
                                    "apt install tesseract-ocr-LANG for more).", check=_languages)
    psm: int = setting(3, "Tesseract page segmentation mode (3: fully automatic, its own default).", ge=0, le=13)
    page_timeout_s: float = setting(60.0, "One page's OCR may take this long (then that document fails with 422).", gt=0)
    kill_grace_s: float = setting(
        10.0, "On top of page_timeout_s: how long a worker that stopped reporting (stuck, or ignoring\n"
              "a cancel) is given before it is killed and replaced.", gt=0)
    max_pages: int = setting(2000, "Pages one document may have (413 beyond; a request may pick a part).", ge=1)
    max_pixels: int = setting(
        89_478_485, "Pixels in one image or rendered page (decompression bombs are refused with 413;\n"
                    "Pillow's own MAX_IMAGE_PIXELS default).", ge=1_000_000)
    max_file_bytes: int = setting(200 * MIB, "Largest file read (413 beyond).", ge=1024)
    nice: int = setting(10, "Niceness of the worker processes and of tesseract under them: OCR yields the CPU\n"
                            "to the request path.", ge=0, le=19)
    queue: int = setting(64, "Documents waiting for a worker; one more is refused with 503.", ge=0, le=100_000)
    allowed_dirs: tuple[str, ...] = setting(
        (), "Only files whose real path (symlinks and .. resolved) lies under one of these are read;\n"
            "empty means the state directory (its inbox/ and the router's uploads) and every\n"
            "[collections.NAME] folder.")
    min_text_chars: int = setting(
        32, "A PDF page's text layer is used instead of OCR when it has at least this many visible\n"
            "characters and this share of its words look like words (a scanner's invisible layer of\n"
            "misread glyphs does not).", ge=0)
    min_word_ratio: float = setting(0.6, "", ge=0, le=1)
    tesseract_cmd: str = setting("tesseract", "The tesseract program: a path, or a name looked up in PATH.")
    shutdown_timeout_s: float = setting(10.0, "On SIGTERM: let documents in flight finish for this long, then stop them.",
                                        gt=0)

    def problems(self) -> Iterator[str]:
        if not self.min_dpi <= self.dpi <= self.max_dpi:
            yield f"dpi: must be between min_dpi ({self.min_dpi}) and max_dpi ({self.max_dpi})"
