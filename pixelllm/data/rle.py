"""COCO mask encodings (run-length and polygons), through `pycocotools.mask`.

Masks are HxW bool arrays. A COCO RLE is `{"size": [H, W], "counts": str}` (the compressed string form,
column-major as COCO defines it); polygons are lists of flat `[x0, y0, x1, y1, ...]` lists in absolute
pixels.
"""

from __future__ import annotations

import warnings

import numpy as np
from pycocotools import mask as mask_utils


def encode_mask(mask: np.ndarray) -> dict:
    """HxW bool mask -> COCO RLE `{"size": [H, W], "counts": str}` (JSON-serializable)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_segmentation(segmentation: dict | list, height: int, width: int) -> np.ndarray:
    """A COCO `segmentation` (RLE, uncompressed RLE, or polygons) -> HxW bool mask."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]  # fewer than 3 points enclose nothing
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        counts = segmentation["counts"]
        rle = {
            "size": list(segmentation["size"]),
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
        }
    with warnings.catch_warnings():  # pycocotools' Cython decode trips a numpy 2 copy-keyword deprecation
        warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)
