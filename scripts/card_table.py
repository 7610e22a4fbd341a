"""The held-out metrics table of weights/pixelllm-tiny/MODEL_CARD.md, from `pixelllm eval` JSON files.

python scripts/card_table.py NEW_INDEPENDENT.json NEW_SYNTHETIC.json OLDER_INDEPENDENT.json ...

One column per file, in order; the first column's goal metrics are set in bold. Prints Markdown rows
(without the header) to paste under the card's header row.
"""

import argparse
import json
from collections.abc import Callable
from pathlib import Path

MISSING = "-"  # a metric the file's `pixelllm eval` did not report yet


def pct(*keys: str) -> Callable[[dict], str]:
    return lambda d: " / ".join(f"{100 * d[k]:.1f}%" if k in d else MISSING for k in keys)


def num(*keys: str, digits: int = 3) -> Callable[[dict], str]:
    return lambda d: " / ".join(f"{d[k]:.{digits}f}" if k in d else MISSING for k in keys)


# (row label, cell from an eval JSON, goal or "")
ROWS: list[tuple[str, Callable[[dict], str], str]] = [
    ("referring Acc@0.5 (box refined with a proposal, the default)", pct("referring_acc@0.5"), ">= 90% (issue 4)"),
    ("referring Acc@0.5, the point head's own box (`refine=False`)", pct("referring_acc@0.5_regressed"), ""),
    (
        "referring mean IoU, refined / point head's box",
        num("referring_mean_iou", "referring_mean_iou_regressed"),
        "",
    ),
    ("referring mask IoU (mask decoder on the refined box)", num("mask_iou"), ">= 0.80 (issue 4)"),
    ("referring mask IoU (mask decoder on the point head's box)", num("mask_iou_regressed"), ""),
    ("region caption, color and shape right (box prompt)", pct("region_caption_acc_box"), ">= 90% (issue 4)"),
    (
        "region caption, color and shape right (point prompt; verified, the default)",
        pct("region_caption_acc_point"),
        "",
    ),
    (
        "region caption from a point, the decoder's words",
        pct("region_caption_acc_point_unverified"),
        "",
    ),
    (
        "caption word point in its object's box (object unnamed = miss; words refined with a proposal and verified, "
        "the default)",
        pct("caption_word_point_acc"),
        ">= 90% (issue 4)",
    ),
    (
        "caption word point, the words as decoded, placed as verifying placed them",
        pct("caption_word_point_acc_unverified"),
        "",
    ),
    (
        "caption word point, the default caption's words at the point head's own boxes",
        pct("caption_word_point_acc_regressed"),
        "",
    ),
    ("objects the whole-image caption names by color and shape", pct("caption_object_mention_rate"), ""),
    (
        "word point in its object's box, among named objects, refined / point head's",
        pct("caption_word_point_acc_mentioned", "caption_word_point_acc_mentioned_regressed"),
        "",
    ),
    (
        'caption phrases "<color> <shape>" that name an object (the rest: none, or one named before)',
        pct("caption_phrase_precision"),
        "",
    ),
    ("objects the whole-image caption names by color (any shape word)", pct("caption_object_color_rate"), ""),
    ("word point in its object's box, among objects named by color", pct("caption_word_point_acc_color_named"), ""),
    (
        "word point in its object's box, reference caption teacher-forced",
        pct("caption_word_point_acc_teacher_forced"),
        "",
    ),
    (
        "point error vs trace points, mean per coordinate (teacher-forced, original px)",
        num("point_l1_px", digits=1),
        "",
    ),
    (
        "BLEU-4 / ROUGE-L / CIDEr / METEOR (vs the scene's caption, PTB-tokenized)",
        lambda d: f"{d['bleu4']:.3f} / {d['rouge_l']:.3f} / {d['cider']:.2f} / {d['meteor']:.3f}",
        "",
    ),
    (
        "dense: objects found at IoU >= 0.5 with color and shape right (default threshold 0.3)",
        pct("dense_recall@0.5"),
        ">= 90% (issue 9)",
    ),
    ("dense: AP at IoU 0.5, any caption (proposals alone)", num("dense_ap@0.5_iou_any_caption"), ""),
    ("dense: VG densecap mAP (METEOR 1.5, exact matches, see below)", num("dense_map"), ""),
    ("dense: regions per image at threshold 0.3", num("dense_regions_per_image", digits=1), ""),
    ("objects per image", lambda d: f"{d['num_objects'] / d['num_scenes']:.1f}", ""),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evals", nargs="+", type=Path, help="pixelllm eval JSON files, one per column")
    columns = [json.loads(p.read_text()) for p in parser.parse_args().evals]
    for label, cell, goal in ROWS:
        cells = [_cell(cell, d) for d in columns]
        if goal:
            cells[0] = f"**{cells[0]}**"
        print(f"| {label} | {' | '.join(cells)} | {goal} |")


def _cell(cell: Callable[[dict], str], d: dict) -> str:
    """The formatted figure, or "-" where an older JSON lacks the metric."""
    try:
        return cell(d)
    except KeyError:
        return "-"


if __name__ == "__main__":
    main()
