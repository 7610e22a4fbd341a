"""`Predictor.caption_stream` and `pixelllm caption --stream` on the shipped default model, whose captions
have punctuation and words of several tokens ('bot'+'tom'): each word comes once it is complete, and the
words and the returned caption equal the greedy `caption()`."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import record_decoded
from PIL import Image
from server_helpers import DEFAULT_MODEL_DIR, ROOT

from pixelllm import PixelLLM, Predictor
from pixelllm.cli import main
from pixelllm.tokenizer import EOS_ID, words_with_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = str(DEFAULT_MODEL_DIR)
SAMPLE = str(ROOT / "assets" / "sample.jpg")
PROMPTS = [{}, {"box": (40, 60, 300, 320)}, {"point": (120, 260)}]


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    p = Predictor(PixelLLM.from_pretrained(MODEL))
    p.set_image(Image.open(SAMPLE))
    return p


def drain(stream):
    """The words a `caption_stream` yields, and the caption it returns."""
    words = []
    while True:
        try:
            words.append(next(stream))
        except StopIteration as end:
            return words, end.value


def assert_same_words(got, expected) -> None:
    assert [(w.text, w.start, w.end) for w in got] == [(w.text, w.start, w.end) for w in expected]
    for a, b in zip(got, expected):  # the point head per step vs once over all steps: float rounding only
        assert a.box == pytest.approx(b.box, abs=1e-3) and a.point == pytest.approx(b.point, abs=1e-3)
        assert a.score == pytest.approx(b.score, abs=1e-5)


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: next(iter(p), "image"))
def test_stream_equals_the_greedy_caption(predictor, prompt):
    expected = predictor.caption(max_new_tokens=32, **prompt)
    words, caption = drain(predictor.caption_stream(max_new_tokens=32, **prompt))
    assert len(words) >= 3, expected.text
    assert caption.words == words
    assert caption.text == expected.text
    assert caption.score == pytest.approx(expected.score, rel=1e-5)
    assert_same_words(words, expected.words)


def test_each_word_comes_as_soon_as_the_next_one_begins(predictor, monkeypatch):
    """A word is complete when a token of the next word is decoded (not before: its last token may follow).
    Unverified: a verified attribute phrase waits for the word after it (test_caption_verify.py)."""
    model = predictor.model
    decoded = record_decoded(model, monkeypatch)  # token ids decoded so far
    stream = predictor.caption_stream(verify=False)
    steps_at_word = []  # tokens decoded when each word was yielded
    while True:
        try:
            next(stream)
        except StopIteration as end:
            caption = end.value
            break
        steps_at_word.append(len(decoded))
    words = caption.words
    ids = [i for i in decoded if i != EOS_ID]
    text, spans = model.tokenizer.decode_with_spans(ids)
    assert text == caption.text
    groups = words_with_tokens(text, spans)
    assert any(len(members) > 1 for _, _, members in groups), "no word of several tokens: the test is vacuous"
    assert [text[s:e] for s, e, _ in groups] == [w.text for w in words]
    # word i is yielded right after decoding the first token of word i+1; the last word at the end
    expected = [members[0] + 1 for _, _, members in groups[1:]] + [len(decoded)]
    assert steps_at_word == expected
    assert steps_at_word[0] < len(decoded) / 4


def test_cli_stream_prints_each_word_then_the_caption(capsys, predictor):
    expected = predictor.caption(max_new_tokens=12)
    assert main(["caption", SAMPLE, "--model", MODEL, "--stream", "--json", "--max-new-tokens", "12"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    *words, final = lines
    assert final["text"] == expected.text and final["words"] == words
    assert [w["text"] for w in words] == [w.text for w in expected.words]
    assert set(words[0]) == {f.name for f in dataclasses.fields(expected.words[0])}

    assert main(["caption", SAMPLE, "--model", MODEL, "--stream", "--max-new-tokens", "12"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == expected.text
    assert [line.split()[0] for line in lines[:-1]] == [w.text for w in expected.words]
    assert all("point=(" in line and "box=(" in line for line in lines[:-1])


def test_cli_stream_refuses_beam_search(capsys):
    assert main(["caption", SAMPLE, "--model", MODEL, "--stream", "--num-beams", "3"]) == 2
    assert "--stream decodes greedily" in capsys.readouterr().err
