"""The app factory `create_app(settings)` and `run(host, port, settings)` for `pixelllm serve`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from .errors import StartupError, install_error_handlers
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, FaultInjectionMiddleware, MetricsMiddleware
from .openapi import install_openapi
from .requestlog import RequestLogMiddleware, configure_logging
from .routes import STATIC_DIR, PageFiles, router
from .schemas import CaptionJSON, DenseJSON, LocalizeJSON, RegionsJSON
from .security import install_access_control, open_paths
from .service import Engine
from .settings import Settings, read_settings

logger = logging.getLogger(__name__)

DESCRIPTION = """Grounded captions: every word of a caption comes with a point and a box in the image.
Send images as multipart files or as base64 in JSON. Coordinates are pixels of the image as uploaded (a JPEG
or PNG after its EXIF orientation, a WebP as stored: as browsers show them), x right, y down; `*_norm` fields
divide by width and height."""


def create_app(settings: Settings | None = None, engine_type: type[Engine] = Engine) -> FastAPI:
    """A new app with its own model, batcher, cache and metrics; the model loads in the background.

    `engine_type` runs the model: `Engine` batches in this process, `server.ray_app.RayEngine` on Ray Serve."""
    settings = settings or Settings()
    metrics = Metrics()
    engine = engine_type(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        yield
        await engine.stop()

    # /docs is a route of ours (Swagger UI served from static/docs, not a CDN); no ReDoc
    app = FastAPI(
        title="PixelLLM",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,  # a 307 has no error body; the 404 says the path without the slash
    )
    app.state.engine, app.state.metrics, app.state.settings = engine, metrics, settings
    app.include_router(router)
    app.mount("/static", PageFiles(directory=STATIC_DIR), name="static")
    install_error_handlers(app)
    keyless = open_paths(settings, app.openapi_url) if settings.auth_enabled else None
    install_openapi(app, [CaptionJSON, LocalizeJSON, RegionsJSON, DenseJSON], keyless)
    if settings.debug_fail_rate > 0:  # inside the body limit, so a refused request's body is read
        logger.warning(
            "PIXELLLM_DEBUG_FAIL_RATE=%g: that fraction of /v1 requests is answered %s on purpose (for tests of "
            "clients only: never set it in production)",
            settings.debug_fail_rate,
            " or ".join(map(str, settings.debug_fail_statuses)),
        )
        app.add_middleware(
            FaultInjectionMiddleware, rate=settings.debug_fail_rate, statuses=settings.debug_fail_statuses
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    install_access_control(app, settings)  # outside the body limit: a refused request's body is never read
    app.state.paths = {route.path for route in router.routes} | {app.openapi_url}
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.state.paths)
    app.add_middleware(RequestLogMiddleware)  # outermost: every response gets its X-Request-ID
    return app


def serving_settings(settings: Settings | None = None) -> Settings:
    """Logging on, and `settings` with the model resolved; a model that does not exist fails now, not later."""
    from pixelllm.config import load_config

    configure_logging()
    settings = settings or read_settings()
    try:
        settings = settings.model_copy(update={"model": settings.resolved_model()})
        load_config(settings.model)
    except ValueError as exc:
        raise StartupError(f"{exc}; check PIXELLLM_MODEL") from None
    return settings


def run(host: str = "127.0.0.1", port: int = 8000, settings: Settings | None = None) -> None:
    """Serve until SIGINT/SIGTERM; on shutdown, requests in flight are answered first.

    A model that fails to load (a corrupt or mismatched checkpoint) stops the server at once, and `run` raises
    `StartupError` with the reason, rather than leaving a server up that can never answer.
    """
    settings = serving_settings(settings)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
        timeout_keep_alive=settings.keep_alive_s,
        log_level="info",
        log_config=None,  # uvicorn's loggers go through configure_logging's handler, with request IDs
        access_log=False,  # server.access logs each request instead
    )
    server = uvicorn.Server(config)
    app.state.engine.on_load_error = lambda message: setattr(server, "should_exit", True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: a graceful shutdown, as in uvicorn.run
        server.run()
    if app.state.engine.load_error:
        raise StartupError(f"{app.state.engine.load_error}; check PIXELLLM_MODEL ({settings.model})")
    if not server.started:
        raise StartupError("the server did not start; the log above says why")
