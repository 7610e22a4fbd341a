"""Pure ASGI middleware: request metrics, the request body's limits (413, 408), and test-only fault injection."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Collection, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import HTTP_CODES, client_gone, error_response
from .metrics import Metrics
from .requestlog import OUTCOME_STATUS

# the methods counted by name; any other (h11 takes any token as a method) is counted as "other", so a client
# cannot add a metrics series per made-up method
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class MetricsMiddleware:
    """Counts requests by route, method and status (a stream's outcome: `OUTCOME_STATUS`), and observes their
    latency. Unknown routes and methods are counted as "other"."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Collection[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"
            status = scope.get("state", {}).get(OUTCOME_STATUS, status)
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


class BodyLimitMiddleware:
    """Reads the whole request body, answering 413 once it passes `max_bytes` and 408 if it has not all come within
    `timeout_s` (a client sending a byte now and then holds no connection and buffer), then replays it to the app.

    After the body, `receive` is the server's again, so the app still sees `http.disconnect`.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks, size = [], 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                message = f"the request body did not arrive within {self.timeout_s:g} s"
                await error_response(408, "request_timeout", message, {"Connection": "close"})(scope, receive, send)
                return
            if message["type"] == "http.disconnect":  # answered into the void, so metrics and logs say 499, not 500
                await client_gone().response()(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body is larger than {self.max_bytes} bytes"
        await error_response(413, "payload_too_large", message, {"Connection": "close"})(scope, receive, send)


class FaultInjectionMiddleware:
    """Test only (`PIXELLLM_DEBUG_FAIL_RATE`): answers a seeded random `rate` of `/v1/` requests with one of
    `statuses` and `Retry-After: 1`, so clients' retry paths can be tested against a real server."""

    def __init__(self, app: ASGIApp, rate: float, statuses: Sequence[int], seed: int = 0) -> None:
        self.app, self.rate, self.statuses, self.rng = app, rate, list(statuses), random.Random(seed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/") or self.rng.random() >= self.rate:
            await self.app(scope, receive, send)
            return
        status = self.rng.choice(self.statuses)
        message = f"injected failure (PIXELLLM_DEBUG_FAIL_RATE={self.rate:g}, for tests only)"
        response = error_response(status, HTTP_CODES.get(status, "error"), message, {"Retry-After": "1"})
        await response(scope, receive, send)
