"""RefCOCO / RefCOCO+ / RefCOCOg loader for the standard (lichengunc/refer) layout::

    <data_root>/<dataset>/refs(<split_by>).p   pickled list of refs: {ref_id, ann_id, image_id, split,
                                                sentences: [{sent, tokens, raw, sent_id}], category_id, file_name}
    <data_root>/<dataset>/instances.json       COCO: images, annotations (bbox [x, y, w, h], segmentation), categories
    <data_root>/images/mscoco/images/train2014/<images[].file_name>   (or pass `image_dir`)

The refs file is a pickle because that is the official distribution format. It is read only from the
local path you give, with an unpickler that refuses every class except plain builtins, so a tampered file
fails to load instead of running code. Boxes are (x0, y0, x1, y1) in absolute pixels of the image.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pixelllm.data.rle import decode_segmentation

logger = logging.getLogger(__name__)

SPLITS_BY = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google")}
_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "int", "float", "bool", "complex"}


@dataclass
class RefExample:
    """One referring sentence and its object.

    box: (x0, y0, x1, y1) absolute px. segmentation: the COCO annotation's polygons (list of flat
    [x0, y0, x1, y1, ...] lists) or RLE dict; decode with `ref_mask`.
    """

    image_path: Path
    image_id: int
    width: int
    height: int
    sentence: str
    box: tuple[float, float, float, float]
    segmentation: list | dict
    ref_id: int
    ann_id: int
    sent_id: int
    category_id: int


class _BuiltinsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return super().find_class("builtins", name)
        raise pickle.UnpicklingError(f"refs file references {module}.{name}; only plain builtins are allowed")


def load_refs(path: str | Path) -> list[dict]:
    """Read a local `refs(<split_by>).p` file (plain builtins only; see the module docstring)."""
    with Path(path).open("rb") as f:
        return _BuiltinsUnpickler(f).load()


def load_refexp(
    data_root: str | Path,
    dataset: str = "refcoco",
    split_by: str = "unc",
    split: str = "val",
    image_dir: str | Path | None = None,
) -> list[RefExample]:
    """All (sentence, object) pairs of one split, one `RefExample` per sentence, in refs-file order.

    Args:
        data_root: folder holding `<dataset>/refs(<split_by>).p` and `<dataset>/instances.json`.
        dataset: "refcoco", "refcoco+" or "refcocog" (any folder name in that layout works).
        split_by: "unc", "google" or "umd".
        split: e.g. "train", "val", "test", "testA", "testB".
        image_dir: where the COCO images are; default `<data_root>/images/mscoco/images/train2014`.
    """
    root = Path(data_root)
    refs_path = root / dataset / f"refs({split_by}).p"
    instances_path = root / dataset / "instances.json"
    for p in (refs_path, instances_path):
        if not p.is_file():
            known = ", ".join(f"{d}/refs({s}).p" for d, ss in SPLITS_BY.items() for s in ss)
            raise FileNotFoundError(f"{p} not found (the refer layout has e.g. {known} under data_root)")
    refs = load_refs(refs_path)
    splits = sorted({r["split"] for r in refs})
    if split not in splits:
        raise ValueError(f"split {split!r} not in {refs_path}; available: {', '.join(splits)}")
    try:
        with instances_path.open() as f:
            instances = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{instances_path} is not valid JSON: {e}") from None
    images = {im["id"]: im for im in instances["images"]}
    anns = {a["id"]: a for a in instances["annotations"]}
    image_dir = Path(image_dir) if image_dir is not None else root / "images" / "mscoco" / "images" / "train2014"

    examples = []
    for ref in refs:
        if ref["split"] != split:
            continue
        ann, image = anns.get(ref["ann_id"]), images.get(ref["image_id"])
        if ann is None or image is None:
            what = f"annotation {ref['ann_id']}" if ann is None else f"image {ref['image_id']}"
            raise ValueError(f"{refs_path}: ref {ref['ref_id']} names {what}, which {instances_path} does not have")
        what = f"{instances_path}: annotation {ann.get('id')} (of ref {ref['ref_id']})"
        x, y, w, h = _field(ann, "bbox", what, "[x, y, width, height] in pixels", _is_box)
        segmentation = _field(ann, "segmentation", what, "polygons or RLE (the mask scores need it)", _is_mask)
        what = f"{instances_path}: image {ref['image_id']}"
        file_name = _field(image, "file_name", what, "a file name", lambda v: isinstance(v, str) and v)
        width, height = (
            _field(image, k, what, "pixels", lambda v: isinstance(v, int) and v > 0) for k in ("width", "height")
        )
        for sent in ref["sentences"]:
            examples.append(
                RefExample(
                    image_path=image_dir / file_name,
                    image_id=ref["image_id"],
                    width=width,
                    height=height,
                    sentence=sent["sent"],
                    box=(float(x), float(y), float(x + w), float(y + h)),
                    segmentation=segmentation,
                    ref_id=ref["ref_id"],
                    ann_id=ref["ann_id"],
                    sent_id=sent["sent_id"],
                    category_id=ref["category_id"],
                )
            )
    logger.info("%s (%s) %s: %d sentences, %d refs", dataset, split_by, split, len(examples), len(refs))
    return examples


def _field(record: dict, key: str, what: str, expected: str, valid: Callable[[Any], Any]) -> Any:
    """`record[key]`; ValueError naming `what` and the `expected` value when it is absent or not `valid`."""
    if key not in record:
        raise ValueError(f"{what} has no {key!r}: give it {expected}")
    if not valid(record[key]):
        raise ValueError(f"{what}: {key} is {record[key]!r}; give it {expected}")
    return record[key]


def _is_box(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)


def _is_mask(value: Any) -> bool:
    return isinstance(value, list) or (isinstance(value, dict) and "counts" in value)


def ref_mask(example: RefExample) -> np.ndarray:
    """The referred object's mask: HxW bool at the image's size."""
    return decode_segmentation(example.segmentation, example.height, example.width)
