"""Masks for JSON: COCO compressed RLE (pycocotools) and/or a base64 PNG."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .schemas import Mask, MaskFormat


def encode_mask(mask: np.ndarray, fmt: MaskFormat) -> Mask:
    """`mask`: HxW bool array in image pixels."""
    mask = np.asarray(mask, dtype=bool)
    counts = png = None
    if fmt in ("rle", "both"):
        counts = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")
    if fmt in ("png", "both"):
        buffer = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
        png = base64.b64encode(buffer.getvalue()).decode("ascii")
    return Mask(size=[int(mask.shape[0]), int(mask.shape[1])], counts=counts, png=png)
