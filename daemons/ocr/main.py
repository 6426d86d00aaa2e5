"""onebox-ocr: tesseract OCR of scanned PDFs and images, bus service `ocr`, on a pool
of worker processes at a lower priority than inference."""

from __future__ import annotations

import dataclasses
import logging
import sys

from daemons import registry
from daemons.bus import serve
from daemons.bus.errors import RequestError
from daemons.bus.worker import Emitter
from daemons.feeder import TestHooks
from daemons.ocr.engine import OcrEngine
from daemons.ocr.extract import check_languages, installed_languages

log = logging.getLogger("daemons.ocr")


def load(loading: serve.Loading) -> serve.Served:
    config = loading.config
    oc = config.ocr
    if not oc.enabled:
        raise serve.LoadError("[ocr] enabled = false: this daemon has nothing to do")
    try:
        check_languages(oc.languages, oc.tesseract_cmd)
    except RequestError as exc:
        raise serve.LoadError(f"config error: ocr.languages: {exc.message}") from None
    # By default: the state dir (its inbox/ and the router's uploads) and every
    # collection's inbox folder, wherever it is.
    allowed = oc.allowed_dirs or (config.paths.state_dir, *(str(p) for p in config.collection_dirs().values()))
    settings = dataclasses.replace(oc, allowed_dirs=tuple(allowed))
    log.info("OCR: %d worker(s) at nice %d, %d dpi, languages %s (installed: %s), files under %s",
             oc.workers, oc.nice, oc.dpi, oc.languages, ", ".join(sorted(installed_languages(oc.tesseract_cmd))),
             ", ".join(allowed))
    hooks = TestHooks.from_env()

    def engine(emitter: Emitter) -> serve.Engine:
        return OcrEngine(settings, emitter, stall_s=loading.stall_s, hooks=hooks)

    service_name = registry.Instance(registry.OCR).service or ""
    return serve.Served(
        service=service_name, capacity=oc.workers + oc.queue, engine=engine, shutdown_timeout_s=oc.shutdown_timeout_s,
        ready_status=f"serving {service_name} ({oc.workers} worker(s), {oc.dpi} dpi, {oc.languages})",
        meta={"workers": oc.workers, "languages": oc.languages, "engine": "ocr"},
    )


def main(argv: list[str] | None = None) -> int:
    return serve.run(prog="onebox ocr", description="Run the OCR daemon: scanned PDFs and images to markdown.",
                     sections=registry.OCR.sections, load=load, name="ocr", argv=argv)


if __name__ == "__main__":
    sys.exit(main())
