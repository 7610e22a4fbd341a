"""Shared model fixtures: a random tiny PixelLLM, peer-library builders, and tiny official-format checkpoints.

The peer builders call `segment_anything`, `timm` and `transformers` themselves, with the arguments their
own builders use (`segment_anything.build_sam._build_sam`, `timm.create_model`, `T5Config`), so tests compare
our modules and loaders against what those libraries make and save, never against hand-written key lists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from server_helpers import ROOT
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

from pixelllm import PixelLLMConfig, Tokenizer, build_pixelllm
from pixelllm.config import EvaEncoderConfig, LoraConfig, load_config
from pixelllm.data.synthetic import generate_scene
from pixelllm.data.tasks import TASKS, collate, make_sample, prepare_scene

# `segment_anything.build_sam._build_sam`'s pixel statistics (0-255 scale)
SAM_PIXEL_MEAN = [123.675, 116.28, 103.53]
SAM_PIXEL_STD = [58.395, 57.12, 57.375]

# The tiny official-format checkpoints: our model input, and the (different) input size the peer SAM was
# "trained" at, so loading resamples its position embeddings.
OFFICIAL_IMAGE_SIZE = 112
PEER_SAM_IMAGE_SIZE = 160
PEER_EVA = "eva02_tiny_patch14_224"
CAPTIONS = [
    "a large red circle on the left and a small blue square at the bottom.",
    "a small green star in the middle.",
    "a purple diamond at the top and an orange triangle on the right.",
    "where is the yellow circle",
    "an object of a small green star.",
]


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread. The toy models gain nothing from more, and on a busy machine (CI, a training
    run beside the tests) two spinning OpenMP threads make them tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Use in model test modules: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with single_thread():
        yield


def run_probe(script: str, tmp_path: Path, *args: str) -> dict:
    """Run `scripts/<script>` with `args` on one thread, its table written to `tmp_path`; the table."""
    out = tmp_path / "probe.json"
    cmd = [sys.executable, f"scripts/{script}", *args, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.read_text())


def record_decoded(model, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The list that the token ids `model.generate_stream` decodes from now on (its first row's) are appended to,
    each as soon as its step is decoded."""
    decoded: list[int] = []
    real = model.generate_stream

    def recording(*args, **kwargs):
        for step in real(*args, **kwargs):
            decoded.append(int(step[0][0]))
            yield step

    monkeypatch.setattr(model, "generate_stream", recording)
    return decoded


@torch.no_grad()
def perturb_(module: nn.Module, seed: int, scale: float = 0.02) -> nn.Module:
    """Add Gaussian noise to every parameter, so no weight keeps a zero/one init (pos_embed, rel_pos, biases,
    LayerNorms, LoRA B): comparisons and round trips then check every tensor, not only the random ones."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype), alpha=scale)
    return module


def peer_sam(cfg: PixelLLMConfig, image_size: int) -> Sam:
    """segment_anything's `Sam` at `cfg`'s SAM widths, assembled exactly as `build_sam._build_sam` does."""
    s, md = cfg.sam, cfg.mask_decoder
    grid = image_size // s.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=s.depth,
            embed_dim=s.embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=s.num_heads,
            patch_size=s.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=s.global_attn_indexes,
            window_size=s.window_size,
            out_chans=s.out_chans,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=s.out_chans,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=md.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=md.depth, embedding_dim=s.out_chans, mlp_dim=md.mlp_dim, num_heads=md.num_heads
            ),
            transformer_dim=s.out_chans,
            iou_head_depth=md.iou_head_depth,
            iou_head_hidden_dim=md.iou_head_hidden_dim,
        ),
        pixel_mean=SAM_PIXEL_MEAN,
        pixel_std=SAM_PIXEL_STD,
    )
    return sam.eval()


def peer_eva(cfg: PixelLLMConfig, **kwargs) -> nn.Module:
    """timm's own EVA02 for `cfg.eva` at our input size, without classifier."""
    overrides = dict(cfg.eva.overrides)
    if "ref_feat_shape" in overrides:
        overrides["ref_feat_shape"] = tuple(overrides["ref_feat_shape"])
    args = {"img_size": cfg.image_size, **overrides, "num_classes": 0, **kwargs}
    return timm.create_model(cfg.eva.model_name, **args).eval()


def peer_t5(cfg: PixelLLMConfig) -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration(T5Config(**cfg.language_model.t5)).eval()


def train_tokenizer(vocab_size: int = 120) -> Tokenizer:
    return Tokenizer.train(CAPTIONS * 4, vocab_size=vocab_size)


def official_tiny_config() -> PixelLLMConfig:
    """The tiny preset's SAM/extractor widths with a stock `eva02_tiny_patch14_224` at 112 px, frozen SAM and
    mask decoder, and a LoRA T5: the shape of the paper preset, at toy size, for official-checkpoint tests."""
    cfg = load_config("pixelllm-tiny")
    cfg.name = "pixelllm-tiny-official"
    cfg.image_size = OFFICIAL_IMAGE_SIZE
    cfg.sam.trainable = False
    cfg.mask_decoder.trainable = False
    cfg.eva = EvaEncoderConfig(model_name=PEER_EVA, overrides={}, trainable=True)
    cfg.language_model.mode = "lora"
    cfg.language_model.lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q", "v"])
    cfg.language_model.t5 = {
        "vocab_size": 128,
        "d_model": 64,
        "d_kv": 16,
        "d_ff": 128,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "dropout_rate": 0.0,
    }
    return cfg


@pytest.fixture(scope="session")
def tiny_model():
    """A random `pixelllm-tiny` (every parameter perturbed), in eval mode. Do not modify it in tests."""
    with single_thread():
        torch.manual_seed(0)
        return perturb_(build_pixelllm("pixelllm-tiny"), seed=1).eval()


@pytest.fixture(scope="session")
def official_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny checkpoints written by the peer libraries in their own formats, for `official_tiny_config()`:

    - `sam_same` / `sam_resized`: `torch.save(Sam.state_dict())` at our input size / at another size;
    - `eva_pth` / `eva_safetensors`: `timm.create_model(PEER_EVA, num_classes=10)` weights (224 px, with
      classifier);
    - `t5`: `T5ForConditionalGeneration.save_pretrained` directory plus a trained `tokenizer.json`, in Flan-T5's
      layout (`as_flan_layout`).
    """
    with single_thread():
        return _write_official_files(tmp_path_factory.mktemp("official"))


def _write_official_files(root: Path) -> dict[str, Path]:
    cfg = official_tiny_config()
    torch.manual_seed(10)
    files = {}
    for name, size, seed in (("sam_same", cfg.image_size, 11), ("sam_resized", PEER_SAM_IMAGE_SIZE, 12)):
        files[name] = root / f"{name}.pth"
        torch.save(perturb_(peer_sam(cfg, size), seed=seed).state_dict(), files[name])
    from safetensors.torch import save_file

    eva = perturb_(timm.create_model(PEER_EVA, num_classes=10), seed=13)
    files["eva_pth"] = root / "eva.pth"
    torch.save(eva.state_dict(), files["eva_pth"])
    files["eva_safetensors"] = root / "eva.safetensors"
    save_file({k: v.contiguous() for k, v in eva.state_dict().items()}, str(files["eva_safetensors"]))
    files["t5"] = root / "flan-t5-toy"
    perturb_(peer_t5(cfg), seed=14).save_pretrained(files["t5"])
    as_flan_layout(files["t5"], seed=15)
    train_tokenizer(cfg.language_model.t5["vocab_size"]).save(files["t5"])
    return files


def as_flan_layout(directory: Path, seed: int) -> None:
    """Give a saved T5 directory Flan-T5's layout: an LM head of its own (`lm_head.weight`, not the input
    embeddings) and `"tie_word_embeddings": false` (no output scaling). transformers 5 saves a T5 it builds
    tied, whatever its config said."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(directory / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    state["lm_head.weight"] = torch.randn(state["shared.weight"].shape, generator=generator) * 0.05
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config.pop("scale_decoder_outputs", None)  # transformers 5 writes it; Flan's config.json has no such key
    (directory / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}, indent=2))


@pytest.fixture(scope="session")
def official_model(official_files):
    """`official_tiny_config()` built from the peer-saved checkpoints (SAM at another size: resampled)."""
    with single_thread():
        return build_pixelllm(
            official_tiny_config(),
            sam_checkpoint=official_files["sam_resized"],
            eva_checkpoint=official_files["eva_safetensors"],
            t5_path=official_files["t5"],
        )


def make_batch(model, tasks: tuple[str, ...] = TASKS, seed: int = 0) -> dict:
    """A real training batch for `model`: synthetic scenes through `prepare_scene` / `make_sample` / `collate`,
    one sample per task."""
    rng = np.random.default_rng(seed)
    samples = []
    for i, task in enumerate(tasks):
        scene = prepare_scene(generate_scene(seed * 100 + i), model.cfg.image_size, model.tokenizer)
        samples.append(make_sample(scene, task, rng, model.cfg, model.tokenizer))
    return collate(samples, model.cfg.language_model.max_text_tokens)
