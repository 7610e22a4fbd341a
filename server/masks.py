"""Masks for JSON: COCO compressed RLE (pycocotools) and/or a base64 PNG."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from pixelllm.data import rle

from .schemas import Mask, MaskFormat


def encode_mask(mask: np.ndarray, fmt: MaskFormat) -> Mask:
    """`mask`: HxW bool array in image pixels."""
    mask = np.asarray(mask, dtype=bool)
    counts = png = None
    if fmt in ("rle", "both"):
        counts = rle.encode_mask(mask)["counts"]
    if fmt in ("png", "both"):
        buffer = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
        png = base64.b64encode(buffer.getvalue()).decode("ascii")
    return Mask(size=[int(mask.shape[0]), int(mask.shape[1])], counts=counts, png=png)
