"""Decode untrusted image bytes into an RGB `PIL.Image`, refusing what could hurt the service."""

from __future__ import annotations

import hashlib
import io

from PIL import Image, UnidentifiedImageError

from pixelllm.transforms import DecodedImage, decode

from .errors import ApiError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


def signature_format(data: bytes) -> str | None:
    """The allowed format whose signature `data` starts with, if any: Pillow's open refuses a file whose header is
    damaged as it refuses one of another format, but the first is a corrupt image (422), the second a wrong type."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM"):
        return "BMP"
    return None


def image_key(data: bytes) -> str:
    """The cache key of an image: a hash of its bytes."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _bad(message: str) -> ApiError:
    return ApiError(422, "invalid_image", message)


def _too_large(message: str) -> ApiError:
    return ApiError(413, "image_too_large", message)


def check_size(width: int, height: int, max_pixels: int, max_aspect: float) -> None:
    """Refuse empty, too many pixels (ours or Pillow's MAX_IMAGE_PIXELS, whichever is lower), too thin."""
    if width < 1 or height < 1:
        raise _bad(f"image has no pixels ({width}x{height})")
    budget = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    if width * height > budget:
        raise _too_large(f"image is {width}x{height} = {width * height} pixels; the limit is {budget}")
    if max(width, height) / min(width, height) > max_aspect:
        raise _bad(f"image is {width}x{height}; the longest side may be at most {max_aspect:g}x the shortest")


def decode_image(data: bytes, max_pixels: int, max_aspect: float, image_size: int | None = None) -> DecodedImage:
    """An RGB image from PNG/JPEG/WEBP/BMP/GIF bytes (GIF: first frame), EXIF orientation applied
    (`pixelllm.transforms.orientation`); with the model input side `image_size`, a large JPEG decoded at reduced
    scale (`pixelllm.transforms.decode`).

    Raises `ApiError`: 415 for an unknown format, 413 for too many pixels (checked from the header,
    before decoding), 422 for empty, corrupt, truncated or degenerate images.
    """
    if not data:
        raise _bad("image is empty")
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        check_size(*img.size, max_pixels, max_aspect)
        decoded = decode(img, image_size)
    except ApiError:
        raise
    except UnidentifiedImageError as exc:
        fmt = signature_format(data)
        if fmt is not None:
            raise _bad(f"corrupt {fmt} image: its header cannot be read") from exc
        raise ApiError(415, "unsupported_media_type", f"not a {'/'.join(ALLOWED_FORMATS)} image") from exc
    except Image.DecompressionBombError as exc:
        raise _too_large(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on corrupt input
        raise _bad(f"could not decode image: {type(exc).__name__}: {exc}") from exc
    return decoded
