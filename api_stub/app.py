"""The ASGI application: ``uvicorn api_stub.app:app``."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api_stub.edge import EdgeMiddleware
from api_stub.errors import install_error_handlers
from api_stub.openapi import install_openapi
from api_stub.route_policy import BODY_READ_TIMEOUT_SECONDS
from api_stub.routes import (
    archive,
    assets,
    bulk,
    deployments,
    health,
    index,
    preferences,
    purposes,
    tenancy,
    webhooks,
    widgets,
)
from worker.db import api_engine, reset_engine
from worker.settings import ConfigurationError, get_settings


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    try:
        get_settings()
    except ConfigurationError as exc:
        # One clear line, not a traceback; nothing has been started yet, so exit right here
        # (raising would make the server print the whole stack trace as the reason).
        print(f"error: {exc}", file=sys.stderr, flush=True)
        os._exit(2)
    api_engine()
    yield
    reset_engine()


def create_app(body_read_timeout: float = BODY_READ_TIMEOUT_SECONDS) -> FastAPI:
    app = FastAPI(
        title="Widget deployment API",
        summary="Enqueue deploy and archive jobs for privacy widgets (Didomi-style API).",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served by install_openapi, without any CDN
        redoc_url=None,
    )
    install_error_handlers(app)
    install_openapi(app)
    # Body limits, authentication before the body is read, no connection-closing 500s.
    app.add_middleware(EdgeMiddleware, body_read_timeout=body_read_timeout)
    app.include_router(index.router)
    app.include_router(health.router)
    app.include_router(tenancy.router)
    app.include_router(purposes.router)
    app.include_router(preferences.router)
    # Before the widgets router: /widgets/deployments, /widgets/archived... must not match
    # /widgets/{widget_id}.
    app.include_router(bulk.router)  # before deployments: /bulk is not a deployment id
    app.include_router(deployments.router)
    app.include_router(archive.router)
    app.include_router(assets.router)
    app.include_router(widgets.router)
    app.include_router(webhooks.router)
    return app


app = create_app()
