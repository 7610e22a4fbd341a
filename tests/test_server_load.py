"""Concurrency: many clients at once, dynamic batching, and batched answers equal to unbatched ones."""

from __future__ import annotations

import asyncio

import httpx
from server_helpers import answers, assert_same, metric, send_all

pytest_plugins = ["server_fixtures"]


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
