"""The shipped default model reproduces its model card: `pixelllm eval` on the first scenes of the card's
held-out set (independent renderer, seed 1000) lands within sampling noise of the card's 500-scene figures."""

from __future__ import annotations

import functools
import itertools
import json
import math
import subprocess
import sys

import pytest
import torch
from server_helpers import DEFAULT_MODEL_DIR, ROOT

from pixelllm.build import load_model
from pixelllm.evaluate import evaluate, generated_scenes
from pixelllm.predictor import Predictor

NUM_SCENES = 100

pytestmark = pytest.mark.usefixtures("one_thread")


def evaluate_subset(num_beams: int) -> dict:
    """`pixelllm eval`'s figures on the first `NUM_SCENES` of the card's held-out scenes."""
    with torch.no_grad():
        scenes = generated_scenes(NUM_SCENES, 1000, "independent")
        return evaluate(Predictor(load_model(DEFAULT_MODEL_DIR)), scenes, num_beams=num_beams)


def assert_share_matches(card: dict, subset: dict, metric: str) -> None:
    """A share over the subset's objects is within 3 binomial standard deviations of the card's share."""
    p, n = card[metric], subset["num_objects"]
    assert abs(subset[metric] - p) <= 3 * math.sqrt(p * (1 - p) / n), (metric, subset[metric], p)


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((DEFAULT_MODEL_DIR / "eval_independent_seed1000.json").read_text())


@pytest.fixture(scope="module")
def subset(one_thread) -> dict:
    return evaluate_subset(num_beams=1)


@pytest.mark.parametrize(
    "metric",
    [
        "referring_acc@0.5",
        "region_caption_acc_box",
        "region_caption_acc_point",
        "caption_word_point_acc",
        "caption_word_point_acc_unverified",
        "caption_word_point_acc_regressed",
        "caption_word_point_acc_teacher_forced",
        "dense_recall@0.5",
    ],
)
def test_object_shares_match_the_card(card: dict, subset: dict, metric: str) -> None:
    assert_share_matches(card, subset, metric)


@functools.cache
def beam_subset(num_beams: int) -> dict:
    return evaluate_subset(num_beams)


@pytest.mark.parametrize("num_beams", [3, 5])
@pytest.mark.parametrize("metric", ["caption_word_point_acc", "caption_object_mention_rate", "region_caption_acc_box"])
def test_beam_search_shares_match_the_card(num_beams: int, metric: str) -> None:
    """The card's `--num-beams 3` and `--num-beams 5` figures, reproduced the same way on the subset."""
    card = json.loads((DEFAULT_MODEL_DIR / f"eval_independent_seed1000_beams{num_beams}.json").read_text())
    subset = beam_subset(num_beams)
    assert card["num_beams"] == subset["num_beams"] == num_beams
    assert_share_matches(card, subset, metric)


@pytest.mark.parametrize("metric", ["referring_mean_iou", "mask_iou"])
def test_mean_ious_match_the_card(card: dict, subset: dict, metric: str) -> None:
    assert abs(subset[metric] - card[metric]) <= 0.05, (metric, subset[metric], card[metric])


def test_subset_is_the_start_of_the_card_set(card: dict, subset: dict) -> None:
    assert card["num_scenes"] >= 500 and card["data"] == "independent renderer, seed 1000"
    assert subset["num_scenes"] == NUM_SCENES


def test_card_table_shows_the_shipped_eval_files() -> None:
    """The card's held-out table (labels, the shipped model's two columns, goals) is what
    `scripts/card_table.py` prints from the JSON files beside it."""
    evals = [str(DEFAULT_MODEL_DIR / f"eval_{r}_seed1000.json") for r in ("independent", "synthetic")]
    printed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "card_table.py"), *evals], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    lines = (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text().splitlines()
    card_rows = {line.split(" | ")[0]: line.split(" | ") for line in lines}
    header = next(i for i, line in enumerate(lines) if line.startswith("| metric | independent | training renderer"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[header + 2 :]))
    assert len(printed) == len(table) >= 17  # no row missing from the card, none left over
    for line in printed:
        cells = line.split(" | ")
        row = card_rows.get(cells[0], [])
        assert row[:3] == cells[:3] and row[-1:] == cells[-1:], line
