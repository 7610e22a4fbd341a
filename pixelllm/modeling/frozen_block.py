"""Frozen LM block in the visual path ("Frozen Transformers in Language Models Are Effective Visual
Encoder Layers", ICLR 2024): Linear(d_vis, d_lm, no bias) -> one frozen pretrained LM layer -> Linear(d_lm, d_vis).

The layer runs bidirectionally (no causal mask) and without positional rotation, keeping its own
residual and norms. Supported sources: a Hugging Face T5 directory (an encoder block), a LLaMA directory
(a decoder layer) or a BERT directory (an encoder layer). `checkpoint` is a directory path, or
`pkg:<package>/<subdir>` for a model shipped inside an installed Python package.
"""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, BertConfig, BertModel, LlamaConfig, LlamaModel, T5Config, T5EncoderModel

from ..config import FrozenBlockConfig

log = logging.getLogger(__name__)


def resolve_checkpoint(checkpoint: str | None) -> Path:
    """A directory path, or `pkg:<package>/<subdir>` inside an installed package."""
    if checkpoint and checkpoint.startswith("pkg:"):
        package, _, sub = checkpoint[4:].partition("/")
        try:
            return Path(str(importlib.resources.files(package) / sub))
        except ModuleNotFoundError:
            raise FileNotFoundError(
                f"frozen_block.checkpoint {checkpoint!r}: package {package!r} is not installed"
            ) from None
    return Path(checkpoint or "")


def _build_layer(cfg: FrozenBlockConfig, load_weights: bool) -> tuple[nn.Module, str, int]:
    """The chosen LM layer, its model type and width. Weights are loaded only when `load_weights`."""
    path = resolve_checkpoint(cfg.checkpoint)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"frozen_block.checkpoint must be a Hugging Face model directory with config.json, got {str(path)!r}"
        )
    config = AutoConfig.from_pretrained(path)
    if isinstance(config, T5Config):
        model = T5EncoderModel.from_pretrained(path) if load_weights else T5EncoderModel(config)
        layers, kind, dim = model.encoder.block, "t5", config.d_model
    elif isinstance(config, LlamaConfig):
        model = LlamaModel.from_pretrained(path) if load_weights else LlamaModel(config)
        layers, kind, dim = model.layers, "llama", config.hidden_size
        for layer in layers:
            layer.self_attn.is_causal = False
    elif isinstance(config, BertConfig):
        model = BertModel.from_pretrained(path, add_pooling_layer=False) if load_weights else BertModel(config)
        layers, kind, dim = model.encoder.layer, "bert", config.hidden_size
    else:
        raise ValueError(f"frozen_block supports T5, LLaMA and BERT checkpoints, got model_type {config.model_type!r}")
    layer = layers[cfg.layer]
    if load_weights:
        log.info("frozen block: %s layer %d of %s (width %d)", kind, cfg.layer, path, dim)
    return layer, kind, dim


class FrozenLMBlock(nn.Module):
    """Visual tokens (B, N, d_vis) -> (B, N, d_vis) through one frozen LM layer."""

    def __init__(self, cfg: FrozenBlockConfig, vis_dim: int, load_weights: bool = True):
        super().__init__()
        self.layer, self.kind, lm_dim = _build_layer(cfg, load_weights)
        self.layer.requires_grad_(False)
        self.head_dim = getattr(getattr(self.layer, "self_attn", None), "head_dim", 0)
        self.proj_in = nn.Linear(vis_dim, lm_dim, bias=False)
        self.proj_out = nn.Linear(lm_dim, vis_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(tokens)
        if self.kind == "t5":
            x = self.layer(x)[0]
        elif self.kind == "bert":
            x = self.layer(x)
            x = x[0] if isinstance(x, tuple) else x
        else:
            b, n, _ = x.shape
            identity_rotation = (x.new_ones(b, n, self.head_dim), x.new_zeros(b, n, self.head_dim))
            x = self.layer(x, position_embeddings=identity_rotation)
            x = x[0] if isinstance(x, tuple) else x
        return self.proj_out(x)
