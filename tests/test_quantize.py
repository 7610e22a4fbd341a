"""int8 language model (`PixelLLM.quantize_language_model`): every T5 linear layer int8, with LoRA folded in and
gone; inference only, and said so. How close the shipped model's answers stay to float32: test_dtypes."""

from __future__ import annotations

import json

import pydantic
import pytest
import torch
from conftest import perturb_
from peft.tuners.lora import LoraLayer
from server_helpers import ROOT

from pixelllm import PixelLLM, build_pixelllm
from pixelllm.cli import main
from pixelllm.config import load_config
from server import Settings
from server.inference import load_predictor

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def lora_model():
    cfg = load_config("pixelllm-tiny")
    cfg.language_model.mode = "lora"
    torch.manual_seed(0)
    model = build_pixelllm(cfg).eval()
    perturb_(torch.nn.ParameterList([p for n, p in model.named_parameters() if ".lora_B" in n]), seed=0, scale=0.5)
    return model


def decoder_states(model) -> torch.Tensor:
    """Final decoder states (1, 5, D) for fixed visual tokens and decoder ids."""
    lm = model.language_model
    generator = torch.Generator().manual_seed(0)
    visual = torch.randn(1, 6, lm.dim, generator=generator)
    prompt = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        states, mask = lm.encode(visual, prompt, torch.ones_like(prompt))
        hidden, _ = lm.decode(torch.tensor([[0, 11, 12, 13, 14]]), states, mask)
    return hidden


def test_int8_quantizes_every_t5_layer_with_lora_folded_in(lora_model) -> None:
    lora_model.set_lora_merged(True)
    merged = {k.replace(".base_layer.", "."): v.clone() for k, v in lora_model.language_model.t5.state_dict().items()}
    plain = build_pixelllm("pixelllm-tiny").eval()  # no LoRA: T5 given the merged weights
    plain.language_model.t5.load_state_dict({k: v for k, v in merged.items() if ".lora_" not in k})
    expected = decoder_states(lora_model)
    assert torch.allclose(decoder_states(plain), expected, atol=1e-5)

    lora_model.quantize_language_model()
    plain.quantize_language_model()
    t5 = lora_model.language_model.t5
    assert lora_model.language_model.quantized
    assert not any(isinstance(m, (LoraLayer, torch.nn.Linear)) for m in t5.modules())  # the vocabulary head too
    got = decoder_states(lora_model)
    assert not torch.equal(got, expected)  # int8 arithmetic
    assert torch.equal(got, decoder_states(plain))  # the same int8 model as T5 with the merged weights
    lora_model.quantize_language_model()  # a second call changes nothing
    assert torch.equal(decoder_states(lora_model), got)


def test_int8_model_is_for_inference_only(lora_model, tmp_path) -> None:
    lora_model.quantize_language_model()
    with pytest.raises(ValueError, match="save the float32 model"):
        lora_model.save_pretrained(tmp_path / "int8")
    assert not (tmp_path / "int8").exists()
    with pytest.raises(RuntimeError, match="folded in for good"):
        lora_model.set_lora_merged(False)


def test_int8_needs_a_float32_model_on_the_cpu(lora_model) -> None:
    lora_model.to(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="needs a float32 model on the CPU, this one is torch.bfloat16 on cpu"):
        lora_model.quantize_language_model()
    assert not lora_model.language_model.quantized


def test_service_setting_takes_none_or_int8_only() -> None:
    assert Settings().quantize == "none"
    assert Settings(quantize="int8").quantize == "int8"
    with pytest.raises(pydantic.ValidationError, match="quantize"):
        Settings(quantize="int4")


def test_service_refuses_int8_with_half_precision_or_a_gpu() -> None:
    for settings in ({"dtype": "bfloat16"}, {"device": "cuda:0"}, {"device": "mps"}):
        with pytest.raises(pydantic.ValidationError, match="PIXELLLM_QUANTIZE=int8 is for float32 models on the CPU"):
            Settings(quantize="int8", **settings)
    assert Settings(dtype="bfloat16", device="cuda").quantize == "none"


def test_service_on_device_auto_runs_int8_on_the_cpu_even_with_a_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    predictor, _ = load_predictor(Settings(model="pixelllm-tiny", quantize="int8", keep_freed_memory=False))
    assert predictor.model.device.type == "cpu" and predictor.model.language_model.quantized


def test_cli_caption_with_an_int8_language_model(capsys, lora_model, tmp_path, monkeypatch) -> None:
    quantized = []
    quantize = PixelLLM.quantize_language_model

    def recording(model: PixelLLM) -> None:
        quantize(model)
        quantized.append(model.language_model.quantized)

    monkeypatch.setattr(PixelLLM, "quantize_language_model", recording)
    lora_model.save_pretrained(tmp_path / "tiny")
    image = str(ROOT / "assets" / "sample.jpg")
    argv = ["caption", image, "--model", str(tmp_path / "tiny"), "--json", "--max-new-tokens", "6"]
    assert main([*argv, "--quantize", "int8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["words"] and all(len(w["box"]) == 4 for w in result["words"])
    assert quantized == [True]
    with pytest.raises(SystemExit):
        main([*argv, "--quantize", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
