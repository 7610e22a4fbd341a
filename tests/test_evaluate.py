"""Evaluation metrics with known answers."""

import json
import warnings
from collections import defaultdict

import numpy as np
import pytest

from pixelllm.data.synthetic import SceneObject
from pixelllm.evaluate import (
    _color_shape,
    _phrases,
    _readable,
    _referring_metrics,
    _share_true,
    _word_point_hits,
    box_iou,
    caption_scores,
    evaluate,
    mask_iou,
    ptb_tokenized,
    run_eval,
)
from pixelllm.predictor import Predictor, Word


def test_box_iou_known_values():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


def test_mask_iou_known_values():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True
    b[1:3] = True
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    assert mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 0.0


def test_color_and_shape_are_read_from_a_region_caption():
    assert _color_shape("a small green star.") == ("green", "star")
    assert _color_shape("a large thing") == (None, None)


def _obj(color: str, shape: str, box: tuple[float, float, float, float]) -> SceneObject:
    return SceneObject(shape, color, "small", "left", box, np.zeros((1, 1), bool), f"the {color} {shape}")


def test_word_points_are_matched_to_objects_by_color_and_shape():
    def word(text: str, point: tuple[float, float]) -> Word:
        return Word(text, 0, len(text), point, (point[0], point[1], point[0], point[1]), 1.0)

    words = [
        word("a", (0, 0)),
        word("red", (0, 0)),
        word("circle", (5, 5)),  # inside the first red circle
        word("and", (0, 0)),
        word("red", (0, 0)),
        word("circle", (50, 50)),  # outside the second red circle
        word("blue", (0, 0)),
        word("star", (1, 1)),
    ]
    objects = [
        _obj("red", "circle", (0, 0, 10, 10)),
        _obj("red", "circle", (20, 20, 30, 30)),
        _obj("green", "star", (0, 0, 10, 10)),  # named with the wrong color: not named
    ]
    hits = _word_point_hits(words, objects)
    assert hits == [True, False, None]
    # any shape after the color: the blue star still names nothing (its color is wrong), and a "red star"
    # would name a red circle
    assert _word_point_hits(words, objects, match_shape=False) == [True, False, None]
    red_star = [word("a", (0, 0)), word("red", (0, 0)), word("star", (25, 25))]
    assert _word_point_hits(red_star, objects) == [None, None, None]
    # the red star names one of the two red circles: the one its point is inside
    assert _word_point_hits(red_star, objects, match_shape=False) == [None, True, None]
    assert _share_true(hits) == 0.5
    # identical objects named in the other order: each phrase pairs with the object its point is inside
    swapped = [word("red", (0, 0)), word("circle", (25, 25)), word("red", (0, 0)), word("circle", (5, 5))]
    assert _word_point_hits(swapped, objects) == [True, True, None]
    # one phrase for two identical objects: one named (a hit, if its point is in either), one not
    assert _word_point_hits(swapped[:2], objects) == [None, True, None]
    assert _word_point_hits([word("red", (0, 0)), word("circle", (90, 90))], objects).count(None) == 2


def test_word_points_pair_phrases_by_size_and_position_before_points():
    def words_of(text: str, point: tuple[float, float]) -> list[Word]:
        return [Word(t, 0, len(t), point, (point[0], point[1], point[0], point[1]), 1.0) for t in text.split()]

    small_left = SceneObject("circle", "red", "small", "on the left", (0, 0, 10, 10), np.zeros((1, 1), bool), "")
    large_right = SceneObject("circle", "red", "large", "on the right", (50, 0, 90, 40), np.zeros((1, 1), bool), "")
    objects = [small_left, large_right]
    # the words name the large circle on the right; a point inside the small one does not move the phrase to it
    assert _word_point_hits(words_of("a large red circle on the right", (5, 5)), objects) == [None, False]
    assert _word_point_hits(words_of("a large red circle on the right", (60, 20)), objects) == [None, True]
    # size alone decides too, and a phrase whose words fit neither better goes where its point is
    assert _word_point_hits(words_of("a small red circle", (60, 20)), objects) == [False, None]
    assert _word_point_hits(words_of("a red circle", (60, 20)), objects) == [None, True]
    # a repeated phrase names one object; the share of phrases paired reports the other
    twice = words_of("a small red circle on the left", (60, 20)) + words_of(
        "and a small red circle on the left", (5, 5)
    )
    assert _word_point_hits(twice, [small_left]) == [True]
    assert len(_phrases(twice)) == 2
    assert _share_true([None]) == 0.0


def test_a_referring_text_longer_than_the_model_reads_is_cut_to_what_it_reads(tiny_model):
    predictor = Predictor(tiny_model)
    limit = tiny_model.cfg.language_model.max_text_tokens - 1
    short = "the large green circle on the left"
    assert _readable(predictor, short) == short
    long = " ".join(f"circle{i}" for i in range(100))
    cut = _readable(predictor, long)
    assert long.startswith(cut) and len(cut) < len(long)
    assert len(tiny_model.tokenizer.encode(cut, add_eos=False)) == limit
    predictor.check_text(cut)  # what is left, the model reads whole
    for many in ("\u00bd" * 60, "\u3392" * 60, "\ufb03 " * 50):  # one character, several tokens (NFKC)
        cut = _readable(predictor, many)
        assert many.startswith(cut) and 0 < len(tiny_model.tokenizer.encode(cut, add_eos=False)) <= limit
        predictor.check_text(cut)


def test_captions_are_scored_as_coco_tokenizes_them(monkeypatch, caplog):
    """Punctuation and case are not words: a caption with the reference's words scores as the reference itself
    (untokenized, "left," and "left" were different words). Without Java, a regex gives the same words here."""
    references = {
        0: ["A large red circle on the left, a small blue square."],
        1: ["a green star at the bottom, it's small."],
    }
    bare = {0: ["a large red circle on the left a small blue square"], 1: ["a green star at the bottom it's small"]}
    assert ptb_tokenized(references[1]) == ["a green star at the bottom it 's small"]
    same = caption_scores(references, {k: [v[0]] for k, v in references.items()})
    assert caption_scores(references, bare) == same
    assert same["bleu4"] == pytest.approx(1.0) and same["cider"] == pytest.approx(10.0)
    monkeypatch.setenv("PATH", "")  # no java
    with caplog.at_level("WARNING", logger="pixelllm.evaluate"):
        assert ptb_tokenized(references[0] + ["It's  here!"]) == [
            "a large red circle on the left a small blue square",
            "it's here",
        ]
    assert "PTB tokenizer (Java) did not run" in caplog.text


def test_an_eval_folder_without_scenes_names_its_file(tmp_path, tiny_model):
    """`pixelllm eval --data` on a folder with no scenes: one clear error, not numpy's "Mean of empty slice" and
    CIDEr's `max() arg is an empty sequence`."""
    (tmp_path / "annotations.jsonl").write_text("\n")
    (tmp_path / "narratives.jsonl").write_text("")
    tiny_model.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=f"{tmp_path / 'annotations.jsonl'} holds no scenes: write some with"):
        run_eval(str(tmp_path / "model"), None, str(tmp_path), 1, 0, "synthetic")
    with pytest.raises(ValueError, match="no scenes to evaluate"):
        evaluate(Predictor(tiny_model), iter([]), 0)


def test_a_metric_without_samples_is_null_not_nan():
    """RefCOCO sentences all dropped, or scenes without objects: null in the JSON (NaN is not JSON), no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = _referring_metrics(defaultdict(list))
    assert metrics["referring_acc@0.5"] is None and metrics["mask_iou_regressed"] is None
    json.dumps(metrics, allow_nan=False)
