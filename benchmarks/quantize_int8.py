"""int8 language model (`PixelLLM.quantize_language_model`, `PIXELLLM_QUANTIZE=int8`) vs float32, on the CPU.

- speed: a region caption (box prompt) on a cached image embedding, exactly `--tokens` tokens (EOS suppressed),
  through `Predictor.caption_embeddings` as the service calls it (LoRA merged); float32 and int8 copies of the
  same random-weight model timed side by side, alternating which goes first, per preset (random weights say
  nothing of quality).
- quality: `pixelllm eval` on the shipped default model (held-out generated scenes), float32 and int8.

    python benchmarks/quantize_int8.py            # pixelllm-tiny and pixelllm-base, 200 scenes (about 3.5 minutes)
    python benchmarks/quantize_int8.py --quick    # 3 repeats, 20 scenes
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS_DIR, ROOT, machine, no_eos, random_pixelllm, resolve_device, timed, write_result

from pixelllm import Predictor
from pixelllm.evaluate import run_eval

DEFAULT_MODEL = ROOT / "weights" / "pixelllm-tiny"
BOX = (200.0, 150.0, 600.0, 460.0)
EVAL_KEYS = (
    "referring_acc@0.5",
    "mask_iou",
    "region_caption_acc_box",
    "caption_word_point_acc",
    "caption_object_mention_rate",
    "cider",
    "bleu4",
    "dense_map",
    "seconds",
)


def speed(preset: str, tokens: int, repeats: int) -> dict[str, Any]:
    """Median ms of a cached-image region caption, float32 vs int8."""
    models = {"float32": random_pixelllm(preset)}
    models["float32"].set_lora_merged(True)  # as the service serves it (int8 folds LoRA in too)
    models["int8"] = copy.deepcopy(models["float32"])
    models["int8"].quantize_language_model()
    image = torch.Generator().manual_seed(0)
    pixels = (torch.rand(480, 640, 3, generator=image) * 255).to(torch.uint8).numpy()
    predictors = {name: Predictor(model) for name, model in models.items()}
    embedding = predictors["float32"].embed(pixels)  # the same cached embedding for both

    def caption(name: str):
        with no_eos(models[name]):
            return predictors[name].caption_embeddings([embedding], [BOX], [None], tokens, 1)[0]

    for name in models:  # warm-up
        caption(name)
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(repeats):
        for name in list(models)[:: 1 if r % 2 == 0 else -1]:
            times[name].append(1000 * timed(lambda n=name: caption(n), "cpu"))
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "request": f"region caption (box) on a cached embedding, {tokens} tokens, random weights",
        "ms_median": medians,
        "ms_all": times,
        "speedup": medians["float32"] / medians["int8"],
    }


def quality(num_scenes: int) -> dict[str, Any]:
    """`pixelllm eval` metrics of the shipped default model, float32 and int8 (same scenes)."""
    out = {}
    for quantize in ("none", "int8"):
        result = run_eval(str(DEFAULT_MODEL), None, None, num_scenes, 1000, "independent", "cpu", 1, quantize)
        out["int8" if quantize == "int8" else "float32"] = {key: result[key] for key in EVAL_KEYS}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repeats, 20 scenes")
    parser.add_argument("--device", default="cpu", help="cpu (auto: cpu without a GPU); elsewhere it skips")
    parser.add_argument("--presets", default="pixelllm-tiny,pixelllm-base")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--scenes", type=int, help="eval scenes (default 200, --quick 20; 0 skips the eval)")
    parser.add_argument("--note", default="")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device != "cpu":
        parser.exit(0, f"quantize_int8: skipped on {device} (int8 dynamic quantization runs on the CPU only)\n")
    mode = "quick" if args.quick else "full"
    repeats = 3 if args.quick else 11
    scenes = args.scenes if args.scenes is not None else (20 if args.quick else 200)
    started = time.perf_counter()
    info = machine("cpu", torch.get_num_threads(), args.note)
    speeds = {preset: speed(preset, args.tokens, repeats) for preset in args.presets.split(",")}
    evals = quality(scenes) if scenes and DEFAULT_MODEL.is_dir() else None
    figure = ", ".join(
        f"{preset.removeprefix('pixelllm-')} {s['ms_median']['float32']:.0f} -> {s['ms_median']['int8']:.0f} ms "
        f"({s['speedup']:.2f}x)"
        for preset, s in speeds.items()
    )
    figure = f"cached-image region caption, {args.tokens} tokens: {figure}"
    if evals is not None:
        f32, i8 = evals["float32"], evals["int8"]
        figure += (
            f"; default model eval ({scenes} scenes) float32 / int8: referring acc@0.5 {f32['referring_acc@0.5']:.3f} / "
            f"{i8['referring_acc@0.5']:.3f}, caption word-point acc {f32['caption_word_point_acc']:.3f} / "
            f"{i8['caption_word_point_acc']:.3f}, CIDEr {f32['cider']:.2f} / {i8['cider']:.2f}"
        )
    write_result(
        "quantize_int8",
        {"settings": {"tokens": args.tokens, "repeats": repeats, "scenes": scenes}, "speed": speeds, "eval": evals},
        mode=mode,
        machine_info=info,
        figure=figure,
        results_dir=args.results_dir,
    )
    print(f"{mode} run in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
