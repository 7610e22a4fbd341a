"""Reliability (issue 7), sustained load: many varied requests at 16 concurrency, and the server's memory.

A real server with default settings (the default model; a cache of 64 embeddings) answers the request mix of
tests/test_server_load.py (caption whole / box / point, localize two texts, regions) over `IMAGES` distinct
images, more than the cache holds, so it fills and then evicts. The server's memory is read once loaded, after a
warm-up of the same mix on other images ("before"), and every 100 requests, between rounds (no request in flight):
its resident size (RSS), and RSS less the freed memory malloc keeps for reuse (`pixelllm_malloc_free_bytes` in
/metrics, glibc), the memory the process uses ("in use").

The server keeps freed memory for reuse (pixelllm/memory.py), so its RSS climbs to the peak working set of the
largest batches the mix happens to form and stays there: runs of the same code on the stage-23 default grew RSS by
+1, +69, +70, +77 and +94 MiB over 1000 requests after the warm-up, as the peak happened to come early or late.
That is not a leak, and the memory in use shows it; a leak grows both.
The warm-up runs until memory in use settles: in rounds of `SAMPLE_EVERY` requests, until `SETTLED_ROUNDS` rounds
in a row each add at most `SETTLE_MB`, and at most `MAX_WARMUP` requests. A leak never settles, so it runs the
warm-up to its end and is still measured. The warm-up also fills the cache, so "before" sees it full.
Goal: every request 200; memory in use grows by at most the cache's growth plus `SLACK_MB`, and by at most
`LEAK_MB` over the second half of the run (no leak). RSS is reported beside it.

    .venv/bin/python benchmarks/reliability_load.py --quick    # 300 requests
    .venv/bin/python benchmarks/reliability_load.py            # 1000 requests

Writes benchmarks/results/reliability_load.json (see common.write_result).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil
from common import machine, resolve_device, write_result
from reliability_common import arguments, category, default_model
from server_helpers import image_b64, metric, requests_for
from service_bench import serve, summary

COUNTS = {"quick": 300, "full": 1000}
CONCURRENCY = 16
IMAGES = 150  # > the default 64 cache entries
SAMPLE_EVERY = 100
SETTLE_MB, SETTLED_ROUNDS, MAX_WARMUP = 4.0, 2, 1000  # the warm-up (see the module docstring)
SLACK_MB, LEAK_MB = 32.0, 16.0


def request(i: int, image: int | None = None) -> tuple[str, dict[str, Any]]:
    """`requests_for(i)` on image number `image`, by default one of `IMAGES` distinct images chosen by `i`."""
    path, body = requests_for(i)
    return path, {**body, "image": image_b64(i % IMAGES if image is None else image)}


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


async def load(url: str, pid: int, n: int) -> dict[str, Any]:
    """A warm-up on images the run does not use until memory in use settles, then `n` requests, `CONCURRENCY` at a
    time; memory and cache size after each warm-up round, after the warm-up ("before") and every `SAMPLE_EVERY`
    requests."""
    statuses: Counter[str] = Counter()
    failures: list[str] = []
    seconds: list[float] = []
    limit = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one(i: int, image: int | None = None) -> None:
            path, body = request(i, image)
            async with limit:
                start = time.perf_counter()
                response = await client.post(path, json=body)
                seconds.append(time.perf_counter() - start)
            statuses[category(response)] += 1
            if response.status_code != 200:
                failures.append(f"{path}: {response.status_code} {response.text[:200]}")

        async def memory() -> dict[str, float]:
            """MiB: RSS, malloc's kept free memory, RSS less it (in use), the cache."""
            text = (await client.get("/metrics")).text
            rss, free = rss_mb(pid), metric(text, "pixelllm_malloc_free_bytes") / 2**20
            return {
                "rss": rss,
                "malloc_free": free,
                "in_use": rss - free,
                "cache": metric(text, "pixelllm_cache_bytes") / 2**20,
            }

        loaded = await memory()
        warmup = [loaded]
        while len(warmup) <= MAX_WARMUP // SAMPLE_EVERY:
            first = (len(warmup) - 1) * SAMPLE_EVERY
            await asyncio.gather(*(one(i, IMAGES + i) for i in range(first, first + SAMPLE_EVERY)))
            warmup.append(await memory())
            steps = [b["in_use"] - a["in_use"] for a, b in zip(warmup[1:], warmup[2:])]
            if len(steps) >= SETTLED_ROUNDS and max(steps[-SETTLED_ROUNDS:]) <= SETTLE_MB:
                break
        samples = {"loaded": loaded, "before": warmup[-1]}
        statuses.clear()
        seconds.clear()
        started = time.perf_counter()
        for first in range(0, n, SAMPLE_EVERY):  # in rounds, so memory is read with no request in flight
            await asyncio.gather(*(one(i) for i in range(first, min(first + SAMPLE_EVERY, n))))
            samples[str(min(first + SAMPLE_EVERY, n))] = await memory()
        wall = time.perf_counter() - started
    half = str(min(n, max(SAMPLE_EVERY, n // 2 // SAMPLE_EVERY * SAMPLE_EVERY)))
    before, after = samples["before"], samples[str(n)]
    return {
        "requests": n,
        "failures": len(failures),
        "failure_examples": failures[:10],
        "statuses": dict(statuses),
        "wall_s": wall,
        "rps": n / wall,
        "latency": summary(seconds),
        "memory_mb": samples,
        "growth_mb": after["in_use"] - before["in_use"],
        "growth_second_half_mb": after["in_use"] - samples[half]["in_use"],
        "rss_growth_mb": after["rss"] - before["rss"],
        "allowed_growth_mb": after["cache"] - before["cache"] + SLACK_MB,
        "warmup_requests": (len(warmup) - 1) * SAMPLE_EVERY,
        "warmup_memory_mb": warmup,
    }


def main() -> None:
    parser = arguments(__doc__, f"{COUNTS['quick']} requests, not {COUNTS['full']}")
    parser.add_argument("--requests", type=int, help="how many requests (overrides the mode)")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    n, device = args.requests or COUNTS[mode], resolve_device(args.device)
    machine_info = machine(device, args.threads, args.note)
    with tempfile.TemporaryDirectory(prefix="reliability-load-") as tmp:
        model, model_name = default_model(Path(tmp))
        with serve(model, Path(tmp), device, args.threads) as server:
            result = asyncio.run(load(server.url, server.proc.pid, n))
        traceback = "Traceback" in server.log()
    met = (
        result["failures"] == 0
        and result["growth_mb"] <= result["allowed_growth_mb"]
        and result["growth_second_half_mb"] <= LEAK_MB
        and not traceback
    )
    memory = result["memory_mb"]
    for name in ("in_use", "rss"):
        print(f"{name} MiB: {', '.join(f'{k} {v[name]:.0f}' for k, v in memory.items())}")
    before, after = memory["before"], memory[str(n)]
    write_result(
        "reliability_load",
        {
            "model": model_name,
            "settings": {
                "concurrency": CONCURRENCY,
                "images": IMAGES,
                "slack_mb": SLACK_MB,
                "leak_mb": LEAK_MB,
                "settle_mb": SETTLE_MB,
                "settled_rounds": SETTLED_ROUNDS,
                "max_warmup": MAX_WARMUP,
            },
            "traceback_in_server_log": traceback,
            **result,
        },
        mode=mode,
        machine_info=machine_info,
        figure=f"{n} requests at {CONCURRENCY} concurrency after a {result['warmup_requests']}-request warm-up: "
        f"{result['failures']} failures, {result['rps']:.1f} req/s; memory in use (RSS less malloc's free) "
        f"{before['in_use']:.0f} -> {after['in_use']:.0f} MiB ({result['growth_mb']:+.0f}; cache "
        f"{before['cache']:.1f} -> {after['cache']:.1f} MiB), RSS {before['rss']:.0f} -> {after['rss']:.0f} MiB "
        f"({result['rss_growth_mb']:+.0f})",
        goal=f"0 failures; memory in use grows <= the cache's growth + {SLACK_MB:g} MiB, <= {LEAK_MB:g} MiB in the "
        "second half",
        met=met,
        limits="; ".join(result["failure_examples"][:3])
        or f"memory in use grew {result['growth_mb']:.0f} MiB (allowed {result['allowed_growth_mb']:.0f}), "
        f"second half {result['growth_second_half_mb']:.0f} MiB, traceback in the log {traceback}",
        results_dir=args.results_dir,
    )


if __name__ == "__main__":
    main()
