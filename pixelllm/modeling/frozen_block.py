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

from ..checkpoints import CheckpointError, loading_problems
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
        kind, dim, count, cls, prefix = "t5", config.d_model, config.num_layers, T5EncoderModel, "encoder.block"
    elif isinstance(config, LlamaConfig):
        kind, dim, count, cls, prefix = "llama", config.hidden_size, config.num_hidden_layers, LlamaModel, "layers"
    elif isinstance(config, BertConfig):
        kind, dim, count, cls, prefix = "bert", config.hidden_size, config.num_hidden_layers, BertModel, "encoder.layer"
    else:
        raise ValueError(f"frozen_block supports T5, LLaMA and BERT checkpoints, got model_type {config.model_type!r}")
    if not -count <= cfg.layer < count:
        raise ValueError(
            f"frozen_block.layer is {cfg.layer} but {path} has {count} layers: give 0 to {count - 1} or -1"
        )
    index = cfg.layer % count
    kwargs = {"add_pooling_layer": False} if kind == "bert" else {}
    model = _load_layer(cls, path, f"{prefix}.{index}.", **kwargs) if load_weights else cls(config, **kwargs)
    layers = model.get_submodule(prefix)
    if kind == "llama":
        for layer in layers:
            layer.self_attn.is_causal = False
    layer = layers[index]
    if load_weights:
        log.info("frozen block: %s layer %d of %s (width %d)", kind, cfg.layer, path, dim)
    return layer, kind, dim


def _load_layer(cls: type, path: Path, layer_prefix: str, **kwargs: object) -> nn.Module:
    """`cls.from_pretrained(path)`, refused if a weight of the chosen layer (keys under `layer_prefix`) is missing or
    mis-shaped: transformers would initialize it at random, and frozen it would stay random."""
    model, info = cls.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    problems = loading_problems(info, layer_prefix)
    if problems:
        raise CheckpointError(f"frozen_block.checkpoint {path} does not hold layer {layer_prefix[:-1]}: {problems}")
    return model


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
