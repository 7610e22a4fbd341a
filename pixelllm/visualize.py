"""Overlay renderer: a caption or a localization drawn on its image (PNG-ready PIL image).

Each word gets a color; its box is outlined and its point marked in that color, the caption is written
below the image with each word in its color, and a mask is blended in. Line widths, marker and font sizes
scale with the image so the overlay reads at any size.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .predictor import Caption, Localization, Region
from .transforms import DecodedImage, to_rgb_array


def word_colors(n: int) -> list[tuple[int, int, int]]:
    """n well-separated colors (golden-ratio hues)."""
    return [tuple(int(c * 255) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 0.95)) for i in range(n)]


def canvas(image: Image.Image | np.ndarray | DecodedImage) -> Image.Image:
    """An RGB copy of `image` to draw on, in the pixels results are given in (a `DecodedImage` decoded at reduced
    scale is scaled back to its file's size)."""
    if isinstance(image, DecodedImage):
        return image.image.convert("RGB").resize((image.width, image.height), Image.BILINEAR)
    return Image.fromarray(to_rgb_array(image))


def render_overlay(image: Image.Image | np.ndarray | DecodedImage, result: Caption | Localization) -> Image.Image:
    """`image` with `result`'s words (points and boxes), its box and mask if any, and its text below."""
    base = canvas(image)
    w, h = base.size
    scale = max(w, h) / 512
    line = max(1, round(2 * scale))
    radius = max(2, round(4 * scale))
    font = ImageFont.load_default(size=max(10, round(14 * scale)))
    if isinstance(result, Localization) and result.mask is not None:
        tint = np.asarray(base, dtype=np.float32)
        tint[result.mask] = 0.55 * tint[result.mask] + 0.45 * np.array([30, 144, 255])
        base = Image.fromarray(tint.astype(np.uint8))
    colors = word_colors(len(result.words))
    draw = ImageDraw.Draw(base)
    for word, color in zip(result.words, colors):
        draw.rectangle(word.box, outline=color, width=line)
        x, y = word.point
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color, outline=(0, 0, 0))
    if isinstance(result, Localization):
        draw.rectangle(result.box, outline=(255, 255, 255), width=line * 2)
    return _with_text(base, result.text, [(w.start, w.end) for w in result.words], colors, font)


def render_dense(image: Image.Image | np.ndarray | DecodedImage, regions: list[Region]) -> Image.Image:
    """`image` with each dense-caption region's box in its color and number; numbered captions below."""
    base = canvas(image)
    scale = max(base.size) / 512
    line = max(1, round(2 * scale))
    font = ImageFont.load_default(size=max(10, round(14 * scale)))
    colors = word_colors(len(regions))
    draw = ImageDraw.Draw(base)
    text, spans = "", []
    for i, (region, color) in enumerate(zip(regions, colors), start=1):
        draw.rectangle(region.box, outline=color, width=line)
        draw.text((region.box[0] + line + 1, region.box[1] + line), str(i), fill=color, font=font)
        label = f"{i}. {region.caption.text} ({region.score:.2f})"
        spans.append((len(text), len(text) + len(label)))
        text += label + "   "
    return _with_text(base, text.rstrip() or "no regions", spans, colors, font)


def _with_text(image: Image.Image, text: str, spans: list[tuple[int, int]], colors, font) -> Image.Image:
    """Append a band below `image` with `text` wrapped to its width, each (start, end) span in its color."""
    w = image.width
    probe = ImageDraw.Draw(image)
    line_h = probe.textbbox((0, 0), "Ag", font=font)[3] + 4
    pieces, pos = [], 0  # (text, color): the words and the text between them
    for (start, end), color in zip(spans, colors):
        pieces += [(text[pos:start], None), (text[start:end], color)]
        pos = end
    pieces.append((text[pos:], None))
    rows, x = [[]], 4.0
    for piece, color in pieces:
        width = probe.textlength(piece, font=font)
        if x + width > w - 4 and rows[-1]:
            rows.append([])
            x = 4.0
        rows[-1].append((piece, color, x))
        x += width
    band = Image.new("RGB", (w, line_h * len(rows) + 8), (20, 20, 20))
    draw = ImageDraw.Draw(band)
    for r, row in enumerate(rows):
        for piece, color, x in row:
            draw.text((x, 4 + r * line_h), piece, fill=color or (230, 230, 230), font=font)
    out = Image.new("RGB", (w, image.height + band.height))
    out.paste(image, (0, 0))
    out.paste(band, (0, image.height))
    return out
