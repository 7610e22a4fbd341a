"""Access control, rate limits, CORS, request IDs and the access log, against a real uvicorn process."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi.routing import APIRoute
from PIL import Image, PngImagePlugin
from server_helpers import assert_error, encode, png, random_image, start_server
from starlette.routing import Mount
from test_server_browser import WAIT_S, driver, needs_chromium, open_page, wait_for_answer  # noqa: F401 - driver: a fixture

from pixelllm.cli import main as cli_main
from server import Settings, create_app, service
from server.errors import ApiError, StartupError
from server.security import RateLimiter, client_of, hash_key, new_key

pytest_plugins = ["server_fixtures"]

FILE_KEYS = [new_key() for _ in range(5)]  # one per test group, so their rate limits stay apart
ROUTES_KEY, LIMIT_KEY, LOG_KEY, INPUT_KEY, OTHER_KEY = FILE_KEYS
ENV_KEY = new_key()
IMAGE = png(64, 48, seed=4)
ORIGIN = "http://page.example:8080"
BURST, PER_MINUTE = 60, 60
OPEN = {"/healthz", "/readyz", "/", "/docs", "/openapi.json"}


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api_keys"
    path.write_text("# PixelLLM API keys\n\n" + "".join(f"{hash_key(k)}  # key {i}\n" for i, k in enumerate(FILE_KEYS)))
    return path


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, random_tiny_dir: Path, keys_file: Path):
    """Keys from a file and the environment, 60 requests a minute per key in bursts of 60, two CORS origins."""
    proc = start_server(
        tmp_path_factory,
        random_tiny_dir,
        api_keys_file=keys_file,
        api_key_hashes=hash_key(ENV_KEY),
        rate_limit_per_minute=PER_MINUTE,
        rate_limit_burst=BURST,
        cors_origins=f"{ORIGIN}, https://other.example",
        max_text_chars=64,
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(secure):
    with httpx.Client(base_url=secure.url, timeout=60) as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def flat(routes: list) -> list:
    """`routes` with each included router replaced by its own routes (newer FastAPI keeps it as one route)."""
    out = []
    for route in routes:
        included = getattr(route, "original_router", None)
        out += flat(included.routes) if included is not None else [route]
    return out


def app_routes() -> list[tuple[str, str]]:
    """(method, path) of every route of the app, so a new route cannot be left out."""
    routes = []
    for route in flat(create_app(Settings(model="pixelllm-tiny")).routes):
        if isinstance(route, Mount):
            routes.append(("GET", f"{route.path}/app.js"))
        elif isinstance(route, APIRoute) or hasattr(route, "methods"):
            path = re.sub(r"{[^}]+}", "x", route.path)
            routes += [(m, path) for m in sorted(route.methods - {"HEAD"})]
    return routes


FIELDS = {"/v1/localize": {"text": "a red circle"}, "/v1/regions": {"points": "10,10", "max_new_tokens": "2"}}


def call(client: httpx.Client, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    if method == "POST":  # a valid request
        fields = FIELDS.get(path, {"max_new_tokens": "2"})
        return client.post(path, files={"image": IMAGE}, data=fields, headers=headers)
    return client.request(method, path, headers=headers)


def test_the_route_list_has_every_documented_path() -> None:
    app = create_app(Settings(model="pixelllm-tiny"))
    documented = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    assert documented <= set(app_routes())
    assert ("GET", "/") in app_routes() and ("GET", "/static/app.js") in app_routes()


@pytest.mark.parametrize("method,path", app_routes())
def test_every_route_without_wrong_and_right_key(client: httpx.Client, method: str, path: str) -> None:
    protected = path not in OPEN and not path.startswith("/static/")
    for headers in ({}, {"X-API-Key": "nope"}, bearer("pxl_" + "x" * 43)):
        r = call(client, method, path, headers)
        if not protected:
            assert r.status_code == 200, r.text
            continue
        if headers:
            assert_error(r, 403, "forbidden")
        else:
            error = assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert "X-API-Key" in error["message"]
    r = call(client, method, path, bearer(ROUTES_KEY))
    assert r.status_code == 200, r.text  # the key is accepted, and every route answers a valid request


def test_key_headers(client: httpx.Client) -> None:
    for headers in (bearer(OTHER_KEY), {"authorization": f"bearer  {OTHER_KEY}"}, {"X-API-Key": OTHER_KEY}):
        assert client.get("/metrics", headers=headers).status_code == 200, headers
    assert client.get("/metrics", headers={"X-API-Key": ENV_KEY}).status_code == 200  # PIXELLLM_API_KEY_HASHES
    assert_error(client.get("/metrics", headers={"Authorization": f"Basic {OTHER_KEY}"}), 401)
    assert_error(client.get("/metrics", headers={"X-API-Key": hash_key(OTHER_KEY)}), 403)  # the hash is no key
    assert_error(client.get("/no/such/path"), 401)  # unknown paths are not revealed without a key
    assert_error(client.get("/no/such/path", headers=bearer(OTHER_KEY)), 404)


def test_refused_upload_is_not_read(client: httpx.Client) -> None:
    big = png(1200, 900, seed=1)
    assert_error(client.post("/v1/caption", files={"image": big}), 401)
    assert_error(client.post("/v1/caption", files={"image": big}, headers={"X-API-Key": "wrong"}), 403)
    assert client.get("/healthz").status_code == 200  # the connection is still usable


def test_keys_file_changes_apply_without_restart(
    client: httpx.Client, keys_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = keys_file.read_text()
    assert cli_main(["api-key", "--keys-file", str(keys_file), "--note", "for the test"]) == 0
    key = re.search(r"^key: +(\S+)$", capsys.readouterr().out, re.MULTILINE)[1]
    assert keys_file.read_text() == before + f"{hash_key(key)}  # for the test\n"  # the hash, never the key
    assert client.get("/metrics", headers={"X-API-Key": key}).status_code == 200
    keys_file.write_text(before)  # revoked
    assert_error(client.get("/metrics", headers={"X-API-Key": key}), 403)
    keys_file.write_text("not a hash\n")  # broken: its keys stop working, the environment's still work
    assert_error(client.get("/metrics", headers={"X-API-Key": OTHER_KEY}), 403)
    assert client.get("/metrics", headers={"X-API-Key": ENV_KEY}).status_code == 200
    keys_file.write_text(before)
    assert client.get("/metrics", headers={"X-API-Key": OTHER_KEY}).status_code == 200


def test_rate_limit_per_key_then_recovery(client: httpx.Client, secure) -> None:
    async def burst(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=secure.url, timeout=30) as c:
            return await asyncio.gather(*[c.get("/metrics", headers=bearer(LIMIT_KEY)) for _ in range(n)])

    responses = asyncio.run(burst(BURST + 10))
    limited = [r for r in responses if r.status_code != 200]
    assert 0 < len(limited) <= 10, [r.status_code for r in responses]  # fewer if tokens were refilled meanwhile
    for r in limited:
        assert_error(r, 429, "rate_limited")
    retry_after = max(int(r.headers["retry-after"]) for r in limited)
    assert 1 <= retry_after <= 60 / PER_MINUTE
    assert client.get("/metrics", headers=bearer(OTHER_KEY)).status_code == 200  # other keys are not limited
    assert all(client.get("/healthz").status_code == 200 for _ in range(BURST + 3))  # health checks never are
    time.sleep(retry_after)
    assert client.get("/metrics", headers=bearer(LIMIT_KEY)).status_code == 200


def test_rate_limiter_keeps_the_most_recent_clients_only() -> None:
    """Past `max_clients` the least recently seen client's bucket goes (it had rebuilt every bucket per request past
    10,000 clients, with no bound); a client seen since keeps its own."""
    limiter = RateLimiter(per_minute=1, burst=1, clock=lambda: 0.0, max_clients=3)
    assert [limiter.acquire(c) for c in "abc"] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") > 0  # seen again: now the most recent
    assert limiter.acquire("d") == 0.0
    assert list(limiter.buckets) == ["c", "a", "d"]  # b, the least recently seen, went
    assert limiter.acquire("a") > 0 and limiter.acquire("b") == 0.0


def test_an_ipv6_host_is_one_client_however_many_addresses_it_picks() -> None:
    """One host gets a whole /64: each address of it was a client of its own, with a fresh burst."""
    assert client_of("2001:db8::1") == client_of("2001:db8::ffff:2") == "2001:db8::/64"
    assert client_of("2001:db8:0:1::1") != client_of("2001:db8::1")
    assert client_of("10.0.0.1") == client_of("::ffff:10.0.0.1") == "10.0.0.1"
    assert client_of("testclient") == "testclient"


def test_the_page_files_are_sent_whole_whatever_range_is_asked(service_client: httpx.Client) -> None:
    """Starlette answered a bad Range in plain text (400, 416), outside the JSON error shape: the page's small files
    are sent whole instead, saying so (Accept-Ranges: none)."""
    for path in ("/", "/static/app.js", "/static/docs/favicon-32x32.png"):
        whole = service_client.get(path)
        assert whole.status_code == 200 and whole.headers["accept-ranges"] == "none", path
        for asked in ("bytes=999999999-", "bytes=5-1", "bytes=0-9", "lines=1-2"):
            r = service_client.get(path, headers={"Range": asked})
            assert r.status_code == 200 and r.content == whole.content, (path, asked, r.status_code)


def test_rate_limiter_refills_at_the_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=30, burst=2, clock=lambda: now[0])
    assert [limiter.acquire("a"), limiter.acquire("a")] == [0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(2.0)  # one token every 2 s
    assert limiter.acquire("b") == 0.0
    now[0] = 1.0
    assert limiter.acquire("a") == pytest.approx(1.0)
    now[0] = 2.0
    assert limiter.acquire("a") == 0.0
    now[0] = 100.0
    assert [limiter.acquire("a"), limiter.acquire("a"), limiter.acquire("a") > 0] == [0.0, 0.0, True]


def test_cors(client: httpx.Client) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"}
    ok = client.options("/v1/caption", headers={"Origin": ORIGIN, **preflight})
    assert ok.status_code == 200, ok.text
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    assert "x-api-key" in ok.headers["access-control-allow-headers"].lower()
    assert_error(client.options("/v1/caption", headers={"Origin": "http://evil.example", **preflight}), 400)
    r = client.get("/metrics", headers={"Origin": ORIGIN, **bearer(OTHER_KEY)})
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    assert (
        "access-control-allow-origin" not in client.get("/healthz", headers={"Origin": "http://evil.example"}).headers
    )


def test_request_ids(client: httpx.Client) -> None:
    given = client.get("/healthz", headers={"X-Request-ID": "client-id_1.2:3"})
    assert given.headers["x-request-id"] == "client-id_1.2:3"
    for bad in ("has spaces", "x" * 129, "%0aforged"):
        made = client.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", made), made
    responses = [
        client.get("/readyz"),
        client.get("/metrics"),  # 401
        client.get("/metrics", headers={"X-API-Key": "wrong"}),  # 403
        client.get("/missing", headers=bearer(OTHER_KEY)),  # 404
        client.post("/v1/caption", content=b"x", headers={"Content-Type": "text/plain", **bearer(OTHER_KEY)}),  # 415
        client.options(
            "/v1/caption", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
        ),
    ]
    ids = [r.headers["x-request-id"] for r in responses]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_log_lines_carry_request_ids_and_no_secrets(client: httpx.Client, secure) -> None:
    image = png(96, 64, seed=9)
    b64 = base64.b64encode(image).decode()
    wrong_key = new_key()
    r = client.post(
        "/v1/caption",
        json={"image": b64, "max_new_tokens": 2},
        headers={**bearer(LOG_KEY), "X-Request-ID": "log-test-1"},
    )
    assert r.status_code == 200, r.text
    client.post("/v1/localize", files={"image": image}, data={"text": "a circle"}, headers={"X-API-Key": LOG_KEY})
    client.post("/v1/caption", json={"image": b64}, headers={**bearer(wrong_key), "X-Request-ID": "log-test-2"})
    client.get("/metrics?api_key=" + LOG_KEY, headers={"X-API-Key": LOG_KEY})
    time.sleep(0.3)
    log = secure.log()
    for secret in (LOG_KEY, wrong_key, ENV_KEY, *FILE_KEYS, b64[100:140], b64[-40:]):
        assert secret not in log
    key_id = hash_key(LOG_KEY)[:8]
    assert re.search(
        rf"server\.access \[log-test-1\] POST /v1/caption 200 [\d.]+ms client=127\.0\.0\.1 key={key_id}", log
    )
    assert re.search(r"server\.access \[log-test-2\] POST /v1/caption 403 [\d.]+ms client=127\.0\.0\.1 key=-", log)
    assert re.search(rf"GET /metrics 200 [\d.]+ms client=\S+ key={key_id}", log)  # no query string
    lines = [line for line in log.splitlines() if re.match(r"\d{4}-\d\d-\d\d ", line)]
    assert lines and all(re.search(r" \[[^\]]+\] ", line) for line in lines)  # every line has a request ID slot
    assert any("uvicorn" in line and "[-]" in line for line in lines)  # uvicorn's own lines too


def test_open_paths_are_configurable() -> None:
    """`protect_metrics=false` opens /metrics, `protect_docs=true` closes the docs (in-process app); with no CORS
    origins set a preflight is refused as such, not as a request without a key."""
    key = new_key()
    settings = Settings(model="pixelllm-tiny", api_key_hashes=[hash_key(key)], protect_metrics=False, protect_docs=True)

    async def go() -> tuple[list[int], httpx.Response]:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            paths = ["/metrics", "/docs", "/openapi.json", "/static/docs/swagger-ui.css"]
            statuses = [(await c.get(p)).status_code for p in paths] + [
                (await c.get(p, headers={"X-API-Key": key})).status_code for p in paths
            ]
            preflight = {"Origin": "http://page.example", "Access-Control-Request-Method": "POST"}
            return statuses, await c.options("/v1/caption", headers=preflight)

    statuses, preflight = asyncio.run(go())
    assert statuses == [200, 401, 401, 200, 200, 200, 200, 200]  # the page's files are open, as the web page's
    assert_error(preflight, 400, "cors_refused")
    assert not Settings().auth_enabled and Settings().rate_limit_per_minute == 0  # off by default


def test_with_keys_the_openapi_schema_says_which_operations_take_one() -> None:
    """Swagger UI's Authorize button and generated clients need the schemes: without them every "Try it out" call
    of /docs was a 401. Without keys there are none."""
    secure = create_app(Settings(model="pixelllm-tiny", api_key_hashes=[hash_key(new_key())])).openapi()
    assert {s["type"] for s in secure["components"]["securitySchemes"].values()} == {"http", "apiKey"}
    security = {path: [op.get("security") for op in ops.values()] for path, ops in secure["paths"].items()}
    keyed = [{"bearer": []}, {"apiKey": []}]
    assert {p for p, s in security.items() if s == [keyed]} == {p for p in security if p.startswith("/v1/")} | {
        "/metrics"
    }
    assert security["/healthz"] == security["/readyz"] == [None]
    assert "securitySchemes" not in create_app(Settings(model="pixelllm-tiny")).openapi()["components"]


def test_without_keys_the_rate_limit_spares_metrics() -> None:
    """A scraper (behind a proxy: one address with every user) was refused as `rate_limited`; /v1 stays limited."""
    settings = Settings(model="pixelllm-tiny", rate_limit_per_minute=6, rate_limit_burst=1)

    async def go() -> tuple[list[int], int]:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            scrapes = [(await c.get("/metrics")).status_code for _ in range(3)]
            calls = [(await c.post("/v1/caption", json={})).status_code for _ in range(2)]
            return scrapes, calls

    scrapes, calls = asyncio.run(go())
    assert scrapes == [200, 200, 200] and calls[1] == 429


def test_bad_keys_file_stops_the_start(tmp_path: Path) -> None:
    """A missing file, or a raw key where a hash belongs, is an error at start-up that never shows the key."""
    with pytest.raises(StartupError, match="pixelllm api-key"):
        create_app(Settings(model="pixelllm-tiny", api_keys_file=tmp_path / "missing"))
    raw = new_key()
    (tmp_path / "keys").write_text(f"{hash_key(new_key())}\n{raw}\n")
    with pytest.raises(StartupError, match=r"keys:2 is not a SHA-256 hex digest") as e:
        create_app(Settings(model="pixelllm-tiny", api_keys_file=tmp_path / "keys"))
    assert raw not in str(e.value)  # `pixelllm serve` prints a StartupError as one line (the tests below)


@pytest.mark.parametrize(
    "env,message",
    [
        ({"PIXELLLM_API_KEY_HASHES": "zz"}, "PIXELLLM_API_KEY_HASHES: entry:1 is not a SHA-256 hex digest"),
        ({"PIXELLLM_REQUEST_TIMEOUT_S": "inf"}, "PIXELLLM_REQUEST_TIMEOUT_S: Input should be a finite number"),
        ({"PIXELLLM_MAX_BATCH_WAIT_MS": "nan"}, "PIXELLLM_MAX_BATCH_WAIT_MS: Input should be a finite number"),
        (
            {"PIXELLLM_RAY_MIN_REPLICAS": "5", "PIXELLLM_RAY_MAX_REPLICAS": "2"},
            "PIXELLLM_RAY_MIN_REPLICAS (5) is above PIXELLLM_RAY_MAX_REPLICAS (2)",
        ),
        ({"PIXELLLM_DEBUG_FAIL_STATUSES": "[200, 503]"}, "give HTTP error statuses (400 to 599), got [200, 503]"),
        ({"PIXELLLM_DEBUG_FAIL_STATUSES": '["x"]'}, "PIXELLLM_DEBUG_FAIL_STATUSES (item 0): Input should be a valid"),
    ],
)
def test_bad_settings_are_one_line_not_a_traceback(monkeypatch: pytest.MonkeyPatch, capsys, env, message) -> None:
    """Each had ended `pixelllm serve` in a traceback (a ValueError, an OverflowError at int(inf), Ray's own check)."""
    monkeypatch.setenv("PIXELLLM_MODEL", "/nonexistent")  # were the setting let through, it would still not serve
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli_main(["serve", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pixelllm: error: ") and message in err and "Traceback" not in err, err
    assert err.count("\n") == 1, err


def test_python_m_server_says_what_is_wrong_with_its_settings(tmp_path: Path) -> None:
    env = {**os.environ, "PIXELLLM_REQUEST_TIMEOUT_S": "inf"}
    run = subprocess.run(
        [sys.executable, "-m", "server", "--port", "1"], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "python -m server: error: bad settings: PIXELLLM_REQUEST_TIMEOUT_S" in run.stderr


def test_an_empty_keys_file_setting_stops_the_start(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`PIXELLLM_API_KEYS_FILE=$KEYS` with KEYS unset: neither no keys (open to all) nor the folder '.'."""
    from pixelllm.cli import main

    monkeypatch.setenv("PIXELLLM_API_KEYS_FILE", "")
    assert main(["serve", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "bad settings: PIXELLLM_API_KEYS_FILE: is empty: give the keys file" in err, err


def test_keys_are_off_by_default(service_client: httpx.Client) -> None:
    r = service_client.post("/v1/caption", files={"image": IMAGE}, data={"max_new_tokens": "2"})
    assert r.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    assert service_client.get("/metrics").status_code == 200


# ------------------------------------------------------------------ inputs
def test_no_request_field_names_a_model_or_a_file(client: httpx.Client) -> None:
    """The model is the operator's choice: fields like these are unknown fields (422), whatever the endpoint."""
    headers = bearer(INPUT_KEY)
    b64 = base64.b64encode(IMAGE).decode()
    for field, value in (("model", "pixelllm-base"), ("sam_checkpoint", "/etc/passwd"), ("path", "../weights")):
        r = client.post("/v1/caption", json={"image": b64, field: value}, headers=headers)
        assert_error(r, 422, "invalid_request", field=field)
        r = client.post("/v1/localize", files={"image": IMAGE}, data={"text": "a", field: value}, headers=headers)
        assert_error(r, 422, "invalid_request", field=field)


def localize(client: httpx.Client, texts: list[str], as_json: bool = True) -> httpx.Response:
    if as_json:
        body = {"image": base64.b64encode(IMAGE).decode(), "texts": texts}
        return client.post("/v1/regions", json=body, headers=bearer(INPUT_KEY))
    return client.post("/v1/regions", files={"image": IMAGE}, data={"texts": texts}, headers=bearer(INPUT_KEY))


@pytest.mark.parametrize(
    "char", ["\x00", "\x1b", "\x7f", "\u0085", "\u200b", "\u202e", "\ufeff", "\ue000", "\U000e0001"]
)
def test_control_and_invisible_characters_are_refused(client: httpx.Client, char: str) -> None:
    for as_json in (True, False):
        error = assert_error(localize(client, ["a red circle", f"blue{char}square"], as_json), 422, field="texts.1")
        assert f"U+{ord(char):04X}" in error["message"]


def test_tabs_and_line_breaks_are_spaces_and_text_is_nfc(client: httpx.Client) -> None:
    """The texts as read: whitespace collapsed (`Predictor.localize`), Unicode's own line separators too."""
    r = localize(client, ["a red\tcircle\r\nleft ", "cafe\u0301", "a\u2028red\u2029circle"])
    assert r.status_code == 200, r.text
    texts = [loc["text"] for loc in r.json()["localizations"]]
    assert texts == ["a red circle left", "caf\u00e9", "a red circle"]
    # 128 code points, 64 characters once composed: within max_text_chars=64, so refused for its 65 tokens (the
    # model reads 47), not its characters; and so the longest decomposition (4 code points a character)
    for limit in ("e\u0301" * 64, "\u0391\u0313\u0342\u0345" * 64):
        error = assert_error(localize(client, [limit]), 422, field="texts.0")
        assert error["message"] == "texts.0: the text is 65 tokens; the model reads at most 47: shorten it"
    r = localize(client, ["\u0391\u0313\u0342\u0345" * 8])
    assert r.status_code == 200, r.text
    assert r.json()["localizations"][0]["text"] == "\u1f8e" * 8  # ALPHA WITH PSILI AND PERISPOMENI AND PROSGEGRAMMENI
    error = assert_error(localize(client, ["x" * 65]), 422, field="texts.0")
    assert error["message"] == "texts.0: text is 65 characters; at most 64"


def test_a_text_too_long_however_it_composes_is_refused_before_its_characters_are_read(monkeypatch) -> None:
    """The per-character pass runs on the event loop: a 20 MB text must not reach it."""
    read = []
    monkeypatch.setattr(service, "clean_text", lambda field, text: read.append(text) or text)
    engine = SimpleNamespace(settings=Settings(max_text_chars=64), predictor=None)  # before the model loads
    with pytest.raises(ApiError) as refused:
        service.check_texts("text", ["x" * (4 * 64 + 1)], engine)
    assert refused.value.status == 422 and "at most 64" in refused.value.message and read == []
    assert service.check_texts("text", ["x" * 64], engine) == ["x" * 64] and read == ["x" * 64]


def test_image_metadata_is_never_echoed(client: httpx.Client) -> None:
    exif = Image.Exif()
    exif[0x010E] = "EXIF-MARKER-7c1f"  # ImageDescription
    exif[0x0112] = 6
    jpeg = encode(random_image(40, 30, seed=3), "JPEG", exif=exif.tobytes(), comment=b"COM-MARKER-7c1f")
    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", "PNG-MARKER-7c1f")
    png_bytes = encode(random_image(40, 30, seed=3), "PNG", pnginfo=text)
    for data, size in ((jpeg, {"width": 30, "height": 40}), (png_bytes, {"width": 40, "height": 30})):
        r = client.post("/v1/caption", files={"image": data}, data={"max_new_tokens": "2"}, headers=bearer(INPUT_KEY))
        assert r.status_code == 200, r.text
        assert r.json()["image"] == size  # EXIF orientation 6 applied to the JPEG
        assert "MARKER-7c1f" not in r.text and "MARKER-7c1f" not in str(r.headers)


def other_formats() -> dict[str, bytes]:
    image = random_image(32, 24, seed=5)
    formats = {fmt: encode(image, fmt) for fmt in ("TIFF", "ICO", "PPM", "TGA", "PCX", "SGI", "EPS", "PDF", "DDS")}
    formats["PSD"] = b"8BPS\x00\x01" + bytes(20) + b"\x00\x03" + bytes(64)  # Pillow reads PSD; we never try
    formats["SVG"] = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    return formats


@pytest.mark.parametrize("fmt", sorted(other_formats()))
def test_formats_outside_the_allow_list_are_refused(client: httpx.Client, fmt: str) -> None:
    data = other_formats()[fmt]
    r = client.post("/v1/caption", files={"image": data}, headers=bearer(INPUT_KEY))
    assert_error(r, 415, "unsupported_media_type")


# ------------------------------------------------------------------ the web page with keys on
@pytest.mark.browser
@needs_chromium
def test_web_page_asks_for_a_key(driver, secure, tmp_path: Path) -> None:  # noqa: F811 - the imported fixture
    """The page loads without a key; its first API call gets 401, it asks for a key (again, for one no key could
    be: pasted with a zero-width space, which the browser cannot send in a header), and captions."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(driver, secure.url)
    (tmp_path / "upload.png").write_bytes(IMAGE)
    driver.find_element("id", "file").send_keys(str(tmp_path / "upload.png"))
    prompt = WebDriverWait(driver, WAIT_S).until(expected_conditions.alert_is_present())
    assert "API key" in prompt.text
    prompt.send_keys(OTHER_KEY + "\u200b")
    prompt.accept()
    again = WebDriverWait(driver, WAIT_S).until(expected_conditions.alert_is_present())
    assert again.text.startswith("That is not an API key")
    again.send_keys(OTHER_KEY)
    again.accept()
    wait_for_answer(driver, previous="")
    assert driver.find_element("id", "caption").text
    assert driver.execute_script("return sessionStorage.getItem('pixelllm-api-key')") == OTHER_KEY
