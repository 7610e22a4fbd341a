"""Refined captions on the shipped default model: every located word snapped to its nearest object proposal,
the point head's box kept in `regressed_box` (`Predictor.caption(refine=True)`, the default; without the
verification that follows it, see test_caption_verify.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from conftest import run_probe
from server_helpers import DEFAULT_MODEL_DIR

from pixelllm import PixelLLM, Predictor
from pixelllm.data.independent import render_independent_scene
from pixelllm.data.synthetic import scene_seed
from pixelllm.evaluate import _word_point_hits
from pixelllm.predictor import LOCATED_SCORE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(PixelLLM.from_pretrained(str(DEFAULT_MODEL_DIR)))


@contextmanager
def shifted_confidence(model, shift: float) -> Iterator[None]:
    """Shift the point head's confidence logit: every word located (shift > 0) or none (shift < 0)."""
    bias = model.point_head.mlp[-1].bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias[4] += shift
    try:
        yield
    finally:
        with torch.no_grad():
            bias.copy_(saved)


def centre(box) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


@pytest.mark.parametrize("prompt", [{}, {"box": (20, 30, 200, 180)}], ids=["image", "box"])
def test_located_words_take_the_nearest_proposal(predictor, prompt):
    predictor.set_image(render_independent_scene(scene_seed(77, 0)).image)
    refined = predictor.caption(verify=False, **prompt)
    plain = predictor.caption(refine=False, **prompt)
    proposals = [r.box for r in predictor.dense_caption()]  # the proposals dense captioning sees
    assert refined.text == plain.text and len(proposals) >= 2
    assert all(w.regressed_box is None for w in plain.words)
    moved = 0
    for word, before in zip(refined.words, plain.words):
        assert (word.text, word.start, word.end, word.score) == (before.text, before.start, before.end, before.score)
        if before.score < LOCATED_SCORE:
            assert word == before
            continue
        nearest = min(proposals, key=lambda p: sum(abs(a - b) for a, b in zip(centre(p), centre(before.box))))
        assert word.box == pytest.approx(nearest, abs=1e-3) and word.point == pytest.approx(centre(word.box))
        assert word.regressed_box == before.box
        moved += word.box != pytest.approx(before.box)
    assert moved >= 1


def test_words_without_a_location_stay(predictor):
    predictor.set_image(render_independent_scene(scene_seed(77, 1)).image)
    with shifted_confidence(predictor.model, -40.0):
        refined = predictor.caption()
        plain = predictor.caption(refine=False)
    assert refined.words and all(w.score < LOCATED_SCORE for w in refined.words)
    assert refined.words == plain.words


def test_snapped_words_put_more_object_points_inside_their_object(predictor):
    """The reason for the default: on 100 scenes of seed 77 (never the held-out seed) more of the refined captions'
    shape words land inside their object's box than the point head's own do."""
    refined_hits, plain_hits = 0, 0
    for i in range(100):
        scene = render_independent_scene(scene_seed(77, i))
        predictor.set_image(scene.image)
        refined, plain = predictor.caption(verify=False), predictor.caption(refine=False)
        refined_hits += sum(h is True for h in _word_point_hits(refined.words, scene.objects))
        plain_hits += sum(h is True for h in _word_point_hits(plain.words, scene.objects))
    assert refined_hits > plain_hits


def test_word_refine_probe_rules_include_the_predictors(tmp_path):
    """scripts/word_refine_probe.py: its 'nearest_located' rule, applied to the point head's words, scores what
    `Predictor.caption` answers before verifying."""
    table = run_probe("word_refine_probe.py", tmp_path, "--num-scenes", "6")
    assert table["objects"] >= 10 and table["seed"] == 77
    assert table["nearest_located"]["word_point"] == table["predictor_refined"]
    assert table["nearest"]["word_point"] >= table["none"]["word_point"]
