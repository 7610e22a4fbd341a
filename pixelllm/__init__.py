"""PixelLLM: pixel-aligned language models. Captions where every word has a location."""

from .build import build_pixelllm, list_presets
from .config import PixelLLMConfig
from .modeling.pixelllm import PixelLLM
from .predictor import Caption, ImageEmbedding, Localization, Predictor, Region, Word
from .tokenizer import Tokenizer

__all__ = [
    "build_pixelllm",
    "list_presets",
    "PixelLLM",
    "PixelLLMConfig",
    "Predictor",
    "Caption",
    "Localization",
    "Region",
    "Word",
    "ImageEmbedding",
    "Tokenizer",
]
