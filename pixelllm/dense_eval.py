"""Dense-captioning metrics: the Visual Genome densecap mAP (Johnson et al., 2016) and object recall.

mAP: for every IoU threshold (0.3 ... 0.7) and caption threshold (0, 0.05 ... 0.25), predictions of all images
are ranked by score; a prediction is a true positive when its best-overlapping ground-truth region (by IoU) is
still unmatched, overlaps it by >= the IoU threshold, and their captions score >= the caption threshold. AP is
the area under that precision/recall curve; mAP averages the 30 APs.

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
    """Area under the interpolated precision/recall curve of predictions ranked by score."""
    if num_truth == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(true_positive[order])
    fp = np.cumsum(~true_positive[order])
    recall = np.concatenate([[0.0], tp / num_truth, [1.0]])
    precision = np.concatenate([[1.0], tp / np.maximum(tp + fp, 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def densecap_map(predictions: Sequence[DensePrediction], truths: Sequence[DenseTruth]) -> dict[str, float]:
    """VG densecap mAP over images, plus AP at IoU 0.5 with any caption (pure detection)."""
    scored = []  # per image: (scores, best gt index, best IoU, caption score)
    for pred, truth in zip(predictions, truths):
        m = len(pred.scores)
        if m == 0:
            continue
        if len(truth.captions) == 0:
            scored.append((pred.scores, np.full(m, -1), np.zeros(m), np.zeros(m)))
            continue
        iou = box_iou_matrix(pred.boxes, truth.boxes)
        best = iou.argmax(1)
        caption = np.array([meteor_exact(c, truth.captions[g]) for c, g in zip(pred.captions, best)])
        scored.append((pred.scores, best, iou[np.arange(m), best], caption))
    num_truth = sum(len(t.captions) for t in truths)
    aps = {}
    for t_iou in IOU_THRESHOLDS:
        for t_cap in CAPTION_THRESHOLDS:
            aps[(t_iou, t_cap)] = _ap_at(scored, num_truth, t_iou, t_cap)
    return {
        "dense_map": float(np.mean(list(aps.values()))),
        "dense_ap@0.5_iou_any_caption": _ap_at(scored, num_truth, 0.5, None),
    }


def _ap_at(scored: list, num_truth: int, t_iou: float, t_cap: float | None) -> float:
    all_scores, all_tp = [], []
    for scores, best, iou, caption in scored:
        order = np.argsort(-scores, kind="stable")
        matched: set[int] = set()
        tp = np.zeros(len(scores), bool)
        for k in order:
            ok = best[k] >= 0 and iou[k] >= t_iou and (t_cap is None or caption[k] >= t_cap)
            if ok and int(best[k]) not in matched:
                matched.add(int(best[k]))
                tp[k] = True
        all_scores.append(scores)
        all_tp.append(tp)
    if not all_scores:
        return 0.0
    return average_precision(np.concatenate(all_scores), np.concatenate(all_tp), num_truth)


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
