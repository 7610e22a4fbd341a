"""PixelLLM: pixel-aligned language models. Captions where every word has a location.

The model classes are imported on first use, so the HTTP-only parts (`pixelllm.batch`, `pixelllm batch`) start
without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .build import build_pixelllm, list_presets
    from .config import PixelLLMConfig
    from .modeling.generation import GenerationCancelled
    from .modeling.pixelllm import PixelLLM
    from .predictor import Caption, ImageEmbedding, Localization, Predictor, Region, Word
    from .tokenizer import Tokenizer

_EXPORTS = {
    "build_pixelllm": ".build",
    "list_presets": ".build",
    "PixelLLM": ".modeling.pixelllm",
    "GenerationCancelled": ".modeling.generation",
    "PixelLLMConfig": ".config",
    "Predictor": ".predictor",
    "Caption": ".predictor",
    "Localization": ".predictor",
    "Region": ".predictor",
    "Word": ".predictor",
    "ImageEmbedding": ".predictor",
    "Tokenizer": ".tokenizer",
}

__all__ = [
    "build_pixelllm",
    "list_presets",
    "PixelLLM",
    "GenerationCancelled",
    "PixelLLMConfig",
    "Predictor",
    "Caption",
    "Localization",
    "Region",
    "Word",
    "ImageEmbedding",
    "Tokenizer",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pixelllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
