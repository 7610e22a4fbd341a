"""The optional frozen LM block in the visual path: a layer taken from a T5 or LLaMA saved with
`save_pretrained`, frozen, bidirectional and without positional rotation."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from pixelllm import PixelLLM, build_pixelllm
from pixelllm.checkpoints import CheckpointError
from pixelllm.config import FrozenBlockConfig, load_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    """Tiny peer LMs saved by transformers: {kind: (directory, the saved model's layers)}."""
    root = tmp_path_factory.mktemp("frozen_lm")
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=48, d_kv=12, d_ff=96, num_layers=2, num_decoder_layers=1, num_heads=4)
    )
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with torch.no_grad():  # LLaMA's RMSNorm weights start at exactly one: make them count
        for p in llama.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    t5.save_pretrained(root / "t5")
    llama.save_pretrained(root / "llama")
    return {"t5": (root / "t5", t5.encoder.block), "llama": (root / "llama", llama.model.layers)}


def tiny_with_block(directory, layer: int = 0) -> PixelLLM:
    cfg = load_config("pixelllm-tiny")
    cfg.frozen_block = FrozenBlockConfig(checkpoint=str(directory), layer=layer)
    torch.manual_seed(0)
    return build_pixelllm(cfg)


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_block_is_the_saved_layer_frozen_and_the_model_runs(lm_dirs, kind, tmp_path):
    directory, saved_layers = lm_dirs[kind]
    model = tiny_with_block(directory, layer=0)
    block = model.frozen_block
    saved = saved_layers[0].state_dict()
    ours = block.layer.state_dict()
    assert ours.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(ours[k], v), k
    assert not any(p.requires_grad for p in block.layer.parameters())
    assert all(p.requires_grad for n, p in block.named_parameters() if n.startswith(("proj_in", "proj_out")))
    assert block.proj_in.bias is None

    model.train()
    out = model(make_batch(model, tasks=("caption", "region_box")))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is None for p in block.layer.parameters())
    assert block.proj_in.weight.grad is not None and block.proj_in.weight.grad.abs().sum() > 0
    # the frozen layer comes from the checkpoint, not from our weights file
    model.eval()
    model.save_pretrained(tmp_path / "m")
    assert not [k for k in load_file(tmp_path / "m" / "model.safetensors") if k.startswith("frozen_block.layer.")]
    loaded = PixelLLM.from_pretrained(tmp_path / "m")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@torch.no_grad()
def test_llama_layer_is_bidirectional_and_position_free(lm_dirs):
    block = tiny_with_block(lm_dirs["llama"][0]).frozen_block.eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 6, block.proj_in.in_features, generator=gen)
    out = block(tokens)
    later_changed = tokens.clone()
    later_changed[:, -1] += 1.0
    # no causal mask: the first token sees the last one
    assert not torch.allclose(block(later_changed)[:, 0], out[:, 0], atol=1e-6)
    # no positional rotation: permuting the tokens permutes the outputs
    perm = torch.randperm(6, generator=gen)
    torch.testing.assert_close(block(tokens[:, perm]), out[:, perm], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_t5_layer_is_bidirectional(lm_dirs):
    block = tiny_with_block(lm_dirs["t5"][0]).frozen_block.eval()
    tokens = torch.randn(1, 5, block.proj_in.in_features, generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, -1] += 1.0
    assert not torch.allclose(block(changed)[:, 0], block(tokens)[:, 0], atol=1e-6)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        tiny_with_block(tmp_path / "nowhere")


def test_a_layer_the_checkpoint_lacks_is_refused(lm_dirs, tmp_path):
    """transformers initializes missing weights at random, and frozen they would stay random: the chosen layer's
    weights must all be in the file (another layer's need not), and its index in range."""
    directory, _ = lm_dirs["t5"]
    partial = tmp_path / "t5"
    partial.mkdir()
    (partial / "config.json").write_text((directory / "config.json").read_text())
    state = load_file(directory / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("encoder.block.1.")}, partial / "model.safetensors")
    assert tiny_with_block(partial, layer=0).frozen_block is not None
    with pytest.raises(CheckpointError, match=r"layer encoder\.block\.1: .* missing keys"):
        tiny_with_block(partial, layer=1)
    with pytest.raises(CheckpointError, match="missing keys"):
        tiny_with_block(partial, layer=-1)
    with pytest.raises(ValueError, match="frozen_block.layer is 2 but .* has 2 layers: give 0 to 1 or -1"):
        tiny_with_block(directory, layer=2)
