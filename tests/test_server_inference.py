"""The service's model side: LoRA folded into the base weights once, outputs unchanged; the work of requests
whose callers left is skipped or stopped; requests that ask the same decoding share a call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import perturb_
from peft.tuners.lora import LoraLayer
from PIL import Image
from server_helpers import DEFAULT_MODEL_DIR

from pixelllm import Predictor, build_pixelllm
from pixelllm.config import load_config
from pixelllm.data.synthetic import generate_scene
from server import Settings
from server.cache import EmbeddingCache
from server.inference import Job, load_predictor, run_jobs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_service_merges_lora_and_answers_as_the_unmerged_model(tmp_path):
    cfg = load_config("pixelllm-tiny")
    cfg.language_model.mode = "lora"
    torch.manual_seed(0)
    model = build_pixelllm(cfg).eval()
    perturb_(torch.nn.ParameterList([p for n, p in model.named_parameters() if ".lora_B" in n]), seed=0, scale=0.5)
    model.save_pretrained(tmp_path / "lora-tiny")

    predictor, name = load_predictor(Settings(model=str(tmp_path / "lora-tiny"), device="cpu"))
    layers = [m for m in predictor.model.modules() if isinstance(m, LoraLayer)]
    assert name == "pixelllm-tiny" and layers and all(m.merged for m in layers)

    image = generate_scene(3).image
    unmerged = Predictor(model)
    for p in (predictor, unmerged):
        p.set_image(image)
    served, reference = predictor.caption(max_new_tokens=8), unmerged.caption(max_new_tokens=8)
    assert served.text == reference.text
    for a, b in zip(served.words, reference.words):
        assert a.point == pytest.approx(b.point, abs=1e-3)


def test_abandoned_jobs_are_skipped_and_their_decoding_stops(monkeypatch):
    """One job abandoned before its batch (nothing runs for it, though a live job shares its image), one
    abandoned after two decoder steps (its caption call stops at the next step), one kept (answered as alone)."""
    predictor, _ = load_predictor(Settings(model=str(DEFAULT_MODEL_DIR), device="cpu"))
    monkeypatch.setattr(predictor, "_attribute_class", {})  # unverified: the test counts the captions' own steps
    images = [Image.fromarray(generate_scene(seed).image) for seed in (11, 12, 13)]
    gone = Job(key="gone", image=images[0], prompts=[(None, None)], texts=["the object"])
    leaving = Job(key="leaving", image=images[1], prompts=[(None, None)], max_new_tokens=24)
    staying = Job(key="staying", image=images[2], prompts=[(None, None)], max_new_tokens=12)
    sharing = Job(key="gone", image=images[0], texts=["the object"])
    gone.abandoned.set()
    predictor.set_image(images[0])
    located = predictor.localize("the object")
    predictor.set_image(images[1])
    assert len(predictor.caption(max_new_tokens=24).words) >= 3  # so two decoder steps do not finish it
    predictor.set_image(images[2])
    decode, steps = predictor.model.language_model.decode, []

    def counting_decode(*args, **kwargs):
        steps.append(len(args[0]))  # decoder rows
        if len(steps) == 2:
            leaving.abandoned.set()
        return decode(*args, **kwargs)

    monkeypatch.setattr(predictor.model.language_model, "decode", counting_decode)
    alone, alone_steps = predictor.caption(max_new_tokens=12), len(steps)
    leaving.abandoned.clear()  # the count above set it
    steps.clear()

    cache, reported = EmbeddingCache(8, 1 << 30), []
    results = run_jobs(predictor, cache, [gone, leaving, staying, sharing], on_abandoned=reported.append)

    assert all(cache.get(key) is not None for key in ("gone", "leaving", "staying"))  # "gone" for `sharing`
    assert results[0].captions == [None] and results[0].localizations == [None]
    assert results[3].localizations[0].box == located.box
    assert results[1].captions == [None]
    # two steps of `leaving`, then `staying` as when alone, then one teacher-forced pass localizing for `sharing`
    assert steps == [1] * (2 + alone_steps + 1)
    served = results[2].captions[0]
    assert served.text == alone.text
    # the served embedding came from an encoder batch of two: its visual tokens may differ in the last float bits
    np.testing.assert_allclose([w.point for w in served.words], [w.point for w in alone.words], rtol=0, atol=1e-3)
    assert reported == [2]


def test_a_call_runs_on_for_its_live_jobs_and_later_calls_drop_the_abandoned(monkeypatch):
    """`leaving` shares `partner`'s caption call and is abandoned after two decoder steps: the call goes on
    for `partner`, answered as alone. `late` is abandoned during `partner`'s localization: its own
    localization (another mask flag, so another call) and its dense captions do not run at all."""
    predictor, _ = load_predictor(Settings(model=str(DEFAULT_MODEL_DIR), device="cpu"))
    monkeypatch.setattr(predictor, "_attribute_class", {})  # unverified: the test counts the captions' own steps
    images = [Image.fromarray(generate_scene(seed).image) for seed in (12, 13, 14)]
    partner = Job(key="partner", image=images[0], prompts=[(None, None)], texts=["the object"], max_new_tokens=24)
    leaving = Job(key="leaving", image=images[1], prompts=[(None, None)], max_new_tokens=24)
    late = Job(key="late", image=images[2], texts=["the object"], mask=True, dense=(0.3, 0.5, 8))
    predictor.set_image(images[0])
    caption, located = predictor.caption(max_new_tokens=24), predictor.localize("the object")
    decode, rows = predictor.model.language_model.decode, []

    def counting_decode(*args, **kwargs):
        rows.append(len(args[0]))  # decoder rows of this call
        if len(rows) == 2:
            leaving.abandoned.set()
        if rows[-1] == 1:  # the first localization call: `partner`'s
            late.abandoned.set()
        return decode(*args, **kwargs)

    monkeypatch.setattr(predictor.model.language_model, "decode", counting_decode)
    monkeypatch.setattr(predictor, "dense_caption_embeddings", lambda *a, **k: pytest.fail("dense call ran"))
    reported = []
    results = run_jobs(predictor, EmbeddingCache(8, 1 << 30), [partner, leaving, late], on_abandoned=reported.append)

    served = results[0].captions[0]  # batched with another row: the same words, points equal to float precision
    assert served.text == caption.text
    np.testing.assert_allclose([w.point for w in served.words], [w.point for w in caption.words], atol=1e-3)
    assert results[0].localizations[0].box == pytest.approx(located.box, abs=1e-3)
    assert len(rows) > 3 and rows[:-1] == [2] * (len(rows) - 1) and rows[-1] == 1  # no second localization call
    assert results[2].localizations == [None] and results[2].regions == []
    assert reported == [2]


def test_the_default_decoding_length_and_that_number_given_share_one_caption_call(monkeypatch):
    predictor, _ = load_predictor(Settings(model=str(DEFAULT_MODEL_DIR), device="cpu"))
    monkeypatch.setattr(predictor, "_attribute_class", {})  # unverified: one caption call per group, no more
    default = predictor.model.cfg.language_model.max_text_tokens
    images = [Image.fromarray(generate_scene(seed).image) for seed in (15, 16, 17)]
    jobs = [
        Job(key="default", image=images[0], prompts=[(None, None)]),
        Job(key="given", image=images[1], prompts=[(None, None)], max_new_tokens=default),
        Job(key="shorter", image=images[2], prompts=[(None, None)], max_new_tokens=4),
    ]
    caption_embeddings, calls = predictor.caption_embeddings, []

    def recording(embeddings, *args, **kwargs):
        calls.append((len(embeddings), kwargs["max_new_tokens"]))
        return caption_embeddings(embeddings, *args, **kwargs)

    monkeypatch.setattr(predictor, "caption_embeddings", recording)
    results = run_jobs(predictor, EmbeddingCache(8, 1 << 30), jobs)

    assert calls == [(2, default), (1, 4)]
    assert all(r.captions[0] is not None for r in results)
