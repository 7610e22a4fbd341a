"""Service benchmark (issue 5, Performance), against real `python -m server` processes on localhost.

(a) throughput with 8 concurrent clients / serial throughput, same server, default model: goal >= 3x;
(b) a second prompt on a cached image / the first prompt on that image, `pixelllm-base` with random
    weights, different prompts on the same image, median over images: goal >= 5x faster;
(c) p50 / p95 latency per endpoint, default model.

    .venv/bin/python benchmarks/service_bench.py --quick    # small counts, a few minutes at most
    .venv/bin/python benchmarks/service_bench.py            # full counts

Prints a table and writes benchmarks/results/service.json (with the machine it ran on).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from server_helpers import MAKE_MODEL, ServerProcess, metric, png  # noqa: E402

DEFAULT_WEIGHTS = ROOT / "weights" / "pixelllm-tiny"
RESULTS = ROOT / "benchmarks" / "results" / "service.json"
# Random weights. pixelllm-base ships no tokenizer (T5's is not bundled); the tiny preset's stands in.
MAKE_BASE = """
import sys, torch
from pixelllm import build_pixelllm
from pixelllm.build import default_tokenizer
from pixelllm.config import load_config
torch.manual_seed(0)
model = build_pixelllm("pixelllm-base", tokenizer=default_tokenizer(load_config("pixelllm-tiny")))
model.save_pretrained(sys.argv[1])
"""
COUNTS = {
    "quick": dict(serial=12, concurrent=32, cache_images=2, latency=10),
    "full": dict(serial=48, concurrent=160, cache_images=6, latency=50),
}
CLIENTS = 8
IMAGE_SIZE = (640, 480)
BOX_A, BOX_B = (40, 40, 400, 300), (200, 150, 600, 460)


class Images:
    """Distinct base64 PNGs (each a cache miss), `IMAGE_SIZE`, in a fixed order."""

    def __init__(self) -> None:
        self._seeds = itertools.count(1000)

    def next(self) -> str:
        return base64.b64encode(png(*IMAGE_SIZE, seed=next(self._seeds))).decode()


def box(b: tuple[int, int, int, int]) -> dict[str, int]:
    return dict(zip(("x0", "y0", "x1", "y1"), b))


@contextmanager
def serve(model_dir: Path, log_dir: Path, device: str, threads: int) -> Iterator[ServerProcess]:
    """A server with default settings for `model_dir`, stopped on exit."""
    env = {"PIXELLLM_MODEL": str(model_dir), "PIXELLLM_DEVICE": device, "OMP_NUM_THREADS": str(threads)}
    server = ServerProcess(env, log_dir / f"{model_dir.name}.log")
    try:
        server.wait_ready(timeout_s=900)
        yield server
    finally:
        server.stop()


async def post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Seconds to answer, and the answer; fails on any status but 200."""
    start = time.perf_counter()
    response = await client.post(path, json=body)
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"{path}: {response.status_code} {response.text[:300]}")
    return seconds, response.json()


async def concurrently(
    client: httpx.AsyncClient, path: str, bodies: list[dict[str, Any]], clients: int
) -> list[dict[str, Any]]:
    """The answers to `bodies`, sent by `clients` clients that each send their next request when answered."""
    queue, answers = list(reversed(bodies)), []

    async def worker() -> None:
        while queue:
            answers.append((await post(client, path, queue.pop()))[1])

    await asyncio.gather(*(worker() for _ in range(clients)))
    return answers


def median_timings(answers: list[dict[str, Any]]) -> dict[str, float]:
    """The median of each server-side `timing_ms` field."""
    return {k: float(np.median([a["timing_ms"][k] for a in answers])) for k in answers[0]["timing_ms"]}


async def batch_sizes(client: httpx.AsyncClient) -> tuple[float, float]:
    text = (await client.get("/metrics")).text
    return metric(text, "pixelllm_batch_size_sum"), metric(text, "pixelllm_batch_size_count")


async def throughput(url: str, images: Images, counts: dict[str, int], tokens: int) -> dict[str, Any]:
    """(a): caption requests, every one on a new image, one at a time and then from `CLIENTS` clients."""
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        for _ in range(2):  # warm-up
            await post(client, "/v1/caption", {"image": images.next(), "max_new_tokens": tokens})
        bodies = [{"image": images.next(), "max_new_tokens": tokens} for _ in range(counts["serial"])]
        start = time.perf_counter()
        serial_answers = [(await post(client, "/v1/caption", body))[1] for body in bodies]
        serial = len(bodies) / (time.perf_counter() - start)
        bodies = [{"image": images.next(), "max_new_tokens": tokens} for _ in range(counts["concurrent"])]
        before = await batch_sizes(client)
        start = time.perf_counter()
        answers = await concurrently(client, "/v1/caption", bodies, CLIENTS)
        parallel = len(bodies) / (time.perf_counter() - start)
        after = await batch_sizes(client)
    return {
        "request": f"POST /v1/caption, a new {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image each, max_new_tokens={tokens}",
        "serial_requests": counts["serial"],
        "concurrent_requests": counts["concurrent"],
        "clients": CLIENTS,
        "serial_rps": serial,
        "concurrent_rps": parallel,
        "speedup": parallel / serial,
        "mean_batch_size_concurrent": (after[0] - before[0]) / max(after[1] - before[1], 1),
        "server_timing_ms_median": {"serial": median_timings(serial_answers), "concurrent": median_timings(answers)},
        "goal": 3.0,
    }


async def cache_speedup(url: str, images: Images, counts: dict[str, int], tokens: int) -> dict[str, Any]:
    """(b): per image, a first prompt (encoders run) then a different prompt (embedding from the cache)."""
    pairs = {
        "localize": ({"text": "the red car on the left"}, {"text": "a person"}),
        "caption": ({"box": box(BOX_A), "max_new_tokens": tokens}, {"box": box(BOX_B), "max_new_tokens": tokens}),
    }
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        await post(client, "/v1/localize", {"image": images.next(), "text": "warm-up"})
        for kind, (first, second) in pairs.items():
            rows = []
            for _ in range(counts["cache_images"]):
                image = images.next()
                t1, a1 = await post(client, f"/v1/{kind}", {"image": image, **first})
                t2, a2 = await post(client, f"/v1/{kind}", {"image": image, **second})
                assert not a1["cache_hit"] and a2["cache_hit"], (a1["cache_hit"], a2["cache_hit"])
                rows.append((t1, t2, a1["timing_ms"]["encode"]))
            first_s, second_s, encode_ms = (np.array(column) for column in zip(*rows))
            out[kind] = {
                "first_prompt": f"POST /v1/{kind} {json.dumps(first)}",
                "second_prompt": f"POST /v1/{kind} {json.dumps(second)}",
                "images": len(rows),
                "first_ms_median": 1000 * float(np.median(first_s)),
                "second_ms_median": 1000 * float(np.median(second_s)),
                "encode_ms_median": float(np.median(encode_ms)),
                "speedup_median": float(np.median(first_s / second_s)),
                "goal": 5.0,
            }
    return out


async def latencies(url: str, images: Images, counts: dict[str, int], tokens: int) -> dict[str, Any]:
    """(c): serial requests per endpoint; POSTs on a new image each, except the cached-image case."""
    cached = images.next()
    cases = {
        "POST /v1/caption": lambda: {"image": images.next(), "max_new_tokens": tokens},
        "POST /v1/caption (cached image, box)": lambda: {"image": cached, "box": box(BOX_A), "max_new_tokens": tokens},
        "POST /v1/localize (mask png)": lambda: {
            "image": images.next(),
            "text": "the red car",
            "mask": True,
            "mask_format": "png",
        },
        "POST /v1/regions (2 boxes, 1 text)": lambda: {
            "image": images.next(),
            "boxes": [box(BOX_A), box(BOX_B)],
            "texts": ["a person"],
            "max_new_tokens": tokens,
        },
    }
    out = {}
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        await post(client, "/v1/caption", {"image": cached, "max_new_tokens": tokens})
        for name, make in cases.items():
            bodies = [make() for _ in range(counts["latency"])]
            path = name.split()[1]
            times = [(await post(client, path, body))[0] for body in bodies]
            out[name] = summary(times)
        for path in ("/healthz", "/readyz", "/metrics"):
            times = []
            for _ in range(counts["latency"]):
                start = time.perf_counter()
                (await client.get(path)).raise_for_status()
                times.append(time.perf_counter() - start)
            out[f"GET {path}"] = summary(times)
    return out


def summary(seconds: list[float]) -> dict[str, float]:
    ms = 1000 * np.array(seconds)
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def make_model(script: str, path: Path) -> Path:
    subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, check=True, timeout=1800)
    return path


def machine(device: str, threads: int, note: str) -> dict[str, Any]:
    import torch

    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name()
    return {
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": name,
        "torch_threads": threads,
        "load_average_at_start": os.getloadavg(),
        "note": note,
    }


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "cpu"


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def print_table(result: dict[str, Any]) -> None:
    t = result["throughput"]
    print(f"\ndefault model: {result['models']['default']}")
    print(f"(a) throughput {t['request']}")
    print(f"    serial {t['serial_rps']:.2f} req/s, {CLIENTS} clients {t['concurrent_rps']:.2f} req/s")
    print(f"    speedup {t['speedup']:.2f}x (goal >= {t['goal']:g}x), mean batch {t['mean_batch_size_concurrent']:.2f}")
    for phase, timing in t["server_timing_ms_median"].items():
        print(f"    {phase:10s} server ms (median): " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items()))
    print(f"(b) cache, {result['models']['cache']}")
    for kind, c in result["cache"].items():
        print(
            f"    {kind:9s} first {c['first_ms_median']:9.1f} ms  second {c['second_ms_median']:9.1f} ms  "
            f"(encode {c['encode_ms_median']:.1f} ms)  speedup {c['speedup_median']:.2f}x (goal >= {c['goal']:g}x)"
        )
    print("(c) latency, default model")
    print(f"    {'endpoint':42s} {'n':>4s} {'p50 ms':>9s} {'p95 ms':>9s}")
    for name, s in result["latency"].items():
        print(f"    {name:42s} {s['n']:4d} {s['p50_ms']:9.1f} {s['p95_ms']:9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts (a few minutes)")
    parser.add_argument("--device", default="auto", help="PIXELLLM_DEVICE for the servers (default: auto)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS for the servers")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="for every caption request")
    parser.add_argument("--note", default="", help="recorded in the JSON, e.g. what else ran on the machine")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    counts, device, tokens = COUNTS[mode], resolve_device(args.device), args.max_new_tokens
    started = time.perf_counter()
    result: dict[str, Any] = {"mode": mode, "counts": counts, "machine": machine(device, args.threads, args.note)}
    images = Images()
    with tempfile.TemporaryDirectory(prefix="service-bench-") as tmp:
        work = Path(tmp)
        if DEFAULT_WEIGHTS.is_dir():
            default, result["models"] = (
                DEFAULT_WEIGHTS,
                {"default": f"trained weights {DEFAULT_WEIGHTS.relative_to(ROOT)}"},
            )
        else:
            default = make_model(MAKE_MODEL, work / "pixelllm-tiny-random")
            result["models"] = {"default": "pixelllm-tiny, RANDOM weights (weights/pixelllm-tiny not found)"}
        print(f"default model: {result['models']['default']}", flush=True)
        with serve(default, work, device, args.threads) as server:
            result["throughput"] = asyncio.run(throughput(server.url, images, counts, tokens))
            result["latency"] = asyncio.run(latencies(server.url, images, counts, tokens))
        print("building pixelllm-base (random weights)", flush=True)
        base = make_model(MAKE_BASE, work / "pixelllm-base-random")
        result["models"]["cache"] = (
            "pixelllm-base, RANDOM weights, pixelllm-tiny's tokenizer standing in (captions run to max_new_tokens)"
        )
        with serve(base, work, device, args.threads) as server:
            result["cache"] = asyncio.run(cache_speedup(server.url, images, counts, tokens))
    result["machine"]["load_average_at_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - started
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{mode} run in {result['wall_s']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
