"""Image preprocessing and coordinate mapping between input-image pixels and the model's square input.

An image of H x W is resized so its longer side is S (the model's `image_size`), keeping the aspect
ratio, and padded at the right/bottom to S x S (as SAM does; with black or SAM's pixel mean, per the model's
`image_padding`). So a point (x, y) in image pixels is
(x * s, y * s) in model-input pixels with s = S / max(H, W), and a normalized model output u in [0, 1]
is u * max(H, W) in image pixels.

A photo much larger than the model input can be decoded at reduced size (`decode`: JPEG at 1/2, 1/4 or 1/8 scale,
never below the model input); its `DecodedImage` keeps the file's size, and every coordinate stays in the file's
pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image

from .config import IMAGE_PADDINGS
from .modeling.image_encoder import SAM_PIXEL_MEAN

# the padding's colour, RGB in [0, 1], by `PixelLLMConfig.image_padding`
PADDING_RGB = {"black": (0.0, 0.0, 0.0), "mean": SAM_PIXEL_MEAN}


@dataclass(frozen=True)
class ImageTransform:
    """The resize of one image: original (height, width) and the model input side S."""

    height: int
    width: int
    image_size: int

    @property
    def scale(self) -> float:
        return self.image_size / max(self.height, self.width)

    def to_model(self, xy: np.ndarray) -> np.ndarray:
        """Image pixels (..., 2k) -> model-input pixels."""
        return np.asarray(xy, dtype=np.float32) * self.scale

    def from_normalized(self, uv: np.ndarray) -> np.ndarray:
        """Model outputs in [0, 1] of the square input (..., 2k) -> image pixels, clipped to the image."""
        xy = np.asarray(uv, dtype=np.float64) * max(self.height, self.width)
        xy[..., 0::2] = xy[..., 0::2].clip(0, self.width)
        xy[..., 1::2] = xy[..., 1::2].clip(0, self.height)
        return xy

    def mask_from_model(self, mask_logits: torch.Tensor) -> np.ndarray:
        """Mask logits (S, S) of the model input -> boolean mask (H, W) of the image."""
        h, w = max(1, round(self.height * self.scale)), max(1, round(self.width * self.scale))  # as `preprocess`
        crop = mask_logits[None, None, :h, :w].float()
        full = F.interpolate(crop, size=(self.height, self.width), mode="bilinear", align_corners=False)
        return (full[0, 0] > 0).cpu().numpy()


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image decoded from a file of `height` x `width` pixels (EXIF orientation applied), possibly at a
    reduced size (`decode`): boxes, points and masks are in the file's pixels, not `image`'s."""

    image: Image.Image
    height: int
    width: int


def decode(img: Image.Image, image_size: int | None = None) -> DecodedImage:
    """An opened, not yet loaded image -> RGB (`to_rgb`), EXIF orientation applied.

    With `image_size` (the model input side S) a JPEG is decoded at the smallest of 1/2, 1/4 and 1/8 scale whose
    longer side is still at least S (libjpeg's DCT scaling; benchmarks/service_bench.py times a 4000x3000 photo both
    ways), as the model input is resized from it anyway; other formats decode in full.
    `img` is changed by the decode.
    """
    width, height = img.size
    turn = orientation(img)  # before loading, which would also read a PNG's EXIF after the pixels: browsers do not
    if image_size is not None:
        scale = image_size / max(width, height)
        img.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
    img.load()
    if turn in (5, 6, 7, 8):  # a quarter turn: the sides swap
        width, height = height, width
    shown = to_rgb(upright(img, turn))
    # Shown as it is now: a WebP's tag, still there, would turn it once the image no longer says it is a WebP.
    for key in ("exif", "xmp"):
        shown.info.pop(key, None)
    return DecodedImage(shown, height, width)


def orientation(img: Image.Image) -> int:
    """The EXIF orientation `img` is shown in, 1 (as stored) to 8, by the browsers' rule: a JPEG's or PNG's tag is
    applied, a WebP's is not (Chromium draws a WebP as stored whatever its tag says; tests/test_server_browser.py
    checks both), so coordinates are those of the image a user sees on a web page. The tag is read from the EXIF
    block only, as browsers read it (Pillow's `getexif` would also take one from XMP); an EXIF block that cannot
    be read says 1, as browsers show such a file. A WebP converted (`.convert`) before it gets here no longer says
    it is one: pass it as opened, or through `decode`."""
    data = img.info.get("exif")
    if img.format == "WEBP" or not isinstance(data, bytes):
        return 1
    exif = Image.Exif()
    try:
        exif.load(data)
        tag = exif.get(ExifTags.Base.Orientation)
    except Exception:  # Pillow's TIFF reader raises SyntaxError, struct.error, ValueError... on damaged blocks
        return 1
    return tag if isinstance(tag, int) and 1 <= tag <= 8 else 1


# how to turn an image of each EXIF orientation upright (ImageOps.exif_transpose's table)
UPRIGHT_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright(img: Image.Image, turn: int | None = None) -> Image.Image:
    """`img` turned as its EXIF `orientation` (`turn`, when already read) says; `img` itself, not a copy, when it
    says nothing to turn. A turned image has no EXIF block, so nothing turns it again (`ImageOps.exif_transpose`
    rewrites the block instead, and fails on one with a damaged tag)."""
    turn = orientation(img) if turn is None else turn
    if turn == 1:
        return img
    turned = img.transpose(UPRIGHT_TRANSPOSE[turn])
    turned.info.pop("exif", None)
    return turned


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any PIL mode: 16/32-bit integers scaled to 8 bits, floats read as [0, 1] (as [0, 255] when
    some value is above 1, clipped), transparency composited onto white.

    One rule for every way in (Python API, CLI, service), so a transparent or 16-bit PNG gives the same answer.
    """
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A PIL image (any mode, see `to_rgb`; its EXIF orientation applied, as `decode` does) or an (H, W, 3) uint8
    array -> (H, W, 3) uint8 RGB array."""
    if isinstance(image, (str, PurePath)):
        raise TypeError(f"got the path {str(image)!r}, not an image: open it first, e.g. PIL.Image.open(path)")
    array = np.asarray(to_rgb(upright(image)) if isinstance(image, Image.Image) else image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got shape {array.shape} dtype {array.dtype}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image is empty: shape {array.shape}")
    return array


def preprocess(
    image: Image.Image | np.ndarray | DecodedImage, image_size: int, padding: str = "black"
) -> tuple[torch.Tensor, ImageTransform]:
    """Image -> model input (3, S, S) in [0, 1] (resized longest side, padded with `padding`, a name of
    `PADDING_RGB`) and its transform (of the file's size, for a `DecodedImage`)."""
    if padding not in IMAGE_PADDINGS:
        raise ValueError(f"padding is {padding!r}: it must be one of {', '.join(IMAGE_PADDINGS)}")
    if isinstance(image, DecodedImage):
        array, (h, w) = to_rgb_array(image.image), (image.height, image.width)
    else:
        array = to_rgb_array(image)
        h, w = array.shape[:2]
    transform = ImageTransform(h, w, image_size)
    nh, nw = max(1, round(h * transform.scale)), max(1, round(w * transform.scale))
    resized = np.asarray(Image.fromarray(array).resize((nw, nh), Image.BILINEAR), dtype=np.float32) / 255.0
    out = torch.tensor(PADDING_RGB[padding]).view(3, 1, 1).repeat(1, image_size, image_size)
    out[:, :nh, :nw] = torch.from_numpy(resized).permute(2, 0, 1)
    return out, transform
