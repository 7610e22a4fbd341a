"""The embedding cache: LRU order, the bounds in entries and in bytes, and both as a real server applies them."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

import httpx
import pytest
from server_helpers import metric, png, start_server

from server.cache import EmbeddingCache

pytest_plugins = ["server_fixtures"]


@dataclass
class Value:
    nbytes: int


def test_entry_bound_evicts_the_least_recently_used() -> None:
    cache = EmbeddingCache(max_entries=2, max_bytes=1000)
    cache.put("a", Value(10))
    cache.put("b", Value(10))
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put("c", Value(10))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2 and cache.nbytes == 20


def test_byte_bound_evicts_until_the_new_value_fits() -> None:
    cache = EmbeddingCache(max_entries=10, max_bytes=100)
    for key in "abc":
        cache.put(key, Value(30))
    cache.put("d", Value(50))  # 140 bytes: "a" and then "b" go
    assert [k for k in "abcd" if cache.get(k) is not None] == ["c", "d"]
    assert cache.nbytes == 80 and len(cache) == 2


def test_value_larger_than_the_budget_is_not_cached_and_evicts_nothing() -> None:
    cache = EmbeddingCache(max_entries=10, max_bytes=100)
    cache.put("a", Value(60))
    cache.put("big", Value(101))
    assert cache.get("big") is None and cache.get("a") is not None and cache.nbytes == 60


def test_putting_a_key_again_replaces_its_size() -> None:
    cache = EmbeddingCache(max_entries=10, max_bytes=100)
    cache.put("a", Value(60))
    cache.put("a", Value(20))
    cache.put("b", Value(70))  # fits beside the new "a" (90 bytes), not beside the old one
    assert cache.get("a").nbytes == 20 and cache.get("b") is not None and cache.nbytes == 90 and len(cache) == 2


def test_zero_entries_disables_the_cache() -> None:
    cache = EmbeddingCache(max_entries=0, max_bytes=100)
    cache.put("a", Value(1))
    assert cache.get("a") is None and len(cache) == 0 and cache.nbytes == 0


def test_concurrent_puts_keep_the_byte_count_exact() -> None:
    cache, errors = EmbeddingCache(max_entries=7, max_bytes=10_000), []

    def fill(offset: int) -> None:
        try:
            for i in range(5000):
                cache.put(str((offset + i) % 23), Value(1 + (offset + i) % 5))
        except Exception as exc:  # noqa: BLE001 - a race shows as any error; the test reports it
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often, inside `put` too
    try:
        threads = [threading.Thread(target=fill, args=(n * 100,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    held = [cache.get(str(k)) for k in range(23)]
    assert len(cache) == 7 and cache.nbytes == sum(v.nbytes for v in held if v is not None)


@pytest.fixture(scope="module")
def two_entry_service(tmp_path_factory, random_tiny_dir):
    proc = start_server(tmp_path_factory, random_tiny_dir, cache_entries=2)
    yield proc
    proc.stop()


def caption(client: httpx.Client, image: bytes) -> dict:
    r = client.post("/v1/caption", files={"image": image}, data={"max_new_tokens": "2"})
    assert r.status_code == 200, r.text
    return r.json()


def test_server_keeps_the_two_most_recent_images(two_entry_service) -> None:
    """PIXELLLM_CACHE_ENTRIES=2, images A, B, A, C: C evicts B, the least recently used (first in, first out would
    evict A), so A is still a hit and B is encoded again."""
    a, b, c = (png(96, 64, seed=70 + i) for i in range(3))
    with httpx.Client(base_url=two_entry_service.url, timeout=60) as client:
        hits = [caption(client, image)["cache_hit"] for image in (a, b, a, c, a, b)]
        text = client.get("/metrics").text
    assert hits == [False, False, True, False, True, False]
    assert metric(text, "pixelllm_cache_entries") == 2
    assert metric(text, "pixelllm_cache_hits_total") == 2 and metric(text, "pixelllm_cache_misses_total") == 4


def test_server_with_cache_off_encodes_every_time(unbatched_service) -> None:
    """PIXELLLM_CACHE_ENTRIES=0: the same image twice is encoded twice."""
    image = png(96, 64, seed=80)
    with httpx.Client(base_url=unbatched_service.url, timeout=60) as client:
        answers = [caption(client, image) for _ in range(2)]
        text = client.get("/metrics").text
    assert [a["cache_hit"] for a in answers] == [False, False]
    assert all(a["timing_ms"]["encode"] > 0 for a in answers)
    assert metric(text, "pixelllm_cache_entries") == 0 and metric(text, "pixelllm_cache_bytes") == 0
