"""Request IDs and the access log: every response carries `X-Request-ID`, every log line its request's ID.

A client's `X-Request-ID` is kept when it is 1-128 characters of `A-Z a-z 0-9 . _ : -`, else a new one is made.
The access log (`server.access`) has one line per request: method, path (never the query), status,
duration, client address and key id (a hash prefix, never the key); never a header or a body byte.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextvars import ContextVar
from urllib.parse import quote

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_LOGGED_PATH = 256
# scope["state"] key: a response's outcome when it differs from its status line (a stream cut short), which the
# access log and the metrics count
OUTCOME_STATUS = "outcome_status"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"

access_log = logging.getLogger("server.access")


class RequestIdFilter(logging.Filter):
    """Gives every record a `request_id` (`-` outside a request), for `%(request_id)s` in the format."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def configure_logging(level: int = logging.INFO) -> None:
    """The server process's logging: `LOG_FORMAT` on stderr, uvicorn's loggers included."""
    logging.basicConfig(level=level, format=LOG_FORMAT, force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())


class RequestLogMiddleware:
    """Sets the request ID (header, `REQUEST_ID`, `scope["state"]["request_id"]`) and logs the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if VALID_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        # Each request runs in a task of its own, so this stays set for the error handlers outside us.
        REQUEST_ID.set(request_id)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        start, status = time.perf_counter(), 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            client = scope["client"][0] if scope.get("client") else "-"
            access_log.info(
                "%s %s %d %.1fms client=%s key=%s",
                scope["method"],
                quote(scope["path"][:MAX_LOGGED_PATH]),  # quoted: no control characters in the log
                state.get(OUTCOME_STATUS, status),
                (time.perf_counter() - start) * 1000.0,
                client,
                state.get("key_id", "-"),
            )
