"""The HTTP endpoints: thin wrappers that read the body and call `service`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Receive, Scope, Send

from . import service
from .bodies import read_body
from .errors import ApiError
from .openapi import request_body
from .schemas import (
    CaptionJSON,
    CaptionParams,
    CaptionResponse,
    DenseJSON,
    DenseParams,
    DenseResponse,
    ErrorResponse,
    Health,
    LocalizeJSON,
    LocalizeParams,
    LocalizeResponse,
    Ready,
    RegionsJSON,
    RegionsParams,
    RegionsResponse,
)
from .service import Engine
from .streaming import caption_stream

router = APIRouter()
STATIC_DIR = Path(__file__).parent / "static"
# The page and its files are revalidated (ETag) before each use: after an upgrade a browser never runs the new
# page with the old script, or the old page with the new one. They are sent whole (`whole`).
PAGE_HEADERS = {"Cache-Control": "no-cache", "Accept-Ranges": "none"}

ERRORS = {
    401: {"model": ErrorResponse, "description": "API keys are on and none was sent; see WWW-Authenticate"},
    403: {"model": ErrorResponse, "description": "The API key is not valid"},
    413: {"model": ErrorResponse, "description": "Body or image too large"},
    415: {"model": ErrorResponse, "description": "Not an image we read, or not multipart/JSON"},
    422: {"model": ErrorResponse, "description": "Invalid field or corrupt image; the message names the field"},
    429: {"model": ErrorResponse, "description": "Queue full or the key's rate limit reached; see Retry-After"},
    500: {"model": ErrorResponse, "description": "The model failed on this request (code model_error)"},
    503: {
        "model": ErrorResponse,
        "description": "Model still loading or shutting down (see Retry-After), or it failed to load (load_failed)",
    },
    504: {"model": ErrorResponse, "description": "No answer within the request timeout"},
}


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    engine.require_ready()
    return engine


def _max_fields(engine: Engine) -> int:
    s = engine.settings
    return 2 * s.max_regions + s.max_texts + 16


# OpenAPI 3.1 (no itemSchema): the schema of an event stream describes one event, as clients parse it
SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["word", "done", "error"]},
        "data": {"type": "string", "description": "JSON: a word, the whole answer, or the error shape"},
    },
    "required": ["event", "data"],
}
STREAM = {
    "description": "With `stream`: Server-Sent Events. `event: word` (data: a word, as in `words`) per word as soon "
    "as it is decoded, then `event: done` (data: the whole answer; `timing_ms` has `first_word` and `total`), or "
    "`event: error` (data: the error shape).",
    "content": {"text/event-stream": {"schema": SSE_EVENT}},
}


@router.post(
    "/v1/caption",
    response_model=CaptionResponse,
    responses={**ERRORS, 200: STREAM},
    openapi_extra=request_body(CaptionJSON),
)
async def caption(
    request: Request, stream: bool = Query(False, description="Stream the words as Server-Sent Events (greedy)")
) -> Response:
    """Caption the image, or the region given by `box` or `point`; every word comes with a point and box."""
    engine = _engine(request)
    data, params = await read_body(request, CaptionParams, CaptionJSON, _max_fields(engine), query=("stream",))
    if stream or params.stream:
        return await caption_stream(engine, request, data, params)
    return await service.caption(engine, request, data, params)


@router.post(
    "/v1/localize", response_model=LocalizeResponse, responses=ERRORS, openapi_extra=request_body(LocalizeJSON)
)
async def localize(request: Request) -> LocalizeResponse:
    """Find each `text` in the image: a box, a score, per-word points and optionally a mask."""
    engine = _engine(request)
    data, params = await read_body(request, LocalizeParams, LocalizeJSON, _max_fields(engine))
    return await service.localize(engine, request, data, params)


@router.post("/v1/regions", response_model=RegionsResponse, responses=ERRORS, openapi_extra=request_body(RegionsJSON))
async def regions(request: Request) -> RegionsResponse:
    """Many questions about one image in one call: caption boxes and points, localize texts."""
    engine = _engine(request)
    data, params = await read_body(request, RegionsParams, RegionsJSON, _max_fields(engine))
    return await service.regions(engine, request, data, params)


@router.post(
    "/v1/dense",
    response_model=DenseResponse,
    responses={**ERRORS, 501: {"model": ErrorResponse, "description": "The served model has no proposal head"}},
    openapi_extra=request_body(DenseJSON),
)
async def dense(request: Request) -> DenseResponse:
    """Dense captioning: every salient object's box, objectness score and caption (with per-word locations)."""
    engine = _engine(request)
    data, params = await read_body(request, DenseParams, DenseJSON, _max_fields(engine))
    return await service.dense(engine, request, data, params)


@router.get("/healthz", response_model=Health, responses={503: {"model": ErrorResponse}})
async def healthz(request: Request) -> Health:
    """Liveness: 200 while the process can serve (loading included), 503 if the model failed to load."""
    error = request.app.state.engine.load_error
    if error:
        raise ApiError(503, "load_failed", error)
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> Ready:
    """Readiness: 200 once the model is loaded, 503 before; with the body limit, so a client (the web page) can
    refuse a file over it before sending it."""
    engine = _engine(request)
    return Ready(status="ready", model=engine.model_name, max_body_bytes=request.app.state.settings.max_body_bytes)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The web page: upload an image, see its grounded caption, localize a text."""
    return WholeFile(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


@router.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    """Swagger UI on the OpenAPI schema, its script and style served from here (static/docs), not a CDN; relative
    URLs, as the web page's, so both work behind a proxy that serves the service under a path prefix."""
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url.lstrip("/"),
        title=f"{request.app.title} API",
        swagger_js_url="static/docs/swagger-ui-bundle.js",
        swagger_css_url="static/docs/swagger-ui.css",
        swagger_favicon_url="static/docs/favicon-32x32.png",
        oauth2_redirect_url=None,
    )


def whole(scope: Scope) -> Scope:
    """`scope` without a `Range` header: the page's files are sent whole (Starlette would answer a bad range in
    plain text, not the service's JSON errors; no browser asks a range of a script or a page)."""
    return {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]}


class WholeFile(FileResponse):
    """A file sent whole whatever `Range` the request asks for."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(whole(scope), receive, send)


class PageFiles(StaticFiles):
    """The web page's files (`/static`), each revalidated before use and sent whole (`PAGE_HEADERS`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(whole(scope), receive, send)

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(PAGE_HEADERS)
        return response
