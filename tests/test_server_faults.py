"""Faults against real servers: a model that raises, requests that time out, clients that leave mid-request,
a corrupt checkpoint at start-up. Each leaves the server serving (or refusing to start, with a clear message),
and every other request answered as a healthy server answers it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from server_helpers import (
    ROOT,
    answers,
    assert_error,
    assert_same,
    free_port,
    metric,
    png,
    start_server,
    wait_for,
)

pytest_plugins = ["server_fixtures"]

IMAGES = [png(64, 48, seed=seed) for seed in range(40, 52)]
FORM = {"max_new_tokens": "4"}
FAIL_EVERY = 3
DELAY_S, TIMEOUT_S, BODY_TIMEOUT_S = 1.0, 3.5, 2.0


async def caption(client: httpx.AsyncClient, image: bytes, timeout: float = 60) -> httpx.Response | Exception:
    try:
        return await client.post("/v1/caption", files={"image": image}, data=FORM, timeout=timeout)
    except httpx.TimeoutException as exc:
        return exc


async def caption_all(url: str, images: list[bytes], timeouts: list[float] | None = None) -> list:
    """Caption `images` at once, each request with its own client timeout (a timeout closes the connection)."""
    async with httpx.AsyncClient(base_url=url) as client:
        return await asyncio.gather(*(caption(client, i, t) for i, t in zip(images, timeouts or [60] * len(images))))


@pytest.fixture(scope="module")
def expected(service_client: httpx.Client) -> dict[bytes, list[dict]]:
    """What a healthy server (same weights, no faults) answers for each image."""
    responses = {image: service_client.post("/v1/caption", files={"image": image}, data=FORM) for image in IMAGES}
    assert all(r.status_code == 200 for r in responses.values())
    return {image: answers(r) for image, r in responses.items()}


@pytest.fixture(scope="module")
def failing_service(tmp_path_factory, random_tiny_dir):
    """Every 3rd model call raises; batches of up to 4."""
    proc = start_server(tmp_path_factory, random_tiny_dir, debug_fail_model_every=FAIL_EVERY, max_batch_size=4)
    yield proc
    proc.stop(tracebacks=True)  # the injected failures are logged with theirs


@pytest.fixture(scope="module")
def slow_service(tmp_path_factory, random_tiny_dir):
    """Every batch takes 1 s more, batches of up to 2, a 3.5 s request timeout, bodies in 2 s."""
    proc = start_server(
        tmp_path_factory,
        random_tiny_dir,
        debug_batch_delay_ms=DELAY_S * 1000,
        request_timeout_s=TIMEOUT_S,
        max_batch_size=2,
        body_timeout_s=BODY_TIMEOUT_S,
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def slow_decode_service(tmp_path_factory, random_tiny_dir):
    """Decoding an image takes 2.5 s more, a 2 s request timeout, batches of one."""
    proc = start_server(
        tmp_path_factory, random_tiny_dir, debug_decode_delay_ms=2500, request_timeout_s=2.0, max_batch_size=1
    )
    yield proc
    proc.stop()


def check(response: httpx.Response, image: bytes, expected: dict[bytes, list[dict]]) -> None:
    assert response.status_code == 200, response.text
    assert_same(answers(response), expected[image])


def wait_idle(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while metric(httpx.get(f"{url}/metrics").text, "pixelllm_queue_depth") > 0:
        assert time.monotonic() < deadline, "requests still queued"
        time.sleep(0.1)


def test_model_error_fails_only_that_request(failing_service, expected) -> None:
    """Requests one at a time: model calls 3 and 6 raise; those requests get a JSON 500, the rest their answer."""
    images = [IMAGES[i % 2] for i in range(6)]
    with httpx.Client(base_url=failing_service.url, timeout=60) as client:
        responses = [
            client.post("/v1/caption", files={"image": image}, data=FORM, headers={"X-Request-ID": f"req-{i}"})
            for i, image in enumerate(images)
        ]
        assert client.get("/readyz").status_code == 200
        text = client.get("/metrics").text
    for i, (image, r) in enumerate(zip(images, responses)):
        if (i + 1) % FAIL_EVERY == 0:
            assert "see the server log" in assert_error(r, 500, "model_error")["message"]
        else:
            check(r, image, expected)
    assert metric(text, "pixelllm_requests_total", route="/v1/caption", method="POST", status="500") == 2
    log = failing_service.log()
    assert log.count("InjectedFault: injected model failure") == 2 and "unhandled error" not in log
    assert "[req-2] model call failed" in log and "[req-5] model call failed" in log  # which 500 is which


def test_model_error_in_a_batch_spares_the_others(failing_service, expected) -> None:
    """12 requests at once: a batch that raises is retried one request at a time, so only the request whose
    retry raises again fails; every other one gets its own answer."""
    responses = asyncio.run(caption_all(failing_service.url, IMAGES))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 500} and statuses.count(500) >= 1 and statuses.count(200) >= 6, statuses
    for image, r in zip(IMAGES, responses):
        if r.status_code == 500:
            assert_error(r, 500, "model_error")
        else:
            check(r, image, expected)
    assert "retrying one by one" in failing_service.log()
    with httpx.Client(base_url=failing_service.url, timeout=60) as client:  # 3 calls: exactly one raises
        after = [client.post("/v1/caption", files={"image": IMAGES[0]}, data=FORM) for _ in range(FAIL_EVERY)]
    assert sorted(r.status_code for r in after) == [200, 200, 500]
    for r in after:
        if r.status_code == 200:
            check(r, IMAGES[0], expected)


def test_timeouts_leave_the_server_serving(slow_service, expected) -> None:
    """10 requests at once, 2 per 1 s batch, 3.5 s timeout: the first batches answer, the later ones time out
    (504) and are dropped from the queue; then the server answers at once again."""
    images = IMAGES[:10]
    responses = asyncio.run(caption_all(slow_service.url, images))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 504} and 200 in statuses and statuses.count(504) >= 2, statuses
    for image, r in zip(images, responses):
        if r.status_code == 504:
            assert f"within {TIMEOUT_S:g} s" in assert_error(r, 504, "timeout")["message"]
        else:
            check(r, image, expected)
    wait_idle(slow_service.url)
    start = time.perf_counter()
    r = httpx.post(f"{slow_service.url}/v1/caption", files={"image": IMAGES[11]}, data=FORM, timeout=60)
    check(r, IMAGES[11], expected)
    assert time.perf_counter() - start < TIMEOUT_S


def test_the_timeout_counts_the_image_decoding(slow_decode_service) -> None:
    """The request timeout starts when the handler does: an image that takes longer than it to decode is a 504,
    and the model never runs on it."""
    forms = {"/v1/caption": FORM, "/v1/localize": {"text": "a dog"}, "/v1/regions": {"boxes": "0,0,8,8"}}
    with httpx.Client(base_url=slow_decode_service.url, timeout=60) as client:
        for route, form in forms.items():
            start = time.perf_counter()
            r = client.post(route, files={"image": IMAGES[0]}, data=form)
            assert "within 2 s" in assert_error(r, 504, "timeout")["message"], route
            assert time.perf_counter() - start < 2.5 + 2.0, route  # answered after decoding, not a timeout later
        text = client.get("/metrics").text
        assert metric(text, "pixelllm_cache_misses_total") == 0  # no job reached the model
    assert metric(text, "pixelllm_batch_size_count") == 0


def test_clients_that_leave_mid_request(slow_service, expected) -> None:
    """Two of four concurrent clients hang up while their requests wait or run, and a third hangs up halfway
    through sending its body: the other two get their own answers, and the server serves on."""
    before = httpx.get(f"{slow_service.url}/metrics").text
    with socket.create_connection(("127.0.0.1", slow_service.port)) as sock:
        head = (
            b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        )
        sock.sendall(head + b'{"image": "' + b"A" * 1000)
    images = IMAGES[:4]
    responses = asyncio.run(caption_all(slow_service.url, images, timeouts=[30, 0.3, 30, 0.3]))
    assert isinstance(responses[1], httpx.TimeoutException) and isinstance(responses[3], httpx.TimeoutException)
    check(responses[0], images[0], expected)
    check(responses[2], images[2], expected)
    wait_idle(slow_service.url)
    after = httpx.get(f"{slow_service.url}/metrics").text
    for status, count in (("499", 3), ("500", 0)):  # the upload cut short is a 499 too, not a server error
        labels = dict(route="/v1/caption", method="POST", status=status)
        assert (
            metric(after, "pixelllm_requests_total", **labels) - metric(before, "pixelllm_requests_total", **labels)
            == count
        )
    r = httpx.post(f"{slow_service.url}/v1/caption", files={"image": IMAGES[10]}, data=FORM, timeout=60)
    check(r, IMAGES[10], expected)


def test_a_body_sent_a_byte_at_a_time_is_408_and_frees_its_connection(slow_service) -> None:
    """A client trickling its body (slowloris) would hold a connection and its buffer for ever: the whole body must
    arrive within PIXELLLM_BODY_TIMEOUT_S, else 408 and the connection closed; the server serves on."""
    with socket.create_connection(("127.0.0.1", slow_service.port), timeout=30) as sock:
        head = b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        sock.sendall(head)
        start = time.monotonic()
        answer = b""
        for byte in b'{"image": "' + b"A" * 100:
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # closed by the server after its answer
                break
            sock.settimeout(0.25)
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            if answer:
                break
        sock.settimeout(10)
        while not answer.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    elapsed = time.monotonic() - start
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), answer
    error = json.loads(body)["error"]
    assert error == {
        "code": "request_timeout",
        "message": f"the request body did not arrive within {BODY_TIMEOUT_S:g} s",
    }
    assert BODY_TIMEOUT_S <= elapsed < BODY_TIMEOUT_S + 5
    r = httpx.post(f"{slow_service.url}/v1/caption", files={"image": IMAGES[9]}, data=FORM, timeout=60)
    assert r.status_code == 200, r.text


def test_a_client_that_leaves_mid_batch_cuts_its_work_short(tmp_path_factory, random_tiny_dir) -> None:
    """The batch holding a request whose client left skips the model work it has not started: the image is
    not encoded (the next request for it misses the cache) and the abandoned job is counted and logged."""
    delay_s = 3.0  # the client leaves 1 s into its batch's delay: wide margins on both sides on a busy machine
    proc = start_server(tmp_path_factory, random_tiny_dir, debug_batch_delay_ms=delay_s * 1000)
    try:
        image = png(80, 56, seed=77)

        def abandoned() -> float:
            return metric(httpx.get(f"{proc.url}/metrics").text, "pixelllm_jobs_abandoned_total")

        assert abandoned() == 0
        (response,) = asyncio.run(caption_all(proc.url, [image], timeouts=[delay_s / 3]))
        assert isinstance(response, httpx.TimeoutException)
        wait_for(lambda: abandoned() > 0, 10 * delay_s)  # the batch ends after its delay
        assert abandoned() == 1
        assert "1 of 1 jobs in this batch were abandoned by their callers" in proc.log()
        r = httpx.post(f"{proc.url}/v1/caption", files={"image": image}, data=FORM, timeout=60)
        assert r.status_code == 200 and r.json()["cache_hit"] is False
    finally:
        proc.stop()


def corrupt(model_dir: Path, kind: str) -> None:
    weights, config = model_dir / "model.safetensors", model_dir / "config.json"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "garbage":
        weights.write_bytes(os.urandom(4096))
    else:  # weights that do not match the config
        cfg = json.loads(config.read_text())
        cfg["language_model"]["t5"]["d_ff"] *= 2
        config.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "kind, command",
    [
        ("truncated", ["-m", "server"]),
        ("truncated", ["-m", "pixelllm.cli", "serve"]),
        ("garbage", ["-m", "server"]),
        ("mismatched", ["-m", "pixelllm.cli", "serve"]),
    ],
)
def test_corrupt_checkpoint_refuses_to_start(tmp_path, random_tiny_dir, kind: str, command: list[str]) -> None:
    """The server stops as soon as the model fails to load, exits non-zero, and says why in one line."""
    model_dir = tmp_path / "model"
    shutil.copytree(random_tiny_dir, model_dir)
    corrupt(model_dir, kind)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIXELLLM_DEVICE": "cpu", "PIXELLLM_MODEL": str(model_dir)}
    port = str(free_port())
    proc = subprocess.run(
        [sys.executable, *command, "--port", port], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    message = proc.stderr.strip().splitlines()[-1]
    assert "error: the model failed to load: CheckpointError" in message, output
    assert str(model_dir) in message and "PIXELLLM_MODEL" in message, message
