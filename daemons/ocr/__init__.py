"""The OCR daemon's core: documents (PDF, PNG, JPEG, TIFF, WebP) to Markdown, page by page.

`engine.OcrEngine` is the bus engine; `pool` runs the work in worker processes; `extract`
is what one worker does with one document; `paths` decides which files may be read.
"""
