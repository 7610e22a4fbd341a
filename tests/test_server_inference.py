"""The service's model loading: LoRA folded into the base weights once, outputs unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_
from peft.tuners.lora import LoraLayer

from pixelllm import Predictor, build_pixelllm
from pixelllm.config import load_config
from pixelllm.data.synthetic import generate_scene
from server import Settings
from server.inference import load_predictor

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
