"""Data: Localized Narratives (real format), synthetic grounded narratives, RefCOCO-family loader."""

from .independent import render_independent_scene
from .narratives import LocatedWord, NarrativesIndex, TokenTargets, read_narratives, token_targets, word_locations
from .refexp import RefExample, load_refexp, ref_mask
from .rle import decode_segmentation, encode_mask
from .synthetic import Scene, SceneObject, generate_scene, region_caption, write_dataset

__all__ = [
    "LocatedWord",
    "NarrativesIndex",
    "TokenTargets",
    "read_narratives",
    "word_locations",
    "token_targets",
    "Scene",
    "SceneObject",
    "generate_scene",
    "render_independent_scene",
    "region_caption",
    "write_dataset",
    "RefExample",
    "load_refexp",
    "ref_mask",
    "encode_mask",
    "decode_segmentation",
]
