"""Readiness, the queue bound (429), timeouts (504), client disconnects and graceful shutdown."""

from __future__ import annotations

import asyncio
import base64
import http.client
import threading
import time

import httpx
import pytest
from server_helpers import (
    ServerProcess,
    assert_error,
    broken_model_dir,
    metric,
    png,
    settings_env,
    start_server,
    wait_for,
)
from starlette.testclient import TestClient

from server import Settings, StartupError, create_app, run

pytest_plugins = ["server_fixtures"]

DELAY_S, TIMEOUT_S = 0.6, 1.5
IMAGE = png(64, 48, seed=3)


@pytest.fixture(scope="module")
def slow_service(tmp_path_factory, random_tiny_dir):
    """Every batch takes 0.6 s more; one request per batch; 3 in flight at most; 1.5 s timeout."""
    proc = start_server(
        tmp_path_factory,
        random_tiny_dir,
        debug_batch_delay_ms=DELAY_S * 1000,
        max_batch_size=1,
        max_queue=3,
        request_timeout_s=TIMEOUT_S,
    )
    httpx.post(f"{proc.url}/v1/caption", files={"image": IMAGE}, data={"max_new_tokens": "2"}, timeout=30)
    yield proc
    proc.stop()


async def post_many(url: str, n: int, timeout: float = 30) -> list[httpx.Response | Exception]:
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        calls = [client.post("/v1/caption", files={"image": IMAGE}, data={"max_new_tokens": "2"}) for _ in range(n)]
        return await asyncio.gather(*calls, return_exceptions=True)


def test_loading_server_answers_503_not_ready(tmp_path, random_tiny_dir) -> None:
    """A real server while its model loads (held back 4 s): live, not ready, every model route 503 with
    Retry-After; then ready and answering."""
    env = settings_env(random_tiny_dir, debug_load_delay_ms=4000)
    server = ServerProcess(env, tmp_path / "server.log")
    try:
        server.wait_ready(timeout_s=120, path="/healthz")  # live, the model held back
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.get("/healthz").json() == {"status": "ok", "model": None}
            for r in (
                client.get("/readyz"),
                client.post("/v1/caption", files={"image": IMAGE}),
                client.post("/v1/localize", json={"image": base64.b64encode(IMAGE).decode(), "text": "a dog"}),
            ):
                assert_error(r, 503, "not_ready")
                assert r.headers["retry-after"] == "5"
            assert client.get("/metrics").status_code == 200
            server.wait_ready()
            answer = client.post("/v1/caption", files={"image": IMAGE}, data={"max_new_tokens": "2"})
            assert answer.status_code == 200, answer.text
    finally:
        server.stop()


def test_not_ready_is_503() -> None:
    """Before the model is loaded (here: never, as the app's lifespan does not run) the service says 503."""

    async def go() -> tuple[httpx.Response, ...]:
        transport = httpx.ASGITransport(app=create_app(Settings(model="pixelllm-tiny")))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (
                await client.get("/healthz"),
                await client.get("/readyz"),
                await client.post("/v1/caption", files={"image": IMAGE}),
            )

    health, ready, caption = asyncio.run(go())
    assert health.status_code == 200
    for r in (ready, caption):
        assert_error(r, 503, "not_ready")
        assert r.headers["retry-after"]


def test_model_that_fails_to_load(tmp_path, random_tiny_dir) -> None:
    """Weights that do not load: not ready, and not live either, so an orchestrator restarts it."""
    broken = broken_model_dir(tmp_path / "broken", like=random_tiny_dir)
    with TestClient(create_app(Settings(model=str(broken)))) as client:
        deadline = time.monotonic() + 60
        while client.get("/healthz").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        for r in (client.get("/healthz"), client.get("/readyz"), client.post("/v1/caption", files={"image": IMAGE})):
            assert "failed to load" in assert_error(r, 503, "load_failed")["message"]
            assert "retry-after" not in r.headers  # retrying will not help: the weights need fixing


def test_closed_batcher_is_503_shutting_down(random_tiny_dir) -> None:
    """Once shutdown has closed the batcher (Ray Serve or another ASGI host may still route a request), model
    routes, streamed captions included, say 503 shutting_down with Retry-After."""
    app = create_app(Settings(model=str(random_tiny_dir)))
    with TestClient(app) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, timeout_s=120)
        client.portal.call(app.state.engine.batcher.close)
        for r in (
            client.post("/v1/caption", files={"image": IMAGE}),
            client.post("/v1/caption?stream=true", files={"image": IMAGE}),
            client.post("/v1/localize", files={"image": IMAGE}, data={"text": "a dog"}),
        ):
            assert_error(r, 503, "shutting_down")
            assert r.headers["retry-after"] == "5"


def test_unknown_model_fails_at_start() -> None:
    with pytest.raises(StartupError, match="no-such-model"):
        run(settings=Settings(model="no-such-model"))


def test_queue_full_is_429_and_slow_is_504(slow_service) -> None:
    responses = asyncio.run(post_many(slow_service.url, 4))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(429) == 1 and 200 in statuses and 504 in statuses, statuses
    assert set(statuses) <= {200, 429, 504}
    for r in responses:
        if r.status_code == 429:
            assert_error(r, 429, "queue_full")
            assert r.headers["retry-after"] == "1"
        elif r.status_code == 504:
            assert_error(r, 504, "timeout")


def test_a_full_queue_refuses_before_decoding_the_image(slow_service) -> None:
    """The queue holds at most max_queue decoded images, and shedding load costs no decoding: past a full queue, a
    request is 429 before its image is read (here bytes that would be a 415 if they were decoded)."""

    async def go() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=slow_service.url, timeout=30) as client:
            data = {"max_new_tokens": "2"}
            filling = [
                asyncio.ensure_future(client.post("/v1/caption", files={"image": IMAGE}, data=data)) for _ in range(3)
            ]
            deadline = time.monotonic() + 10
            while metric((await client.get("/metrics")).text, "pixelllm_queue_depth") < 3:
                assert time.monotonic() < deadline, "the queue never filled"
                await asyncio.sleep(0.02)
            late = await client.post("/v1/caption", files={"image": b"not an image at all"})
            return late, await asyncio.gather(*filling)

    late, filled = asyncio.run(go())
    assert_error(late, 429, "queue_full")
    assert {r.status_code for r in filled} <= {200, 504}


def test_client_disconnect_frees_the_slot(slow_service) -> None:
    before = httpx.get(f"{slow_service.url}/metrics").text
    gone = asyncio.run(post_many(slow_service.url, 3, timeout=0.25))
    assert all(isinstance(r, httpx.TimeoutException) for r in gone)
    time.sleep(0.2)
    text = httpx.get(f"{slow_service.url}/metrics").text
    assert metric(text, "pixelllm_queue_depth") == 0  # while the first batch still runs
    statuses = [r.status_code for r in asyncio.run(post_many(slow_service.url, 3))]
    assert 429 not in statuses and 200 in statuses, statuses
    after = httpx.get(f"{slow_service.url}/metrics").text
    closed = dict(route="/v1/caption", method="POST", status="499")
    assert metric(after, "pixelllm_requests_total", **closed) - metric(before, "pixelllm_requests_total", **closed) == 3


def test_graceful_shutdown_answers_running_and_queued_requests(tmp_path_factory, random_tiny_dir) -> None:
    """SIGTERM while one request runs and two wait in the queue (one per batch, each batch 0.5 s): all three are
    answered, then the server exits and no longer listens."""
    server = start_server(
        tmp_path_factory, random_tiny_dir, debug_batch_delay_ms=500, max_batch_size=1, request_timeout_s=30
    )
    results: list[httpx.Response | Exception] = []
    thread = threading.Thread(target=lambda: results.extend(asyncio.run(post_many(server.url, 3))))
    thread.start()
    try:
        wait_for(lambda: metric(httpx.get(f"{server.url}/metrics").text, "pixelllm_queue_depth") == 3, timeout_s=10)
        server.terminate()
        thread.join(timeout=60)
    finally:
        server.stop()
    assert [getattr(r, "status_code", r) for r in results] == [200, 200, 200], [getattr(r, "text", r) for r in results]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz", timeout=2)


def test_idle_keep_alive_connection_outlives_client_expiry(service) -> None:
    """PIXELLLM_KEEP_ALIVE_S (75 s by default) keeps an idle connection open past uvicorn's own 5 s, which equals
    httpx's idle expiry: with equal timeouts a client may send on a connection the server is just closing."""
    url = httpx.URL(service.url)
    conn = http.client.HTTPConnection(url.host, url.port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        first = conn.getresponse()
        assert first.status == 200 and first.read()
        local = conn.sock.getsockname()
        time.sleep(6)
        conn.request("GET", "/healthz")  # a closed connection raises RemoteDisconnected here
        second = conn.getresponse()
        assert second.status == 200 and second.read()
        assert conn.sock.getsockname() == local  # the same connection, not a new one
    finally:
        conn.close()
