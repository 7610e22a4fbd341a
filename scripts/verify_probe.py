"""Which region caption should check a caption's attribute words? Compares rules on scenes the held-out evaluation
never uses.

For `--num-scenes` independent-renderer scenes (seed `--seed`, 77 by default, not the model card's held-out seed
1000) it captions the image with refined words (`Predictor.caption(verify=False)`), then checks its attribute words
(the model's `attribute_words`: size, color, shape) against the model's region caption of a proposal per rule, and
prints the caption word-point accuracy of each (`pixelllm eval`'s `caption_word_point_acc`) and the share of objects
the caption names: no check; each attribute word against the proposal it was itself snapped to ("per_word"); each
word of an attribute phrase ("large blue triangle") against the proposal of the phrase's last word ("phrase", the
rule of session 26); the phrases first placed on distinct proposals by their last word alone ("grounded_head") or by
the words from their last on ("grounded", `Predictor._ground_phrases`, the rule `Predictor.caption` uses:
`predictor_verified` scores its default words). It also
times the two `Predictor` calls (median milliseconds per caption, refined only and verified).

python scripts/verify_probe.py --model weights/pixelllm-tiny --num-scenes 500 --out runs/verify_probe.json
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from unittest.mock import patch

import numpy as np
import torch
from probe_args import probe_parser
from tqdm import tqdm

from pixelllm.build import load_model
from pixelllm.evaluate import _word_point_hits, generated_scenes
from pixelllm.predictor import Box, ImageEmbedding, Predictor, Word

RULES = ("none", "per_word", "phrase", "grounded_head", "grounded")


def regions(predictor: Predictor, rule: str, words: list[Word]) -> list[Box | None]:
    """Per word, the proposal box whose region caption checks it per `rule`; None: not checked."""
    if rule == "per_word":
        return [
            w.box if w.regressed_box is not None and w.text.lower() in predictor._attribute_class else None
            for w in words
        ]
    found: list[Box | None] = [None] * len(words)
    if rule == "phrase":  # every word of a run, against the proposal its last word (the head) was snapped to
        for run in predictor._attribute_runs(words):
            if words[run[-1]].regressed_box is not None:
                for j in run:
                    found[j] = words[run[-1]].box
    return found


def head_anchor(predictor: Predictor, words: list[Word], span: list[int]) -> Word | None:
    """A phrase's last word, the head, where it was snapped ("grounded_head"'s stand-in for `Predictor._anchor`)."""
    head = words[span[0]]
    return head if head.regressed_box is not None else None


def checked(predictor: Predictor, emb: ImageEmbedding, rule: str, words: list[Word]) -> list[Word]:
    if rule in ("grounded", "grounded_head"):
        proposals = predictor._proposal_boxes(predictor.model.propose(emb.features)[0], emb.transform)
        anchor = patch.object(Predictor, "_anchor", head_anchor) if rule == "grounded_head" else nullcontext()
        with anchor:
            return predictor._verify_words([words], [0], {0: emb}, {0: proposals}, 1, None)[0]
    boxes = regions(predictor, rule, words)
    said = predictor._region_attributes([(0, b) for b in boxes if b is not None], {0: emb}, 1, None)
    return [w if b is None else predictor._verified(w, said[(0, b)]) for w, b in zip(words, boxes)]


def main() -> None:
    parser = probe_parser(__doc__)
    args = parser.parse_args()

    predictor = Predictor(load_model(args.model))
    if not predictor._attribute_class:
        parser.error(f"{args.model}'s config names no attribute_words: nothing to verify")
    hits: dict[str, list[bool | None]] = {rule: [] for rule in RULES}
    shipped: list[bool | None] = []
    ms: dict[str, list[float]] = {"refined": [], "verified": []}
    with torch.no_grad():
        scenes = generated_scenes(args.num_scenes, args.seed, "independent")
        for scene in tqdm(scenes, total=args.num_scenes, desc="verify probe", unit="scene"):
            emb = predictor.embed(scene.image)
            start = time.perf_counter()
            words = predictor.caption_embeddings([emb], verify=False)[0].words
            middle = time.perf_counter()
            verified = predictor.caption_embeddings([emb])[0].words
            ms["refined"].append(1000 * (middle - start))
            ms["verified"].append(1000 * (time.perf_counter() - middle))
            for rule in RULES:
                hits[rule] += _word_point_hits(checked(predictor, emb, rule, words), scene.objects)
            shipped += _word_point_hits(verified, scene.objects)
    table = {
        rule: {
            "word_point": float(np.mean([h is True for h in found])),
            "named": float(np.mean([h is not None for h in found])),
        }
        for rule, found in hits.items()
    }
    table.update(
        {
            "objects": len(shipped),
            "scenes": args.num_scenes,
            "seed": args.seed,
            "predictor_verified": float(np.mean([h is True for h in shipped])),
            "median_ms_per_caption": {k: float(np.median(v)) for k, v in ms.items()},
            "threads": torch.get_num_threads(),
        }
    )
    for rule in RULES:
        print(f"{rule:13s} word point {table[rule]['word_point']:.1%}  objects named {table[rule]['named']:.1%}")
    print(f"Predictor.caption (verified): {table['predictor_verified']:.1%} over {len(shipped)} objects")
    print("median ms per caption: " + ", ".join(f"{k} {v:.0f}" for k, v in table["median_ms_per_caption"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table, f, indent=2)


if __name__ == "__main__":
    main()
