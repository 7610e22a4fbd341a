"""Training samples for the multi-task mix, from scenes (synthetic) into model-input coordinates.

A scene is prepared once (`prepare_scene`): the image resized and padded to the model's S x S input,
object boxes and masks in that square, and the caption's per-token targets from its Localized-Narratives
record. `make_sample` then draws one task from a prepared scene:

- caption: caption prompt -> the caption, each token located by the narrative trace;
- region_box / region_point: a box (jittered) or a point inside the object -> its region caption, tokens
  located at the object box;
- referring: "where is <expression>" -> the expression, its tokens and EOS located at the object box;
  the object mask is the mask-decoder target.

Coordinates: boxes/points fed as prompts are model-input pixels; targets are in [0, 1] of the square.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..config import PixelLLMConfig
from ..modeling.pixelllm import IGNORE_INDEX
from ..tokenizer import EOS_ID, Tokenizer
from ..transforms import ImageTransform, preprocess
from .narratives import token_targets, word_locations
from .synthetic import Scene, region_caption

TASKS = ("caption", "region_box", "region_point", "referring")


@dataclass
class PreparedObject:
    box: np.ndarray  # (4,) normalized to the model square
    packed_mask: np.ndarray  # (S, S) bool mask in the model square, 1 bit a pixel (np.packbits): see `mask`
    side: int  # S
    region_caption: str
    referring: str

    @property
    def mask(self) -> np.ndarray:
        """(S, S) bool. Kept packed, as a training run holds thousands of prepared scenes."""
        return np.unpackbits(self.packed_mask, count=self.side * self.side).view(bool).reshape(self.side, self.side)


@dataclass
class PreparedScene:
    image: torch.Tensor  # (3, S, S) uint8, resized and padded
    caption_ids: list[int]
    caption_boxes: np.ndarray  # (T, 4) normalized to the model square
    caption_located: np.ndarray  # (T,) bool
    objects: list[PreparedObject]
    objects_labeled: bool = False  # every object is in `objects` (a proposal-head target); False for LN records


def prepare_record(
    image: np.ndarray, record: dict, image_size: int, tokenizer: Tokenizer, padding: str = "black"
) -> PreparedScene:
    """An image (H, W, 3) and its Localized-Narratives record -> the caption task's inputs and targets; the image
    padded with `padding` (the model's `image_padding`)."""
    h, w = image.shape[:2]
    tensor, _ = preprocess(image, image_size, padding)
    to_square = np.array([w, h, w, h], dtype=np.float32) / max(h, w)  # image-normalized -> square-normalized
    targets = token_targets(record["caption"], word_locations(record), tokenizer)
    return PreparedScene(
        image=(tensor * 255).round().to(torch.uint8),
        caption_ids=targets.ids,
        caption_boxes=targets.boxes * to_square,
        caption_located=targets.located,
        objects=[],
    )


def prepare_scene(scene: Scene, image_size: int, tokenizer: Tokenizer, padding: str = "black") -> PreparedScene:
    """A synthetic scene: its narrative's caption targets plus every object's box, mask and texts."""
    prepared = prepare_record(scene.image, scene.narrative, image_size, tokenizer, padding)
    h, w = scene.image.shape[:2]
    transform = ImageTransform(h, w, image_size)
    nh, nw = round(h * transform.scale), round(w * transform.scale)
    for obj in scene.objects:
        mask = np.zeros((image_size, image_size), dtype=bool)
        resized = Image.fromarray(obj.mask.astype(np.uint8) * 255).resize((nw, nh), Image.BILINEAR)
        mask[:nh, :nw] = np.asarray(resized) >= 128
        prepared.objects.append(
            PreparedObject(
                box=np.asarray(obj.box, dtype=np.float32) / max(h, w),
                packed_mask=np.packbits(mask),
                side=image_size,
                region_caption=region_caption(obj),
                referring=obj.referring,
            )
        )
    prepared.objects_labeled = True
    return prepared


def make_sample(
    scene: PreparedScene, task: str, rng: np.random.Generator, cfg: PixelLLMConfig, tokenizer: Tokenizer
) -> dict:
    """One training sample of `task` from `scene` (random choices from `rng`)."""
    s = cfg.image_size
    sample = {
        "image": scene.image,
        "box": np.zeros(4, np.float32),
        "has_box": False,
        "point": np.zeros(2, np.float32),
        "has_point": False,
        "mask": None,
        "mask_box": np.zeros(4, np.float32),
        "object_boxes": np.array([o.box for o in scene.objects], np.float32).reshape(-1, 4),
        "objects_labeled": scene.objects_labeled,
    }
    if task == "caption" or not scene.objects:  # a scene without objects (a narrative) gives a caption
        sample.update(
            task="caption",
            prompt=cfg.caption_prompt,
            ids=scene.caption_ids,
            boxes=scene.caption_boxes,
            located=scene.caption_located,
        )
        return sample
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    if task == "referring":
        text = obj.referring
        ids = tokenizer.encode(text)
        located = np.ones(len(ids), dtype=bool)
        sample.update(prompt=cfg.localize_prompt + text, mask=obj.mask, mask_box=obj.box * s)
    else:
        text = obj.region_caption
        ids = tokenizer.encode(text)
        located = np.array([i != EOS_ID for i in ids])
        if task == "region_box":
            x0, y0, x1, y1 = obj.box * s
            jitter = rng.normal(0, 0.05, 4) * np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0])
            box = np.clip(np.array([x0, y0, x1, y1]) + jitter, 0, s)
            sample.update(box=box.astype(np.float32), has_box=True)
        else:
            ys, xs = np.nonzero(obj.mask)
            k = int(rng.integers(len(xs))) if len(xs) else 0
            point = np.array([xs[k] + 0.5, ys[k] + 0.5]) if len(xs) else (obj.box[:2] + obj.box[2:]) / 2 * s
            sample.update(point=point.astype(np.float32), has_point=True)
        sample["prompt"] = cfg.region_prompt
    sample.update(task=task, ids=ids, boxes=np.tile(obj.box, (len(ids), 1)), located=located)
    return sample


def collate(samples: list[dict], max_text_tokens: int) -> dict:
    """Stack samples into the batch `PixelLLM.forward` takes."""
    b = len(samples)
    t = min(max(len(x["ids"]) for x in samples), max_text_tokens)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    corners = torch.zeros(b, t, 2, 2)
    located = torch.zeros(b, t, dtype=torch.bool)
    for i, x in enumerate(samples):
        n = min(len(x["ids"]), t)
        labels[i, :n] = torch.tensor(x["ids"][:n])
        corners[i, :n] = torch.from_numpy(np.asarray(x["boxes"][:n], np.float32)).view(n, 2, 2)
        located[i, :n] = torch.from_numpy(np.asarray(x["located"][:n], bool))
    size = samples[0]["image"].shape[-1]
    masks = torch.zeros(b, size, size)
    for i, x in enumerate(samples):
        if x["mask"] is not None:
            masks[i] = torch.from_numpy(x["mask"]).float()
    return {
        "images": torch.stack([x["image"] for x in samples]).float() / 255,
        "prompts": [x["prompt"] for x in samples],
        "boxes": torch.from_numpy(np.stack([x["box"] for x in samples])),
        "box_mask": torch.tensor([x["has_box"] for x in samples]),
        "points": torch.from_numpy(np.stack([x["point"] for x in samples])),
        "point_mask": torch.tensor([x["has_point"] for x in samples]),
        "labels": labels,
        "target_corners": corners,
        "located": located,
        "mask_boxes": torch.from_numpy(np.stack([x["mask_box"] for x in samples])),
        "mask_targets": masks,
        "mask_valid": torch.tensor([x["mask"] is not None for x in samples]),
        "object_boxes": [torch.from_numpy(x["object_boxes"]) for x in samples],
        "objects_valid": torch.tensor([x["objects_labeled"] for x in samples]),
    }
