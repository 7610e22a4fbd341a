"""Dense-captioning metrics: the Visual Genome densecap mAP (Johnson et al., 2016) and object recall.

mAP, as densecap's `eval_utils.lua` computes it: per image, ground-truth regions overlapping by >= 0.7 are merged
into one (their mean box, all their captions as references), and predictions, in order of score, each take their
best-overlapping region; the first to take a region may count, any later one cannot (whatever its overlap or
caption). For every IoU threshold (0.3 ... 0.7) and caption threshold (0, 0.05 ... 0.25), predictions of all
images are ranked by score; one is a true positive when it was first to its region, overlaps it by >= the IoU
threshold, and its caption scores > the caption threshold against the region's best reference. AP is the
101-point interpolated precision; mAP averages the 30 APs. (Boxes are continuous here, so IoU has no +1 pixel.)

The caption score is METEOR restricted to exact word matches (no stemming, synonyms or paraphrases, which
need WordNet and METEOR's Java tables): F-mean of unigram precision and recall (alpha 0.9) times
(1 - 0.5 * (chunks / matches) ** 3). On our synthetic vocabulary every word is a content word, so exact
matching is what METEOR's other modules would reduce to.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
CAPTION_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
MERGE_IOU = 0.7  # ground-truth regions overlapping by this much are one region
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass
class DenseTruth:
    """One image's ground-truth regions: boxes (N, 4) and their captions."""

    boxes: np.ndarray
    captions: list[str]


@dataclass
class DensePrediction:
    boxes: np.ndarray  # (M, 4)
    scores: np.ndarray  # (M,)
    captions: list[str]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def meteor_exact(candidate: str, reference: str) -> float:
    """METEOR with exact unigram matching only (see the module docstring); 0 when nothing matches."""
    cand, ref = _words(candidate), _words(reference)
    used = [False] * len(ref)
    alignment = []  # (candidate index, reference index), in candidate order
    for i, word in enumerate(cand):
        for j, r in enumerate(ref):
            if not used[j] and r == word:
                used[j] = True
                alignment.append((i, j))
                break
    matches = len(alignment)
    if matches == 0:
        return 0.0
    precision, recall = matches / len(cand), matches / len(ref)
    fmean = precision * recall / (0.9 * precision + 0.1 * recall)
    chunks = 1 + sum(1 for (i0, j0), (i1, j1) in zip(alignment, alignment[1:]) if not (i1 == i0 + 1 and j1 == j0 + 1))
    return fmean * (1 - 0.5 * (chunks / matches) ** 3)


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a (M, 4) against b (N, 4) -> (M, N)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def average_precision(scores: np.ndarray, true_positive: np.ndarray, num_truth: int) -> float:
    """101-point interpolated AP of predictions ranked by score: the mean over recall levels 0, 0.01 ... 1 of the
    best precision at that recall or more (0 where it is never reached)."""
    if num_truth == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(true_positive[order])
    precision = tp / np.arange(1, len(tp) + 1)
    recall = tp / num_truth
    best = [precision[recall >= r].max(initial=0.0) for r in RECALL_POINTS]
    return float(np.mean(best))


def merge_regions(truth: DenseTruth, threshold: float = MERGE_IOU) -> tuple[np.ndarray, list[list[str]]]:
    """Regions overlapping by >= `threshold` as one, as densecap's `merge_boxes`: repeatedly the region with the
    most such neighbours takes them all. -> boxes (R, 4) (each group's mean) and each group's captions."""
    iou = box_iou_matrix(truth.boxes, truth.boxes)
    np.fill_diagonal(iou, 1.0)
    groups = []
    while len(iou) and (good := iou >= threshold).any():
        top = int(good.sum(0).argmax())
        members = np.flatnonzero(good[top])
        groups.append(members)
        iou[members, :] = 0.0
        iou[:, members] = 0.0
    boxes = np.asarray(truth.boxes, np.float64).reshape(-1, 4)
    merged = np.array([boxes[g].mean(0) for g in groups]).reshape(-1, 4)
    return merged, [[truth.captions[i] for i in g] for g in groups]


def densecap_map(predictions: Sequence[DensePrediction], truths: Sequence[DenseTruth]) -> dict[str, float]:
    """VG densecap mAP over images, plus AP at IoU 0.5 with any caption (pure detection)."""
    scored = []  # per image: (scores, first to its region, IoU with it, caption score); False/0: no region overlaps
    num_truth = 0
    for pred, truth in zip(predictions, truths):
        boxes, references = merge_regions(truth)
        num_truth += len(references)
        m = len(pred.scores)
        first, overlap, caption = np.zeros(m, bool), np.zeros(m), np.zeros(m)
        taken = np.zeros(len(references), bool)
        iou = box_iou_matrix(pred.boxes, boxes)
        for k in np.argsort(-np.asarray(pred.scores), kind="stable"):
            if not len(references) or iou[k].max() <= 0:
                continue
            j = int(iou[k].argmax())
            first[k], overlap[k] = not taken[j], iou[k, j]
            taken[j] = True
            caption[k] = max(meteor_exact(pred.captions[k], r) for r in references[j])
        if m:
            scored.append((np.asarray(pred.scores), first, overlap, caption))
    aps = {}
    for t_iou in IOU_THRESHOLDS:
        for t_cap in CAPTION_THRESHOLDS:
            aps[(t_iou, t_cap)] = _ap_at(scored, num_truth, t_iou, t_cap)
    return {
        "dense_map": float(np.mean(list(aps.values()))),
        "dense_ap@0.5_iou_any_caption": _ap_at(scored, num_truth, 0.5, None),
    }


def _ap_at(scored: list, num_truth: int, t_iou: float, t_cap: float | None) -> float:
    if not scored:
        return 0.0
    scores = np.concatenate([s for s, *_ in scored])
    tp = np.concatenate(
        [first & (overlap >= t_iou) & (t_cap is None or caption > t_cap) for _, first, overlap, caption in scored]
    )
    return average_precision(scores, tp, num_truth)


def object_recall(
    predictions: Sequence[DensePrediction], truths: Sequence[DenseTruth], correct, t_iou: float = 0.5
) -> float:
    """Share of ground-truth regions that some prediction overlaps by >= `t_iou` with `correct(pred, truth)`
    captions (each prediction may serve one region)."""
    found, total = 0, 0
    for pred, truth in zip(predictions, truths):
        total += len(truth.captions)
        if len(pred.scores) == 0 or len(truth.captions) == 0:
            continue
        iou = box_iou_matrix(pred.boxes, truth.boxes)
        used: set[int] = set()
        for g, gt_caption in enumerate(truth.captions):
            for k in np.argsort(-iou[:, g]):
                if iou[k, g] < t_iou:
                    break
                if int(k) not in used and correct(pred.captions[k], gt_caption):
                    used.add(int(k))
                    found += 1
                    break
    return found / max(total, 1)
