"""Reliability (issue 7), overload: a pool of clients far beyond the queue bound, against a real server.

The server (default model) holds at most `QUEUE` requests (PIXELLLM_MAX_QUEUE); `clients` clients each send
caption requests back to back for `seconds`, ignoring Retry-After (the worst case), while a probe in a process
of its own checks /healthz. Then the pool stops and the serial requests timed before the storm are timed again.
Goal: every request answered 200, or 429/503 with Retry-After; no other status and no transport error;
afterwards the server is ready and its serial latency within 1.5x of before.

    .venv/bin/python benchmarks/reliability_overload.py --quick    # 64 clients (8x the queue), 15 s
    .venv/bin/python benchmarks/reliability_overload.py            # 128 clients (16x the queue), 60 s

Writes benchmarks/results/reliability_overload.json (see common.write_result).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from common import machine, resolve_device, write_result
from reliability_common import arguments, category, default_model, error_problem
from server_helpers import metric, png
from service_bench import serve, summary

QUEUE = 8
COUNTS = {"quick": dict(clients=64, seconds=15, serial=8), "full": dict(clients=128, seconds=60, serial=20)}
IMAGES = 32  # distinct images the pool cycles through
TOKENS = 8
RECOVERY_GOAL = 1.5
SHED = (429, 503)
JSON = {"content-type": "application/json"}
# a liveness probe in a process of its own, so the pool's event loop does not delay it: GET every 0.25 s
PROBE = """
import json, sys, time, httpx
url, end, seconds, failures = sys.argv[1], time.perf_counter() + float(sys.argv[2]), [], []
with httpx.Client(timeout=30) as client:
    while time.perf_counter() < end:
        start = time.perf_counter()
        status = client.get(url).status_code
        seconds.append(time.perf_counter() - start)
        failures += [status] * (status != 200)
        time.sleep(0.25)
print(json.dumps({"seconds": seconds, "failures": failures}))
"""


def body(seed: int) -> bytes:
    """A JSON caption request, encoded once (the pool sends bytes, so the clients cost little CPU)."""
    image = base64.b64encode(png(160, 120, seed=seed)).decode()
    return httpx.Request("POST", "/", json={"image": image, "max_new_tokens": TOKENS}).read()


async def serial(client: httpx.AsyncClient, seeds: range) -> list[float]:
    """Seconds for each of one-at-a-time caption requests on new images; each must answer 200."""
    times = []
    for seed in seeds:
        start = time.perf_counter()
        response = await client.post("/v1/caption", content=body(seed), headers=JSON)
        times.append(time.perf_counter() - start)
        if response.status_code != 200:
            raise RuntimeError(f"serial request: {response.status_code} {response.text[:300]}")
    return times


async def storm(client: httpx.AsyncClient, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` clients sending back to back until `seconds` have passed; a /healthz probe every 0.25 s."""
    bodies = [body(10_000 + i) for i in range(IMAGES)]
    statuses: Counter[str] = Counter()
    problems: list[str] = []
    shed_ms: list[float] = []
    ok_ms: list[float] = []
    no_retry_after = 0
    end = time.perf_counter() + seconds

    async def one_client(k: int) -> None:
        nonlocal no_retry_after
        i = k
        while time.perf_counter() < end:
            start = time.perf_counter()
            try:
                response = await client.post("/v1/caption", content=bodies[i % IMAGES], headers=JSON)
            except httpx.HTTPError as exc:
                statuses[f"transport error {type(exc).__name__}"] += 1
                problems.append(f"{type(exc).__name__}: {exc}")
                continue
            ms = 1000 * (time.perf_counter() - start)
            statuses[category(response)] += 1
            i += clients
            if response.status_code == 200:
                ok_ms.append(ms)
            elif response.status_code in SHED:
                shed_ms.append(ms)
                no_retry_after += "retry-after" not in response.headers
            if response.status_code not in (200, *SHED) or (response.status_code >= 400 and error_problem(response)):
                problems.append(f"{response.status_code}: {response.text[:200]}")

    started = time.perf_counter()
    probe = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PROBE, str(client.base_url.join("/healthz")), str(seconds), stdout=asyncio.subprocess.PIPE
    )
    await asyncio.gather(*(one_client(k) for k in range(clients)))
    wall = time.perf_counter() - started
    health = json.loads((await probe.communicate())[0])
    health_ms = [1000 * t for t in health["seconds"]]
    problems += [f"/healthz answered {status}" for status in health["failures"]]
    total = sum(statuses.values())
    shed = sum(n for k, n in statuses.items() if k[:3] in ("429", "503"))
    return {
        "requests": total,
        "wall_s": wall,
        "statuses": dict(sorted(statuses.items())),
        "answered_per_s": len(ok_ms) / wall,
        "shed_share": shed / max(total, 1),
        "shed_without_retry_after": no_retry_after,
        "other_errors": total - len(ok_ms) - shed,
        "problems": problems[:20],
        "latency_ms": {
            "answered": percentiles(ok_ms),
            "shed": percentiles(shed_ms),
            "healthz_during": percentiles(health_ms),
        },
        "healthz_over_1s": sum(ms > 1000 for ms in health_ms),
    }


def percentiles(ms: list[float]) -> dict[str, float]:
    return summary([m / 1000 for m in ms]) if ms else {"n": 0}


async def wait_idle(client: httpx.AsyncClient, timeout_s: float = 120) -> float:
    """Seconds until the server's queue is empty."""
    start = time.perf_counter()
    while metric((await client.get("/metrics")).text, "pixelllm_queue_depth") > 0:
        if time.perf_counter() - start > timeout_s:
            raise RuntimeError(f"requests still queued {timeout_s} s after the storm")
        await asyncio.sleep(0.05)
    return time.perf_counter() - start


async def overload(url: str, clients: int, seconds: float, n_serial: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await serial(client, range(2))  # warm-up
        before = await serial(client, range(100, 100 + n_serial))
        during = await storm(client, clients, seconds)
        idle_s = await wait_idle(client)
        ready = (await client.get("/readyz")).status_code == 200
        after = await serial(client, range(200, 200 + n_serial))
    return {
        "before": summary(before),
        "storm": during,
        "idle_after_s": idle_s,
        "ready_after": ready,
        "after": summary(after),
        "recovery_ratio": summary(after)["p50_ms"] / summary(before)["p50_ms"],
    }


def main() -> None:
    parser = arguments(__doc__, f"{COUNTS['quick']['clients']} clients for {COUNTS['quick']['seconds']} s")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    counts, device = COUNTS[mode], resolve_device(args.device)
    machine_info = machine(device, args.threads, args.note)
    with tempfile.TemporaryDirectory(prefix="reliability-overload-") as tmp:
        model, model_name = default_model(Path(tmp))
        with serve(model, Path(tmp), device, args.threads, max_queue=QUEUE) as server:
            result = asyncio.run(overload(server.url, counts["clients"], counts["seconds"], counts["serial"]))
        traceback = "Traceback" in server.log()
    storm_ = result["storm"]
    met = (
        storm_["other_errors"] == 0
        and storm_["shed_without_retry_after"] == 0
        and not storm_["problems"]
        and result["ready_after"]
        and result["recovery_ratio"] <= RECOVERY_GOAL
        and not traceback
    )
    print(
        f"storm: {storm_['requests']} requests from {counts['clients']} clients in {storm_['wall_s']:.0f} s: "
        f"{storm_['statuses']}\n  healthz during: {storm_['latency_ms']['healthz_during']}\n"
        f"serial p50 before {result['before']['p50_ms']:.0f} ms, after {result['after']['p50_ms']:.0f} ms"
    )
    write_result(
        "reliability_overload",
        {
            "model": model_name,
            "settings": {"max_queue": QUEUE, "max_new_tokens": TOKENS, "images": IMAGES, **counts},
            "traceback_in_server_log": traceback,
            **result,
        },
        mode=mode,
        machine_info=machine_info,
        figure=f"{counts['clients']} clients ({counts['clients'] // QUEUE}x the queue), {storm_['requests']} requests: "
        f"{storm_['shed_share']:.0%} shed with 429/503 + Retry-After, {storm_['other_errors']} other errors; "
        f"serial p50 after / before {result['recovery_ratio']:.2f}x",
        goal=f"0 other errors, Retry-After on every 429/503, ready and p50 within {RECOVERY_GOAL:g}x afterwards",
        met=met,
        limits="; ".join(storm_["problems"][:3])
        or f"recovery {result['recovery_ratio']:.2f}x, ready {result['ready_after']}, traceback {traceback}",
        results_dir=args.results_dir,
    )


if __name__ == "__main__":
    main()
