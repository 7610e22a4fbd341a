"""How should a referring box use the proposal head? Compares rules on scenes the held-out evaluation never uses.

For every object of `--num-scenes` independent-renderer scenes (seed `--seed`, 77 by default, not the model
card's held-out seed 1000) it localizes the object's referring expression with the point head
(`Predictor.localize(refine=False)`), then replaces that box by one of the model's own proposals, per rule and
objectness threshold, and prints the referring Acc@0.5 of each: the point head's box alone; the proposal of
largest IoU with it (kept only if they overlap, or always); largest IoU x objectness; nearest centre (L1), the
rule `Predictor.localize` uses.

python scripts/refine_probe.py --model weights/pixelllm-tiny --out runs/refine_probe.json
"""

from __future__ import annotations

import json

import numpy as np
import torch
from probe_args import probe_parser

from pixelllm.build import load_model
from pixelllm.dense_eval import box_iou_matrix
from pixelllm.evaluate import box_iou, generated_scenes
from pixelllm.predictor import Predictor

THRESHOLDS = (0.05, 0.1, 0.2, 0.3)


def pick(rule: str, box: np.ndarray, boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The box `rule` answers, given the point head's `box` (4,) and proposals (N, 4) with objectness (N,)."""
    if len(boxes) == 0:
        return box
    iou = box_iou_matrix(box[None], boxes)[0]
    if rule == "iou":
        return boxes[iou.argmax()] if iou.max() > 0 else box
    if rule == "iou_always":
        return boxes[iou.argmax()]
    if rule == "iou_x_objectness":
        return boxes[(iou * scores).argmax()] if iou.max() > 0 else box
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    return boxes[np.abs(centers - (box[:2] + box[2:]) / 2).sum(axis=1).argmin()]


def main() -> None:
    parser = probe_parser(__doc__, num_scenes=200)
    args = parser.parse_args()

    predictor = Predictor(load_model(args.model))
    records = []  # (point head box, proposal boxes, objectness, true box), image pixels
    with torch.no_grad():
        for scene in generated_scenes(args.num_scenes, args.seed, "independent"):
            emb = predictor.embed(scene.image)
            texts = [o.referring for o in scene.objects]
            locs = predictor.localize_embeddings([emb] * len(texts), texts, refine=False)
            regions = predictor.dense_caption_embeddings([emb], score_threshold=min(THRESHOLDS), max_new_tokens=1)[0]
            boxes = np.array([r.box for r in regions], np.float64).reshape(-1, 4)
            scores = np.array([r.score for r in regions])
            records += [(np.array(loc.box), boxes, scores, np.array(o.box)) for loc, o in zip(locs, scene.objects)]

    result = {"model": args.model, "scenes": args.num_scenes, "seed": args.seed, "objects": len(records)}
    result["point_head_box"] = float(np.mean([box_iou(b, t) >= 0.5 for b, _, _, t in records]))
    for rule in ("iou", "iou_always", "iou_x_objectness", "nearest_centre"):
        for th in THRESHOLDS:
            hits = [box_iou(pick(rule, b, p[s >= th], s[s >= th]), t) >= 0.5 for b, p, s, t in records]
            result[f"{rule}@{th}"] = float(np.mean(hits))
    for key, value in result.items():
        print(f"{key:>24}: {value:.3f}" if isinstance(value, float) else f"{key:>24}: {value}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
