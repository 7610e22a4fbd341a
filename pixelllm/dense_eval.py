"""Dense-captioning metrics: the Visual Genome densecap mAP (Johnson et al., 2016) and object recall.

mAP, as densecap's `eval_utils.lua` computes it: per image, ground-truth regions overlapping by >= 0.7 are merged
into one (their mean box, all their captions as references), and predictions, in order of score, each take their
best-overlapping region; the first to take a region may count, any later one cannot (whatever its overlap or
caption). For every IoU threshold (0.3 ... 0.7) and caption threshold (0, 0.05 ... 0.25), predictions of all
images are ranked by score; one is a true positive when it was first to its region, overlaps it by >= the IoU
threshold, and its caption scores > the caption threshold against the region's best reference. AP is the
101-point interpolated precision; mAP averages the 30 APs. (Boxes are continuous here, so IoU has no +1 pixel.)

The caption score is METEOR 1.5 (`-l en -norm`, what densecap runs) with exact word matches only (no stemming,
synonyms or paraphrases, which need METEOR's Java tables; none of them joins two words of our synthetic
vocabulary): weighted unigram precision P and recall R (function words weigh 1 - delta, the others delta),
F = P R / (alpha P + (1 - alpha) R), times 1 - gamma (chunks / matches) ** beta, with METEOR's English parameters
and function words. tests/test_dense.py checks it against the jar.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

IOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
CAPTION_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
MERGE_IOU = 0.7  # ground-truth regions overlapping by this much are one region
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
METEOR_ALPHA, METEOR_BETA, METEOR_GAMMA, METEOR_DELTA = 0.85, 0.2, 0.6, 0.75  # METEOR 1.5, English (`-l en`)
METEOR_FUNCTION_WORDS = frozenset(  # the jar's resources/function/english.words
    "the , . to of and a in that for \" is on 's it with was as said at he by be from have has are his but an this "  # noqa: SIM905
    "not i will \u2019 they ) -rrb- ( -lrb- who their had we which were been more or s its would about new one after "
    "you : also up when there than $ all out her people she year two - can if last first \u201c over other \u201d "
    "into some what so -- no time years could ? 't \u2014 '".split()
)


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


def _tokens(text: str) -> list[str]:
    """Lower-cased words and punctuation marks, as METEOR's `-norm` splits them."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def _fewest_chunks(cand: list[str], ref: list[str], matched: Counter) -> int:
    """The chunks (runs of matches adjacent in both texts) of the alignment METEOR takes among exact matches: each
    word of `matched` matched as often as it can be, in the fewest chunks. Captions are short: every pairing of
    repeated words is tried."""
    groups = []
    for word, k in matched.items():
        at_c = [i for i, w in enumerate(cand) if w == word]
        at_r = [j for j, w in enumerate(ref) if w == word]
        groups.append(
            [list(zip(c, r)) for c in itertools.combinations(at_c, k) for r in itertools.permutations(at_r, k)]
        )
    fewest = None
    for choice in itertools.product(*groups):
        pairs = sorted(p for group in choice for p in group)
        chunks = 1 + sum(1 for (i0, j0), (i1, j1) in zip(pairs, pairs[1:]) if not (i1 == i0 + 1 and j1 == j0 + 1))
        fewest = chunks if fewest is None else min(fewest, chunks)
    return fewest


def meteor_exact(candidate: str, reference: str) -> float:
    """METEOR 1.5 with exact unigram matching only (see the module docstring); 0 when nothing matches."""
    cand, ref = _tokens(candidate), _tokens(reference)
    matched = Counter(cand) & Counter(ref)  # each word's matches: the least of its two counts
    matches = sum(matched.values())
    if matches == 0:
        return 0.0

    def weight(words: list[str]) -> float:
        return sum(1 - METEOR_DELTA if w in METEOR_FUNCTION_WORDS else METEOR_DELTA for w in words)

    matched_weight = weight(list(matched.elements()))
    precision, recall = matched_weight / weight(cand), matched_weight / weight(ref)
    fmean = precision * recall / (METEOR_ALPHA * precision + (1 - METEOR_ALPHA) * recall)
    chunks = _fewest_chunks(cand, ref, matched)
    identical = matches == len(cand) == len(ref) and chunks == 1  # METEOR gives a whole match no penalty
    return fmean * (1 - (0.0 if identical else METEOR_GAMMA * (chunks / matches) ** METEOR_BETA))


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
    captions, each prediction serving one region: the most regions any such one-to-one matching finds."""
    found, total = 0, 0
    for pred, truth in zip(predictions, truths):
        total += len(truth.captions)
        if len(pred.scores) == 0 or len(truth.captions) == 0:
            continue
        iou = box_iou_matrix(pred.boxes, truth.boxes)
        can = np.array(
            [
                [iou[k, g] >= t_iou and correct(pred.captions[k], c) for g, c in enumerate(truth.captions)]
                for k in range(len(iou))
            ]
        )
        rows, cols = linear_sum_assignment(can, maximize=True)
        found += int(can[rows, cols].sum())
    return found / max(total, 1)
