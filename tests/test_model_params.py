"""Presets on the meta device: parameter counts against the peer libraries, and exactly which parts train."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import peer_eva, peer_sam, peer_t5
from segment_anything import sam_model_registry

from pixelllm import build_pixelllm, list_presets

pytestmark = pytest.mark.usefixtures("one_thread")

log = logging.getLogger(__name__)


def numel(module_or_params) -> int:
    params = module_or_params.parameters() if hasattr(module_or_params, "parameters") else module_or_params
    return sum(p.numel() for p in params)


def expected_trainable(model) -> set[str]:
    """Parameter names that must train, derived from module names and the config's trainable flags."""
    cfg = model.cfg
    always = ("extractor.", "point_head.", "proposal_head.", "prompt_encoder.no_prompt", "frozen_block.proj_")
    expected = set()
    for name, _ in model.named_parameters():
        if name.startswith(always):
            expected.add(name)
        elif name.startswith("image_encoder.eva."):
            if cfg.eva.trainable:
                expected.add(name)
        elif name.startswith(("image_encoder.sam.", "prompt_encoder.sam.")):
            if cfg.sam.trainable:
                expected.add(name)
        elif name.startswith("mask_head."):
            if cfg.mask_decoder.trainable:
                expected.add(name)
        elif name.startswith("language_model.t5."):
            mode = cfg.language_model.mode
            if mode == "full" or (mode == "lora" and ".lora_" in name):
                expected.add(name)
    return expected


@pytest.fixture(scope="module")
def paper_model():
    return build_pixelllm("pixelllm-t5xl", device="meta")


def test_paper_preset_builds_on_meta_and_matches_peer_parts(paper_model):
    model = paper_model
    assert all(p.is_meta for p in model.parameters())
    cfg = model.cfg
    with torch.device("meta"):
        sam_h = sam_model_registry["vit_h"]()  # segment_anything's own ViT-H builder (1024 px)
        sam = peer_sam(cfg, cfg.image_size)  # the same widths at our 384 px input
        eva = peer_eva(cfg)  # timm.create_model("eva02_large_patch14_448", num_classes=0, img_size=384)
        t5 = peer_t5(cfg)  # T5ForConditionalGeneration(T5Config(flan-t5-xl shape))
    # ViT-H's parameters do not depend on the input size except pos_embed and the global rel_pos tables
    grid_params = {"pos_embed"} | {f"blocks.{i}.attn.rel_pos_{a}" for i in cfg.sam.global_attn_indexes for a in "hw"}
    same = {k: v for k, v in sam.image_encoder.named_parameters() if k not in grid_params}
    assert {k: v.shape for k, v in same.items()} == {
        k: v.shape for k, v in sam_h.image_encoder.named_parameters() if k not in grid_params
    }
    lora = [p for n, p in model.language_model.named_parameters() if ".lora_" in n]
    ours = {
        "no-prompt embedding": model.prompt_encoder.no_prompt.numel(),
        "prompt feature extractor + projections": numel(model.extractor),
        "LoRA (q, v)": numel(lora),
        "point head": numel(model.point_head),
    }
    parts = {
        "SAM ViT-H image encoder (segment_anything, 1024 px)": numel(sam_h.image_encoder),
        "SAM ViT-H image encoder (segment_anything, 384 px)": numel(sam.image_encoder),
        "SAM prompt encoder (segment_anything)": numel(sam.prompt_encoder),
        "SAM mask decoder (segment_anything)": numel(sam.mask_decoder),
        "EVA02-L/14 at 384 px, no head (timm)": numel(eva),
        "Flan-T5-XL (transformers)": numel(t5),
        **ours,
    }
    counted = [k for k in parts if "1024 px" not in k]
    total_parts = sum(parts[k] for k in counted)
    total = numel(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = [(k, parts[k]) for k in parts] + [
        ("sum of parts (384 px)", total_parts),
        ("pixelllm-t5xl total", total),
        ("pixelllm-t5xl trainable", trainable),
    ]
    table = "\n".join(f"  {k:<55} {v:>15,d} {v / 1e6:>10,.1f}M" for k, v in rows)
    print("\npixelllm-t5xl parameters\n" + table)
    log.info("pixelllm-t5xl parameters\n%s", table)

    assert abs(total - total_parts) <= 0.01 * total_parts
    # the published magnitudes
    assert parts["SAM ViT-H image encoder (segment_anything, 1024 px)"] == pytest.approx(637.0e6, abs=0.05e6)
    # at 384 px only the position tables shrink (pos_embed 64x64 -> 24x24, global rel_pos 127 -> 47 rows)
    assert numel(sam.image_encoder) == pytest.approx(637.0e6, rel=0.01)
    assert numel(eva) == pytest.approx(303.8e6, abs=0.05e6)
    assert numel(t5) == pytest.approx(2.85e9, rel=0.03)
    # and part by part, our modules are the peer modules
    assert numel(model.image_encoder.sam) == numel(sam.image_encoder)
    assert numel(model.image_encoder.eva) == numel(eva)
    assert numel(model.mask_head) == numel(sam.mask_decoder)
    assert numel(model.prompt_encoder.sam) == numel(sam.prompt_encoder)
    assert numel(model.language_model) - ours["LoRA (q, v)"] == numel(t5)


def test_paper_preset_trains_exactly_eva_extractor_lora_point_head(paper_model):
    model = paper_model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(model)
    groups = {
        "image_encoder.eva.": 0,
        "extractor.": 0,
        "point_head.": 0,
        "prompt_encoder.no_prompt": 0,
        "language_model.t5.": 0,
    }
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups[next(g for g in groups if n.startswith(g))] += p.numel()
    lora = {n for n in trainable if n.startswith("language_model.")}
    assert lora and all(".lora_" in n for n in lora)
    # LoRA on q and v of every attention: encoder self, decoder self and cross
    t5 = model.cfg.language_model.t5
    attentions = t5["num_layers"] + 2 * t5["num_decoder_layers"]
    assert len(lora) == attentions * 2 * 2  # (q, v) x (A, B)
    assert groups["language_model.t5."] == attentions * 2 * 32 * (t5["d_model"] + t5["num_heads"] * t5["d_kv"])
    assert sum(groups.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_trainable_set_follows_its_config(preset, request):
    model = (
        request.getfixturevalue("paper_model") if preset == "pixelllm-t5xl" else build_pixelllm(preset, device="meta")
    )
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected_trainable(model)
    cfg = model.cfg
    with torch.device("meta"):
        assert numel(model.image_encoder.eva) == numel(peer_eva(cfg))
        assert numel(model.image_encoder.sam) == numel(peer_sam(cfg, cfg.image_size).image_encoder)


@pytest.mark.parametrize("preset", ["pixelllm-tiny", "pixelllm-base", "pixelllm-t5xl"])
def test_every_preset_builds_on_meta(preset):
    """No module computes from its own parameters at construction (a meta tensor has no values)."""
    model = build_pixelllm(preset, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
