"""What the OCR engine may do and how: the [ocr] config section (daemons/config/ocr.py),
with `allowed_dirs` resolved by the daemon before it reaches the engine."""

from daemons.config.ocr import MIB, OcrConfig as OcrSettings

__all__ = ["MIB", "OcrSettings"]
