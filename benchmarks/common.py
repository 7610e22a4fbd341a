"""What every benchmark script shares: the machine it ran on, timing, forced-length captions, peak memory,
and the result file `benchmarks/results/<name>.json`.

A result file holds the benchmark's own figures plus a `summary` that `run_all.py` turns into one row of
benchmarks/RESULTS.md: `figure` (headline text), `goal` (text, or null), `met` (bool, or null without a
goal) and `limits` (what holds a figure back when its goal is not met).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


def cpu_name() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; anything else unchanged."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def machine(device: str, threads: int | None = None, note: str = "") -> dict[str, Any]:
    """The machine, software and load a figure was measured with."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "git_commit": commit,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "note": note,
    }


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | str) -> float:
    """Seconds `fn()` takes, with the device synchronized before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@contextmanager
def no_eos(model) -> Iterator[None]:
    """Make EOS impossible for a PixelLLM, so every caption runs to max_new_tokens."""
    from pixelllm.tokenizer import EOS_ID

    def hook(module, args, logits):
        logits = logits.clone()
        logits[..., EOS_ID] = float("-inf")
        return logits

    handle = model.language_model.t5.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def build_random(build: Callable[[], torch.nn.Module], seed: int = 0) -> torch.nn.Module:
    """`build()` with random weights, fast: the constructors' own initialisation is skipped (transformers'
    `no_init_weights`, which also stubs `torch.nn.init`; tied embeddings are tied again after), then every
    parameter is filled in one pass from a block of 2^24 standard-normal draws, repeated: scaled to variance
    1 / fan-in for matrices and convolutions, 0 for biases, 1 for other vectors (norm scales). Seconds instead
    of minutes for billions of parameters; buffers (position tables) are built as usual, and latency does not
    depend on which random values the weights hold."""
    from transformers import PreTrainedModel
    from transformers.initialization import no_init_weights

    generator = torch.Generator().manual_seed(seed)
    with no_init_weights():
        model = build()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.tie_weights()
    block = torch.randn(2**24, generator=generator)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                flat = param.view(-1)
                for start in range(0, flat.numel(), block.numel()):
                    chunk = flat[start : start + block.numel()]
                    chunk.copy_(block[: chunk.numel()])
                flat.mul_(param[0].numel() ** -0.5)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    return model


def random_pixelllm(preset: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """`preset` with random weights (`build_random`), in eval mode. Presets that ship no tokenizer (base, t5xl)
    borrow the tiny preset's: it only turns prompts into ids, and the weights are random anyway."""
    from pixelllm import build_pixelllm
    from pixelllm.build import default_tokenizer
    from pixelllm.config import load_config

    cfg = load_config(preset)
    tokenizer = default_tokenizer(cfg) or default_tokenizer(load_config("pixelllm-tiny"))
    return build_random(lambda: build_pixelllm(cfg, tokenizer=tokenizer)).to(device=device, dtype=dtype).eval()


def peak_memory_mb(device: torch.device | str) -> dict[str, float]:
    """This process's peak resident memory (and peak CUDA allocation on a GPU), in MiB."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # ru_maxrss is KiB on Linux
    if torch.device(device).type == "cuda":
        out["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def command() -> str:
    """How this script was run, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    name = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(name), *sys.argv[1:]])


def write_result(
    name: str,
    body: dict[str, Any],
    *,
    mode: str,
    machine_info: dict[str, Any],
    figure: str,
    goal: str | None = None,
    met: bool | None = None,
    limits: str | None = None,
    results_dir: Path = RESULTS_DIR,
) -> Path:
    """Write `results_dir/<name>.json`: `body` under the header every result file shares; print the headline."""
    summary = {"figure": figure, "goal": goal, "met": met, "limits": limits if met is False else None}
    out = {"benchmark": name, "mode": mode, "command": command(), "summary": summary, "machine": machine_info, **body}
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    verdict = "" if met is None else f" (goal {goal}: {'met' if met else 'NOT met'})"
    print(f"{name}: {figure}{verdict}\nwrote {path}", flush=True)
    return path
