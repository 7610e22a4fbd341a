"""How should caption words use the proposal head? Compares rules on scenes the held-out evaluation never uses.

For `--num-scenes` independent-renderer scenes (seed `--seed`, 77 by default, not the model card's held-out seed
1000) it captions the image with the point head's word boxes (`Predictor.caption(refine=False)`), then moves words
to one of the model's own proposals (objectness >= 0.3, the proposals `dense_caption` returns) per rule, and prints
the caption word-point accuracy of each (`pixelllm eval`'s `caption_word_point_acc`, and among named objects):
no move; every word to the proposal of nearest centre (L1); only located words (score >= 0.5) so, the rule
`Predictor.caption` uses to refine (`predictor_refined`: its words with `verify=False`); a word whose point lies inside a proposal to the nearest such; a word to its nearest
proposal only when its point lies within that proposal's box grown by 100% or 50% of its size on each side; a word
to the proposal of largest IoU with its box when that IoU reaches 0.1 or 0.3.

python scripts/word_refine_probe.py --model weights/pixelllm-tiny --num-scenes 500 --out runs/word_refine_probe.json
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch
from probe_args import probe_parser

from pixelllm.build import load_model
from pixelllm.dense_eval import box_iou_matrix
from pixelllm.evaluate import _word_point_hits, generated_scenes
from pixelllm.predictor import LOCATED_SCORE, Predictor, Word, centre

RULES = ("none", "nearest", "nearest_located", "inside", "grown_1.0", "grown_0.5", "iou_0.1", "iou_0.3")


def move(rule: str, word: Word, boxes: np.ndarray) -> Word:
    """`word` moved per `rule` to one of the proposals (N, 4), image pixels."""
    if rule == "none" or len(boxes) == 0 or (rule == "nearest_located" and word.score < LOCATED_SCORE):
        return word
    point = np.array(word.point)
    distance = np.abs((boxes[:, :2] + boxes[:, 2:]) / 2 - point).sum(axis=1)
    inside = np.all((boxes[:, :2] <= point) & (point <= boxes[:, 2:]), axis=1)
    if rule.startswith("iou"):
        iou = box_iou_matrix(np.array([word.box]), boxes)[0]
        k = int(iou.argmax()) if iou.max() >= float(rule.split("_")[1]) else None
    elif rule == "inside":
        k = int(np.where(inside, distance, np.inf).argmin()) if inside.any() else None
    else:
        k = int(distance.argmin())
        if rule.startswith("grown"):
            grow = float(rule.split("_")[1]) * (boxes[k, 2:] - boxes[k, :2])
            k = k if np.all((boxes[k, :2] - grow <= point) & (point <= boxes[k, 2:] + grow)) else None
    if k is None:
        return word
    box = tuple(float(v) for v in boxes[k])
    return replace(word, box=box, point=centre(box), regressed_box=word.box)


def main() -> None:
    parser = probe_parser(__doc__)
    args = parser.parse_args()

    predictor = Predictor(load_model(args.model))
    hits: dict[str, list[bool | None]] = {rule: [] for rule in RULES}
    shipped: list[bool | None] = []
    with torch.no_grad():
        for scene in generated_scenes(args.num_scenes, args.seed, "independent"):
            emb = predictor.embed(scene.image)
            words = predictor.caption_embeddings([emb], refine=False)[0].words
            regions = predictor.dense_caption_embeddings([emb], max_new_tokens=1)[0]
            boxes = np.array([r.box for r in regions], np.float64).reshape(-1, 4)
            for rule in RULES:
                hits[rule] += _word_point_hits([move(rule, w, boxes) for w in words], scene.objects)
            shipped += _word_point_hits(predictor.caption_embeddings([emb], verify=False)[0].words, scene.objects)
    table = {
        rule: {
            "word_point": float(np.mean([h is True for h in found])),
            "among_named": float(np.mean([h for h in found if h is not None])),
        }
        for rule, found in hits.items()
    }
    result = {
        "model": args.model,
        "scenes": args.num_scenes,
        "seed": args.seed,
        "objects": len(shipped),
        **table,
        "predictor_refined": float(np.mean([h is True for h in shipped])),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
