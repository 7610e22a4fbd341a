"""Training throughput of the tiny preset: samples/s and peak memory of real `pixelllm.train.train` steps.

The run is `pixelllm/configs/train/tiny.json` (batch 32, the four-task mix on synthetic scenes) with fewer
steps and scenes, logging every step. Scene preparation happens before the loop and is not timed; the
first `--warmup` steps are not counted. Samples/s = batch size x timed steps / their wall time, which
includes making each step's batch, forward, backward and the optimizer step, as in a real run.

    python benchmarks/train_throughput.py --quick              # 2 + 8 steps on CPU
    python benchmarks/train_throughput.py --device cuda        # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import RESULTS_DIR, ROOT, machine, peak_memory_mb, write_result

from pixelllm.train import TrainConfig, train

CONFIG = ROOT / "pixelllm" / "configs" / "train" / "tiny.json"
STEPS = {"quick": (2, 8), "full": (5, 40)}  # (warm-up, timed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 warm-up + 8 timed steps instead of 5 + 40")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="train.py uses cuda when visible")
    parser.add_argument("--steps", type=int, help="timed steps (default: by --quick)")
    parser.add_argument("--warmup", type=int, help="steps before timing starts (default: by --quick)")
    parser.add_argument("--scenes", type=int, default=32, help="synthetic scenes to sample batches from")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument("--note", default="", help="recorded with the machine, e.g. what else ran on it")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    warmup = args.warmup if args.warmup is not None else STEPS[mode][0]
    timed_steps = args.steps or STEPS[mode][1]
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # train.py picks cuda whenever one is visible (CUDA starts lazily)
    elif not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    cfg = TrainConfig.from_json(CONFIG)
    cfg.steps, cfg.warmup_steps = warmup + timed_steps, 1
    cfg.log_every, cfg.ckpt_every, cfg.threads = 1, 10**9, args.threads
    for source in cfg.sources:
        source.num_scenes = args.scenes
    machine_info = machine(args.device, args.threads, args.note)
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        cfg.out_dir = tmp
        before = os.times()
        train(cfg)
        after = os.times()
        records = [json.loads(line) for line in (Path(tmp) / "log.jsonl").read_text().splitlines()]
    timed = records[warmup - 1 :] if warmup else records  # the first timed step ends at records[warmup]
    seconds = timed[-1]["time"] - timed[0]["time"]
    samples_per_s = cfg.batch_size * (len(timed) - 1) / seconds
    memory = peak_memory_mb(args.device)
    # CPU time / (wall time x threads) over the whole run: well below 1 when other jobs took the cores
    cpu_utilization = (after.user + after.system - before.user - before.system) / (
        (after.elapsed - before.elapsed) * args.threads
    )
    params = {"steps_timed": len(timed) - 1, "warmup_steps": warmup, "batch_size": cfg.batch_size}
    figure = f"{samples_per_s:.1f} samples/s, peak RSS {memory['peak_rss_mb']:.0f} MiB"
    if "peak_cuda_allocated_mb" in memory:
        figure += f", peak CUDA {memory['peak_cuda_allocated_mb']:.0f} MiB"
    write_result(
        "train_throughput",
        {
            "config": str(CONFIG.relative_to(ROOT)),
            "settings": {**params, "scenes": args.scenes, "tasks": cfg.tasks, "precision": cfg.precision},
            "samples_per_s": samples_per_s,
            "step_s_median": statistics.median(b["time"] - a["time"] for a, b in zip(timed, timed[1:])),
            "memory": memory,
            "cpu_utilization": cpu_utilization,
            "final_loss": timed[-1]["loss"],
        },
        mode=mode,
        machine_info=machine_info,
        figure=figure + f" (batch {cfg.batch_size}, {len(timed) - 1} steps; the run got {cpu_utilization:.0%} of "
        f"{args.threads} threads' CPU time)",
        results_dir=args.results_dir,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
