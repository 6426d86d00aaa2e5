"""The FastAPI app: shared state, error handlers, the body limit, and each area's routes.

Every area but health needs an identified caller (`caller`: the Unix socket's uid or an
API key, else 401); the admin area needs an admin (403 otherwise)."""

from __future__ import annotations

import logging

from fastapi import Depends, FastAPI, Request, Response
from prometheus_client import CollectorRegistry

from daemons import __version__
from daemons.bus.broker import Broker
from daemons.bus.errors import BusError
from daemons.config import Config
from daemons.router import errors, openapi
from daemons.router.body import BodyLimit
from daemons.router.calls import ClientGone
from daemons.router.index import Index
from daemons.router.routes import (
    admin,
    completions,
    documents,
    embeddings,
    health,
    metrics,
    models,
    ocr,
    search,
)
from daemons.router.state import RouterState, caller
from daemons.router.state import admin as admin_only

log = logging.getLogger(__name__)

AREAS = (models, completions, embeddings, ocr, search, documents, metrics)


def create_app(config: Config, broker: Broker, registry: CollectorRegistry | None = None) -> FastAPI:
    """The app; `app.state.onebox.open()` must run before it serves (and close() after)."""
    app = FastAPI(title="onebox", version=__version__, docs_url=None, redoc_url=None)
    app.state.onebox = RouterState(config, broker, Index(config.paths.state / "index.db"),
                                   registry or CollectorRegistry())
    errors.install(app)
    openapi.install(app)  # the document as the routes really parse and answer

    @app.exception_handler(BusError)
    async def _bus(request: Request, exc: BusError) -> Response:
        # Before any response started: the worker's or broker's answer as an HTTP status.
        return errors.error_response(errors.from_bus(exc, config.router.retry_after_s))

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        log.info("%s %s: the client went away before the reply; its call was cancelled", request.method,
                 request.url.path)
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    # Uploads (OCR, documents) may be as large as their daemon reads (plus multipart framing).
    app.add_middleware(BodyLimit, limit=config.router.max_body_bytes,
                       streamed={"/v1/ocr": config.ocr.max_file_bytes + 64 * 1024,
                                 "/v1/documents": config.ingest.max_file_bytes + 64 * 1024})
    app.include_router(health.router)
    app.include_router(admin.router, dependencies=[Depends(admin_only)])
    for area in AREAS:
        app.include_router(area.router, dependencies=[Depends(caller)])
    return app
