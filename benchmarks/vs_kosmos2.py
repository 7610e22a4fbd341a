"""PixelLLM (`pixelllm-t5xl`, the paper's shape) vs Kosmos-2 (transformers' `Kosmos2ForConditionalGeneration`
from its default `Kosmos2Config()`): per-caption latency and peak memory, both with random weights.

One caption = image tensor -> image encoders -> exactly `--tokens` generated tokens (greedy; PixelLLM's
EOS logit is masked, Kosmos-2 gets min_new_tokens = max_new_tokens), batch 1, in the same dtype.
Each model runs in its own subprocess, so each process's peak memory is that model's alone; both get their
random weights from `common.build_random` (one fast fill instead of each library's initialisers). Input sizes are
each model's own: 384 px for pixelllm-t5xl (SAM ViT-H + EVA02-L), 224 px for Kosmos-2 (CLIP ViT-L/14).

    python benchmarks/vs_kosmos2.py --quick                   # CPU, 8 tokens, one caption each, no warm-up
    python benchmarks/vs_kosmos2.py --device cuda             # GPU, bf16, 32 tokens, 5 timed captions

On CPU fp32 needs about 16 GB free for pixelllm-t5xl (3.77B parameters); the script checks before building.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    RESULTS_DIR,
    build_random,
    machine,
    no_eos,
    peak_memory_mb,
    random_pixelllm,
    resolve_device,
    sync,
    write_result,
)

SETTINGS = {"quick": dict(tokens=8, warmup=0, repeats=1), "full": dict(tokens=32, warmup=1, repeats=5)}
PARAMS = {"pixelllm": 3.774e9, "kosmos2": 1.664e9}  # from a meta-device build of each
KOSMOS2_PROMPT = [64012, 1466, 1723, 9]  # stand-in prompt ids: no tokenizer is bundled and the weights are random
RESULT = "RESULT "  # the line a worker prints its JSON on


def bench_pixelllm(device: torch.device, dtype: torch.dtype, tokens: int) -> tuple[Any, dict[str, Any]]:
    """The model, and `run()` (encode + generate one caption) with its input size."""
    from pixelllm.modeling.pixelllm import Prompts

    model = random_pixelllm("pixelllm-t5xl", device, dtype)
    size = model.cfg.image_size
    pixels = torch.rand(1, 3, size, size, device=device)
    prompts = Prompts(texts=[model.cfg.caption_prompt])

    def encode():
        return model.encode_images(pixels)

    def generate(features):
        with no_eos(model):
            (out,) = model.generate(features, prompts, max_new_tokens=tokens)
        assert len(out.ids) == tokens, len(out.ids)

    return model, {"encode": encode, "generate": generate, "image_size": size}


def bench_kosmos2(device: torch.device, dtype: torch.dtype, tokens: int) -> tuple[Any, dict[str, Any]]:
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

    config = Kosmos2Config()
    model = build_random(lambda: Kosmos2ForConditionalGeneration(config)).to(device=device, dtype=dtype).eval()
    size, n_image = config.vision_config.image_size, config.latent_query_num
    pixels = torch.randn(1, 3, size, size, device=device, dtype=dtype)
    # <s> <image> 64 image positions </image> prompt, as Kosmos2Processor lays them out
    ids = [0, 64003, *range(4, 4 + n_image), 64004, *KOSMOS2_PROMPT]
    input_ids = torch.tensor([ids], device=device)
    position_mask = torch.tensor([[0, 0] + [1] * n_image + [0] * (1 + len(KOSMOS2_PROMPT))], device=device)

    def encode():
        vision = model.vision_model(pixels)[0]
        embeds = torch.nn.functional.normalize(model.vision_model.model.post_layernorm(vision), dim=-1)
        return model.image_to_text_projection(embeds)[0]

    def generate(image_embeds):
        out = model.generate(
            image_embeds=image_embeds,
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            image_embeds_position_mask=position_mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
        )
        assert out.shape[1] - input_ids.shape[1] == tokens, out.shape

    return model, {"encode": encode, "generate": generate, "image_size": size}


def worker(name: str, device: torch.device, dtype: torch.dtype, tokens: int, warmup: int, repeats: int) -> None:
    """Build one model, caption `warmup + repeats` times, print the figures as one JSON line."""
    start = time.perf_counter()
    model, run = {"pixelllm": bench_pixelllm, "kosmos2": bench_kosmos2}[name](device, dtype, tokens)
    build_s = time.perf_counter() - start
    after_build = peak_memory_mb(device)
    times: dict[str, list[float]] = {"encode": [], "generate": [], "caption": []}
    with torch.no_grad():
        for i in range(warmup + repeats):
            sync(device)
            t0 = time.perf_counter()
            features = run["encode"]()
            sync(device)
            t1 = time.perf_counter()
            run["generate"](features)
            sync(device)
            encode_s, generate_s = t1 - t0, time.perf_counter() - t1
            if i >= warmup:
                times["encode"].append(encode_s)
                times["generate"].append(generate_s)
                times["caption"].append(encode_s + generate_s)
            print(f"{name}: caption {i + 1}: encode {encode_s:.2f} s, generate {generate_s:.2f} s", flush=True)
    result = {
        "params": sum(p.numel() for p in model.parameters()),
        "image_size": run["image_size"],
        "build_s": build_s,
        "caption_s": statistics.median(times["caption"]),
        "encode_s": statistics.median(times["encode"]),
        "generate_s": statistics.median(times["generate"]),
        "generate_ms_per_token": 1000 * statistics.median(times["generate"]) / tokens,  # prompt prefill included
        "raw_s": times,
        "memory_after_build": after_build,
        "memory": peak_memory_mb(device),
    }
    print(RESULT + json.dumps(result), flush=True)


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def run_worker(name: str, args: argparse.Namespace, settings: dict[str, int]) -> dict[str, Any]:
    if args.device == "cpu":  # random weights are built in float32 before any cast
        need = PARAMS[name] * 4 / 2**30 + 1.5  # float32 weights + activations and runtime
        if mem_available_gb() < need:
            sys.exit(f"{name}: needs about {need:.0f} GB of free memory on CPU, {mem_available_gb():.0f} GB free")
    cmd = [sys.executable, __file__, "--worker", name, "--device", args.device, "--dtype", args.dtype]
    cmd += ["--threads", str(args.threads), *(f"--{k}={v}" for k, v in settings.items())]
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    )
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        sys.exit(f"{name} worker failed with exit code {proc.returncode}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith(RESULT))[len(RESULT) :])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 tokens, 1 timed caption (CPU-sized)")
    parser.add_argument("--device", default="auto", help="cpu, cuda (default: cuda when visible)")
    parser.add_argument("--dtype", default="auto", help="float32 or bfloat16 (default: float32 on CPU, else bf16)")
    parser.add_argument("--tokens", type=int, help="generated tokens per caption (default: by --quick)")
    parser.add_argument("--warmup", type=int, help="untimed captions first (default: by --quick)")
    parser.add_argument("--repeats", type=int, help="timed captions (default: by --quick)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument("--worker", choices=list(PARAMS), help=argparse.SUPPRESS)
    parser.add_argument("--note", default="", help="recorded with the machine, e.g. what else ran on it")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    settings = {k: v if (v := getattr(args, k)) is not None else d for k, d in SETTINGS[mode].items()}
    args.device = resolve_device(args.device)
    if args.dtype == "auto":
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, torch.device(args.device), getattr(torch, args.dtype), **settings)
        return 0

    machine_info = machine(args.device, args.threads, args.note)
    results = {name: run_worker(name, args, settings) for name in ("kosmos2", "pixelllm")}
    p, k = results["pixelllm"], results["kosmos2"]
    latency_ratio = p["caption_s"] / k["caption_s"]
    memory_key = "peak_cuda_allocated_mb" if args.device.startswith("cuda") else "peak_rss_mb"
    memory_ratio = p["memory"][memory_key] / k["memory"][memory_key]
    write_result(
        "vs_kosmos2",
        {
            "settings": {**settings, "dtype": args.dtype, "batch": 1, "weights": "random"},
            "models": {
                "pixelllm": "pixelllm-t5xl preset (SAM ViT-H frozen + EVA02-L, Flan-T5-XL shape with LoRA)",
                "kosmos2": "transformers Kosmos2ForConditionalGeneration(Kosmos2Config())",
            },
            "latency_ratio": latency_ratio,
            "memory_ratio": memory_ratio,
            "memory_measure": memory_key,
            "results": results,
        },
        mode=mode,
        machine_info=machine_info,
        figure=f"pixelllm-t5xl / Kosmos-2: latency {latency_ratio:.2f}x ({p['caption_s']:.1f} / {k['caption_s']:.1f} s per "
        f"{settings['tokens']}-token caption), memory {memory_ratio:.2f}x "
        f"({p['memory'][memory_key] / 1024:.1f} / {k['memory'][memory_key] / 1024:.1f} GiB), {args.dtype}",
        results_dir=args.results_dir,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
