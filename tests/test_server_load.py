"""Concurrency: many clients at once, dynamic batching, and batched answers equal to unbatched ones."""

from __future__ import annotations

import asyncio
import base64
import functools

import httpx
import pytest
from server_helpers import metric, png

pytest_plugins = ["server_fixtures"]


@functools.cache
def image_b64(seed: int) -> str:
    return base64.b64encode(png(96 + 8 * (seed % 8), 80, seed=seed)).decode()


def requests_for(i: int) -> tuple[str, dict]:
    """A varied request: caption (whole, box, point), localize, or regions; 8 images per thousand `i`."""
    image = {"image": image_b64(100 * (i // 1000) + i % 8), "max_new_tokens": 6}
    kind = i % 5
    if kind == 0:
        return "/v1/caption", image
    if kind == 1:
        return "/v1/caption", {**image, "box": {"x0": 4, "y0": 8, "x1": 60 + i % 30, "y1": 70}}
    if kind == 2:
        return "/v1/caption", {**image, "point": {"x": 10 + i % 50, "y": 20}}
    if kind == 3:
        return "/v1/localize", {"image": image["image"], "text": ["a red ball", f"thing {i % 7}"]}
    return "/v1/regions", {**image, "boxes": [{"x0": 0, "y0": 0, "x1": 50, "y1": 50}], "texts": ["sky"]}


async def send_all(url: str, indices: list[int], concurrency: int) -> list[httpx.Response]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(i: int) -> httpx.Response:
            path, body = requests_for(i)
            async with limit:
                return await client.post(path, json=body)

        return await asyncio.gather(*(one(i) for i in indices))


def test_200_requests_at_16_concurrency(service, service_client: httpx.Client) -> None:
    before = service_client.get("/metrics").text
    responses = asyncio.run(send_all(service.url, list(range(200)), concurrency=16))
    failures = [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
    assert failures == []
    after = service_client.get("/metrics").text
    batches = metric(after, "pixelllm_batch_size_count") - metric(before, "pixelllm_batch_size_count")
    requests = metric(after, "pixelllm_batch_size_sum") - metric(before, "pixelllm_batch_size_sum")
    assert requests == 200
    assert batches < 200 / 2, f"{batches} batches for 200 requests: no dynamic batching"
    assert metric(after, "pixelllm_queue_depth") == 0


def answers(response: httpx.Response) -> list[dict]:
    """The model's part of a response (no timings or cache flags)."""
    body = response.json()
    if "results" in body:
        return body["results"]
    if "captions" in body:
        return body["captions"] + body["localizations"]
    return [{k: body[k] for k in ("caption", "words", "box", "point")}]


def assert_same(a: object, b: object, path: str = "") -> None:
    """Equal, floats to 1e-3 pixels (batching changes summation order, not answers)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}.{i}")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-3), path
    else:
        assert a == b, path


def test_batched_equals_unbatched(service, unbatched_service, service_client: httpx.Client) -> None:
    """16 fresh requests sent at once (batched, images encoded together) answer exactly as one by one."""
    indices = list(range(1000, 1016))
    before = service_client.get("/metrics").text
    batched = asyncio.run(send_all(service.url, indices, concurrency=16))
    after = service_client.get("/metrics").text
    alone = asyncio.run(send_all(unbatched_service.url, indices, concurrency=1))
    assert all(r.status_code == 200 for r in batched + alone)
    assert not all(r.json()["cache_hit"] for r in batched)
    batches = metric(after, "pixelllm_batch_size_count") - metric(before, "pixelllm_batch_size_count")
    assert batches < len(indices), "the requests were not batched"
    captions = [c for r in batched for c in answers(r) if c.get("caption")]
    assert len(captions) >= 4, "captions are empty: the comparison would prove nothing"
    for i, (a, b) in enumerate(zip(batched, alone)):
        assert_same(answers(a), answers(b), f"request {i}")
