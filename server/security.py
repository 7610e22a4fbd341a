"""Access control: API keys (stored as SHA-256 hashes), per-key rate limits, and CORS for the web page.

Keys are random strings made by `pixelllm api-key`; the server keeps only their hashes, from
`PIXELLLM_API_KEYS_FILE` (one per line, re-read when the file changes) and `PIXELLLM_API_KEY_HASHES`.
A key is sent as `Authorization: Bearer <key>` or `X-API-Key: <key>`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import StartupError, error_response
from .settings import Settings

logger = logging.getLogger(__name__)

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
OPEN_PATHS = ("/healthz", "/readyz", "/")  # health checks, and the web page (its API calls need a key)
OPEN_PREFIX = "/static/"  # the web page's files
MAX_BUCKETS = 10_000


def new_key() -> str:
    """A new random API key (256 bits, URL-safe)."""
    return "pxl_" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of `key`: what the server stores. Keys are random, so no slow hash is needed."""
    return hashlib.sha256(key.encode()).hexdigest()


def parse_hashes(lines: Iterable[str], source: str) -> set[str]:
    """Hashes from lines of text; blank lines and `#` comments are skipped."""
    hashes = set()
    for number, line in enumerate(lines, 1):
        value = line.split("#", 1)[0].strip().lower()
        if not value:
            continue
        if not SHA256_HEX.fullmatch(value):
            raise ValueError(
                f"{source}:{number} is not a SHA-256 hex digest (64 hex characters); "
                "store key hashes made by `pixelllm api-key`, never the keys themselves"
            )
        hashes.add(value)
    return hashes


class KeyStore:
    """The accepted key hashes: `PIXELLLM_API_KEY_HASHES` plus the keys file, re-read when it changes.

    If the file is removed or becomes invalid while serving, its keys stop working (the error is logged)
    until it is fixed: revoking a key can never fail open.
    """

    def __init__(self, path: Path | None, hashes: Iterable[str] = ()) -> None:
        self.path, self.fixed = path, parse_hashes(hashes, "PIXELLLM_API_KEY_HASHES")
        self._stamp: tuple[int, int, int] | None = None
        self._from_file: set[str] = set()
        if path is not None:
            if not path.is_file():
                raise FileNotFoundError(
                    f"PIXELLLM_API_KEYS_FILE={path} does not exist; create it with `pixelllm api-key`"
                )
            self._reload()  # at start-up a bad file is an error
        if not self.hashes():
            logger.warning("API keys are on but no key is configured: every protected request gets 403")

    def _reload(self) -> None:
        """Read the keys file if it changed (a new modification time, size or inode) since the last read."""
        assert self.path is not None
        stat = self.path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp != self._stamp:
            self._from_file = parse_hashes(self.path.read_text().splitlines(), str(self.path))
            self._stamp = stamp
            logger.info("read %d API key hashes from %s", len(self._from_file), self.path)

    def hashes(self) -> set[str]:
        if self.path is not None:
            try:
                self._reload()
            except (OSError, ValueError) as exc:
                if self._stamp is not None:
                    logger.error("API keys file unusable, its keys are refused until it is fixed: %s", exc)
                self._from_file, self._stamp = set(), None
        return self.fixed | self._from_file

    def identify(self, key: str) -> str | None:
        """The key's id (the first 8 hex digits of its hash) if it is accepted, else None; constant time."""
        digest = hash_key(key)
        found = False
        for known in self.hashes():
            found |= hmac.compare_digest(known, digest)
        return digest[:8] if found else None


class RateLimiter:
    """Token buckets: a client may make `burst` requests at once, then `per_minute` a minute. At most `max_clients`
    buckets are kept: past that, the least recently seen client's is dropped (it starts again with a full one)."""

    def __init__(
        self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic, max_clients: int = MAX_BUCKETS
    ) -> None:
        self.rate, self.burst, self.clock, self.max_clients = per_minute / 60.0, float(burst), clock, max_clients
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, when), oldest first

    def acquire(self, client: str) -> float:
        """0 if `client` may go now (taking a token), else the seconds until it may."""
        now = self.clock()
        tokens, when = self.buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        allowed = tokens >= 1.0
        self.buckets[client] = (tokens - 1.0 if allowed else tokens, now)
        if len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)
        return 0.0 if allowed else (1.0 - tokens) / self.rate


def client_of(address: str) -> str:
    """Whom the rate limit counts an address as: an IPv6 address by its /64 network (one host is given a whole /64
    to pick addresses from), an IPv4-mapped one as its IPv4 address, anything else as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped is not None:  # an IPv4 client of a dual-stack socket
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else address


def presented_key(headers: Headers) -> str | None:
    """The key from `Authorization: Bearer <key>` or `X-API-Key: <key>`, if any."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key", "").strip() or None


class AccessMiddleware:
    """401 without a key, 403 with a wrong one, 429 past the rate limit; open paths pass untouched.

    Without keys configured only the rate limit applies, per client address. The key id goes to
    `scope["state"]["key_id"]` for the access log.
    """

    def __init__(
        self, app: ASGIApp, keys: KeyStore | None, limiter: RateLimiter | None, open_paths: frozenset[str]
    ) -> None:
        self.app, self.keys, self.limiter, self.open_paths = app, keys, limiter, open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or scope["path"].startswith(OPEN_PREFIX):
            await self.app(scope, receive, send)
            return
        denied = self._check(scope)
        await (denied or self.app)(scope, receive, send)

    def _check(self, scope: Scope) -> Response | None:
        client = client_of(scope["client"][0]) if scope.get("client") else "-"
        if self.keys is not None:
            key = presented_key(Headers(scope=scope))
            if key is None:
                message = "this endpoint needs an API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
                return error_response(401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="pixelllm"'})
            key_id = self.keys.identify(key)
            if key_id is None:
                return error_response(403, "forbidden", "the API key is not valid")
            scope.setdefault("state", {})["key_id"] = client = key_id
        if self.limiter is not None:
            wait = self.limiter.acquire(client)
            if wait > 0:
                per_minute, burst = self.limiter.rate * 60, int(self.limiter.burst)
                message = f"rate limit reached ({per_minute:g} requests a minute, bursts of {burst}); retry later"
                return error_response(429, "rate_limited", message, {"Retry-After": str(math.ceil(wait))})
        return None


class JSONErrorCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered in our JSON error shape."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        message = f"cross-origin request refused: {response.body.decode()} (see PIXELLLM_CORS_ORIGINS)"
        return error_response(400, "cors_refused", message)


def open_paths(settings: Settings, openapi_url: str) -> frozenset[str]:
    """The paths that need no key and are not rate-limited, besides the web page's files (`OPEN_PREFIX`)."""
    paths = set(OPEN_PATHS)
    if not settings.protect_metrics or not settings.auth_enabled:  # no key to scrape with: not rate-limited either
        paths.add("/metrics")
    if not settings.protect_docs:
        paths |= {"/docs", openapi_url}
    return frozenset(paths)


def install_access_control(app: FastAPI, settings: Settings) -> None:
    """Add API keys and rate limits (when set) and CORS (origins in `cors_origins`) to `app`; call after its routes."""
    try:
        keys = KeyStore(settings.api_keys_file, settings.api_key_hashes) if settings.auth_enabled else None
    except (OSError, ValueError) as exc:  # a keys file that is missing, unreadable or holds a bad line
        raise StartupError(str(exc)) from None
    limiter = None
    if settings.rate_limit_per_minute > 0:
        limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
    if keys is not None or limiter is not None:
        app.add_middleware(
            AccessMiddleware, keys=keys, limiter=limiter, open_paths=open_paths(settings, app.openapi_url)
        )
    app.add_middleware(  # with no origins set, every preflight is refused as `cors_refused`, before any key check
        JSONErrorCORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
        expose_headers=["X-Request-ID", "Retry-After"],
        max_age=600,
    )
