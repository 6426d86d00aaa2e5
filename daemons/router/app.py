"""The FastAPI app: shared state, error handlers, the body limit, and each area's routes."""

from __future__ import annotations

from fastapi import FastAPI

from daemons import __version__
from daemons.bus.broker import Broker
from daemons.config import Config
from daemons.router import errors
from daemons.router.body import BodyLimit
from daemons.router.routes import completions, embeddings, health, models, ocr
from daemons.router.state import RouterState

AREAS = (health, models, completions, embeddings, ocr)


def create_app(config: Config, broker: Broker) -> FastAPI:
    app = FastAPI(title="onebox", version=__version__, docs_url=None, redoc_url=None)
    app.state.onebox = RouterState(config, broker)
    errors.install(app)
    # Uploads for OCR may be as large as the OCR daemon reads (plus multipart framing).
    app.add_middleware(BodyLimit, limit=config.router.max_body_bytes,
                       streamed={"/v1/ocr": config.ocr.max_file_bytes + 64 * 1024})
    for area in AREAS:
        app.include_router(area.router)
    return app
