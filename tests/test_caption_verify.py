"""Verified captions (`Predictor.caption(verify=True)`, the default): the attribute words of a refined caption's
phrases checked against the model's own region caption of the proposal each phrase was snapped to."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import record_decoded, run_probe
from server_helpers import DEFAULT_MODEL_DIR

from pixelllm import GenerationCancelled, PixelLLM, Predictor
from pixelllm.config import load_config
from pixelllm.data.independent import render_independent_scene
from pixelllm.data.synthetic import COLORS, SHAPES, SIZES, scene_seed
from pixelllm.evaluate import _unverified_words, _word_point_hits
from pixelllm.predictor import Caption, Word, _rewrite, centre
from pixelllm.tokenizer import EOS_ID, words_with_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

BOX_A, BOX_B = (10.0, 10.0, 50.0, 50.0), (60.0, 10.0, 90.0, 40.0)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(PixelLLM.from_pretrained(str(DEFAULT_MODEL_DIR)))


def word(text: str, start: int, box=BOX_A, snapped: bool = True) -> Word:
    return Word(text, start, start + len(text), (0.0, 0.0), box, 1.0, box if snapped else None)


def test_the_default_models_attribute_words_are_the_synthetic_vocabulary():
    shipped = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["attribute_words"]
    expected = {"size": list(SIZES), "color": list(COLORS), "shape": list(SHAPES)}
    assert shipped == expected == load_config("pixelllm-tiny").attribute_words


def test_punctuation_ends_a_phrase_and_case_is_kept(predictor):
    # "Red star, blue circle": two phrases; the region caption of the star's proposal says "green star"
    words = [word("Red", 0), word("star", 4), word("blue", 10, BOX_B), word("circle", 15, BOX_B)]
    assert predictor._attribute_runs(words) == [[0, 1], [2, 3]]
    assert predictor._ground_phrases(words, [BOX_A, BOX_B], set())[1] == [BOX_A, BOX_A, BOX_B, BOX_B]
    green = predictor._verified(words[0], {"color": "green", "shape": "star"})
    assert (green.text, green.generated_text) == ("Green", "Red")
    assert predictor._verified(words[1], {"color": "green", "shape": "star"}) == words[1]


def test_a_phrase_is_checked_against_the_proposal_it_is_placed_on(predictor):
    # "a large blue triangle on the left and a red star": the point head put "large blue" on another object
    words = [
        word("a", 0),
        word("large", 2, BOX_B),
        word("blue", 8, BOX_B),
        word("triangle", 13, BOX_A),
        word("on", 22),
        word("the", 25),
        word("left", 29),
        word("and", 34),
        word("a", 38),
        word("red", 40, snapped=False),
        word("star", 44, snapped=False),
    ]
    grounded, regions = predictor._ground_phrases(words, [BOX_A, BOX_B], set())
    assert regions == [None] + [BOX_A] * 3 + [None] * 7 and [w.box for w in grounded[1:4]] == [BOX_A] * 3
    # the head unsnapped, "on the left" snapped to B: the whole run is still checked there, the head not moved
    words[3] = replace(words[3], regressed_box=None)
    words[4:7] = [replace(w, box=BOX_B) for w in words[4:7]]
    grounded, regions = predictor._ground_phrases(words, [BOX_A, BOX_B], set())
    assert regions == [None] + [BOX_B] * 3 + [None] * 7
    assert [w.box for w in grounded[1:4]] == [BOX_B, BOX_B, BOX_A]


def test_rewrite_keeps_the_text_between_words_and_moves_the_offsets():
    caption = Caption("a red star, a big blue circle.", [], 0.5)
    caption.words = [word("a", 0), word("red", 2), word("star", 6), word("a", 12), word("big", 14), word("blue", 18)]
    caption.words.append(word("circle", 23))
    changed = list(caption.words)
    changed[2] = Word("diamond", 6, 10, (0.0, 0.0), BOX_A, 1.0, BOX_A, generated_text="star")
    changed[5] = Word("red", 18, 22, (0.0, 0.0), BOX_A, 1.0, BOX_A, generated_text="blue")
    out = _rewrite(caption, changed)
    assert out.text == "a red diamond, a big red circle." and out.score == 0.5
    assert [out.text[w.start : w.end] for w in out.words] == [w.text for w in changed]
    assert _rewrite(caption, caption.words) == caption


def test_a_wrong_shape_word_takes_the_region_captions(predictor):
    """Seed 77 scene 6 (never the held-out seed): one small orange star, which the decoder calls a diamond."""
    scene = render_independent_scene(scene_seed(77, 6))
    assert [(o.size, o.color, o.shape) for o in scene.objects] == [("small", "orange", "star")]
    predictor.set_image(scene.image)
    plain, verified = predictor.caption(verify=False), predictor.caption()
    assert "diamond" in plain.text and "star" in verified.text and "diamond" not in verified.text
    changed = [w for w in verified.words if w.generated_text is not None]
    assert [(w.generated_text, w.text) for w in changed] == [("diamond", "star")]
    assert [verified.text[w.start : w.end] for w in verified.words] == [w.text for w in verified.words]
    assert [(w.box, w.score) for w in verified.words] == [(w.box, w.score) for w in plain.words]
    assert _word_point_hits(plain.words, scene.objects) == [None]
    assert _word_point_hits(verified.words, scene.objects) == [True]
    assert [w.text for w in _unverified_words(verified.words)] == [w.text for w in plain.words]


@pytest.mark.parametrize("index", [2, 3, 6, 22])
def test_the_stream_verifies_as_the_caption_does(predictor, index):
    """Seed 77 scenes of one to four phrases: the stream captions each phrase's region alone, the batch all at once."""
    predictor.set_image(render_independent_scene(scene_seed(77, index)).image)
    stream = predictor.caption_stream()
    words = []
    while True:
        try:
            words.append(next(stream))
        except StopIteration as end:
            streamed = end.value
            break
    caption = predictor.caption()
    assert streamed.text == caption.text and streamed.words == words
    assert [(w.text, w.start, w.end, w.generated_text) for w in words] == [
        (w.text, w.start, w.end, w.generated_text) for w in caption.words
    ]


def test_verify_needs_refine_and_attribute_words(predictor, monkeypatch):
    predictor.set_image(render_independent_scene(scene_seed(77, 6)).image)
    assert "diamond" in predictor.caption(refine=False).text
    assert predictor.caption(refine=False) == predictor.caption(refine=False, verify=False)
    monkeypatch.setattr(predictor, "_attribute_class", {})  # a model whose config names no attribute words
    assert "diamond" in predictor.caption().text
    assert predictor.caption() == predictor.caption(verify=False)


def test_verified_captions_name_more_objects_right(predictor):
    """The reason for the default: on 60 scenes of seed 77 more objects' shape words land in their box."""
    verified_hits, plain_hits = 0, 0
    for i in range(60):
        scene = render_independent_scene(scene_seed(77, i))
        predictor.set_image(scene.image)
        verified_hits += sum(h is True for h in _word_point_hits(predictor.caption().words, scene.objects))
        plain_hits += sum(h is True for h in _word_point_hits(predictor.caption(verify=False).words, scene.objects))
    assert verified_hits > plain_hits


def test_verify_probe_rules_include_the_predictors(tmp_path):
    """scripts/verify_probe.py is wired to the predictor: its 'grounded' rule calls `Predictor`'s own verification,
    so it scores what `Predictor.caption` answers. And the rule does its job: on these scenes (18 objects) it puts
    more shape words in their object's box than no check (measured: 100% against 67%; 92% against 72% on 40)."""
    table = run_probe("verify_probe.py", tmp_path, "--num-scenes", "8")
    assert table["objects"] >= 12 and table["seed"] == 77
    assert {"none", "per_word", "phrase", "grounded_head", "grounded"} <= set(table)
    assert table["grounded"]["word_point"] == table["predictor_verified"]
    assert table["grounded"]["word_point"] > table["none"]["word_point"]
    assert set(table["median_ms_per_caption"]) == {"refined", "verified"}


def test_the_stream_holds_an_attribute_phrase_until_the_word_after_it(predictor, monkeypatch):
    """Each word comes once the next word begins, except that the words of an attribute phrase ("small orange star
    at the top") all wait until the word after the phrase is complete: its words decide where the phrase is."""
    predictor.set_image(render_independent_scene(scene_seed(77, 6)).image)
    model = predictor.model
    decoded = record_decoded(model, monkeypatch)
    stream = predictor.caption_stream()
    steps_at_word = [len(decoded) for _ in iter(lambda: next(stream, None), None)]
    ids = [i for i in decoded if i != EOS_ID]
    text, spans = model.tokenizer.decode_with_spans(ids)
    groups = words_with_tokens(text, spans)
    final = [members[0] + 1 for _, _, members in groups[1:]] + [len(decoded)]  # when each word is complete
    released = list(final)
    words = [word(text[s:e], s) for s, e, _ in groups]
    phrases = predictor._attribute_phrases(words)
    for run, span in phrases:
        for i in range(run[0], span[-1] + 1):
            released[i] = final[min(span[-1] + 1, len(groups) - 1)]
    assert sum(len(run) for run, _ in phrases) >= 3 and max(len(span) for _, span in phrases) >= 3
    assert steps_at_word == released


def test_a_phrase_runs_from_its_attribute_words_to_punctuation_or_the_next_phrase(predictor):
    text = "a large blue triangle on the left and a red star, a green circle."
    starts = [0, 2, 8, 13, 22, 25, 29, 34, 38, 40, 44, 50, 52, 58]
    words = [word(t, s) for t, s in zip(text.replace(",", "").replace(".", "").split(), starts)]
    assert [w.text for w in words] == [text[w.start : w.end] for w in words]
    assert predictor._attribute_phrases(words) == [([1, 2, 3], [3, 4, 5, 6, 7, 8]), ([9, 10], [10]), ([12, 13], [13])]
    assert [predictor._continues_phrase(a, b) for a, b in zip(words, words[1:])] == [
        False, True, True, True, True, True, True, True, False, True, False, False, True,
    ]  # fmt: skip


def test_a_phrase_is_placed_where_most_of_its_words_from_the_head_on_were_snapped(predictor):
    # "a red star at the top": "star at" on A, "the top" on B; the most votes win, ties go to the latest word
    words = [word("a", 0), word("red", 2), word("star", 6), word("at", 11), word("the", 14, BOX_B)]
    words += [word("top", 18, BOX_B)]
    assert predictor._anchor(words, [2, 3, 4, 5]) is words[5]
    assert predictor._anchor(words, [2, 3, 4]) is words[3]
    assert predictor._anchor(words, [3, 4]) is words[4]
    unsnapped = [replace(w, regressed_box=None) for w in words]
    assert predictor._anchor(unsnapped, [2, 3, 4, 5]) is None
    grounded, _ = predictor._ground_phrases(words, [BOX_A, BOX_B], taken := set())
    assert [w.box for w in grounded] == [BOX_A, BOX_B, BOX_B, BOX_A, BOX_B, BOX_B] and taken == {BOX_B}
    assert grounded[2].point == (75.0, 25.0) and grounded[2].regressed_box == BOX_A  # the point head's box kept


def test_a_phrase_that_repeats_an_earlier_ones_proposal_moves_to_the_nearest_free_one(predictor):
    # "red star, red star, red star": all three on A; the point head put the second nearer C than B
    box_c = (0.0, 60.0, 20.0, 80.0)
    words = [word("red", 0), word("star", 4), word("red", 10), word("star", 14), word("red", 20), word("star", 24)]
    words[3] = replace(words[3], regressed_box=(0.0, 40.0, 10.0, 50.0))
    grounded, _ = predictor._ground_phrases(words, [BOX_A, BOX_B, None, box_c], taken := set())
    assert [w.box for w in grounded] == [BOX_A, BOX_A, box_c, box_c, BOX_B, BOX_B]
    assert taken == {BOX_A, BOX_B, box_c}
    again, _ = predictor._ground_phrases(words[:2], [BOX_A, BOX_B, box_c], taken)  # none left: it stays
    assert [w.box for w in again] == [BOX_A, BOX_A]


def test_a_moved_phrase_takes_its_position_words_along(predictor):
    # "red star on top and a red star on top": both on A; the second moves to B, with its "on top" (snapped to A,
    # its anchor's proposal) but not "left" (snapped to C, it did not vote for A)
    box_c = (0.0, 60.0, 20.0, 80.0)
    words = [word("red", 0), word("star", 4), word("on", 9), word("top", 12), word("and", 16), word("a", 20)]
    words += [word("red", 22), word("star", 26), word("on", 31), word("top", 34), word("left", 38, box_c)]
    grounded, regions = predictor._ground_phrases(words, [BOX_A, BOX_B, box_c], set())
    assert [w.box for w in grounded] == [BOX_A] * 6 + [BOX_B] * 4 + [box_c]
    assert grounded[9].point == centre(BOX_B) and grounded[9].regressed_box == BOX_A
    assert regions == [BOX_A, BOX_A] + [None] * 4 + [BOX_B, BOX_B] + [None] * 3


def test_beam_search_answers_its_likeliest_beam_with_a_repeated_phrase_moved(predictor):
    """Seed 77 scene 22 (a blue circle, an orange triangle, two purple diamonds): the likeliest of 3 beams names the
    large blue circle twice and one diamond; verified, that beam's repeat moves to the diamond it left out."""
    scene = render_independent_scene(scene_seed(77, 22))
    predictor.set_image(scene.image)
    emb = predictor._current()
    beams = predictor.model.generate_n_best(emb.features, predictor._location_prompts([emb], None, None), 3)[0]
    likeliest = predictor._caption(beams[0], emb.transform)
    assert likeliest.text.count("large blue circle") == 2 and likeliest.text.count("purple diamond") == 1
    plain = predictor.caption(num_beams=3, verify=False)
    assert plain.text == likeliest.text
    verified = predictor.caption(num_beams=3)
    assert [w.text for w in _unverified_words(verified.words)] == [w.text for w in likeliest.words]
    assert verified.text.count("large blue circle") == 1 and verified.text.count("large purple diamond") == 2
    hits = _word_point_hits(verified.words, scene.objects)
    assert hits.count(True) == len(scene.objects) > _word_point_hits(plain.words, scene.objects).count(True)


def test_verification_asks_should_stop_too(predictor):
    emb = predictor.embed(render_independent_scene(scene_seed(77, 6)).image)
    asked: list[int] = []

    def should_stop() -> bool:
        asked.append(1)
        return False

    predictor.caption_embeddings([emb], should_stop=should_stop, verify=False)
    unverified = len(asked)
    asked.clear()
    predictor.caption_embeddings([emb], should_stop=should_stop)
    assert len(asked) > unverified  # the region captions' decoder steps ask too
    asked.clear()
    with pytest.raises(GenerationCancelled):  # the first question the verification asks stops it
        predictor.caption_embeddings([emb], should_stop=lambda: len(asked) >= unverified or bool(asked.append(1)))


def test_beam_rerank_probe_choices_include_the_predictors(tmp_path):
    """scripts/beam_rerank_probe.py is wired to the predictor: its 'top' choice, built from `Predictor`'s own
    refining and verification helpers, scores what `Predictor.caption` answers with beam search."""
    table = run_probe("beam_rerank_probe.py", tmp_path, "--num-scenes", "8", "--num-beams", "3")
    row = table["beams"]["3"]
    assert table["objects"] >= 12 and table["seed"] == 77
    assert row["top"] == row["predictor"]
