"""One builder for every model: `build_pixelllm(preset name | config JSON | PixelLLMConfig, ...)`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpoints import load_eva_checkpoint, load_sam_checkpoint, load_t5
from .config import CONFIG_DIR, DEFAULT_WEIGHTS, PixelLLMConfig, list_presets, load_config, model_path_hint
from .modeling.pixelllm import PixelLLM
from .tokenizer import Tokenizer

__all__ = ["build_pixelllm", "load_model", "list_presets", "default_tokenizer"]

log = logging.getLogger(__name__)


def _tokenizer_file(cfg: PixelLLMConfig) -> Path:
    return CONFIG_DIR / "tokenizers" / f"{cfg.tokenizer or cfg.name}.json"


def default_tokenizer(cfg: PixelLLMConfig) -> Tokenizer | None:
    """The tokenizer shipped with a preset (`configs/tokenizers/<name>.json`), if any."""
    path = _tokenizer_file(cfg)
    return Tokenizer.from_file(path) if path.is_file() else None


def build_pixelllm(
    name_or_config: str | Path | PixelLLMConfig,
    sam_checkpoint: str | Path | None = None,
    eva_checkpoint: str | Path | None = None,
    t5_path: str | Path | None = None,
    device: str | torch.device | None = None,
    tokenizer: Tokenizer | None = None,
) -> PixelLLM:
    """Build a PixelLLM, optionally from official checkpoint files.

    Args:
        name_or_config: a preset (`pixelllm-t5xl`, `pixelllm-base`, `pixelllm-tiny`), a config JSON path (a saved
            model's `config.json`: its shape, with random weights), or a `PixelLLMConfig`. A saved model directory
            is refused: load it with `PixelLLM.from_pretrained`.
        sam_checkpoint: SAM `.pth` (e.g. `sam_vit_h_4b8939.pth`) for the image encoder A, prompt encoder
            and mask decoder.
        eva_checkpoint: timm EVA02 weights (`.safetensors`, `.pth` or `.bin`).
        t5_path: a Hugging Face Flan-T5 directory (config, weights, tokenizer.json).
        device: where to build. `"meta"` builds the full shape without allocating memory (no checkpoints).
        tokenizer: overrides the tokenizer (default: the T5 directory's, else the preset's own).
    """
    from .checkpoints import WEIGHTS_FILE

    if not isinstance(name_or_config, PixelLLMConfig) and (Path(name_or_config) / WEIGHTS_FILE).is_file():
        raise ValueError(
            f"{name_or_config} is a saved model: load it with PixelLLM.from_pretrained({str(name_or_config)!r}) "
            "(build_pixelllm builds a model's shape with random weights)"
        )
    cfg = load_config(name_or_config)
    if device is not None and torch.device(device).type == "meta":
        if sam_checkpoint or eva_checkpoint or t5_path:
            raise ValueError("checkpoints cannot be loaded on the meta device; build on 'cpu' or 'cuda'")
        with torch.device("meta"):
            model = PixelLLM(cfg, tokenizer or default_tokenizer(cfg), load_frozen_block=False)
        model.sources = {}
        return model
    t5 = None
    if t5_path is not None:
        t5, t5_tokenizer = load_t5(t5_path)
        tokenizer = tokenizer or t5_tokenizer
        cfg.language_model.t5 = {**cfg.language_model.t5, **_t5_shape(t5)}
    model = PixelLLM(cfg, tokenizer or default_tokenizer(cfg), t5=t5)
    if sam_checkpoint is not None:
        load_sam_checkpoint(model, sam_checkpoint)
    if eva_checkpoint is not None:
        load_eva_checkpoint(model, eva_checkpoint)
    model.sources = {
        k: str(Path(v).resolve())
        for k, v in (
            ("sam_checkpoint", sam_checkpoint),
            ("eva_checkpoint", eva_checkpoint),
            ("t5_path", t5_path),
        )
        if v is not None
    }
    model.eval()
    return model.to(device) if device is not None else model


def _t5_shape(t5) -> dict:
    """The architecture fields of a loaded T5's config, so our saved config rebuilds the same shape."""
    c = t5.config
    return {
        "vocab_size": c.vocab_size,
        "d_model": c.d_model,
        "d_kv": c.d_kv,
        "d_ff": c.d_ff,
        "num_layers": c.num_layers,
        "num_decoder_layers": c.num_decoder_layers,
        "num_heads": c.num_heads,
        "feed_forward_proj": c.feed_forward_proj,
        # transformers reads a config's tie_word_embeddings into scale_decoder_outputs and then sets it True
        # (Flan-T5's False means: a separate LM head and no output scaling), so the value to record is that one
        "tie_word_embeddings": c.scale_decoder_outputs,
    }


# the official checkpoint each argument of `build_pixelllm` loads
OFFICIAL_PARTS = {"sam_checkpoint": "SAM", "eva_checkpoint": "EVA02", "t5_path": "T5"}


def load_model(
    name_or_path: str | Path, device: str | torch.device | None = None, quantize: str = "none", **checkpoints
) -> PixelLLM:
    """A model to answer with: a saved model directory (`PixelLLM.from_pretrained`, `checkpoints` the new places of
    official files it was built from) or anything `build_pixelllm` takes that has a tokenizer (its own, or
    `t5_path`'s); `quantize` "int8" gives it an int8 language model (`PixelLLM.quantize_language_model`)."""
    from .checkpoints import from_pretrained

    if quantize not in ("none", "int8"):
        raise ValueError(f"quantize must be 'none' or 'int8', got {quantize!r}")
    path = Path(name_or_path)
    if path.is_dir():  # the checkpoints given are where the official files it was built from are now
        model = from_pretrained(name_or_path, device=device, **checkpoints)
    elif path.is_file() and (hint := model_path_hint(path)):  # e.g. a model directory's config: random weights
        raise ValueError(f"{path} is not a model to load{hint}")
    else:
        cfg = load_config(name_or_path)
        if not checkpoints.get("t5_path") and not _tokenizer_file(cfg).is_file():
            raise ValueError(
                f"{name_or_path} ships no tokenizer, so it cannot read texts or write captions: give a saved model "
                "directory, or its Flan-T5 directory as t5_path (the service: PIXELLLM_T5_PATH)"
            )
        model = build_pixelllm(cfg, device=device, **checkpoints)
        if not any(checkpoints.values()):
            log.warning(
                "%s is built with RANDOM weights (no model directory, no checkpoints): its answers mean nothing; "
                "the trained default model is the directory %s",
                name_or_path,
                DEFAULT_WEIGHTS,
            )
        else:  # official parts only: what joins them has never been trained
            random = [part for key, part in OFFICIAL_PARTS.items() if not checkpoints.get(key)]
            log.warning(
                "%s is built with RANDOM weights for %s: official checkpoints hold no captioning weights, so its "
                "answers mean nothing until it is fine-tuned (pixelllm train) and loaded from the saved model directory",
                name_or_path,
                ", ".join(
                    [*random, "the prompt feature extractor, point head and the rest between the encoders and T5"]
                ),
            )
    if quantize == "int8":
        model.quantize_language_model()
    return model
