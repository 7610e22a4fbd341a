"""First-word latency of a streamed caption vs the latency of the whole (non-streamed) caption.

The shipped default model captions `assets/sample.jpg` and held-out scenes of the independent renderer, whole
and in a region. For each (image, prompt), side by side and alternating which goes first:

- full: `Predictor.caption()` (greedy), the whole answer;
- first word: `Predictor.caption_stream()` until it yields its first word (a word is complete once the
  first token of the next word is decoded); the stream is then drained, and its total is reported too.

Both start from the image embedding, as for a cached image in the service. That is the favourable case for
the ratio: a cold image's encoder pass adds the same time to both and so raises it (`--cold` includes it).
The embedding holds the visual tokens of a prompt without a box or point (README, "What a prompt reads of an
image alone"), so on a cached image a whole-image caption starts at the T5 encoder and a region caption at the
prompt feature extractor.
Per (image, prompt) the medians over the repeats are taken (and the best-of ratio, min / min, least disturbed
by other load on a shared machine); the headline gives the median ratio, first word / full, of whole-image
captions and of region captions.

    python benchmarks/stream_latency.py                 # CPU, 9 repeats, 4 scenes
    python benchmarks/stream_latency.py --quick         # 3 repeats, 2 scenes
    python benchmarks/stream_latency.py --device cuda

Goal (issue 9): first word < 25% of the full caption's latency, judged on whole-image captions, the long captions
a stream is for. Region captions are reported beside them but cannot meet it by construction: their first word
needs 2 of their about 6 decoder steps (33%) before any prompt encoding is counted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS_DIR, ROOT, machine, resolve_device, sync, timed, write_result
from PIL import Image

from pixelllm import PixelLLM, Predictor
from pixelllm.data.independent import render_independent_scene
from pixelllm.data.synthetic import scene_seed

GOAL = 0.25
MODEL = ROOT / "weights" / "pixelllm-tiny"
SAMPLE = ROOT / "assets" / "sample.jpg"


def cases(num_scenes: int) -> list[tuple[str, np.ndarray, dict]]:
    """(name, image, caption prompt): the sample and held-out scenes, each whole and in one region."""
    images = [("sample", np.asarray(Image.open(SAMPLE).convert("RGB")))]
    images += [(f"scene{i}", render_independent_scene(scene_seed(2000, i)).image) for i in range(num_scenes)]
    out = []
    for name, image in images:
        h, w = image.shape[:2]
        out.append((f"{name}/image", image, {}))
        out.append((f"{name}/box", image, {"box": (0.1 * w, 0.1 * h, 0.6 * w, 0.6 * h)}))
    return out


def bench_case(p: Predictor, image: np.ndarray, prompt: dict, args, device: torch.device) -> dict:
    def full() -> None:
        if args.cold:
            p.set_image(image)
        p.caption(**prompt)

    def stream() -> tuple[float, float]:
        """Seconds to the first word, and to the end of the stream."""
        sync(device)
        start = time.perf_counter()
        if args.cold:
            p.set_image(image)
        words = p.caption_stream(**prompt)
        next(words, None)
        sync(device)
        first = time.perf_counter() - start
        for _ in words:
            pass
        sync(device)
        return first, time.perf_counter() - start

    p.set_image(image)
    caption = p.caption(**prompt)
    for _ in range(args.warmup):
        full()
        stream()
    times: dict[str, list[float]] = {"full": [], "first_word": [], "stream_total": []}
    for r in range(args.repeats):
        for mode in ("full", "stream") if r % 2 == 0 else ("stream", "full"):
            if mode == "full":
                times["full"].append(timed(full, device))
            else:
                first, total = stream()
                times["first_word"].append(first)
                times["stream_total"].append(total)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "caption": caption.text,
        "words": len(caption.words),
        "tokens": len(p.model.tokenizer.encode(caption.text, add_eos=False)) + 1,  # + EOS
        **{f"{k}_ms": 1000 * v for k, v in med.items()},
        "first_word_ratio": med["first_word"] / med["full"],
        "first_word_best_of_ratio": min(times["first_word"]) / min(times["full"]),  # least disturbed by other load
        "stream_total_ratio": med["stream_total"] / med["full"],
        "raw_s": times,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repeats and 2 scenes instead of 9 and 4")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--repeats", type=int, help="timed runs per mode, interleaved (default: by --quick)")
    parser.add_argument("--scenes", type=int, help="held-out scenes besides the sample (default: by --quick)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cold", action="store_true", help="include the image encoder pass in both timings")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: stable on a shared machine; 0: torch's)"
    )
    parser.add_argument("--note", default="", help="recorded with the machine, e.g. what else ran on it")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 9)
    args.scenes = args.scenes if args.scenes is not None else (2 if args.quick else 4)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(resolve_device(args.device))
    machine_info = machine(str(device), note=args.note)
    p = Predictor(PixelLLM.from_pretrained(MODEL, device=device))

    results = []
    with torch.no_grad():
        for name, image, prompt in cases(args.scenes):
            r = {
                "case": name,
                "prompt": {k: list(v) for k, v in prompt.items()},
                **bench_case(p, image, prompt, args, device),
            }
            results.append(r)
            print(
                f"{name:<14} {r['words']:3d} words {r['tokens']:3d} tokens: first word {r['first_word_ms']:7.1f} ms, "
                f"full {r['full_ms']:7.1f} ms = {r['first_word_ratio']:.3f} [{r['first_word_best_of_ratio']:.3f}]; stream total {r['stream_total_ms']:7.1f} "
                f"ms = {r['stream_total_ratio']:.2f}x",
                flush=True,
            )
    ratio = statistics.median(r["first_word_ratio"] for r in results)
    total_ratio = statistics.median(r["stream_total_ratio"] for r in results)
    kinds = {}  # whole-image and region captions: long and short captions
    for kind in ("image", "box"):
        of_kind = [r for r in results if r["case"].endswith(f"/{kind}")]
        kinds[kind] = {
            "first_word_ratio_median": statistics.median(r["first_word_ratio"] for r in of_kind),
            "first_word_best_of_ratio_median": statistics.median(r["first_word_best_of_ratio"] for r in of_kind),
            "words_median": statistics.median(r["words"] for r in of_kind),
            "tokens_median": statistics.median(r["tokens"] for r in of_kind),
        }
    image, box = kinds["image"], kinds["box"]
    write_result(
        "stream_latency",
        {
            "settings": {
                "model": str(MODEL.relative_to(ROOT)),
                "repeats": args.repeats,
                "warmup": args.warmup,
                "scenes": args.scenes,
                "cold": args.cold,
                "decoding": "greedy, until EOS (max_text_tokens)",
            },
            "first_word_ratio_median": ratio,
            "by_prompt": kinds,
            "stream_total_ratio_median": total_ratio,
            "results": results,
        },
        mode="quick" if args.quick else "full",
        machine_info=machine_info,
        figure=f"{'cold' if args.cold else 'cached'} image: first word at {image['first_word_ratio_median']:.0%} "
        f"of the full caption's latency for whole-image "
        f"captions ({image['words_median']:g} words), {box['first_word_ratio_median']:.0%} for region captions "
        f"({box['words_median']:g} words); median of all {len(results)}: {ratio:.0%}; whole stream "
        f"{total_ratio:.2f}x the plain caption",
        goal=f"< {GOAL:.0%} for whole-image captions",
        met=image["first_word_ratio_median"] < GOAL,
        limits=f"judged on whole-image captions; a first word needs the prompt's encoder pass and 2 decoder steps, "
        f"the whole caption the same pass and one step per token: a {box['tokens_median']:g}-token region caption cannot stream its first word in "
        f"under {GOAL:.0%} of its time",
        results_dir=args.results_dir,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
