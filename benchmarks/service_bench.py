"""Service benchmarks against real `python -m server` processes on localhost. One run writes four result files:

- `batching_speedup`: caption throughput with 8 concurrent clients / 1 client, same server, default model
  (goal >= 3x). Clients 1, 4, 8 and 16 are measured in alternating rounds, side by side.
- `latency`: p50 / p95 per endpoint (serial requests), and requests/s at 1, 4 and 16 clients, default model;
  with a 12-megapixel JPEG (a phone photo's size), and the time to decode one in full / at reduced scale.
- `regions_scaling`: one /v1/regions call with 32 boxes / with 1 box, same cached image (goal < 4x).
- `cache_speedup`: a second prompt on a cached image / the first prompt on that image, `pixelllm-base` with
  random weights, median over images (goal >= 5x); on CPU also with the language model in int8
  (`PIXELLLM_QUANTIZE=int8`), whose decoding is the second caption prompt's main cost.

    .venv/bin/python benchmarks/service_bench.py --quick    # small counts, about 2 minutes on 2 cores
    .venv/bin/python benchmarks/service_bench.py            # full counts
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import os
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
from common import RESULTS_DIR, ROOT, machine, resolve_device, write_result
from PIL import Image

from pixelllm.transforms import decode

sys.path.insert(0, str(ROOT / "tests"))
from server_helpers import MAKE_MODEL, ServerProcess, metric, png, settings_env  # noqa: E402

DEFAULT_WEIGHTS = ROOT / "weights" / "pixelllm-tiny"
# Random weights (`common.random_pixelllm`: pixelllm-base ships no tokenizer, the tiny preset's stands in).
MAKE_BASE = """
import sys
sys.path.insert(0, "benchmarks")
from common import random_pixelllm
random_pixelllm("pixelllm-base").save_pretrained(sys.argv[1])
"""
# requests per round at each client count; rounds alternate the order of the client counts
COUNTS = {
    "quick": dict(rounds=2, sweep={1: 12, 4: 24, 8: 32, 16: 48}, cache_images=2, latency=10, regions=5),
    "full": dict(rounds=4, sweep={1: 24, 4: 64, 8: 96, 16: 128}, cache_images=6, latency=50, regions=15),
}
BATCH_CLIENTS = 8
BATCHING_GOAL, CACHE_GOAL, REGIONS_GOAL = 3.0, 5.0, 4.0
IMAGE_SIZE = (640, 480)
PHOTO_SIZE = (4000, 3000)
PHOTO = f"{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEG"
PHOTO_CASE = f"POST /v1/caption ({PHOTO})"
BOX_A, BOX_B = (40, 40, 400, 300), (200, 150, 600, 460)


class Images:
    """Distinct base64 PNGs (each a cache miss), `IMAGE_SIZE`, in a fixed order."""

    def __init__(self) -> None:
        self._seeds = itertools.count(1000)

    def next(self) -> str:
        return base64.b64encode(png(*IMAGE_SIZE, seed=next(self._seeds))).decode()

    def next_photo(self) -> str:
        return base64.b64encode(photo(next(self._seeds))).decode()


def photo(seed: int) -> bytes:
    """A smooth photo-like JPEG of `PHOTO_SIZE` (bicubic-upscaled noise, quality 90): about 3 MB, as a phone's."""
    noise = np.random.default_rng(seed).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).resize(PHOTO_SIZE, Image.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def photo_decode_ms(image_size: int, repeats: int = 5) -> dict[str, float]:
    """Milliseconds (best of `repeats`) to decode a `PHOTO_SIZE` JPEG in full and reduced for `image_size`."""
    data = photo(0)

    def best(size: int | None) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            decode(Image.open(io.BytesIO(data)), size)
            times.append(1000 * (time.perf_counter() - start))
        return min(times)

    return {"full": best(None), "reduced": best(image_size), "image_size": image_size}


def box(b: tuple[int, int, int, int]) -> dict[str, int]:
    return dict(zip(("x0", "y0", "x1", "y1"), b))


def grid_boxes(n: int) -> list[dict[str, int]]:
    """`n` distinct boxes tiling `IMAGE_SIZE` on a grid 8 wide."""
    cols, rows = 8, -(-n // 8)
    w, h = IMAGE_SIZE[0] // cols, IMAGE_SIZE[1] // rows
    return [box((c * w, r * h, (c + 1) * w, (r + 1) * h)) for r in range(rows) for c in range(cols)][:n]


@contextmanager
def serve(model_dir: Path, log_dir: Path, device: str, threads: int, **settings: object) -> Iterator[ServerProcess]:
    """A server for `model_dir` with default settings but `settings` (`PIXELLLM_<NAME>`), stopped on exit."""
    env = {**settings_env(model_dir, device=device, **settings), "OMP_NUM_THREADS": str(threads)}
    suffix = "".join(f"-{key}-{value}" for key, value in settings.items())
    server = ServerProcess(env, log_dir / f"{model_dir.name}{suffix}.log")
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


def summary(seconds: list[float]) -> dict[str, float]:
    ms = 1000 * np.array(seconds)
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


async def client_sweep(url: str, images: Images, counts: dict[str, Any], tokens: int) -> dict[str, Any]:
    """Caption requests, every one on a new image, from 1, 4, 8 and 16 clients, in alternating rounds."""
    sweep: dict[int, int] = counts["sweep"]
    seconds = dict.fromkeys(sweep, 0.0)
    requests = dict.fromkeys(sweep, 0)
    batches = {n: [0.0, 0.0] for n in sweep}  # batch-size sum and count
    answers: dict[int, list[dict[str, Any]]] = {n: [] for n in sweep}
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        for _ in range(2):  # warm-up
            await post(client, "/v1/caption", {"image": images.next(), "max_new_tokens": tokens})
        for r in range(counts["rounds"]):
            for n in list(sweep) if r % 2 == 0 else list(sweep)[::-1]:
                bodies = [{"image": images.next(), "max_new_tokens": tokens} for _ in range(sweep[n])]
                before = await batch_sizes(client)
                start = time.perf_counter()
                answers[n] += await concurrently(client, "/v1/caption", bodies, n)
                seconds[n] += time.perf_counter() - start
                requests[n] += len(bodies)
                after = await batch_sizes(client)
                batches[n] = [batches[n][0] + after[0] - before[0], batches[n][1] + after[1] - before[1]]
    return {
        "request": f"POST /v1/caption, a new {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image each, max_new_tokens={tokens}",
        "rounds": counts["rounds"],
        "clients": {
            str(n): {
                "requests": requests[n],
                "rps": requests[n] / seconds[n],
                "mean_batch_size": batches[n][0] / max(batches[n][1], 1),
                "server_timing_ms_median": median_timings(answers[n]),
            }
            for n in sweep
        },
    }


async def regions_scaling(url: str, images: Images, counts: dict[str, Any], tokens: int) -> dict[str, Any]:
    """/v1/regions with 32 boxes and with 1 box on one cached image, alternating which goes first."""
    image, many = images.next(), grid_boxes(32)
    bodies = {n: {"image": image, "boxes": many[:n], "max_new_tokens": tokens} for n in (1, 32)}
    times: dict[int, list[float]] = {1: [], 32: []}
    answers: dict[int, list[dict[str, Any]]] = {1: [], 32: []}
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        for n in (1, 32):  # warm-up; the first call puts the image embedding in the cache
            await post(client, "/v1/regions", bodies[n])
        for r in range(counts["regions"]):
            for n in (1, 32) if r % 2 == 0 else (32, 1):
                seconds, answer = await post(client, "/v1/regions", bodies[n])
                assert answer["cache_hit"] and len(answer["captions"]) == n
                times[n].append(seconds)
                answers[n].append(answer)
    words = {n: float(np.mean([len(c["words"]) for a in answers[n] for c in a["captions"]])) for n in (1, 32)}
    longest = max(len(c["words"]) for a in answers[32] for c in a["captions"])
    return {
        "request": f"POST /v1/regions, one cached {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image, max_new_tokens={tokens}",
        "repeats": counts["regions"],
        "one_box": summary(times[1]) | {"server_timing_ms_median": median_timings(answers[1])},
        "boxes_32": summary(times[32]) | {"server_timing_ms_median": median_timings(answers[32])},
        "ratio": float(np.median(times[32]) / np.median(times[1])),
        "mean_words_per_caption": {"one_box": words[1], "boxes_32": words[32]},
        "longest_caption_words_32": longest,
        "note": "how the server runs it, not a measurement: all boxes of one request in one caption_embeddings call",
    }


async def cache_speedup(url: str, images: Images, counts: dict[str, Any], tokens: int) -> dict[str, Any]:
    """Per image, a first prompt (encoders run) then a different prompt (embedding from the cache)."""
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
            }
    return out


async def latencies(url: str, images: Images, counts: dict[str, Any], tokens: int) -> dict[str, Any]:
    """Serial requests per endpoint; POSTs on a new image each, except the cached-image case."""
    cached = images.next()
    cases = {
        "POST /v1/caption": lambda: {"image": images.next(), "max_new_tokens": tokens},
        "POST /v1/caption (cached image, box)": lambda: {"image": cached, "box": box(BOX_A), "max_new_tokens": tokens},
        PHOTO_CASE: lambda: {"image": images.next_photo(), "max_new_tokens": tokens},
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
            times, answers = zip(*[await post(client, path, body) for body in bodies])
            out[name] = {**summary(list(times)), "server_timing_ms": median_timings(list(answers))}
        for path in ("/healthz", "/readyz", "/metrics"):
            times = []
            for _ in range(counts["latency"]):
                start = time.perf_counter()
                (await client.get(path)).raise_for_status()
                times.append(time.perf_counter() - start)
            out[f"GET {path}"] = summary(times)
    return out


def make_model(script: str, path: Path) -> Path:
    subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, check=True, timeout=1800)
    return path


def hardware(machine_info: dict[str, Any]) -> str:
    """What ran the model, for the limits notes: "2 CPU threads (of 2 cores)" or the GPU's name."""
    if machine_info["device"] == "cpu":
        return f"{machine_info['threads']} CPU threads (of {machine_info['cpu_count']} cores)"
    return machine_info["device_name"]


def batching_limits(sweep: dict[str, Any], machine_info: dict[str, Any]) -> str:
    """Where a request's server time goes alone vs in a batch (the server's own timings); on a CPU, why batching
    gains little there."""
    alone, batched = sweep["clients"]["1"], sweep["clients"][str(BATCH_CLIENTS)]
    b = batched["mean_batch_size"]
    t1, tb = alone["server_timing_ms_median"], batched["server_timing_ms_median"]
    on_cpu = machine_info["device"] == "cpu"
    return (
        f"{hardware(machine_info)}{', compute-bound' if on_cpu else ''}. Server time per request alone vs at "
        f"{BATCH_CLIENTS} clients (mean batch {b:.1f}): image decoding {t1['decode']:.0f} vs {tb['decode']:.0f} ms "
        f"(per request, on the CPU beside the batches), encoders {t1['encode']:.0f} vs {tb['encode'] / b:.0f} ms, "
        f"caption {t1['caption']:.0f} vs {tb['caption'] / b:.0f} ms"
        + (". Batching shares per-call overhead, not arithmetic; a GPU run is the real test" if on_cpu else "")
    )


def regions_limits(regions: dict[str, Any], machine_info: dict[str, Any]) -> str:
    """Why 32 boxes cost more than one box's time although they run in one batched call."""
    one, many = (regions[k]["server_timing_ms_median"]["caption"] for k in ("one_box", "boxes_32"))
    return (
        f"the 32 boxes run as one batched call ({many:.0f} ms of model time, {many / 32:.1f} ms per box, vs {one:.0f} "
        "ms for one box), but each box still has its own prompt feature extractor pass over all the image's tokens, "
        f"T5 encoder pass and decoder row until the longest caption ({regions['longest_caption_words_32']} words) "
        f"ends, on {hardware(machine_info)}"
        + ("; on a compute-bound CPU that work grows with the boxes" if machine_info["device"] == "cpu" else "")
    )


def speedups(cache: dict[str, Any]) -> str:
    """`cache_speedup`'s ratio per prompt kind, e.g. "localize 10.75x, caption 3.07x"."""
    return ", ".join(f"{kind} {c['speedup_median']:.2f}x" for kind, c in cache.items())


def cache_limits(cache: dict[str, Any], tokens: int, machine_info: dict[str, Any]) -> str:
    """Why a cached prompt is not 5x faster: what the second prompt itself costs."""
    return "; ".join(
        f"{kind}: the encoders are {c['encode_ms_median']:.0f} of the first {c['first_ms_median']:.0f} ms, but the "
        f"prompt itself costs {c['second_ms_median']:.0f} ms"
        + (f" (up to {tokens} random-weight tokens through T5-base)" if kind == "caption" else "")
        + f", on {hardware(machine_info)}"
        for kind, c in cache.items()
        if c["speedup_median"] < CACHE_GOAL
    )


def report_default_model(
    sweep: dict[str, Any],
    latency: dict[str, Any],
    regions: dict[str, Any],
    decoding: dict[str, float],
    header: dict[str, Any],
    common: dict[str, Any],
) -> None:
    """Write batching_speedup, latency and regions_scaling; `header` goes into each body (model, settings)."""
    rps = {n: c["rps"] for n, c in sweep["clients"].items()}
    speedup = rps[str(BATCH_CLIENTS)] / rps["1"]
    write_result(
        "batching_speedup",
        {**header, "speedup": speedup, "sweep": sweep},
        figure=f"{speedup:.2f}x ({rps[str(BATCH_CLIENTS)]:.1f} / {rps['1']:.1f} req/s, "
        f"mean batch {sweep['clients'][str(BATCH_CLIENTS)]['mean_batch_size']:.1f})",
        goal=f">= {BATCHING_GOAL:g}x",
        met=speedup >= BATCHING_GOAL,
        limits=batching_limits(sweep, common["machine_info"]),
        **common,
    )
    print(f"{'endpoint':42s} {'n':>4s} {'p50 ms':>9s} {'p95 ms':>9s}")
    for name, s in latency.items():
        print(f"{name:42s} {s['n']:4d} {s['p50_ms']:9.1f} {s['p95_ms']:9.1f}")
    caption, photo_caption = latency["POST /v1/caption"], latency[PHOTO_CASE]
    print(
        f"decoding a {PHOTO}: in full {decoding['full']:.0f} ms, reduced for {decoding['image_size']} px "
        f"{decoding['reduced']:.0f} ms"
    )
    write_result(
        "latency",
        {**header, "endpoints": latency, "rps_by_clients": rps, "photo_decode_ms": decoding},
        figure=f"caption p50 {caption['p50_ms']:.0f} ms, p95 {caption['p95_ms']:.0f} ms; "
        + ", ".join(f"{rps[n]:.1f} req/s at {n}" for n in ("1", "4", "16"))
        + f"; {PHOTO} caption p50 {photo_caption['p50_ms']:.0f} ms (decoding one: in full "
        f"{decoding['full']:.0f} ms, reduced {decoding['reduced']:.0f} ms)",
        **common,
    )
    write_result(
        "regions_scaling",
        {**header, **regions},
        figure=f"{regions['ratio']:.2f}x ({regions['boxes_32']['p50_ms']:.0f} / {regions['one_box']['p50_ms']:.0f} ms)",
        goal=f"< {REGIONS_GOAL:g}x",
        met=regions["ratio"] < REGIONS_GOAL,
        limits=regions_limits(regions, common["machine_info"]),
        **common,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts (about 2 minutes on 2 cores)")
    parser.add_argument("--device", default="auto", help="PIXELLLM_DEVICE for the servers (default: auto)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS for the servers")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="for every caption request")
    parser.add_argument("--note", default="", help="recorded with the machine, e.g. what else ran on it")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    counts, device, tokens = COUNTS[mode], resolve_device(args.device), args.max_new_tokens
    started = time.perf_counter()
    settings = {"counts": counts, "max_new_tokens": tokens, "server_threads": args.threads}
    images = Images()
    with tempfile.TemporaryDirectory(prefix="service-bench-") as tmp:
        work = Path(tmp)
        if DEFAULT_WEIGHTS.is_dir():
            default, model = DEFAULT_WEIGHTS, f"trained weights {DEFAULT_WEIGHTS.relative_to(ROOT)}"
        else:
            default = make_model(MAKE_MODEL, work / "pixelllm-tiny-random")
            model = "pixelllm-tiny, RANDOM weights (weights/pixelllm-tiny not found)"
        print(f"default model: {model}", flush=True)
        machine_info = machine(device, args.threads, args.note)
        with serve(default, work, device, args.threads) as server:
            sweep = asyncio.run(client_sweep(server.url, images, counts, tokens))
            latency = asyncio.run(latencies(server.url, images, counts, tokens))
            regions = asyncio.run(regions_scaling(server.url, images, counts, tokens))
        machine_info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        common = dict(mode=mode, machine_info=machine_info, results_dir=args.results_dir)
        decoding = photo_decode_ms(json.loads((default / "config.json").read_text())["image_size"])
        report_default_model(sweep, latency, regions, decoding, {"model": model, "settings": settings}, common)

        print("building pixelllm-base (random weights)", flush=True)
        base = make_model(MAKE_BASE, work / "pixelllm-base-random")
        machine_info = machine(device, args.threads, args.note)
        with serve(base, work, device, args.threads) as server:
            cache = asyncio.run(cache_speedup(server.url, images, counts, tokens))
        cache_int8 = None
        if device == "cpu":  # int8 dynamic quantization runs on the CPU only
            with serve(base, work, device, args.threads, quantize="int8") as server:
                cache_int8 = asyncio.run(cache_speedup(server.url, images, counts, tokens))
        machine_info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    figure = speedups(cache)
    if cache_int8 is not None:
        figure += f"; with PIXELLLM_QUANTIZE=int8: {speedups(cache_int8)}"
    write_result(
        "cache_speedup",
        {
            "model": "pixelllm-base, RANDOM weights, pixelllm-tiny's tokenizer standing in",
            "settings": settings,
            "prompts": cache,
            "prompts_quantize_int8": cache_int8,
        },
        mode=mode,
        machine_info=machine_info,
        figure=figure + " (pixelllm-base, random weights)",
        goal=f">= {CACHE_GOAL:g}x",
        met=all(c["speedup_median"] >= CACHE_GOAL for c in cache.values()),  # in the default configuration
        limits=cache_limits(cache, tokens, machine_info),
        results_dir=args.results_dir,
    )
    print(f"{mode} run in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
